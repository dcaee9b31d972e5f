"""The training objective: timesteps, the in-context forward of a group of rows, the loss.

Flow matching (REFERENCE §1): x_σ = (1 − σ)·x0 + σ·noise and the model predicts the
velocity noise − x0 on the target tokens of `[text | noisy target | ref_1 … ref_N]`. The
loss is the mean squared error over the target tokens (float32). Timesteps are
logit-normal, σ = sigmoid(N(mean, std²)), then shifted as the checkpoint's scheduler
config shifts sampling sigmas for this many target tokens, so training sees the noise
levels sampling visits. The transformer is told σ itself as its timestep, as the sampler does.

Every random draw of a sample (its dropout, σ and noise) comes from its own CPU generator
seeded by (seed, step, micro-step, the sample's index in the global micro-batch), so a
resumed run draws exactly what an uninterrupted one would, and a global batch draws the same
whether one process or several share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from psr.core.model import MultiRefFlux, PromptEmbeds
from psr.core.packing import pack
from psr.core.positions import grid_ids


def step_generator(seed: int, step: int, micro: int, sample: int) -> torch.Generator:
    """The CPU generator of one sample of a micro-step; `sample` is its index in the global
    micro-batch (process rank's row i is rank·batch_size + i)."""
    state = np.random.SeedSequence([seed, step, micro, sample, 0x7EA1]).generate_state(2, np.uint32)
    return torch.Generator("cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


def shift_mu(scheduler_config, image_seq_len: int) -> float | None:
    """FLUX's resolution-dependent μ (None when the config uses a fixed shift)."""
    cfg = scheduler_config
    if not cfg.get("use_dynamic_shifting", False):
        return None
    lo_len, hi_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    lo, hi = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    return lo + (hi - lo) * (image_seq_len - lo_len) / (hi_len - lo_len)


def shift_sigmas(sigmas: torch.Tensor, scheduler_config, image_seq_len: int) -> torch.Tensor:
    """Apply the scheduler's shift to σ ∈ (0, 1): exponential with μ (dynamic) or
    shift·σ / (1 + (shift − 1)·σ) (fixed), as diffusers' FlowMatchEulerDiscreteScheduler."""
    mu = shift_mu(scheduler_config, image_seq_len)
    if mu is not None:
        return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    shift = float(scheduler_config.get("shift", 1.0))
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def sample_sigmas(generator: torch.Generator, batch: int, mean: float, std: float, scheduler_config,
                  image_seq_len: int, shift: bool = True) -> torch.Tensor:
    """[batch] float32 σ: logit-normal, optionally resolution-shifted."""
    sigmas = torch.sigmoid(mean + std * torch.randn(batch, generator=generator))
    return shift_sigmas(sigmas, scheduler_config, image_seq_len) if shift else sigmas


def dropout_choices(generator: torch.Generator, batch: int, p_text: float, p_refs: float,
                    p_both: float) -> tuple[list[bool], list[bool]]:
    """(drop_text, drop_refs) per row: three exclusive events of the given probabilities."""
    u = torch.rand(batch, generator=generator).tolist()
    text = [x < p_text or p_text + p_refs <= x < p_text + p_refs + p_both for x in u]
    refs = [p_text <= x < p_text + p_refs + p_both for x in u]
    return text, refs


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor,
                       token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in float32 between predicted and true velocity [B, L, C].

    With `token_weights` [B, L] it is the weighted mean Σ w·e / Σ w of the per-token errors
    e (mean over channels), so uniform weights give the plain mean."""
    if token_weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_token = (pred.float() - target.float()).pow(2).mean(dim=-1)
    weights = token_weights.to(per_token)
    return (per_token * weights).sum() / weights.sum()


def subject_token_weights(labels: torch.Tensor, subject_weight: float) -> torch.Tensor | None:
    """Per-token loss weights [B, L] from token labels (0 background, i+1 subject i):
    `subject_weight` inside subjects, 1 elsewhere; None when it is 1 (the plain mean)."""
    if subject_weight == 1.0:
        return None
    return torch.where(labels > 0, float(subject_weight), 1.0)


class Encoders:
    """The frozen VAE and text encoders (no grad), with an optional CPU cache.

    With `cache`, each image and prompt is encoded on its own (so a cached value equals a
    fresh one whatever batch it first came in) and kept on the CPU.
    """

    def __init__(self, model: MultiRefFlux, cache: bool = False):
        self.model = model
        self.cache = cache
        self._images: dict = {}
        self._prompts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def prompts(self, prompts: list[str]) -> PromptEmbeds:
        if not self.cache:
            return self.model.encode_prompt(prompts)
        for p in dict.fromkeys(prompts):
            if p not in self._prompts:
                e = self.model.encode_prompt([p])
                self._prompts[p] = (e.embeds[0].cpu(), e.pooled[0].cpu())
        device = self.model.device
        embeds = torch.stack([self._prompts[p][0] for p in prompts]).to(device)
        pooled = torch.stack([self._prompts[p][1] for p in prompts]).to(device)
        ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=embeds.dtype)  # FLUX: text ids are 0
        return PromptEmbeds(embeds=embeds, pooled=pooled, ids=ids)

    def latents(self, keys: list, pixels: list[torch.Tensor]) -> torch.Tensor:
        """Normalised latents [n, C, h/f, w/f] of n same-size images [3, h, w]."""
        if not self.cache:
            return self.model.encode_images(torch.stack(pixels))
        for key, image in zip(keys, pixels):
            if key not in self._images:
                self._images[key] = self.model.encode_images(image[None])[0].cpu()
        return torch.stack([self._images[k] for k in keys]).to(self.model.device)


@dataclass
class GroupInput:
    """One forward's inputs: rows sharing a reference layout."""

    hidden: torch.Tensor
    """[n, L + R, C] noisy target tokens then reference tokens."""
    ids: torch.Tensor
    """[L + R, 3] position ids."""
    prompt: PromptEmbeds
    timestep: torch.Tensor
    """[n] σ."""
    velocity: torch.Tensor
    """[n, L, C] float32 target: noise − x0."""
    target_grid: tuple[int, int]
    ref_grids: tuple[tuple[int, int], ...]


def group_input(model: MultiRefFlux, encoders: Encoders, batch, rows: list[int], with_refs: bool,
                x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, prompt: PromptEmbeds,
                dtype: torch.dtype) -> GroupInput:
    """Build the sequence of the rows `rows` of `batch` (x0, noise [B, L, C] float32;
    sigmas [B]; prompt for the whole batch) in the transformer's input dtype."""
    device = model.device
    sel = torch.tensor(rows)
    sigma = sigmas[sel].to(device)
    x0, noise = x0[sel].to(device), noise[sel].to(device)
    noisy = (1.0 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
    h, w = batch.target.shape[2:]
    grid = (h // model.token_stride, w // model.token_stride)
    ids = grid_ids(*grid)
    hidden = noisy.to(dtype)
    ref_grids = batch.ref_grids[rows[0]] if with_refs else ()
    if ref_grids:
        per_ref = []
        for k in range(len(ref_grids)):
            keys = [(batch.indices[b], k) for b in rows]
            latents = encoders.latents(keys, [batch.references[b][k] for b in rows])
            per_ref.append(pack(latents).to(dtype))
        hidden = torch.cat([hidden, *per_ref], dim=1)
        ids = torch.cat([ids, model.reference_positions(grid, ref_grids, batch.prompts[rows[0]])])
    text = PromptEmbeds(prompt.embeds[sel.to(prompt.embeds.device)].to(dtype),
                        prompt.pooled[sel.to(prompt.pooled.device)].to(dtype), prompt.ids)
    return GroupInput(hidden=hidden, ids=ids.to(device), prompt=text, timestep=sigma.to(dtype),
                      velocity=(noise - x0).float(), target_grid=grid, ref_grids=tuple(ref_grids))


def predict(transformer, group: GroupInput, guidance: float | None) -> torch.Tensor:
    """Velocity on the target tokens [n, L, C]; `transformer` may be a DDP wrapper."""
    n, length = group.velocity.shape[:2]
    g = None
    if guidance is not None:
        g = torch.full((n,), float(guidance), device=group.hidden.device, dtype=group.hidden.dtype)
    out = transformer(hidden_states=group.hidden, timestep=group.timestep, guidance=g,
                      pooled_projections=group.prompt.pooled, encoder_hidden_states=group.prompt.embeds,
                      txt_ids=group.prompt.ids, img_ids=group.ids, return_dict=False)[0]
    return out[:, :length]
