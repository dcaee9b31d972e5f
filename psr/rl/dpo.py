"""FocusDPO on the multi-reference model: preference pairs, token weights, the pair loss.

A pair is one prompt with its references and two clean latents x0 = (winner, loser):

- "toyworld-disrupted": the winner is the item's ground-truth target, the loser the same
  ToyWorld scene with one subject's identity swapped (`psr.rl.pairs.disrupted_pair`); both
  are VAE-encoded (distribution mode).
- "self-ranked": the current model samples G images with the ODE sampler; the reward mix
  ranks them, the best is the winner and the worst the loser (their sampled latents are
  x0). A group whose rewards are all equal states no preference: its pair has weight 0.

The loss (`pair_loss`): one σ and one noise for both images, x_σ = (1 − σ)·x0 + σ·noise,
per-token squared velocity errors ‖(noise − x0) − v‖² (mean over channels) under the policy
and the reference (adapters disabled), then `diffusion_dpo_loss`. With `focus`, both errors
are reduced with the same FocusDPO weights, computed from the winner:

- structure: cosine of the winner's tokens with each reference's subject tokens. Features
  are the packed VAE latent tokens (`features = "latent"`) or those tokens after the
  transformer's input projection x_embedder (`"embedded"`), which are exactly the tokens
  the transformer reads, in its width. A reference's subject tokens come from the ToyWorld
  render of that reference (mask covering ≥ half of a token); without a ToyWorld example
  the whole reference counts as the subject (a reference shows its subject alone).
- detail: local entropy of the winner image.
For disrupted pairs the layout is identical, so the winner's map marks the disrupted
region in both images and weights both errors. A self-ranked loser comes from other noise,
with its subjects elsewhere: the winner's map would weight its background, so its error is
weighted by its own map (computed the same way from the loser's latents and image).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from psr import toyworld as tw
from psr.core import images as imgs
from psr.core.packing import pack
from psr.core.sampler import euler_sample
from psr.rewards import RewardBatch
from psr.rl.focus import detail_map, focus_weights, structure_map
from psr.rl.grpo import schedule_for
from psr.rl.losses import diffusion_dpo_loss
from psr.rl.pairs import disrupted_pair
from psr.rl.policy import Conditioning, Policy, condition
from psr.train.data import token_labels


@dataclass
class Pair:
    cond: Conditioning
    """Conditioning for a batch of 2 (winner, loser)."""
    x0: torch.Tensor
    """[2, L, C] float32 clean packed latents: winner, loser."""
    winner: Image.Image
    structure: torch.Tensor | None
    """[L] structure map of the winner (None without focus)."""
    detail: torch.Tensor | None
    weight: float = 1.0
    """0 for a tie (no preference): the pair is computed but does not count."""
    structure_loser: torch.Tensor | None = None
    """[L] the loser's own structure map when its layout differs from the winner's
    (self-ranked pairs); None: the winner's maps weight both errors."""
    detail_loser: torch.Tensor | None = None


def _pixels(image: Image.Image) -> torch.Tensor:
    """[3, H, W] float in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def reference_masks(item, grids: list[tuple[int, int]], stride: int) -> list[torch.Tensor]:
    """Per reference, [h·w] bool: its subject's tokens (module docstring)."""
    masks = [torch.ones(h * w, dtype=torch.bool) for h, w in grids]
    if not item.example:
        return masks

    example = tw.Example.from_dict(item.example)
    for i, ((h, w), spec) in enumerate(zip(grids, example.references)):
        if h != w:
            continue  # ToyWorld references are square; another shape is not a ToyWorld render
        render = tw.render(spec, h * stride)
        labels = token_labels(render.masks[:1], [1], stride)
        if labels.any():
            masks[i] = torch.from_numpy(labels > 0)
    return masks


def token_features(policy: Policy, tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """[N, C] packed latent tokens → [N, D] structure-map features."""
    if kind == "latent":
        return tokens.float()
    with torch.no_grad():
        embedder = policy.model.transformer.x_embedder
        return embedder(tokens.to(policy.model.device, policy.dtype)).float()


def focus_maps(policy: Policy, cond: Conditioning, x0_winner: torch.Tensor, winner: Image.Image, item,
               cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(structure [L], detail [L]) of the winner (cfg: the recipe's dpo section)."""
    stride = policy.model.token_stride
    refs = cond.reference_tokens()
    if refs:
        masks = reference_masks(item, cond.refs.grids, stride)
        structure = structure_map(token_features(policy, x0_winner, cfg.features),
                                  [token_features(policy, r, cfg.features) for r in refs], masks, cfg.top_k)
    else:
        structure = torch.zeros(x0_winner.shape[0])
    detail = detail_map(_pixels(winner), stride, sigma=cfg.detail_sigma)
    return structure.cpu(), detail


def _encode(policy: Policy, images: list[Image.Image]) -> torch.Tensor:
    pixels = torch.cat([imgs.to_tensor(im) for im in images])
    return pack(policy.model.encode_images(pixels)).float()


def disrupted(policy: Policy, item, seed: int, guidance: float, cfg) -> Pair:
    """Winner = the item's target, loser = its disrupted re-render."""
    winner = item.target()
    if winner.width != winner.height:
        raise ValueError(f"{item.key}: ToyWorld targets are square, got {winner.width}x{winner.height}")
    pair = disrupted_pair(tw.Example.from_dict(item.example), seed, size=winner.width)
    loser = Image.fromarray(pair.loser.image)
    cond = condition(policy.model, item.prompt, item.references(), winner.width, 2, guidance)
    x0 = _encode(policy, [winner, loser])
    structure = detail = None
    if cfg.focus:
        structure, detail = focus_maps(policy, cond, x0[0], winner, item, cfg)
    return Pair(cond, x0, winner, structure, detail)


def self_ranked(policy: Policy, item, rollout, seeds: list[int], reward: Callable, cfg) -> tuple[Pair, object]:
    """G ODE samples ranked by the reward mix → (pair, the RewardResult of the G samples)."""
    model, g = policy.model, len(seeds)
    references = item.references()
    cond = condition(model, item.prompt, references, rollout.size, g, rollout.guidance)
    latents = model.noise(seeds, rollout.size, rollout.size).to(policy.dtype)
    final = euler_sample(lambda x, t: policy.velocity(x, t, cond), latents,
                         schedule_for(model, rollout.steps, cond.grid)).float()
    images = imgs.to_pil(model.decode(final, rollout.size, rollout.size).float())
    result = reward(RewardBatch(images, [item.prompt] * g, [references] * g, [list(item.categories)] * g))
    order = torch.argsort(result.total, stable=True)
    worst, best = int(order[0]), int(order[-1])
    pair_cond = condition(model, item.prompt, references, rollout.size, 2, rollout.guidance)
    x0 = final[[best, worst]].to(model.device)
    structure = detail = structure_loser = detail_loser = None
    if cfg.focus:  # each image's own map: the two come from different noise, in different layouts
        structure, detail = focus_maps(policy, pair_cond, x0[0], images[best], item, cfg)
        structure_loser, detail_loser = focus_maps(policy, pair_cond, x0[1], images[worst], item, cfg)
    weight = float(result.total[best] > result.total[worst])
    return Pair(pair_cond, x0, images[best], structure, detail, weight, structure_loser, detail_loser), result


def pair_loss(policy: Policy, pair: Pair, sigma: float, noise: torch.Tensor, cfg) -> tuple[torch.Tensor, dict]:
    """FocusDPO loss of one pair at noise level `sigma` with `noise` [1, L, C] (module docstring)."""
    device = policy.model.device
    x0 = pair.x0.to(device)
    noise = noise.to(device).float().expand_as(x0)
    noisy = (1.0 - sigma) * x0 + sigma * noise
    target = noise - x0
    t = torch.full((2,), float(sigma), device=device)
    err_theta = (policy.velocity(noisy, t, pair.cond, grad=True).float() - target).pow(2).mean(dim=-1)
    err_ref = (policy.velocity(noisy, t, pair.cond, reference=True).float() - target).pow(2).mean(dim=-1)
    weights_w = weights_l = None
    if pair.structure is not None:
        weights_w = weights_l = focus_weights(pair.structure, pair.detail, sigma, cfg.detail_on_below,
                                              cfg.floor).to(device)
    if pair.structure_loser is not None:
        weights_l = focus_weights(pair.structure_loser, pair.detail_loser, sigma, cfg.detail_on_below,
                                  cfg.floor).to(device)
    return diffusion_dpo_loss(err_theta[:1], err_ref[:1], err_theta[1:], err_ref[1:], cfg.beta,
                              weights_w=weights_w, weights_l=weights_l)
