"""GRPO / GSPO on the multi-reference model: rollouts, rewards, advantages, the policy update.

A step of process `rank` (the workflow in psr/workflows/rl.py drives it):

1. `rollout` per prompt: G images share the prompt and references (and, with
   `same_noise`, the initial noise); `sde_sample` runs Flow-GRPO's SDE on the trained steps
   (or on all steps) and records latents, per-step log-probs (fp32) and the schedule.
2. `score`: the decoded images of all groups go through the reward mix in one batch.
3. `advantages`: group-relative, from the rewards of every process (so "batch" scope
   sees the whole batch); each group lives in one process.
4. `update`: for the trained steps, the log-prob of the stored transition is recomputed
   under the current policy (velocity with grad) and the objective applied; the optional
   KL term compares the transition means with the reference (adapters disabled).
   GRPO is a mean over (trajectory, step) entries, so each (group, step) chunk is
   backpropagated on its own; GSPO's ratio spans a trajectory, so each group is one chunk
   (its graph holds the group's trained steps). Either way the sum of the chunks' gradients
   equals the gradient of the objective over the whole batch.

Every random draw is a function of (seed, step, rank, group, image): a resumed run draws
exactly what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from psr.core import images as imgs
from psr.core.sampler import flux_schedule
from psr.rewards import RewardBatch
from psr.rl.losses import grpo_loss, gspo_loss
from psr.rl.policy import Conditioning, Policy, condition
from psr.rl.sde import Trajectory, closed_form_kl, sde_sample, sde_step

# Salts that keep the streams of one (seed, step, rank, group) apart.
NOISE, SDE, TRAINED = 0x1017, 0x5DE, 0x57E9


def seed_of(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixing)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def generator(*parts: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed_of(*parts))


def trained_steps(cfg, seed: int, step: int) -> list[int]:
    """The denoising steps trained at `step`: the recipe's explicit list, or a random
    `train_fraction` of them drawn from (seed, step), the same on every process."""
    if cfg.train_steps:
        return sorted(cfg.train_steps)
    rng = np.random.default_rng([seed, step, TRAINED])
    return sorted(int(j) for j in rng.choice(cfg.steps, cfg.trained_count(), replace=False))


class TimedReward:
    """A reward callable that adds up the seconds spent in it (the log's reward_time_share)."""

    def __init__(self, reward: Callable):
        self.reward, self.seconds = reward, 0.0

    def __call__(self, batch):
        start = time.perf_counter()
        try:
            return self.reward(batch)
        finally:
            self.seconds += time.perf_counter() - start


@dataclass
class Group:
    """One prompt's G rollouts."""

    item: Any
    references: list
    cond: Conditioning
    trajectory: Trajectory
    images: list
    """G decoded PIL images."""


def schedule_for(model, steps: int, grid: tuple[int, int]):
    return flux_schedule(model.components.scheduler.config, steps, grid[0] * grid[1])


def rollout(policy: Policy, item, cfg, chosen: list[int], seed: int, step: int, rank: int, index: int) -> Group:
    """G SDE rollouts of `item` (cfg: the resolved rollout section)."""
    model, g = policy.model, cfg.group_size
    references = item.references()
    cond = condition(model, item.prompt, references, cfg.size, g, cfg.guidance)
    seeds = [seed_of(seed, step, rank, index, 0 if cfg.same_noise else k, NOISE) for k in range(g)]
    latents = model.noise(seeds, cfg.size, cfg.size).to(policy.dtype)
    generators = [generator(seed, step, rank, index, k, SDE) for k in range(g)]
    trajectory = sde_sample(lambda x, t: policy.velocity(x, t, cond), latents, schedule_for(model, cfg.steps, cond.grid),
                            cfg.noise_level, generators, chosen if cfg.sde_steps == "trained" else None)
    images = imgs.to_pil(model.decode(trajectory.final, cfg.size, cfg.size).float())
    return Group(item, references, cond, trajectory, images)


def reward_batch(groups: list[Group]):
    """One `RewardBatch` of every group's images, in group order."""
    images, prompts, references, categories = [], [], [], []
    for group in groups:
        for image in group.images:
            images.append(image)
            prompts.append(group.item.prompt)
            references.append(group.references)
            categories.append(list(group.item.categories))
    return RewardBatch(images, prompts, references, categories)


def reward_stats(totals: torch.Tensor, terms: dict[str, torch.Tensor], group_size: int) -> dict[str, float]:
    """Logged statistics of a batch's rewards (totals [B], terms [B] with NaN = undefined)."""
    groups = totals.double().view(-1, group_size)
    out = {"reward": totals.double().mean().item(), "reward_std": totals.double().std(unbiased=False).item(),
           "group_reward_std": groups.std(dim=1, unbiased=False).mean().item()}
    for name, values in sorted(terms.items()):
        defined = values[~torch.isnan(values)].double()
        out[f"reward/{name}"] = defined.mean().item() if defined.numel() else float("nan")
    return out


def _step_log_prob(policy: Policy, group: Group, j: int, noise_level: float, kl: bool):
    """(log-prob [G] with grad, KL [G] or None) of group's stored transition j → j+1."""
    traj, cond = group.trajectory, group.cond
    sigmas = traj.sigmas.tolist()
    x, x_next = traj.latents[:, j], traj.latents[:, j + 1]
    t = traj.timesteps[j].expand(x.shape[0]).to(x.device)
    v = policy.velocity(x, t, cond, grad=True)
    new = sde_step(x, v, sigmas[j], sigmas[j + 1], noise_level, prev_sample=x_next)
    divergence = None
    if kl:
        v_ref = policy.velocity(x, t, cond, reference=True)
        ref = sde_step(x, v_ref, sigmas[j], sigmas[j + 1], noise_level, prev_sample=x_next)
        divergence = closed_form_kl(new.mean, ref.mean, new.std)
    return new.log_prob, divergence


def update(policy: Policy, groups: list[Group], advantages: torch.Tensor, chosen: list[int], objective: str,
           cfg, noise_level: float, *, backward: Callable[[torch.Tensor], None],
           sync: Callable[[bool], Any] = lambda last: contextlib.nullcontext(),
           aux: Callable[[], torch.Tensor] | None = None) -> dict[str, float]:
    """One pass over the rollout batch with gradients (module docstring, step 4).

    advantages [B] (B = groups · G, group order); cfg: the recipe's policy section;
    backward(loss) backpropagates one chunk; sync(last) wraps a chunk's forwards and
    backward (gradient synchronisation only for the last); aux() adds MoE-LoRA's
    load-balancing term of the chunk's forwards. Returns the unweighted statistics.
    """
    g = groups[0].trajectory.latents.shape[0]
    beta = cfg.kl_beta
    chunks = [(k, [j]) for k in range(len(groups)) for j in chosen] if objective == "grpo" else \
        [(k, list(chosen)) for k in range(len(groups))]
    share = 1.0 / len(chunks)
    totals: dict[str, float] = {}
    for n, (k, steps) in enumerate(chunks):
        group, adv = groups[k], advantages[k * g:(k + 1) * g]
        with sync(n == len(chunks) - 1), policy.token_mask(group.cond):
            pairs = [_step_log_prob(policy, group, j, noise_level, beta > 0) for j in steps]
            new = torch.stack([p[0] for p in pairs], dim=1)
            old = group.trajectory.log_probs[:, steps].to(new.device)
            if objective == "grpo":
                loss, stats = grpo_loss(new, old, adv.to(new.device), clip_range=cfg.clip_range)
            else:
                loss, stats = gspo_loss(new, old, adv.to(new.device), clip_low=cfg.clip_low, clip_high=cfg.clip_high)
            total = loss
            stats["policy_loss"] = loss.item()
            if beta > 0:
                kl = torch.stack([p[1] for p in pairs], dim=1).mean()
                total = total + beta * kl
                stats["kl"] = kl.item()
            if aux is not None:
                moe = aux()
                total = total + moe.to(total.device)
                stats["moe_aux"] = moe.item()
            stats["loss"] = total.item()
            backward(total * share)
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value * share
    return totals
