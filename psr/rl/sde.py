"""Flow-GRPO's ODE→SDE sampling step, with the log-probabilities a policy gradient needs.

The deterministic Euler step of `psr.core.sampler` (x ← x + dt·v, dt = σ' − σ < 0) becomes
a Gaussian transition with the same marginals (REFERENCE §4). With noise level a:

    std_dev_t = sqrt(σ / (1 − σ)) · a            (at σ = 1: sqrt(σ / (1 − σ')) · a)
    mean      = x·(1 + std_dev_t²/(2σ)·dt) + v·(1 + std_dev_t²·(1 − σ)/(2σ))·dt
    x'        = mean + std_dev_t·sqrt(−dt)·ε,     ε ~ N(0, I)
    log p(x') = mean over every non-batch dim of log N(x'; mean, (std_dev_t·sqrt(−dt))²)

At σ = 1 the factor σ/(1 − σ) is infinite; like Flow-GRPO, psr divides by 1 − σ' (the
schedule's next sigma) there instead. With a = 0 the step is exactly the Euler step, and a
deterministic step has no density: its log-prob (and its KL) is reported as 0, and the
trained-step mask keeps such steps out of every loss.

Everything is computed in float32 whatever the latents' dtype; the sampled x' is returned in
the latents' dtype and its log-prob is taken of that rounded value, so recomputing the
log-prob from the stored trajectory (`prev_sample=`) gives the same number bit for bit.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from psr.core.sampler import Schedule

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class SdeStep:
    prev_sample: torch.Tensor
    """[B, ...] x at σ', in the dtype of `x` (the given `prev_sample` when one was passed)."""
    mean: torch.Tensor
    """[B, ...] float32: the transition's mean."""
    std: torch.Tensor
    """[B] float32: the transition's standard deviation std_dev_t·sqrt(−dt) (0 for a = 0)."""
    log_prob: torch.Tensor
    """[B] float32: log N(prev_sample; mean, std²) averaged over the non-batch dims (0 where std = 0)."""
    std_dev_t: torch.Tensor
    """[B] float32: the SDE's noise scale sqrt(σ/(1−σ))·a, without the step's sqrt(−dt)
    (what Flow-GRPO's KL divides by)."""


def _per_sample(value: float | torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """A scalar or [B] sigma as a float64 CPU tensor [B] (coefficients are small; float64
    keeps them exact before the one rounding to float32)."""
    t = torch.as_tensor(value).detach().to("cpu", torch.float64)
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name} must be a number or a [{batch}] tensor, got shape {tuple(t.shape)}")
    return t


def _coefficients(sigma, sigma_next, noise_level: float, batch: int):
    """(c_x, c_v, std, std_dev_t) as float64 [B]: mean = c_x·x + c_v·v, x' = mean + std·ε,
    std = std_dev_t·sqrt(−dt)."""
    if not (math.isfinite(noise_level) and noise_level >= 0):
        raise ValueError(f"noise_level must be a finite number >= 0, got {noise_level}")
    s = _per_sample(sigma, batch, "sigma")
    s_next = _per_sample(sigma_next, batch, "sigma_next")
    if not bool(((s > 0) & (s <= 1)).all()):
        raise ValueError(f"sigma must lie in (0, 1], got {s.tolist()}")
    if not bool(((s_next >= 0) & (s_next < s)).all()):
        raise ValueError(f"sigma_next must lie in [0, sigma), got sigma={s.tolist()}, sigma_next={s_next.tolist()}")
    dt = s_next - s
    # σ = 1: divide by 1 − σ' instead of 0 (Flow-GRPO's rule).
    std_dev_t = torch.sqrt(s / (1 - torch.where(s == 1, s_next, s))) * noise_level
    var = std_dev_t**2
    c_x = 1 + var / (2 * s) * dt
    c_v = (1 + var * (1 - s) / (2 * s)) * dt
    return c_x, c_v, std_dev_t * torch.sqrt(-dt), std_dev_t


def _draw(shape: torch.Size, device: torch.device, generator: Generators) -> torch.Tensor:
    """Standard normal float32 noise; one generator per batch item keeps each image's noise
    independent of the batch it runs in."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=torch.float32)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float32)
                        for g in generator]).to(device)


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """float64 CPU [B] → float32 [B, 1, ...] on like's device."""
    return v.to(like.device, torch.float32).view(-1, *([1] * (like.ndim - 1)))


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(sample; mean, std²) averaged over the non-batch dims → [B] float32.

    `std` is [B]; where it is 0 the result is 0 (a deterministic step has no density).
    """
    std = std.to(mean.device, torch.float32)
    safe = torch.where(std > 0, std, torch.ones_like(std)).view(-1, *([1] * (mean.ndim - 1)))
    dens = -((sample.float() - mean) ** 2) / (2 * safe**2) - torch.log(safe) - _LOG_SQRT_2PI
    out = dens.flatten(1).mean(dim=1)
    return torch.where(std > 0, out, torch.zeros_like(out))


def sde_step(x: torch.Tensor, velocity: torch.Tensor, sigma: float | torch.Tensor,
             sigma_next: float | torch.Tensor, noise_level: float, generator: Generators = None,
             prev_sample: torch.Tensor | None = None) -> SdeStep:
    """One stochastic step from σ to σ' (< σ) for latents `x` [B, ...] and model velocity.

    sigma, sigma_next: numbers, or [B] tensors (one step per batch item).
    generator: None (torch's global RNG), one generator for the whole batch, or one per item.
    prev_sample: when given, no noise is drawn: the step scores this x' (the policy update
        recomputes log-probs of a stored trajectory; gradients flow through the mean only).
    """
    if velocity.shape != x.shape:
        raise ValueError(f"velocity shape {tuple(velocity.shape)} != latents shape {tuple(x.shape)}")
    c_x, c_v, std, std_dev_t = _coefficients(sigma, sigma_next, float(noise_level), x.shape[0])
    mean = x.float() * _view(c_x, x) + velocity.float() * _view(c_v, x)
    std32 = std.to(x.device, torch.float32)
    if prev_sample is None:
        prev_sample = mean
        if bool((std > 0).any()):
            prev_sample = mean + _view(std, x) * _draw(x.shape, x.device, generator)
        prev_sample = prev_sample.to(x.dtype)
    elif prev_sample.shape != x.shape:
        raise ValueError(f"prev_sample shape {tuple(prev_sample.shape)} != latents shape {tuple(x.shape)}")
    return SdeStep(prev_sample=prev_sample, mean=mean, std=std32,
                   log_prob=gaussian_log_prob(prev_sample.detach(), mean, std32),
                   std_dev_t=std_dev_t.to(x.device, torch.float32))


@dataclass(frozen=True)
class Trajectory:
    """One batch of SDE rollouts; T = number of steps of the schedule."""

    latents: torch.Tensor
    """[B, T+1, ...] x at sigmas[0..T] in the input dtype; latents[:, T] is the final sample."""
    log_probs: torch.Tensor
    """[B, T] float32: log-prob of the step j transition x_j → x_{j+1} (0 on ODE steps)."""
    timesteps: torch.Tensor
    """[T] the model time of each step (the schedule's timesteps)."""
    sigmas: torch.Tensor
    """[T+1] the schedule's sigmas."""
    means: torch.Tensor
    """[B, T, ...] float32: the transition means (the sampling policy's)."""
    stds: torch.Tensor
    """[B, T] float32: the transition stds (0 on ODE steps)."""
    trained: torch.Tensor
    """[T] bool: the steps that ran as SDE, i.e. carry a log-prob to train on."""

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]

    @property
    def mask(self) -> torch.Tensor:
        """[B, T] bool trained-step mask for the losses."""
        return self.trained.to(self.log_probs.device).expand_as(self.log_probs)


def _train_mask(train_steps: Iterable[int] | None, steps: int) -> torch.Tensor:
    if train_steps is None:
        return torch.ones(steps, dtype=torch.bool)
    mask = torch.zeros(steps, dtype=torch.bool)
    for j in train_steps:
        try:
            index = operator.index(j)
        except TypeError:
            index = -1
        if isinstance(j, bool) or not 0 <= index < steps:
            raise ValueError(f"train_steps must be step indices in [0, {steps}), got {j!r}")
        mask[index] = True
    if not bool(mask.any()):
        raise ValueError("train_steps is empty: at least one step must be stochastic")
    return mask


@torch.no_grad()
def sde_sample(velocity_fn: VelocityFn, latents: torch.Tensor, schedule: Schedule, noise_level: float,
               generators: Generators = None, train_steps: Iterable[int] | None = None,
               progress: Callable[[], None] | None = None) -> Trajectory:
    """Roll out from σ = 1 to 0 with SDE steps, recording what the policy update needs.

    velocity_fn(latents, timestep[B]) → velocity like latents (as `euler_sample` calls it).
    generators: as for `sde_step`; they advance only on stochastic steps.
    train_steps: the step indices that run as SDE (default all). The other steps run as
        the deterministic Euler (ODE) step, get log-prob 0 and are masked out of the losses.
        A single early index, or a short window, gives Flow-GRPO-Fast-style branching: the
        trajectory is deterministic except where the policy is trained, which concentrates
        the exploration (and the reward's credit) on those steps.
    """
    sigmas = schedule.sigmas.tolist()
    steps = len(schedule.timesteps)
    trained = _train_mask(train_steps, steps)
    xs, log_probs, means, stds = [latents], [], [], []
    for j, t in enumerate(schedule.timesteps):
        timestep = t.expand(latents.shape[0]).to(latents.device, latents.dtype)
        level = noise_level if bool(trained[j]) else 0.0
        step = sde_step(latents, velocity_fn(latents, timestep), sigmas[j], sigmas[j + 1], level, generators)
        latents = step.prev_sample
        xs.append(latents)
        log_probs.append(step.log_prob)
        means.append(step.mean)
        stds.append(step.std)
        if progress is not None:
            progress()
    return Trajectory(latents=torch.stack(xs, dim=1), log_probs=torch.stack(log_probs, dim=1),
                      timesteps=schedule.timesteps.clone(), sigmas=schedule.sigmas.clone(),
                      means=torch.stack(means, dim=1), stds=torch.stack(stds, dim=1), trained=trained)


def closed_form_kl(mean_theta: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """KL(π_θ ‖ π_ref) of one step's two Gaussian transitions that share `std` → [B] float32.

    Per dimension the KL is (μθ − μref)²/(2·std²); psr averages it over the non-batch dims,
    the same reduction as the log-probs, so β is per latent dimension. std: number or [B];
    where std = 0 (an ODE step) the KL is 0.
    """
    if mean_theta.shape != mean_ref.shape:
        raise ValueError(f"mean shapes differ: {tuple(mean_theta.shape)} vs {tuple(mean_ref.shape)}")
    batch = mean_theta.shape[0]
    std = torch.as_tensor(std, dtype=torch.float32, device=mean_theta.device)
    std = std.expand(batch) if std.ndim == 0 else std
    if std.shape != (batch,):
        raise ValueError(f"std must be a number or a [{batch}] tensor, got shape {tuple(std.shape)}")
    sq = (mean_theta.float() - mean_ref.float()).pow(2).flatten(1).mean(dim=1)
    safe = torch.where(std > 0, std, torch.ones_like(std))
    return torch.where(std > 0, sq / (2 * safe**2), torch.zeros_like(sq))


KL_CONVENTIONS = ("flow_grpo", "exact")


def step_kl(step: SdeStep, mean_ref: torch.Tensor, convention: str = "flow_grpo") -> torch.Tensor:
    """The KL penalty of one step between the policy's transition `step` and the reference
    transition with mean `mean_ref` → [B] float32.

    "exact": `closed_form_kl` with the transition std std_dev_t·sqrt(−dt), the true KL of the
        two Gaussians (per dimension, averaged over dims).
    "flow_grpo": Flow-GRPO's ((μθ − μref)²).mean(dims) / (2·std_dev_t²), the same expression
        with the noise scale std_dev_t in place of the transition std; it equals
        exact·|dt|, so Flow-GRPO's β values (0.04, 0.01) mean what they mean there.
    """
    if convention not in KL_CONVENTIONS:
        raise ValueError(f"KL convention {convention!r}: choose one of {', '.join(KL_CONVENTIONS)}")
    return closed_form_kl(step.mean, mean_ref, step.std if convention == "exact" else step.std_dev_t)
