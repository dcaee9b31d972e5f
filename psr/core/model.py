"""The core model: diffusers' FLUX transformer with in-context multi-reference conditioning.

Sequence layout (REFERENCE §1): `[text | noisy target | ref_1 | … | ref_N]`. Text tokens go in
as `encoder_hidden_states`; each reference is VAE-encoded (distribution mode), normalised
with the VAE's shift and scale, packed into 2x2 tokens exactly like the target, and
appended after the target tokens. All tokens share one timestep embedding (Kontext's
convention). The velocity is read from the target tokens only.

That is the default `reference_mode` "joint". In "cached" mode references are modulated at
timestep 0 and attend only to themselves, so their keys and values are computed once per
prompt and reused on every step (`psr.core.refstream`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from psr.core import images as imgs
from psr.core.attention import TokenLayout
from psr.core.components import FluxComponents, cpu_has_bfloat16, resolve_device
from psr.core.lora import lora_token_mask
from psr.core.packing import pack, unpack
from psr.core.positions import ReferenceLayout, grid_ids, reference_ids
from psr.core.presets import run_record
from psr.core.refstream import ReferenceKV, cached_references, reference_kv
from psr.core.sampler import euler_sample, flux_schedule
from psr.core.schema import REFERENCE_MODES
from psr.core.weights import load_model_components, trained_reference_mode
from psr.errors import UserError


@dataclass
class PromptEmbeds:
    embeds: torch.Tensor  # [B, T, D] per-token text embedding (T5)
    pooled: torch.Tensor  # [B, P] pooled text embedding (CLIP)
    ids: torch.Tensor  # [T, 3] text position ids (all zero in FLUX)


@dataclass
class References:
    tokens: torch.Tensor  # [1, R, C] packed reference tokens of all references, in order
    ids: torch.Tensor  # [R, 3] their position ids
    grids: list[tuple[int, int]]  # (rows, cols) of each reference's token grid

    @property
    def count(self) -> int:
        return len(self.grids)


@dataclass(frozen=True)
class Guidance:
    """How a sampler steers the velocity (`MultiRefFlux.guided_velocity`).

    embedded: the guidance-embedding value, for guidance-distilled models (FLUX.1-dev,
        Kontext); None for a model without a guidance embedding.
    text: classifier-free guidance scale over the prompt (empty prompt as the unconditional
        branch), for models without a guidance embedding; 1 is off.
    image: classifier-free guidance scale over the references (no references as the
        unconditional branch), InstructPix2Pix's image scale; 1 is off.
    """

    embedded: float | None = None
    text: float = 1.0
    image: float = 1.0

    @classmethod
    def for_model(cls, transformer, guidance: float, image_guidance: float = 1.0) -> "Guidance":
        """`sample.guidance` is the embedding value where the model has a guidance embedding and
        the text CFG scale where it has not, so it always acts; `image_guidance` is the CFG scale
        over the references either way."""
        if transformer.config.guidance_embeds:
            return cls(embedded=float(guidance), image=float(image_guidance))
        return cls(text=float(guidance), image=float(image_guidance))

    @property
    def needs_null_prompt(self) -> bool:
        """Whether some branch drops the prompt (CFG on a model without a guidance embedding)."""
        return self.embedded is None and (self.text != 1.0 or self.image != 1.0)

    @property
    def branches(self) -> int:
        """Transformer forwards per step with references: 1 when no CFG acts, up to 3."""
        if self.image == 1.0:
            return 1 if self.text == 1.0 else 2
        return 2 if self.text == 1.0 and self.embedded is not None else 3


class ReferenceCache:
    """Cached mode's reference keys and values, one set per (prompt, references) pair met,
    computed on first use: within one sampling run the pooled prompt and the guidance value,
    the only other inputs of a reference's stream, are fixed, so each guidance branch's set
    serves every step."""

    def __init__(self, model: "MultiRefFlux"):
        self.model = model
        self._entries: list[tuple[PromptEmbeds, References, ReferenceKV]] = []

    def get(self, prompt: PromptEmbeds, references: References, guidance: torch.Tensor | None) -> ReferenceKV:
        for seen_prompt, seen_refs, kv in self._entries:
            if seen_prompt is prompt and seen_refs is references:
                return kv
        kv = self.model.reference_kv(references, prompt, guidance)
        self._entries.append((prompt, references, kv))  # holding both keeps their ids unique
        return kv


def card_reference_layout(config) -> ReferenceLayout | None:
    """The `reference_layout` table of the model card (the weights' folder first, then the
    model folder), for `position_scheme = "layout"`; None for any other scheme."""
    if config.position_scheme != "layout":
        return None
    for source in (config.weights, config.path):
        _, info, where = run_record(source)
        if info.get("reference_layout") is not None:
            return ReferenceLayout.from_dict(info["reference_layout"], str(where))
    return None


class MultiRefFlux:
    """FLUX components plus the in-context reference sequence.

    `reference_resize` names the rule that brings each reference to the token grid
    (`psr.core.images.RESIZE_RULES`; `reference_size` is the "longest" rule's longer side).
    `cpu_offload` keeps every component on the CPU and moves each to `device` only while
    it runs (text encoders once per prompt, the VAE per encode/decode, the transformer for
    the whole denoising loop). `reference_mode` is "joint" (every token attends to every
    other, one timestep) or "cached" (`psr.core.refstream`). `autocast_dtype` runs every
    transformer forward under `torch.autocast` to that dtype (bfloat16 on the CPU).
    """

    def __init__(self, components: FluxComponents, *, position_scheme: str = "frame",
                 reference_size: int = 64, max_sequence_length: int = 512,
                 device: torch.device | str = "cpu", cpu_offload: bool = False,
                 reference_resize: str = "longest", reference_mode: str = "joint",
                 autocast_dtype: torch.dtype | None = None, reference_layout: ReferenceLayout | None = None):
        from diffusers import FluxPipeline

        if reference_resize not in imgs.RESIZE_RULES:
            raise UserError(f"reference_resize {reference_resize!r}: must be one of "
                            f"{', '.join(map(repr, imgs.RESIZE_RULES))}")
        if reference_mode not in REFERENCE_MODES:
            raise UserError(f"reference_mode {reference_mode!r}: must be one of "
                            f"{', '.join(map(repr, REFERENCE_MODES))}")
        self.reference_mode = reference_mode
        self.autocast_dtype = autocast_dtype
        self.notes: list[str] = []
        """One-line remarks on how the recipe was applied (from_config), for the user to see."""
        self.components = components
        if position_scheme == "layout" and reference_layout is None:
            raise UserError("model.position_scheme 'layout' needs the model's reference layout table "
                            "(`reference_layout` in its psr_model.json card)")
        self.position_scheme = position_scheme
        self.reference_layout = reference_layout
        self.reference_size = reference_size
        self.reference_resize = reference_resize
        self.max_sequence_length = max_sequence_length
        self.device = torch.device(device)
        self.cpu_offload = cpu_offload
        # The pipeline object holds the same modules (no copies); its prompt encoder is used
        # as is, so prompts are embedded exactly as FluxPipeline embeds them.
        self._pipe = FluxPipeline(**components.as_dict())
        self._pipe.set_progress_bar_config(disable=True)
        if not cpu_offload:
            for module in self._modules():
                module.to(self.device)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config) -> "MultiRefFlux":
        """Build from a resolved `ModelConfig` (preset loaded, device, attention backend).

        `dtype = "bfloat16"` on the CPU keeps float32 weights and runs the transformer under
        bfloat16 autocast: matmuls and attention in bfloat16; weights, norms, softmax
        statistics and the sampler in float32, so trained weights stay float32 and images stay
        closer to float32 ones than with every weight cast (bench/bench_cached.py). The VAE and
        the text encoders, which run once per image and prompt, stay float32. A CPU without
        bfloat16 instructions (where torch would emulate them, slower than float32) runs float32
        and says so in `notes`."""
        device = resolve_device(config.device)
        autocast, notes = None, []
        if device.type == "cpu" and config.dtype == "bfloat16":
            if cpu_has_bfloat16():
                autocast = torch.bfloat16
            else:
                notes.append("model.dtype bfloat16: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX); "
                             "running float32")
            config = dataclasses.replace(config, dtype="float32")
        for source in (config.path, config.weights):
            trained = trained_reference_mode(source)
            if trained is not None and trained != config.reference_mode:
                notes.append(f"{source} was trained with model.reference_mode = {trained!r}, this run uses "
                             f"{config.reference_mode!r}; set model.reference_mode = {trained!r} to run it as trained")
        components = load_model_components(config)
        if config.attention_backend:
            try:
                components.transformer.set_attention_backend(config.attention_backend)
            except (ValueError, RuntimeError, ImportError) as err:
                raise UserError(f"model.attention_backend {config.attention_backend!r}: {err}") from None
        model = cls(components, position_scheme=config.position_scheme, reference_size=config.reference_size,
                   max_sequence_length=config.max_sequence_length, device=device, cpu_offload=config.cpu_offload,
                   reference_resize=config.resize_rule, reference_mode=config.reference_mode,
                   autocast_dtype=autocast, reference_layout=card_reference_layout(config))
        model.notes = notes
        return model

    def _modules(self):
        c = self.components
        return (c.transformer, c.vae, c.text_encoder, c.text_encoder_2)

    @contextlib.contextmanager
    def _on_device(self, *modules):
        if self.cpu_offload:
            for m in modules:
                m.to(self.device)
        try:
            yield
        finally:
            if self.cpu_offload:
                for m in modules:
                    m.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    # ------------------------------------------------------------------ geometry
    @property
    def transformer(self):
        return self.components.transformer

    @property
    def vae(self):
        return self.components.vae

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def token_stride(self) -> int:
        """Pixels per token side: the VAE factor times the 2x2 packing."""
        return self.vae_scale_factor * 2

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def autocast(self) -> contextlib.AbstractContextManager:
        """The transformer's autocast (`autocast_dtype`), or nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def check_size(self, height: int, width: int) -> None:
        for name, value in (("height", height), ("width", width)):
            if value % self.token_stride:
                raise UserError(f"{name} {value}: must be a multiple of {self.token_stride} "
                                f"(this model's pixels per token)")

    # ------------------------------------------------------------------ encoders
    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> PromptEmbeds:
        with self._on_device(self.components.text_encoder, self.components.text_encoder_2):
            embeds, pooled, ids = self._pipe.encode_prompt(
                prompt=list(prompts), prompt_2=None, device=self.device,
                max_sequence_length=self.max_sequence_length)
        return PromptEmbeds(embeds=embeds, pooled=pooled, ids=ids)

    def _vae_normalize(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        return (latents - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] → normalised latents [B, C, H/f, W/f] (distribution mode)."""
        with self._on_device(self.vae):
            latents = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mode()
        return self._vae_normalize(latents)

    def prepare_reference(self, image: Image.Image) -> Image.Image:
        """Apply the documented resize rule `self.reference_resize` (see `psr.core.images`)."""
        return imgs.fit_reference(image, self.reference_resize, self.reference_size, self.token_stride)

    def reference_positions(self, target_grid: tuple[int, int], grids: Sequence[tuple[int, int]],
                            prompt: str) -> torch.Tensor:
        """Position ids of the references of `prompt` under `self.position_scheme` ([Σ h_i·w_i, 3])."""
        boxes = None
        if self.position_scheme == "layout":
            boxes = self.reference_layout.boxes_for(prompt, len(grids))
        return torch.cat(reference_ids(target_grid, list(grids), self.position_scheme, boxes))

    @torch.no_grad()
    def encode_references(self, images: Sequence[Image.Image], target_grid: tuple[int, int],
                          prompt: str = "") -> References:
        """VAE-encode and pack each reference; ids follow `self.position_scheme` (the layout
        scheme reads the relation from `prompt`)."""
        tokens, grids = [], []
        for image in images:
            latents = self.encode_images(imgs.to_tensor(self.prepare_reference(image)))
            grids.append((latents.shape[2] // 2, latents.shape[3] // 2))
            tokens.append(pack(latents))
        if not tokens:
            return self.no_references()
        ids = self.reference_positions(target_grid, grids, prompt)
        return References(tokens=torch.cat(tokens, dim=1).to(self.device, self.dtype), ids=ids.to(self.device),
                          grids=grids)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed target latents [B, L, C] → pixels [B, 3, H, W] in [-1, 1]."""
        f = self.vae_scale_factor
        z = unpack(latents, height // f, width // f)
        z = z / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
        with self._on_device(self.vae):
            return self.vae.decode(z.to(self.device, self.vae.dtype), return_dict=False)[0]

    # ------------------------------------------------------------------ denoiser
    def noise(self, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
        """Packed initial noise [B, L, C]; image k is drawn from a CPU generator seeded
        seeds[k], so it is the same on every device and equals FluxPipeline's noise."""
        f = self.vae_scale_factor
        shape = (1, self.latent_channels, height // f, width // f)
        draws = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)), dtype=self.dtype)
                 for s in seeds]
        return pack(torch.cat(draws)).to(self.device)

    def velocity(self, latents: torch.Tensor, timestep: torch.Tensor, prompt: PromptEmbeds,
                 references: References, target_grid: tuple[int, int],
                 guidance: torch.Tensor | None = None, reference_kv: ReferenceKV | None = None) -> torch.Tensor:
        """Predicted velocity for the target tokens: [B, L, C] like `latents`.

        In cached mode `reference_kv` (from `reference_kv`, for this prompt and guidance) is
        used as is; without it the references' stream is recomputed in this forward."""
        batch, length = latents.shape[:2]
        hidden = latents
        ids = grid_ids(*target_grid).to(latents.device)
        extra = None
        if references.count and reference_kv is not None and self.reference_mode == "cached":
            extra = {"reference_kv": reference_kv}
        elif references.count:
            hidden = torch.cat([latents, references.tokens.expand(batch, -1, -1)], dim=1)
            ids = torch.cat([ids, references.ids])
        layout = TokenLayout.for_velocity(prompt.embeds.shape[1], target_grid, references.grids)
        context = contextlib.nullcontext()
        if self.reference_mode == "cached":
            context = cached_references(self.transformer, layout)
        # Reference-only LoRA (e.g. loaded by model.weights) adapts reference tokens only; a no-op
        # without one. In cached mode each stream sets its own mask; this one serves a forward
        # without references.
        mask = lora_token_mask(self.transformer, layout.reference_mask().to(latents.device))
        with mask, context, self.autocast():
            out = self.transformer(
                hidden_states=hidden, timestep=timestep, guidance=guidance,
                pooled_projections=prompt.pooled, encoder_hidden_states=prompt.embeds,
                txt_ids=prompt.ids, img_ids=ids, joint_attention_kwargs=extra, return_dict=False)[0]
        return out[:, :length]

    def reference_kv(self, references: References, prompt: PromptEmbeds,
                     guidance: torch.Tensor | None = None) -> ReferenceKV:
        """Cached mode: every block's keys and values of `references` for this prompt and
        guidance value (the references' stream at timestep 0, `psr.core.refstream`)."""
        pooled = prompt.pooled
        same = torch.equal(pooled, pooled[:1].expand_as(pooled)) and (
            guidance is None or torch.equal(guidance, guidance[:1].expand_as(guidance)))
        rows = 1 if same else pooled.shape[0]  # one prompt over the batch: one row serves every image
        with self.autocast():
            return reference_kv(self.transformer, references.tokens.expand(rows, -1, -1), references.ids,
                                [h * w for h, w in references.grids], pooled=pooled[:rows],
                                guidance=None if guidance is None else guidance[:rows],
                                text=prompt.embeds[:rows], txt_ids=prompt.ids)

    def no_references(self) -> References:
        """The empty reference set (the unconditional branch of image guidance)."""
        return References(tokens=torch.zeros(1, 0, self.latent_channels * 4, dtype=self.dtype, device=self.device),
                          ids=torch.zeros(0, 3, device=self.device), grids=[])

    def guided_velocity(self, latents: torch.Tensor, timestep: torch.Tensor, prompt: PromptEmbeds,
                        references: References, target_grid: tuple[int, int], guidance: Guidance,
                        null_prompt: PromptEmbeds | None = None,
                        branch: Callable[[References], contextlib.AbstractContextManager] | None = None,
                        cache: ReferenceCache | None = None) -> torch.Tensor:
        """The velocity under `guidance`: InstructPix2Pix's two-scale classifier-free guidance

            v = v(∅, ∅) + s_image·(v(∅, R) − v(∅, ∅)) + s_text·(v(T, R) − v(∅, R))

        with T the prompt (∅: `null_prompt`, the empty prompt's embedding) and R the
        references (∅: none), the conditioning dropouts psr trains with. A guidance-distilled
        model has no text branch: v = v(T, ∅) + s_image·(v(T, R) − v(T, ∅)). Scales of 1 drop
        their branches, so with both at 1 this is exactly `velocity`. `branch(refs)` wraps each
        forward (e.g. a LoRA token mask for that branch's layout). In cached mode `cache` keeps
        each branch's reference keys and values across calls (None: recompute them each call)."""
        batch = latents.shape[0]
        g = None
        if guidance.embedded is not None:
            g = torch.full((batch,), guidance.embedded, device=latents.device, dtype=torch.float32)
        text_cfg = guidance.embedded is None and guidance.text != 1.0
        image_cfg = guidance.image != 1.0 and references.count > 0
        if (text_cfg or (image_cfg and guidance.embedded is None)) and null_prompt is None:
            raise ValueError("classifier-free guidance over the prompt needs null_prompt")
        branch = branch or (lambda refs: contextlib.nullcontext())

        def v(text, refs):
            with branch(refs):
                kv = None
                if cache is not None and refs.count and self.reference_mode == "cached":
                    kv = cache.get(text, refs, g)
                return self.velocity(latents, timestep, text, refs, target_grid, g, kv).float()

        full = v(prompt, references)
        if not text_cfg and not image_cfg:
            return full.to(latents.dtype)
        none = self.no_references()
        if guidance.embedded is not None:  # image guidance only, the prompt stays on
            without = v(prompt, none)
            return (without + guidance.image * (full - without)).to(latents.dtype)
        refs_only = v(null_prompt, references)
        out = refs_only + guidance.text * (full - refs_only)
        if image_cfg:
            empty = v(null_prompt, none)
            out = out + (guidance.image - 1.0) * (refs_only - empty)
        return out.to(latents.dtype)

    def null_prompt(self, batch: int) -> PromptEmbeds:
        """The empty prompt's embedding for `batch` rows (what text dropout trains)."""
        empty = self.encode_prompt([""])
        return PromptEmbeds(empty.embeds.expand(batch, -1, -1), empty.pooled.expand(batch, -1), empty.ids)

    @torch.no_grad()
    def generate(self, prompt: str, references: Sequence[Image.Image], *, height: int, width: int,
                 steps: int, guidance: float, seeds: Sequence[int], image_guidance: float = 1.0,
                 progress: Callable[[], None] | None = None, output_type: str = "pil",
                 reuse_references: bool = True) -> list[Image.Image] | np.ndarray | torch.Tensor:
        """One image per seed for `prompt` conditioned on `references` (PIL, any size).

        `guidance` is the guidance-embedding value of a guidance-distilled model, else the
        classifier-free guidance scale over the prompt; `image_guidance` is the CFG scale over
        the references (see `guided_velocity`). `output_type` follows diffusers' pipelines:
        "pil" a list of 8-bit RGB images, "np" a float32 array [N, H, W, 3] in [0, 1], "pt" a
        float32 tensor [N, 3, H, W] in [0, 1] on the model's device. In cached mode the
        references' keys and values are computed once per guidance branch and reused on every
        step; `reuse_references=False` recomputes them at every step (the same numbers, as
        training computes them)."""
        imgs.check_output_type(output_type)  # before any work, so a typo costs nothing
        self.check_size(height, width)
        grid = (height // self.token_stride, width // self.token_stride)
        batch = len(seeds)
        text = self.encode_prompt([prompt])
        text = PromptEmbeds(text.embeds.expand(batch, -1, -1), text.pooled.expand(batch, -1), text.ids)
        refs = self.encode_references(references, grid, prompt)
        latents = self.noise(seeds, height, width)
        schedule = flux_schedule(self.components.scheduler.config, steps, grid[0] * grid[1])
        how = Guidance.for_model(self.transformer, guidance, image_guidance)
        null = self.null_prompt(batch) if how.needs_null_prompt else None
        cache = ReferenceCache(self) if reuse_references else None
        with self._on_device(self.transformer):
            latents = euler_sample(
                lambda x, t: self.guided_velocity(x, t, text, refs, grid, how, null, cache=cache), latents, schedule,
                progress)
        return imgs.postprocess(self.decode(latents, height, width), output_type)
