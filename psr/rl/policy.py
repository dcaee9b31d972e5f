"""The policy: the multi-reference model's velocity with or without its adapter.

`Policy.velocity` runs the transformer on `[text | latents | ref_1 … ref_N]` (the sequence
of `MultiRefFlux.velocity`) and returns the target tokens' velocity. With `grad=True` the
forward goes through the prepared (maybe DDP-wrapped) module so gradients are synchronised;
otherwise through the bare transformer under `no_grad`. `reference=True` is the reference
policy: the same network with the trained adapter disabled (`adapters_disabled`); adapters
loaded frozen below it (an `init` that stays unmerged) stay on, so the reference is the model
the run started from.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from psr.core.adapters import adapters_disabled, input_dtype
from psr.core.attention import TokenLayout
from psr.core.lora import lora_token_mask
from psr.core.model import MultiRefFlux, PromptEmbeds, References
from psr.core.positions import grid_ids
from psr.core.refstream import cached_references


@dataclass
class Conditioning:
    """One prompt with its references, ready for a batch of `batch` images."""

    text: PromptEmbeds
    """Embeds [batch, T, D] and pooled [batch, P]."""
    refs: References
    grid: tuple[int, int]
    """Target token grid (rows, cols)."""
    guidance: torch.Tensor | None
    """[batch] guidance-embedding values (models with guidance_embeds), else None."""
    token_mask: torch.Tensor
    """[L + R] bool: reference tokens of `[target | refs]` (reference-only LoRA)."""

    @property
    def batch(self) -> int:
        return self.text.embeds.shape[0]

    def take(self, batch: int) -> Conditioning:
        """The same conditioning for a batch of `batch` images (<= self.batch): every row
        holds the same prompt, so the first rows serve any subset of a group's images."""
        if batch == self.batch:
            return self
        if not 1 <= batch <= self.batch:
            raise ValueError(f"a conditioning for {self.batch} images cannot serve {batch}")
        text = PromptEmbeds(self.text.embeds[:batch], self.text.pooled[:batch], self.text.ids)
        guidance = None if self.guidance is None else self.guidance[:batch]
        return Conditioning(text, self.refs, self.grid, guidance, self.token_mask)

    def reference_tokens(self) -> list[torch.Tensor]:
        """Per reference, its packed latent tokens [h_i·w_i, C]."""
        sizes = [h * w for h, w in self.refs.grids]
        return list(self.refs.tokens[0].split(sizes)) if sizes else []


def condition(model: MultiRefFlux, prompt: str, references, size: int, batch: int, guidance: float) -> Conditioning:
    """Encode `prompt` and the reference images (PIL) once, for `batch` images of size² px."""
    model.check_size(size, size)
    grid = (size // model.token_stride, size // model.token_stride)
    text = model.encode_prompt([prompt])
    text = PromptEmbeds(text.embeds.expand(batch, -1, -1), text.pooled.expand(batch, -1), text.ids)
    refs = model.encode_references(references, grid, prompt)
    g = None
    if model.transformer.config.guidance_embeds:
        g = torch.full((batch,), float(guidance), device=model.device, dtype=torch.float32)
    mask = TokenLayout.for_velocity(text.embeds.shape[1], grid, refs.grids).reference_mask().to(model.device)
    return Conditioning(text, refs, grid, g, mask)


class Policy:
    """The model's velocity as the current policy (with grad or without) or as the reference."""

    def __init__(self, model: MultiRefFlux, module: Any, autocast=contextlib.nullcontext):
        self.model = model
        self.module = module  # what gradient forwards go through (accelerate-prepared)
        self.autocast = autocast

        # The transformer's input dtype: its frozen weights' (adapters), else its own.
        frozen = any(not p.requires_grad for p in model.transformer.parameters())
        self.dtype = input_dtype(model.transformer, "lora" if frozen else "none")

    @contextlib.contextmanager
    def token_mask(self, cond: Conditioning):
        """Reference-only LoRA's token mask and, in cached reference mode, the sequence layout
        (`psr.core.refstream`) for a `with` block. A backward that recomputes checkpointed
        blocks must run inside it, like the forward."""
        transformer = self.model.transformer
        with contextlib.ExitStack() as stack:
            stack.enter_context(lora_token_mask(transformer, cond.token_mask))
            if self.model.reference_mode == "cached":
                layout = TokenLayout.for_velocity(cond.text.embeds.shape[1], cond.grid, cond.refs.grids)
                stack.enter_context(cached_references(transformer, layout))
            yield

    def velocity(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, *, grad: bool = False,
                 reference: bool = False) -> torch.Tensor:
        """latents [B, L, C] (B = cond.batch), timestep [B] → velocity [B, L, C]."""
        transformer = self.model.transformer
        module = self.module if grad and not reference else transformer
        batch, length = latents.shape[:2]
        hidden, ids = latents.to(self.dtype), grid_ids(*cond.grid).to(latents.device)
        if cond.refs.count:
            hidden = torch.cat([hidden, cond.refs.tokens.expand(batch, -1, -1).to(hidden.dtype)], dim=1)
            ids = torch.cat([ids, cond.refs.ids])
        with contextlib.ExitStack() as stack:
            if not grad or reference:
                stack.enter_context(torch.no_grad())
            if reference:
                stack.enter_context(adapters_disabled(transformer))
            stack.enter_context(self.token_mask(cond))
            stack.enter_context(self.autocast())
            stack.enter_context(self.model.autocast())  # bfloat16 on the CPU (MultiRefFlux.from_config)
            out = module(hidden_states=hidden, timestep=timestep.to(hidden.dtype), guidance=cond.guidance,
                         pooled_projections=cond.text.pooled.to(hidden.dtype),
                         encoder_hidden_states=cond.text.embeds.to(hidden.dtype), txt_ids=cond.text.ids,
                         img_ids=ids, return_dict=False)[0]
        return out[:, :length]
