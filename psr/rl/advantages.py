"""Group-relative advantages (GRPO, REFERENCE §4).

A batch holds B / G groups of G rollouts that share a prompt and references, stored
contiguously: rows [g·G, (g+1)·G) are group g. Each rollout's advantage is its reward minus
its group's mean, divided by a spread, then clipped:

    scope="group":  A = (r − mean_group) / (std_group + eps)
    scope="batch":  A = (r − mean_group) / (std_batch + eps)

std is the population std (ddof = 0). The batch std is the std of all B rewards; it keeps a
group whose rewards barely differ from having its noise blown up to ±1. A group whose rewards
are all equal carries no preference: its advantages are exactly 0 in both scopes.
"""

from __future__ import annotations

import math

import torch

SCOPES = ("group", "batch")


def group_advantages(rewards: torch.Tensor, group_size: int, scope: str = "group", clip: float | None = 5.0,
                     eps: float = 1e-6) -> torch.Tensor:
    """rewards [B] (B a multiple of group_size) → advantages [B] float32, clipped to ±clip
    (None: no clipping)."""
    rewards = torch.as_tensor(rewards)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be a [B] tensor, got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 to compare rollouts within a group, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"batch of {rewards.numel()} rewards is not a whole number of groups of {group_size}")
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r}: choose one of {', '.join(SCOPES)}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be > 0, got {eps}")
    r = rewards.detach().to(torch.float64)
    if not bool(torch.isfinite(r).all()):
        raise ValueError(f"rewards must be finite, got {rewards.tolist()}")
    groups = r.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    # The mean of equal floats can differ from them in the last bit: zero such groups exactly.
    constant = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)
    centred = torch.where(constant, torch.zeros_like(centred), centred)
    if scope == "group":
        spread = groups.std(dim=1, unbiased=False, keepdim=True)
    else:
        spread = r.std(unbiased=False)
    adv = centred / (spread + eps)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.reshape(-1).to(torch.float32).to(rewards.device)
