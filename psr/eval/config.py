"""The `psr eval` recipe: which model generates, which components score.

Components are named by registry (`FEATURE_EXTRACTORS`, `LOCALIZERS`, `REWARDS`) with their
options in a TOML table, e.g. `[extractor] name = "dino"  path = "facebook/dino-vits16"`.
Validation checks the names without loading any weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from psr.core.detect import LOCALIZERS
from psr.core.features import FEATURE_EXTRACTORS
from psr.core.recipe import _suggest
from psr.core.recipe import require as _require
from psr.core.schema import GenerateRecipe, ModelConfig, SampleConfig, resolve_generate
from psr.errors import RecipeError
from psr.rewards import RewardSpec, check_reward_specs


def _check_component(key: str, options: dict, registry: dict, what: str) -> None:
    name = options.get("name")
    _require(isinstance(name, str), f"{key}.name", f"required: one of {', '.join(registry)}")
    _require(name in registry, f"{key}.name",
             f"unknown {what} {name!r}{_suggest(name, registry)}; choose one of {', '.join(registry)}")


@dataclass(frozen=True)
class OptionalMetric:
    """A metric that needs weights of its own; off unless `enabled`."""

    enabled: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    """Passed to the component's factory (clip_t: FEATURE_EXTRACTORS['clip'], whose `name` is the
    open_clip architecture; aesthetic: REWARDS['aesthetic'])."""


@dataclass(frozen=True)
class RewardMetric:
    """One `[[rewards]]` table: a registered reward reported as an extra column `reward:<name>`."""

    name: str
    weight: float = 1.0
    """Kept for symmetry with RL recipes; each reward is reported on its own, unweighted."""
    label: str | None = None
    """Column name `reward:<label>` (default: the name); needed to list a reward twice."""
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def column(self) -> str:
        return f"reward:{self.label or self.name}"


@dataclass(frozen=True)
class EvalRecipe:
    """`psr eval`: generate every bench item with `model`, then score the outputs."""

    command: Literal["eval"] = "eval"
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    seeds_per_item: int = 1
    """Images per item; image k of every item uses seed sample.seed + k."""
    subsets: tuple[str, ...] = ()
    """Subsets to run (file stems in the bench folder); empty: every subset file found."""
    device: str = "auto"
    """Device of the scoring components ('auto', 'cpu', 'cuda:1', ...)."""
    extractor: dict[str, Any] = field(default_factory=lambda: {"name": "dino", "path": "facebook/dino-vits16"})
    """Identity features for both consistency protocols (FEATURE_EXTRACTORS name + options)."""
    localizer: dict[str, Any] = field(default_factory=lambda: {
        "name": "grounding-dino", "path": "IDEA-Research/grounding-dino-tiny"})
    """Subject detector (LOCALIZERS name + options), queried with each subject's category."""
    clip_t: OptionalMetric = field(default_factory=OptionalMetric)
    """Image-text cosine with an open_clip model (DreamBench uses ViT-B/32)."""
    aesthetic: OptionalMetric = field(default_factory=OptionalMetric)
    """REWARDS['aesthetic'] on each output."""
    rewards: tuple[RewardMetric, ...] = ()
    """Extra registered rewards, each reported as a column."""
    protocol: Literal["psrbench", "psr"] = "psrbench"
    """How the `cons PSRBench` and `pos PSRBench` columns are computed. "psrbench": exactly as
    PSRBench's scripts compute them (psr.eval.psrbench: first box in the detector's order,
    truncated crops, the whole image when detection fails, the relation read from the
    instruction). "psr": psr's corrected variant (NMS'd best-first boxes, clipped crops, a
    missing subject scores 0, the k-th-box rule at every count, the relation from the
    item's `position` key, a "next to" rule). `cons Hungarian` and `pos exact` are psr's
    own under either."""
    identity_threshold: float = 0.5
    """ToyWorld identity accuracy: a matched subject counts only if its similarity to its own
    reference is at least this (cosine of the extractor's embeddings)."""
    max_instances: int = 8
    """Most detections per category kept as instances for Hungarian matching (best first)."""
    same_category: bool = True
    """Hungarian matching pairs an instance only with references of the category it was
    detected as (as REWARDS['hungarian'] does by default)."""
    sheet_cell: int = 128
    """Side in pixels of each image in the contact sheets (NEAREST when enlarging)."""

    def __post_init__(self):
        _require(self.model.max_references >= 1, "model.max_references", "must be >= 1 to evaluate")
        _require(self.sample.num_images == 1, "sample.num_images",
                 "eval makes seeds_per_item images per item; set seeds_per_item instead")
        _require(self.seeds_per_item >= 1, "seeds_per_item", "must be >= 1")
        _require(len(set(self.subsets)) == len(self.subsets), "subsets", "names a subset twice")
        _check_component("extractor", self.extractor, FEATURE_EXTRACTORS, "feature extractor")
        _check_component("localizer", self.localizer, LOCALIZERS, "localizer")
        _require(0.0 <= self.identity_threshold <= 1.0, "identity_threshold", "must be in [0, 1]")
        _require(self.max_instances >= 1, "max_instances", "must be >= 1")
        _require(self.sheet_cell >= 16, "sheet_cell", "must be >= 16 pixels")
        clip = self.clip_t.options
        _require(not ("name" in clip and "arch" in clip), "clip_t.options",
                 "give the open_clip architecture once: name or arch, not both")
        _require(not self.clip_t.enabled or any(k in clip for k in ("path", "tiny", "config"))
                 or str(clip.get("name", "")).startswith("hf-hub:"), "clip_t.options",
                 'name the weights: path = "openai" (a pretrained tag), a checkpoint file or an open_clip '
                 'folder; tiny = true for a random-init test model')
        if self.aesthetic.enabled or self.rewards:
            self._check_rewards()

    def _check_rewards(self) -> None:
        """Names and options through psr.rewards' own checks (no weights load)."""
        specs = []
        for i, spec in enumerate(self.rewards):
            try:
                specs.append(RewardSpec(name=spec.name, weight=spec.weight, label=spec.label,
                                        options=dict(spec.options)))
            except RecipeError as err:
                raise RecipeError(f"rewards[{i}].{err.path}", err.message) from None
            _require(spec.name != "aesthetic" or not self.aesthetic.enabled, f"rewards[{i}].name",
                     "aesthetic is already a metric of its own ([aesthetic] enabled = true)")
        if specs:
            check_reward_specs(specs)
        if self.aesthetic.enabled:
            try:
                RewardSpec(name="aesthetic", options=dict(self.aesthetic.options))
            except RecipeError as err:
                raise RecipeError(f"aesthetic.{err.path}", err.message) from None


def clip_options(options: dict[str, Any]) -> dict[str, Any]:
    """`[clip_t] options` as FEATURE_EXTRACTORS["clip"] takes them: the recipe's `name` (the
    open_clip architecture, as docs/eval.md writes it) is the factory's `arch`."""
    options = dict(options)
    if "name" in options:
        options["arch"] = options.pop("name")
    return options


def resolve_eval(recipe: EvalRecipe) -> EvalRecipe:
    """Fill the model/sample values a preset decides (as `psr generate` does)."""
    from dataclasses import replace

    resolved = resolve_generate(GenerateRecipe(model=recipe.model, sample=recipe.sample))
    return replace(recipe, model=resolved.model, sample=resolved.sample)
