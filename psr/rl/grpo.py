"""GRPO / GSPO on the multi-reference model: rollouts, rewards, advantages, the policy update.

A step of process `rank` (the workflow in psr/workflows/rl.py drives it):

1. `rollout` per prompt: G images share the prompt and references (and, with
   `same_noise`, the initial noise); `sde_sample` runs Flow-GRPO's SDE on the trained steps
   (or on all steps) and records latents, per-step log-probs (fp32) and the schedule.
2. `score`: the decoded images of all groups go through the reward mix in one batch.
3. `advantages`: group-relative, from the rewards of every process (so "batch" scope
   sees the whole batch); each group lives in one process.
4. `update`, once per optimizer step: the workflow runs `policy.inner_epochs` epochs, each
   cutting the batch into `policy.mini_batches` shuffled mini-batches (`mini_batches`); the
   advantages stay those of step 3. For the trained steps, the log-prob of the stored
   transition is recomputed under the current policy (velocity with grad) and the objective
   applied; the optional KL term compares the transition means with the reference
   (adapters disabled).
   Each (group, trained step, micro-batch of ≤ `train.micro_batch` images) is one chunk,
   backpropagated on its own, so one step's graph is alive at a time. GRPO is a mean over
   (trajectory, step) entries, so its chunks simply add up. GSPO's ratio spans a trajectory:
   a no-grad pass over the trained steps first gives every sequence ratio and whether its
   trajectory is clipped, then each chunk backpropagates the surrogate Σ w·log π whose
   weights w = ∂loss/∂log π (`gspo_log_prob_weights`) make the chunks' gradients add up to
   GSPO's. Either way the sum is the gradient of the objective over the mini-batch.

Every random draw is a function of (seed, step, group, image), with `group` the prompt's
index in the step's global batch (process rank's k-th group is rank·groups_per_step + k), so a
resumed run draws exactly what an uninterrupted one would and a step's rollouts do not depend
on how many processes share them. The mini-batch cut is a function of (seed, step, rank,
epoch): it permutes one process's trajectories, so with `policy.mini_batches` > 1 the
optimizer steps differ with the number of processes.
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
from psr.rl.losses import grpo_loss, gspo_log_prob_weights, gspo_loss
from psr.rl.policy import Conditioning, Policy, condition
from psr.rl.sde import Trajectory, sde_sample, sde_step, step_kl

# Salts that keep the streams of one (seed, step, rank, group) apart.
NOISE, SDE, TRAINED, SHUFFLE = 0x1017, 0x5DE, 0x57E9, 0x5F1E


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


def rollout(policy: Policy, item, cfg, chosen: list[int], seed: int, step: int, group: int) -> Group:
    """G SDE rollouts of `item` (cfg: the resolved rollout section), the `group`-th prompt of
    the step's global batch."""
    model, g = policy.model, cfg.group_size
    references = item.references()
    cond = condition(model, item.prompt, references, cfg.size, g, cfg.guidance)
    # The 0 holds the place the process index once had: one-process runs draw as before.
    seeds = [seed_of(seed, step, 0, group, 0 if cfg.same_noise else k, NOISE) for k in range(g)]
    latents = model.noise(seeds, cfg.size, cfg.size).to(policy.dtype)
    generators = [generator(seed, step, 0, group, k, SDE) for k in range(g)]
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


def mini_batches(size: int, parts: int, seed: int, step: int, rank: int, epoch: int) -> list[list[int]]:
    """The rows (trajectory indices, group order) of each optimizer step of inner epoch `epoch`.

    The process's `size` trajectories are permuted by a generator seeded from (seed, step,
    rank, epoch), so a resumed run cuts them exactly as before, and cut into `parts` equal
    mini-batches (each sorted, so a group's rows stay together). One part is the whole batch
    in its order.
    """
    if parts < 1 or size % parts:
        raise ValueError(f"{size} trajectories cannot be cut into {parts} equal mini-batches")
    if parts == 1:
        return [list(range(size))]
    order = torch.randperm(size, generator=generator(seed, step, rank, epoch, SHUFFLE)).tolist()
    n = size // parts
    return [sorted(order[k * n:(k + 1) * n]) for k in range(parts)]


def _step_log_prob(policy: Policy, group: Group, j: int, noise_level: float, rows: list[int],
                   kl: str | None = None, grad: bool = True):
    """(log-prob [n] with grad when `grad`, KL [n] or None) of the stored transitions j → j+1
    of the group's images `rows` (kl: the KL convention, None for no KL)."""
    traj = group.trajectory
    sigmas = traj.sigmas.tolist()
    # The whole group as a view, like the rollout saw it; a subset by index.
    index = slice(None) if len(rows) == traj.latents.shape[0] else torch.tensor(rows)
    x, x_next = traj.latents[index, j], traj.latents[index, j + 1]
    cond = group.cond.take(len(rows))
    t = traj.timesteps[j].expand(x.shape[0]).to(x.device)
    v = policy.velocity(x, t, cond, grad=grad)
    new = sde_step(x, v, sigmas[j], sigmas[j + 1], noise_level, prev_sample=x_next)
    divergence = None
    if kl is not None:
        v_ref = policy.velocity(x, t, cond, reference=True)
        ref = sde_step(x, v_ref, sigmas[j], sigmas[j + 1], noise_level, prev_sample=x_next)
        divergence = step_kl(new, ref.mean, kl)
    return new.log_prob, divergence


def _pieces(groups: list[Group], rows: list[int], micro_batch: int) -> list[tuple[int, list[int]]]:
    """(group, its images among `rows`) in group order, cut into at most `micro_batch`
    images each (0: a group's images in one piece)."""
    g = groups[0].trajectory.latents.shape[0]
    out = []
    for k in range(len(groups)):
        mine = [r - k * g for r in rows if k * g <= r < (k + 1) * g]
        if not mine:  # a shuffled mini-batch may leave a group out
            continue
        size = micro_batch or len(mine)
        out.extend((k, mine[i:i + size]) for i in range(0, len(mine), size))
    return out


def _gspo_weights(policy: Policy, groups: list[Group], pieces, rows: list[int], advantages: torch.Tensor,
                  chosen: list[int], cfg, noise_level: float):
    """GSPO's no-grad pass: the current log-probs of every trained step of `rows`, the loss,
    its statistics and ∂loss/∂log π per (row, step) (`gspo_log_prob_weights`). With adapter
    dropout this pass and the gradient pass draw different masks."""
    g = groups[0].trajectory.latents.shape[0]
    position = {r: i for i, r in enumerate(rows)}
    device = groups[0].trajectory.log_probs.device
    new = torch.zeros(len(rows), len(chosen), device=device)
    for k, piece in pieces:
        at = [position[k * g + i] for i in piece]
        with policy.token_mask(groups[k].cond):
            for n, j in enumerate(chosen):
                new[at, n] = _step_log_prob(policy, groups[k], j, noise_level, piece, grad=False)[0].to(device)
    old = torch.stack([groups[r // g].trajectory.log_probs[r % g, chosen].to(device) for r in rows])
    adv = advantages[rows].to(device)
    loss, stats = gspo_loss(new, old, adv, clip_low=cfg.clip_low, clip_high=cfg.clip_high)
    weights = gspo_log_prob_weights(new, old, adv, clip_low=cfg.clip_low, clip_high=cfg.clip_high)
    return weights, {"policy_loss": loss.item(), **stats}


def update(policy: Policy, groups: list[Group], advantages: torch.Tensor, chosen: list[int], objective: str,
           cfg, noise_level: float, *, backward: Callable[[torch.Tensor], None], rows: list[int] | None = None,
           micro_batch: int = 0, sync: Callable[[bool], Any] = lambda last: contextlib.nullcontext(),
           aux: Callable[[], torch.Tensor] | None = None) -> dict[str, float]:
    """The gradient of one optimizer step over the trajectories `rows` (module docstring, step 4).

    advantages [B] (B = groups · G, group order); rows: indices into B (None: all of them),
    one mini-batch; cfg: the recipe's policy section; micro_batch: at most this many images
    per forward (0: a group's images at once); backward(loss) backpropagates one chunk;
    sync(last) wraps a chunk's forwards and backward (gradient synchronisation only for the
    last); aux() adds MoE-LoRA's load-balancing term of the chunk's forwards. Returns the
    unweighted statistics (means over the mini-batch's trained entries).
    """
    if objective not in ("grpo", "gspo"):
        raise ValueError(f"objective {objective!r}: choose grpo or gspo")
    g = groups[0].trajectory.latents.shape[0]
    rows = list(range(len(groups) * g)) if rows is None else sorted(rows)
    if not rows:
        raise ValueError("an optimizer step needs at least one trajectory")
    beta = cfg.kl_beta
    kl = cfg.kl_convention if beta > 0 else None
    pieces = _pieces(groups, rows, micro_batch)
    totals: dict[str, float] = {}
    weights = None
    if objective == "gspo":
        weights, totals = _gspo_weights(policy, groups, pieces, rows, advantages, chosen, cfg, noise_level)
        totals["loss"] = totals["policy_loss"]
        position = {r: i for i, r in enumerate(rows)}
    chunks = [(k, piece, n, j) for k, piece in pieces for n, j in enumerate(chosen)]
    for c, (k, piece, n, j) in enumerate(chunks):
        group = groups[k]
        # Every (image, trained step) entry of the mini-batch weighs the same.
        share = len(piece) / (len(rows) * len(chosen))
        with sync(c == len(chunks) - 1), policy.token_mask(group.cond):
            new, divergence = _step_log_prob(policy, group, j, noise_level, piece, kl)
            stats: dict[str, float] = {}
            if objective == "grpo":
                old = group.trajectory.log_probs[piece, j].to(new.device)
                adv = advantages[[k * g + i for i in piece]].to(new.device)
                total, stats = grpo_loss(new[:, None], old[:, None], adv, clip_range=cfg.clip_range)
                stats["policy_loss"] = total.item()
            else:
                total = torch.zeros((), device=new.device)
            if divergence is not None:
                mean_kl = divergence.mean()
                total = total + beta * mean_kl
                stats["kl"] = mean_kl.item()
            if aux is not None:
                moe = aux()
                total = total + moe.to(total.device)
                stats["moe_aux"] = moe.item()
            if objective == "grpo":
                stats["loss"] = total.item()
                backward(total * share)
            else:
                # GSPO's surrogate: its gradient is the step's part of the sequence loss's.
                w = weights[[position[k * g + i] for i in piece], n].to(new.device)
                stats["loss"] = total.item()
                backward((w * new).sum() + total * share)
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value * share
    return totals
