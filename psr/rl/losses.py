"""Policy losses for online RL (GRPO, GSPO) and the Diffusion-DPO loss (REFERENCE §4).

Log-probs come from `psr.rl.sde` as [B, T]: trajectory b's step-j transition, averaged over
latent dims. `mask` [B, T] (bool) marks the trained steps; untrained entries never enter a
loss or a statistic. Old log-probs and advantages are constants (detached here).

GRPO (Flow-GRPO): one PPO ratio per (trajectory, step), clipped to 1 ± ε;
    loss = mean over trained (b, j) of max(−A_b·r_bj, −A_b·clip(r_bj, 1 − ε, 1 + ε)).
GSPO: the trajectory is the sequence, its trained denoising steps the tokens;
    s_b = exp(mean over trained j of (log π_θ − log π_old)), clipped once to [1 − ε_low, 1 + ε_high];
    loss = −mean over b of min(s_b·A_b, clip(s_b)·A_b).
    `gspo_log_prob_weights` gives ∂loss/∂log π per (b, j), so the loss's gradient can be
    backpropagated one step at a time.

Every statistic is a float: clip_fraction (share of ratios outside the clip range),
approx_kl (mean of ½·(log π_θ − log π_old)² over trained entries), ratio_mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GRPO_CLIP_RANGE = 1e-4  # Flow-GRPO's ε
# The GSPO paper's [1 − 3e-4, 1 + 4e-4] divided by 4: its 3:4 asymmetry with Flow-GRPO's ε
# as the upper bound. psr's step log-probs are means over the latent dims, the scale that
# Flow-GRPO's ε was set for, and s_b is a mean of those (docs/rl.md, "Clip range defaults").
GSPO_CLIP_LOW, GSPO_CLIP_HIGH = 7.5e-5, 1e-4


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of `values` over the entries where `mask` is true (all entries for None)."""
    if mask is None:
        return values.mean()
    mask = _check_mask(mask, values.shape)
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum()


def _check_mask(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if mask.shape != shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != log-prob shape {tuple(shape)}")
    mask = mask.to(torch.bool)
    if not bool(mask.any()):
        raise ValueError("mask selects no step: nothing to train on")
    return mask


def _check_inputs(new: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, mask):
    if new.ndim != 2 or new.shape != old.shape:
        raise ValueError(f"log-probs must both be [B, T], got {tuple(new.shape)} and {tuple(old.shape)}")
    if advantages.shape != new.shape[:1]:
        raise ValueError(f"advantages must be [{new.shape[0]}], got shape {tuple(advantages.shape)}")
    full = torch.ones_like(new, dtype=torch.bool)
    return _check_mask(mask, new.shape) if mask is not None else full


def grpo_loss(log_prob_new: torch.Tensor, log_prob_old: torch.Tensor, advantages: torch.Tensor,
              clip_range: float = GRPO_CLIP_RANGE, mask: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped per-step PPO loss. log_prob_* [B, T], advantages [B] → (scalar loss, stats)."""
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    mask = _check_inputs(log_prob_new, log_prob_old, advantages, mask)
    log_ratio = log_prob_new - log_prob_old.detach()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(ratio.dtype)[:, None]
    per_step = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range))
    loss = masked_mean(per_step, mask)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean(((ratio - 1).abs() > clip_range).float(), mask).item(),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
    return loss, stats


def gspo_loss(log_prob_new: torch.Tensor, log_prob_old: torch.Tensor, advantages: torch.Tensor,
              clip_low: float = GSPO_CLIP_LOW, clip_high: float = GSPO_CLIP_HIGH,
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Sequence-level clipped loss, one ratio per trajectory (see the module docstring).

    log_prob_* [B, T], advantages [B] → (scalar loss, stats). Every trajectory needs at
    least one trained step.
    """
    if not (0 < clip_low < 1 and clip_high > 0):
        raise ValueError(f"need 0 < clip_low < 1 and clip_high > 0, got {clip_low}, {clip_high}")
    mask = _check_inputs(log_prob_new, log_prob_old, advantages, mask)
    steps = mask.sum(dim=1)
    if not bool((steps > 0).all()):
        raise ValueError(f"trajectories {torch.nonzero(steps == 0).flatten().tolist()} have no trained step")
    log_ratio = log_prob_new - log_prob_old.detach()
    seq_log_ratio = torch.where(mask, log_ratio, torch.zeros_like(log_ratio)).sum(dim=1) / steps
    ratio = torch.exp(seq_log_ratio)
    adv = advantages.detach().to(ratio.dtype)
    loss = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv).mean()
    with torch.no_grad():
        outside = (ratio < 1 - clip_low) | (ratio > 1 + clip_high)
        stats = {
            "clip_fraction": outside.float().mean().item(),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask).item(),
            "ratio_mean": ratio.mean().item(),
        }
    return loss, stats


def gspo_log_prob_weights(log_prob_new: torch.Tensor, log_prob_old: torch.Tensor, advantages: torch.Tensor,
                          clip_low: float = GSPO_CLIP_LOW, clip_high: float = GSPO_CLIP_HIGH,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """∂ gspo_loss / ∂ log π_θ[b, j] at the given log-probs, [B, T] (no graph is needed).

    GSPO's gradient is then Σ_bj w_bj·∇log π_θ[b, j], a sum over steps, so the update can
    backpropagate one denoising step at a time with the surrogate Σ_b w_bj·log π_θ[b, j]
    instead of holding the graph of a whole trajectory. With s_b the sequence ratio and T_b
    the trajectory's trained steps,

        w_bj = −c_b·s_b / (T_b·B) on trained steps (0 elsewhere),
        c_b  = A_b where min(s_b·A_b, clip(s_b)·A_b) takes the unclipped term (ties included),
               0 where it takes the clipped constant (that trajectory gives no gradient).

    This is autograd's answer for `gspo_loss`, ties included (the minimum splits a tie's
    gradient in halves that add up again inside the clip range).
    """
    if not (0 < clip_low < 1 and clip_high > 0):
        raise ValueError(f"need 0 < clip_low < 1 and clip_high > 0, got {clip_low}, {clip_high}")
    new, old = log_prob_new.detach(), log_prob_old.detach()
    mask = _check_inputs(new, old, advantages, mask)
    steps = mask.sum(dim=1)
    if not bool((steps > 0).all()):
        raise ValueError(f"trajectories {torch.nonzero(steps == 0).flatten().tolist()} have no trained step")
    log_ratio = torch.where(mask, new - old, torch.zeros_like(new))
    ratio = torch.exp(log_ratio.sum(dim=1) / steps)
    adv = advantages.detach().to(ratio.dtype)
    unclipped = ratio * adv <= ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    coef = torch.where(unclipped, adv, torch.zeros_like(adv)) * ratio / (steps * new.shape[0])
    return torch.where(mask, -coef[:, None].expand_as(new), torch.zeros_like(new))


# Objective-specific options are keywords: grpo takes clip_range, gspo clip_low / clip_high;
# both take mask.
OBJECTIVES = {"grpo": grpo_loss, "gspo": gspo_loss}


def _reduce(err: torch.Tensor, weights: torch.Tensor | None, name: str) -> torch.Tensor:
    """[B, L] errors → [B]: plain mean, or the weighted mean Σ w·e / Σ w."""
    if weights is None:
        return err.mean(dim=1)
    weights = weights.to(err.device, err.dtype)
    if weights.ndim == 1:
        weights = weights.expand_as(err)
    if weights.shape != err.shape:
        raise ValueError(f"{name} shape {tuple(weights.shape)} does not match errors {tuple(err.shape)}")
    if bool((weights < 0).any()) or not bool((weights.sum(dim=1) > 0).all()):
        raise ValueError(f"{name} must be >= 0 with a positive sum in every row")
    return (err * weights).sum(dim=1) / weights.sum(dim=1)


def diffusion_dpo_loss(err_w_theta: torch.Tensor, err_w_ref: torch.Tensor, err_l_theta: torch.Tensor,
                       err_l_ref: torch.Tensor, beta: float, weights_w: torch.Tensor | None = None,
                       weights_l: torch.Tensor | None = None, timestep_scale: float = 1.0
                       ) -> tuple[torch.Tensor, dict[str, float]]:
    """Diffusion-DPO with flow-matching velocity errors, optionally FocusDPO-weighted.

    err_*: [B, L] per-token squared velocity errors ‖v_target − v_model‖² of the winner (w)
    and the loser (l) under the policy (theta) and the frozen reference (ref), at the same
    noisy latents and time. weights_*: [B, L] or [L] token weights (None: plain mean).
    With e = the reduced errors,

        margin = −β·T·[(e_w,θ − e_w,ref) − (e_l,θ − e_l,ref)],   loss = mean over B of −log σ(margin)

    (T = timestep_scale). margin is the implicit reward of the winner minus the loser's;
    stats: implicit_accuracy (share of pairs with margin > 0, ties count ½), reward_margin,
    reward_winner, reward_loser (means over B).
    """
    shape = err_w_theta.shape
    if len(shape) != 2 or any(e.shape != shape for e in (err_w_ref, err_l_theta, err_l_ref)):
        raise ValueError("the four error tensors must share one [B, L] shape, got "
                         f"{[tuple(e.shape) for e in (err_w_theta, err_w_ref, err_l_theta, err_l_ref)]}")
    if not beta > 0 or not timestep_scale > 0:
        raise ValueError(f"beta and timestep_scale must be > 0, got {beta}, {timestep_scale}")
    scale = beta * timestep_scale
    reward_w = -scale * (_reduce(err_w_theta, weights_w, "weights_w")
                         - _reduce(err_w_ref.detach(), weights_w, "weights_w"))
    reward_l = -scale * (_reduce(err_l_theta, weights_l, "weights_l")
                         - _reduce(err_l_ref.detach(), weights_l, "weights_l"))
    margin = reward_w - reward_l
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        accuracy = (margin > 0).float().mean() + 0.5 * (margin == 0).float().mean()
        stats = {
            "implicit_accuracy": accuracy.item(),
            "reward_margin": margin.mean().item(),
            "reward_winner": reward_w.mean().item(),
            "reward_loser": reward_l.mean().item(),
        }
    return loss, stats
