"""Recipe schemas: one frozen dataclass per section, one per command.

Fields left at None take the preset's default when the recipe is resolved
(`resolve_generate`), so the recipe written beside every output holds concrete values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from psr.core.recipe import require as _require
from psr.errors import RecipeError

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to load and how references enter the sequence."""

    preset: str = "embedded"
    """A name from the preset table: embedded, tiny, flux-dev, flux-kontext."""
    path: str | None = None
    """Hub id or local directory in diffusers' FLUX layout (flux-dev, flux-kontext, embedded)."""
    weights: str | None = None
    """Trained transformer weights on top of the preset's: a `psr pretrain` / `psr rl`
    checkpoint or final/ folder, or a LoRA file (a LoRA is merged; see psr.train.weights)."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Weights and activations dtype; None takes the preset's."""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), or any torch device string."""
    cpu_offload: bool = False
    """Keep components on the CPU and move each to the device only while it runs."""
    attention_backend: str | None = None
    """diffusers attention backend for the transformer ('native', 'flash', '_native_cudnn', ...)."""
    position_scheme: Literal["frame", "diagonal"] = "frame"
    """'frame': FLUX.1 Kontext's ids (reference i at frame i+1); 'diagonal': UNO's offsets."""
    reference_size: int | None = None
    """Longer side of each reference in pixels after resizing; None takes the preset's."""
    max_references: int = 8
    max_sequence_length: int | None = None
    """T5 tokens per prompt; None takes the preset's."""
    init_seed: int = 0
    """Seed of the random initialisation of the `tiny` preset."""

    def __post_init__(self):
        from psr.core.presets import PRESETS
        from psr.core.recipe import _suggest

        _require(self.preset in PRESETS, "preset",
                 f"unknown preset {self.preset!r}{_suggest(self.preset, PRESETS)}; "
                 f"choose one of {', '.join(PRESETS)}")
        _require(self.max_references >= 0, "max_references", "must be >= 0")
        _require(self.weights is None or bool(self.weights.strip()), "weights",
                 "must name a folder or file (or leave it out)")
        _require(self.reference_size is None or self.reference_size >= 16, "reference_size", "must be >= 16")
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
    image_guidance: float = 1.0
    """Classifier-free guidance scale over the references (InstructPix2Pix's image scale;
    1 is off). Each scale that is not 1 adds a transformer forward per step."""
    height: int | None = None
    width: int | None = None
    num_images: int = 1
    seed: int = 0
    """Image k of a run uses seed + k, so every image can be reproduced on its own."""

    def __post_init__(self):
        _require(self.steps is None or self.steps >= 1, "steps", "must be >= 1")
        _require(self.guidance is None or (self.guidance >= 0 and math.isfinite(self.guidance)), "guidance",
                 "must be a finite number >= 0")
        _require(self.image_guidance >= 0 and math.isfinite(self.image_guidance), "image_guidance",
                 "must be a finite number >= 0 (1 is off)")
        for name in ("height", "width"):
            value = getattr(self, name)
            _require(value is None or value >= 16, name, "must be >= 16 pixels")
        _require(self.num_images >= 1, "num_images", "must be >= 1")
        _require(self.seed >= 0, "seed", "must be >= 0")


@dataclass(frozen=True)
class GenerateRecipe:
    """`psr generate`: one prompt, up to `model.max_references` references."""

    command: Literal["generate"] = "generate"
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def resolve_model(model: ModelConfig) -> ModelConfig:
    """The model section with every None that its preset decides filled in (every command
    that loads a model resolves it the same way)."""
    from psr.core.presets import PRESETS

    preset = PRESETS[model.preset]
    return replace(
        model,
        path=model.path or preset.default_path,
        dtype=model.dtype or preset.dtype,
        reference_size=model.reference_size or preset.reference_size,
        max_sequence_length=model.max_sequence_length or preset.max_sequence_length,
    )


def resolve_generate(recipe: GenerateRecipe) -> GenerateRecipe:
    """Fill every None that a preset decides with that preset's value."""
    from psr.core.presets import PRESETS

    preset = PRESETS[recipe.model.preset]
    model = resolve_model(recipe.model)
    sample = replace(
        recipe.sample,
        steps=recipe.sample.steps or preset.steps,
        guidance=preset.guidance if recipe.sample.guidance is None else recipe.sample.guidance,
        height=recipe.sample.height or preset.size,
        width=recipe.sample.width or preset.size,
    )
    return replace(recipe, model=model, sample=sample)


@dataclass(frozen=True)
class ToyWorldConfig:
    """How ToyWorld samples are drawn (see psr.toyworld)."""

    size: int = 64
    """Target side in pixels (64 or 128)."""
    reference_size: int = 64
    subject_weights: tuple[float, ...] = (0.15, 0.5, 0.2, 0.15)
    """Relative frequency of 1, 2, 3, 4 subjects per sample."""
    id_split: Literal["train", "eval"] = "train"
    """Identity range: 'train' and 'eval' are disjoint, so benchmarks stay held out."""
    attribute_rate: float = 0.2
    """Chance that each subject wears each added attribute (hat, scarf, …)."""
    level: str = "full"
    """How hard examples are (psr.toyworld.sampling.LEVELS): 'full' (the bench's hardest) or
    'easy' (reference in the target pose at a similar pixel scale, at half the target side)."""

    def __post_init__(self):
        from psr.toyworld.sampling import LEVELS

        _require(self.size in (64, 128), "size", "must be 64 or 128")
        _require(self.reference_size in (32, 64, 128), "reference_size", "must be 32, 64 or 128")
        _require(self.level in LEVELS, "level", f"unknown level {self.level!r}; known: {', '.join(LEVELS)}")
        ratio = LEVELS[self.level].reference_ratio
        if ratio != 1:
            _require(self.size == ratio * self.reference_size, "reference_size",
                     f"level {self.level!r} renders references at 1/{ratio} of the target side: "
                     f"{self.size // ratio} for size {self.size}")
        _require(1 <= len(self.subject_weights) <= 4, "subject_weights",
                 "give one weight per subject count, 1 to 4 counts")
        _require(all(w >= 0 for w in self.subject_weights) and sum(self.subject_weights) > 0,
                 "subject_weights", "weights must be >= 0 and not all 0")
        _require(0.0 <= self.attribute_rate <= 1.0, "attribute_rate", "must be in [0, 1]")


@dataclass(frozen=True)
class BenchConfig:
    """A PSRBench-format export instead of a training dataset (`format = "psrbench"`)."""

    samples_per_subset: int = 50
    subsets: tuple[str, ...] = ("Attribute", "Action", "Background", "Position", "Complex", "Three", "Four")

    def __post_init__(self):
        from psr.synth.psrbench import SUBSETS

        _require(self.samples_per_subset >= 1, "samples_per_subset", "must be >= 1")
        for name in self.subsets:
            from psr.core.recipe import _suggest

            _require(name in SUBSETS, "subsets", f"unknown subset {name!r}{_suggest(name, SUBSETS)}")


@dataclass(frozen=True)
class SynthRecipe:
    """`psr synth`: a training dataset (ToyWorld or PSR's staged pipeline) or a benchmark."""

    command: Literal["synth"] = "synth"
    source: str = "toyworld"
    """A name from the source table: toyworld, pipeline."""
    format: Literal["dataset", "psrbench"] = "dataset"
    num_samples: int = 1000
    """Candidates to draw; `--num-samples` overrides. Filtered candidates are counted, not replaced."""
    shard_size: int = 500
    seed: int = 0
    """Sample i is drawn from seed + i, so disjoint seed ranges give disjoint data."""
    token_stride: int = 8
    """Pixels per token of the model that will train on it (correspondence grid)."""
    workers: int = 1
    """Processes on this machine (shards are split between them)."""
    device: str = "auto"
    toyworld: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    pipeline: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Stage kind → {name = "...", options...} for `source = "pipeline"` (see psr.synth.stages)."""
    categories: tuple[str, ...] = ()
    """Category words the pipeline draws subjects from."""
    subjects_per_sample: int = 2

    def __post_init__(self):
        from psr.core.recipe import _suggest
        from psr.synth.sources import SOURCES

        _require(self.source in SOURCES, "source",
                 f"unknown source {self.source!r}{_suggest(self.source, SOURCES)}; choose one of {', '.join(SOURCES)}")
        _require(self.num_samples >= 1, "num_samples", "must be >= 1")
        _require(self.shard_size >= 1, "shard_size", "must be >= 1")
        _require(self.seed >= 0, "seed", "must be >= 0")
        _require(self.token_stride >= 1 and self.toyworld.size % self.token_stride == 0, "token_stride",
                 f"must divide toyworld.size ({self.toyworld.size})")
        _require(self.workers >= 1, "workers", "must be >= 1")
        _require(self.subjects_per_sample >= 1, "subjects_per_sample", "must be >= 1")
        if self.source == "pipeline":
            from psr.synth.pipeline import REQUIRED
            from psr.synth.stages import check_stage_options

            for kind in REQUIRED:
                _require(kind in self.pipeline, f"pipeline.{kind}", "required stage is missing")
            for kind, options in self.pipeline.items():
                options = dict(options)
                _require("name" in options, f"pipeline.{kind}.name", "required key is missing")
                check_stage_options(kind, options.pop("name"), options)
            _require(len(self.categories) >= self.subjects_per_sample, "categories",
                     f"need at least subjects_per_sample ({self.subjects_per_sample}) categories")
        if self.format == "psrbench":
            _require(self.source == "toyworld", "format", "the psrbench export draws from ToyWorld")


# One entry per command that takes a recipe; `psr validate` reads `command` to pick the schema.
RECIPE_KINDS: dict[str, type] = {
    "generate": GenerateRecipe,
    "synth": SynthRecipe,
    "eval": __import__("psr.eval.config", fromlist=["EvalRecipe"]).EvalRecipe,
    "pretrain": __import__("psr.train.config", fromlist=["PretrainRecipe"]).PretrainRecipe,
    "fit": __import__("psr.fit.recipe", fromlist=["FitRecipe"]).FitRecipe,
    "rl": __import__("psr.rl.config", fromlist=["RlRecipe"]).RlRecipe,
}


def load_recipe(kind: str, path: str | None = None, overrides: list[str] = ()):
    """Read a recipe of `kind` from TOML (or start from the defaults), apply `--set`
    overrides, and build its dataclass. Raises `UserError`/`RecipeError` on any mistake."""
    from psr.core.recipe import apply_overrides, build, read_toml

    data = read_toml(path) if path else {}
    data = apply_overrides(data, list(overrides))
    declared = data.get("command", kind)
    if declared != kind:
        where = f"recipe {path}" if path else "recipe"
        raise RecipeError("command", f"{where} is a {declared!r} recipe, not a {kind!r} one")
    return build(RECIPE_KINDS[kind], data)
