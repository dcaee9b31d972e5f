"""The reward table, reward specs from recipes, and the weighted mix.

A recipe lists rewards as an array of tables, either flat (every key other than name,
weight and label is an option of that reward) — read with `reward_specs_from_toml`:

    [[rewards]]
    name = "psr"
    weight = 1.0
    extractor = { name = "dino", path = "facebook/dino-vits16" }

or with the options in their own table, which `psr.core.recipe.build` reads directly into
a field `rewards: tuple[RewardSpec, ...]`:

    [[rewards]]
    name = "clip_t"
    weight = 0.5
    options = { extractor = { name = "clip", path = "openai" } }

Both are checked without loading anything: an unknown reward, an unknown option or a
wrong type is a one-line error naming the key path and the nearest valid name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Sequence

from psr.core.recipe import _suggest
from psr.core.registry import Registry
from psr.errors import RecipeError
from psr.rewards.base import ComponentCache, RewardBatch, RewardResult, parse_options
from psr.rewards.clip import AestheticReward, ClipTReward
from psr.rewards.consistency import HungarianReward, PsrReward

REWARDS: Registry[Any] = Registry("reward", {
    "psr": PsrReward,
    "hungarian": HungarianReward,
    "clip_t": ClipTReward,
    "aesthetic": AestheticReward,
})
"""Name → factory `(device="cpu", *, cache=None, **options) -> Reward`. Each factory has an
`Options` dataclass: its fields are the reward's options (types, defaults, help text)."""

SPEC_KEYS = ("name", "weight", "label", "options")


def _check_name(name: Any, path: str) -> None:
    if not isinstance(name, str):
        raise RecipeError(path, f"expected a reward name (a string), got {name!r}")
    if name not in REWARDS:
        raise RecipeError(path, f"unknown reward {name!r}{_suggest(name, REWARDS)}; choose one of {', '.join(REWARDS)}")


@dataclass(frozen=True)
class RewardSpec:
    """One `[[rewards]]` table: which reward, its weight in the mix, its options."""

    name: str
    """A name from psr.rewards.REWARDS: psr, hungarian, clip_t, aesthetic."""
    weight: float = 1.0
    """Factor of this reward's total in the mix (0: computed and logged only)."""
    label: str | None = None
    """Name of its terms in logs (default: the reward name); needed to list a reward twice."""
    options: dict[str, Any] = field(default_factory=dict)
    """The reward's options (see each reward's Options); in TOML they may also sit flat in
    the `[[rewards]]` table beside name and weight."""

    RECIPE_EXTRA_KEYS: ClassVar[str] = "options"

    def __post_init__(self):
        _check_name(self.name, "name")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise RecipeError("weight", f"expected a finite number, got {self.weight!r}")
        object.__setattr__(self, "weight", float(self.weight))
        if self.label is not None and (not self.label or "/" in self.label):
            raise RecipeError("label", f"{self.label!r}: must be non-empty and without '/' (terms are label/term)")
        parse_options(REWARDS[self.name].Options, dict(self.options), "options")

    @property
    def key(self) -> str:
        """The name of this reward's total among the mix's terms."""
        return self.label or self.name


def reward_option_names(name: str) -> list[str]:
    return [f.name for f in fields(REWARDS[name].Options)]


def reward_specs_from_toml(tables: Sequence[dict | RewardSpec], path_prefix: str = "rewards") -> tuple[RewardSpec, ...]:
    """RewardSpecs from `[[rewards]]` tables (flat options or an `options` table, or both),
    checked as `check_reward_specs` does; errors name `path_prefix[k].key`."""
    if isinstance(tables, dict):
        raise RecipeError(path_prefix, "expected an array of tables ([[rewards]]), got one table")
    specs = []
    for k, table in enumerate(tables):
        path = f"{path_prefix}[{k}]"
        if isinstance(table, RewardSpec):
            specs.append(table)
            continue
        if not isinstance(table, dict):
            raise RecipeError(path, f"expected a table, got {type(table).__name__}")
        table = dict(table)
        if "name" not in table:
            raise RecipeError(f"{path}.name", f"required key is missing; choose one of {', '.join(REWARDS)}")
        name = table.pop("name")
        _check_name(name, f"{path}.name")
        options = table.pop("options", {})
        if not isinstance(options, dict):
            raise RecipeError(f"{path}.options", "expected a table")
        spec_keys = {key: table.pop(key) for key in ("weight", "label") if key in table}
        valid = list(SPEC_KEYS) + reward_option_names(name)
        for key in table:
            if key not in valid:
                raise RecipeError(f"{path}.{key}", f"unknown key for reward {name!r}{_suggest(key, valid)}")
            if key in options:
                raise RecipeError(f"{path}.{key}", "given both flat and inside `options`; keep one")
        options = {**options, **table}
        parse_options(REWARDS[name].Options, options, path)
        try:
            specs.append(RewardSpec(name=name, options=options, **spec_keys))
        except RecipeError as err:
            raise RecipeError(f"{path}.{err.path}", err.message) from None
    check_reward_specs(specs, path_prefix)
    return tuple(specs)


def check_reward_specs(specs: Sequence[RewardSpec | dict], path_prefix: str = "rewards") -> None:
    """Validate a reward list without loading weights: names, options and types (also for
    dicts, read as `reward_specs_from_toml` reads them), at least one reward, distinct labels."""
    specs = list(specs)
    if not specs:
        raise RecipeError(path_prefix, "no rewards; add at least one [[rewards]] table with a name")
    if any(isinstance(s, dict) for s in specs):
        reward_specs_from_toml(specs, path_prefix)  # checks, then calls back with RewardSpecs only
        return
    seen: dict[str, int] = {}
    for k, spec in enumerate(specs):
        if not isinstance(spec, RewardSpec):
            raise RecipeError(f"{path_prefix}[{k}]", f"expected a reward table, got {type(spec).__name__}")
        if spec.key in seen:
            raise RecipeError(f"{path_prefix}[{k}].label",
                              f"{spec.key!r} is already used by {path_prefix}[{seen[spec.key]}]; "
                              "give each reward listed twice its own label")
        seen[spec.key] = k


class RewardMix:
    """Σ_k weight_k · total_k over the listed rewards, with every reward's terms kept:
    "<key>" is reward k's total and "<key>/<term>" its sub-terms (key = label or name);
    details[b] = {key: that reward's details of sample b}."""

    name = "mix"

    def __init__(self, entries: Sequence[tuple[RewardSpec, Any]]):
        self.entries = list(entries)

    @property
    def specs(self) -> list[RewardSpec]:
        return [spec for spec, _ in self.entries]

    def __call__(self, batch: RewardBatch) -> RewardResult:
        import torch

        size = len(batch)
        total = torch.zeros(size, dtype=torch.float32)
        terms: dict[str, torch.Tensor] = {}
        details: list[dict] = [{} for _ in range(size)]
        for spec, reward in self.entries:
            result = reward(batch)
            if tuple(result.total.shape) != (size,) or len(result.details) != size:
                raise RuntimeError(f"reward {spec.key!r} returned {tuple(result.total.shape)} totals and "
                                   f"{len(result.details)} details for a batch of {size}")  # a reward bug
            total = total + spec.weight * result.total.float()
            terms[spec.key] = result.total.float()
            for term, values in result.terms.items():
                terms[f"{spec.key}/{term}"] = values.float()
            for b in range(size):
                details[b][spec.key] = result.details[b]
        return RewardResult(total, terms, details)


def build_rewards(specs: Sequence[RewardSpec | dict], device="cpu", cache: ComponentCache | None = None) -> RewardMix:
    """Check the specs, then build each reward once, sharing components through `cache`."""
    if any(isinstance(s, dict) for s in specs):
        specs = reward_specs_from_toml(specs)
    check_reward_specs(specs)
    cache = cache if cache is not None else ComponentCache()
    return RewardMix([(spec, REWARDS[spec.name](device, cache=cache, **spec.options)) for spec in specs])
