"""The `psr synth` recipe: a training dataset (ToyWorld or PSR's staged pipeline) or a
PSRBench-format benchmark. Every invariant is checked here, before anything is drawn."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from psr.core.recipe import _suggest
from psr.core.recipe import require as _require
from psr.synth.pipeline import REQUIRED
from psr.synth.psrbench import SUBSETS
from psr.synth.sources import SOURCES
from psr.synth.stages import check_stage_options
from psr.toyworld.sampling import LEVELS


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
        _require(self.samples_per_subset >= 1, "samples_per_subset", "must be >= 1")
        for name in self.subsets:
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
