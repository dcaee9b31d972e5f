"""The model and sampling sections every command shares, and `psr generate`'s recipe.

Each command's own recipe lives in its package (`psr.synth.config`, `psr.train.config`,
`psr.eval.config`, `psr.rl.config`, `psr.fit.recipe`); `psr.cli.recipes` maps command
names to them. Fields left at None take the preset's default when the recipe is resolved
(`resolve_generate`), so the recipe written beside every output holds concrete values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from psr.core.images import RESIZE_RULES
from psr.core.presets import PRESETS, run_record
from psr.core.recipe import _suggest
from psr.core.recipe import require as _require
from psr.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")
REFERENCE_MODES = ("joint", "cached")
MAX_SIDE = 8192
"""Largest image side in pixels: FLUX models are trained up to about 2 MP, and one 8192 px
square already takes 256 K tokens; a mistyped size would otherwise try to allocate
gigabytes and fail with a traceback."""
MAX_STEPS = 10_000
"""Most denoising steps (FLUX samples in 28; more is a typo that would run for days)."""


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to load and how references enter the sequence."""

    preset: str = "embedded"
    """A name from the preset table: embedded, tiny, flux-dev, flux-kontext."""
    path: str | None = None
    """Hub id or local directory in diffusers' FLUX layout (flux-dev, flux-kontext, embedded)."""
    weights: str | None = None
    """Trained transformer weights on top of the preset's: a `psr pretrain` / `psr rl`
    checkpoint or final/ folder, or a LoRA file (a LoRA is merged; see psr.core.weights)."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Weights and activations dtype; None takes the preset's."""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), or any torch device string."""
    cpu_offload: bool = False
    """Keep components on the CPU and move each to the device only while it runs."""
    attention_backend: str | None = None
    """diffusers attention backend for the transformer ('native', 'flash', '_native_cudnn', ...)."""
    position_scheme: Literal["frame", "diagonal", "layout"] | None = None
    """'frame': FLUX.1 Kontext's ids (reference i at frame i+1); 'diagonal': UNO's offsets;
    'layout': each reference's ids spread over the target box its subject goes to, from the
    model card's `reference_layout` table (psr.core.positions). None takes the model card's
    `position_scheme` (what the weights were trained with), else 'frame'."""
    reference_mode: Literal["joint", "cached"] = "joint"
    """'joint': every token attends to every other and references share the target's
    timestep; 'cached': references are modulated at timestep 0 and attend only to themselves,
    so their keys and values are computed once per prompt and reused on every step
    (psr.core.refstream). A model trained in one mode should generate in it."""
    reference_size: int | None = None
    """Longer side of each reference in pixels after resizing under the "longest" rule; None
    takes the preset's."""
    reference_resize: Literal["kontext", "longest"] | None = None
    """How a reference is brought to the token grid: 'kontext' resizes it as diffusers'
    FluxKontextPipeline does by default (the Kontext training resolution of the nearest
    aspect ratio, about 1 MP; `reference_size` is not used); 'longest' scales its longer side
    to `reference_size`. None takes the preset's: 'kontext' for flux-kontext, else 'longest'
    (set 'kontext' for Kontext weights loaded under another preset)."""
    max_references: int = 8
    max_sequence_length: int | None = None
    """T5 tokens per prompt; None takes the preset's."""
    init_seed: int = 0
    """Seed of the random initialisation of the `tiny` preset."""

    @property
    def resize_rule(self) -> str:
        """`reference_resize`, or the preset's rule where it is None."""
        return self.reference_resize or PRESETS[self.preset].reference_resize

    def __post_init__(self):
        _require(self.preset in PRESETS, "preset",
                 f"unknown preset {self.preset!r}{_suggest(self.preset, PRESETS)}; "
                 f"choose one of {', '.join(PRESETS)}")
        _require(self.reference_mode in REFERENCE_MODES, "reference_mode",
                 f"must be one of {', '.join(map(repr, REFERENCE_MODES))}, got {self.reference_mode!r}")
        _require(self.max_references >= 0, "max_references", "must be >= 0")
        _require(self.weights is None or bool(self.weights.strip()), "weights",
                 "must name a folder or file (or leave it out)")
        _require(self.reference_size is None or self.reference_size >= 16, "reference_size", "must be >= 16")
        _require(self.reference_resize is None or self.reference_resize in RESIZE_RULES, "reference_resize",
                 f"must be one of {', '.join(map(repr, RESIZE_RULES))}, got {self.reference_resize!r}")
        # A size given for a preset whose rule does not read it would be ignored without a word;
        # a recipe written out resolved names its rule, so it passes.
        _require(self.reference_size is None or self.resize_rule != "kontext" or self.reference_resize is not None,
                 "reference_size", f"preset {self.preset!r} sizes references as FluxKontextPipeline does "
                 "(reference_resize = \"kontext\"), which does not read it; set reference_resize = \"longest\" "
                 "to scale the longer side to it, or leave reference_size out")
        _require(self.max_sequence_length is None or self.max_sequence_length >= 1,
                 "max_sequence_length", "must be >= 1")


@dataclass(frozen=True)
class SampleConfig:
    """How to sample: the flow-matching Euler sampler over FLUX's sigma schedule."""

    steps: int | None = None
    """Denoising steps; None takes the preset's."""
    guidance: float | None = None
    """The guidance-embedding value of a guidance-distilled model (FLUX.1-dev, Kontext), else
    the classifier-free guidance scale over the prompt (1 is off); None takes the preset's."""
    image_guidance: float | None = None
    """Classifier-free guidance scale over the references (InstructPix2Pix's image scale;
    1 is off); None takes the preset's. Each scale that is not 1 adds a transformer forward
    per step."""
    height: int | None = None
    width: int | None = None
    num_images: int = 1
    seed: int = 0
    """Image k of a run uses seed + k, so every image can be reproduced on its own."""

    def __post_init__(self):
        _require(self.steps is None or self.steps >= 1, "steps", "must be >= 1")
        _require(self.steps is None or self.steps <= MAX_STEPS, "steps", f"must be <= {MAX_STEPS}")
        _require(self.guidance is None or (self.guidance >= 0 and math.isfinite(self.guidance)), "guidance",
                 "must be a finite number >= 0")
        _require(self.image_guidance is None or (self.image_guidance >= 0 and math.isfinite(self.image_guidance)),
                 "image_guidance", "must be a finite number >= 0 (1 is off)")
        for name in ("height", "width"):
            value = getattr(self, name)
            _require(value is None or value >= 16, name, "must be >= 16 pixels")
            _require(value is None or value <= MAX_SIDE, name, f"must be <= {MAX_SIDE} pixels")
        _require(self.num_images >= 1, "num_images", "must be >= 1")
        _require(self.seed >= 0, "seed", "must be >= 0")


@dataclass(frozen=True)
class GenerateRecipe:
    """`psr generate`: one prompt, up to `model.max_references` references."""

    command: Literal["generate"] = "generate"
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def check_generation(model: ModelConfig, sample: SampleConfig) -> None:
    """The checks a command that generates makes before any weights load, so `psr validate`
    refuses what `psr generate` or `psr eval` would: the target size is a multiple of the
    preset's token stride, and a preset that loads a model folder has one. Values left at
    None are read as the preset will fill them in (`resolve_generate`)."""
    preset = PRESETS[model.preset]
    for name, value in (("height", sample.height), ("width", sample.width)):
        value = value or preset.size
        if value % preset.token_stride:
            raise UserError(f"sample.{name} {value}: must be a multiple of {preset.token_stride} (pixels per token "
                            f"of preset {model.preset!r})")
    if preset.needs_path and not (model.path or preset.default_path):
        raise UserError(f"model.path: preset {model.preset!r} needs a local directory or a hub id "
                        "(e.g. black-forest-labs/FLUX.1-dev); nothing is downloaded unless you name one")


def trained_position_scheme(weights: str | None, path: str | None) -> str:
    """The position scheme the weights were trained with, where a psr run says so (a
    checkpoint's recipe, or the card of the weights' folder, else of the model folder);
    'frame' where nothing does."""
    for source in (weights, path):
        if scheme := run_record(source)[1].get("position_scheme"):
            return scheme
    return "frame"


def resolve_model(model: ModelConfig) -> ModelConfig:
    """The model section with every None that its preset decides filled in (every command
    that loads a model resolves it the same way)."""
    preset = PRESETS[model.preset]
    return replace(
        model,
        path=model.path or preset.default_path,
        dtype=model.dtype or preset.dtype,
        reference_size=model.reference_size or preset.reference_size,
        position_scheme=model.position_scheme or trained_position_scheme(model.weights, model.path
                                                                         or preset.default_path),
        reference_resize=model.reference_resize or preset.reference_resize,
        max_sequence_length=model.max_sequence_length or preset.max_sequence_length,
    )


def resolve_generate(recipe: GenerateRecipe) -> GenerateRecipe:
    """Fill every None that a preset decides with that preset's value."""
    preset = PRESETS[recipe.model.preset]
    model = resolve_model(recipe.model)
    sample = replace(
        recipe.sample,
        steps=recipe.sample.steps or preset.steps,
        guidance=preset.guidance if recipe.sample.guidance is None else recipe.sample.guidance,
        image_guidance=preset.image_guidance if recipe.sample.image_guidance is None else recipe.sample.image_guidance,
        height=recipe.sample.height or preset.size,
        width=recipe.sample.width or preset.size,
    )
    return replace(recipe, model=model, sample=sample)
