"""The reward interface: a batch in, per-sample totals plus named sub-terms out.

`RewardBatch` holds B generated images with their prompts, references and detector
queries; `RewardResult` holds the [B] totals, [B] sub-terms for logging and one JSON-able
details dict per sample. `ComponentCache` builds every distinct feature extractor or
localizer once, so rewards that name the same one share it.

Failure policy (every reward follows it): a component that raises on one input
(`COMPONENT_ERRORS`), a missing detection or a box that cannot be cropped is written into
that sample's details with a reason, and the affected value takes the reward's documented
penalty. Nothing is skipped, and nothing else is caught: a `UserError` (bad configuration)
and running out of memory propagate.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from psr.core.detect import build_localizer, crop_box
from psr.core.features import as_feature_extractor
from psr.core.recipe import _suggest, build
from psr.errors import RecipeError, UserError

if TYPE_CHECKING:
    import torch
    from PIL import Image

Box = tuple[float, float, float, float]

# What a model may raise on one bad input (a malformed image, an odd size, a shape it
# rejects). Out-of-memory and NotImplementedError (a component asked for something it
# cannot do, e.g. text from an image-only extractor) are RuntimeErrors too, but they are
# faults of the setup, not of the sample, so `run_component` re-raises them.
COMPONENT_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, ValueError, OSError)


@dataclass
class RewardBatch:
    """B samples to score. Subject i of sample b is `references[b][i]`, queried in the
    generated image by `categories[b][i]`; `reference_boxes[b][i]` is its known box in the
    reference as (x0, y0, x1, y1) pixels, or None to detect it there."""

    images: list["Image.Image"]
    prompts: list[str]
    references: list[list["Image.Image"]]
    categories: list[list[str]]
    reference_boxes: list[list[tuple | None]] | None = None

    def __post_init__(self):
        size = len(self.images)
        for name in ("prompts", "references", "categories"):
            if len(getattr(self, name)) != size:
                raise UserError(f"reward batch: {len(getattr(self, name))} {name} for {size} images")
        for b, (refs, cats) in enumerate(zip(self.references, self.categories)):
            if len(refs) != len(cats):
                raise UserError(f"reward batch sample {b}: {len(refs)} references but {len(cats)} categories")
            if any(not isinstance(c, str) or not c.strip() for c in cats):
                raise UserError(f"reward batch sample {b}: every category must be a non-empty string, got {cats}")
        if self.reference_boxes is not None:
            if len(self.reference_boxes) != size:
                raise UserError(f"reward batch: {len(self.reference_boxes)} reference_boxes lists for {size} images")
            for b, (boxes, refs) in enumerate(zip(self.reference_boxes, self.references)):
                if len(boxes) != len(refs):
                    raise UserError(f"reward batch sample {b}: {len(boxes)} reference boxes for {len(refs)} references")
                for box in boxes:
                    if box is not None and len(box) != 4:
                        raise UserError(f"reward batch sample {b}: reference box {box} is not (x0, y0, x1, y1)")

    def __len__(self) -> int:
        return len(self.images)

    def reference_box(self, b: int, i: int) -> tuple | None:
        return None if self.reference_boxes is None else self.reference_boxes[b][i]


@dataclass
class RewardResult:
    total: "torch.Tensor"
    """[B] float32: the reward of each sample."""
    terms: dict[str, "torch.Tensor"] = field(default_factory=dict)
    """Named [B] float32 sub-terms, for logging (NaN where a term is undefined for a sample)."""
    details: list[dict] = field(default_factory=list)
    """Per sample, JSON-able: per-subject scores, boxes, the assignment, failures."""


class Reward(Protocol):
    name: str

    def __call__(self, batch: RewardBatch) -> RewardResult: ...


def as_tensor(values: Sequence[float]) -> "torch.Tensor":
    """[B] float32 CPU tensor."""
    import torch

    return torch.tensor([float(v) for v in values], dtype=torch.float32)


def json_float(value: float) -> float | None:
    """A float for JSON: rounded for readability, NaN written as null."""
    value = float(value)
    return None if math.isnan(value) else round(value, 6)


def describe_error(err: BaseException) -> str:
    text = str(err).strip()
    return f"{err.__class__.__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError)


def run_component(fn: Callable, *args) -> tuple[Any, str | None]:
    """(fn(*args), None), or (None, reason) when fn raises one of `COMPONENT_ERRORS`."""
    try:
        return fn(*args), None
    except COMPONENT_ERRORS as err:
        if isinstance(err, NotImplementedError) or _is_out_of_memory(err):
            raise
        return None, describe_error(err)


def embed_images(extractor, images: Sequence["Image.Image"]) -> tuple["torch.Tensor", list[str | None]]:
    """Embed all images in one call: ([N, D] float32, per-row failure reason or None).

    When the batched call fails, each image is embedded alone so one bad crop fails alone;
    a failed row is left at zeros and must not be read (its reason says why).
    """
    import torch

    if not images:
        return torch.zeros(0, 0), []
    out, reason = run_component(extractor.embed_images, list(images))
    if reason is None:
        return out.float(), [None] * len(images)
    rows, reasons = [], []
    for image in images:
        row, why = run_component(extractor.embed_images, [image])
        rows.append(None if why else row[0].float())
        reasons.append(why)
    dim = next((r.shape[0] for r in rows if r is not None), 1)
    return torch.stack([r if r is not None else torch.zeros(dim) for r in rows]), reasons


def checked_box(box: Sequence[float], width: int, height: int) -> tuple[Box | None, str | None]:
    """The box clipped to the image, or (None, reason) when it is not finite or is empty there."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        return None, f"box {box!r} is not four numbers"
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None, f"box {[x0, y0, x1, y1]} is not finite"
    x0, x1 = max(0.0, x0), min(float(width), x1)
    y0, y1 = max(0.0, y0), min(float(height), y1)
    if x1 <= x0 or y1 <= y0:
        return None, f"box {list(box)} is empty inside the {width}x{height} image"
    return (x0, y0, x1, y1), None


def crop(image: "Image.Image", box: Sequence[float], pad: float) -> tuple["Image.Image | None", Box | None, str | None]:
    """(crop, clipped box, None), or (None, None, reason) when the box cannot be cropped."""
    clipped, reason = checked_box(box, image.width, image.height)
    if reason:
        return None, None, reason
    return crop_box(image, clipped, pad), clipped, None


# ---------------------------------------------------------------------------- components
def component_key(spec: dict, device) -> str:
    return json.dumps({"device": str(device), **spec}, sort_keys=True, default=str)


class ComponentCache:
    """Builds each distinct feature extractor / localizer once and hands out the same object.

    A spec is `{"name": <registry name>, **options}` (FEATURE_EXTRACTORS / LOCALIZERS);
    two specs are the same component when they are equal as JSON, on the same device.
    An object that is already built (anything but a dict) is returned as it is.
    """

    def __init__(self):
        self._extractors: dict[str, Any] = {}
        self._localizers: dict[str, Any] = {}

    def get_extractor(self, spec, device="cpu"):
        if not isinstance(spec, dict):
            return spec
        key = component_key(spec, device)
        if key not in self._extractors:
            self._extractors[key] = as_feature_extractor(dict(spec), device)
        return self._extractors[key]

    def get_localizer(self, spec, device="cpu"):
        if not isinstance(spec, dict):
            return spec
        key = component_key(spec, device)
        if key not in self._localizers:
            options = dict(spec)
            if "name" not in options:
                raise UserError(f"localizer options {sorted(options)}: missing 'name'")
            self._localizers[key] = build_localizer(options.pop("name"), device, **options)
        return self._localizers[key]

    def __len__(self) -> int:
        return len(self._extractors) + len(self._localizers)


# ---------------------------------------------------------------------------- options
COMPONENT_REGISTRIES = {"extractor": ("psr.core.features", "FEATURE_EXTRACTORS", "feature extractor"),
                        "localizer": ("psr.core.detect", "LOCALIZERS", "localizer")}


def check_component(spec: Any, path: str, kind: str) -> None:
    """A component spec must be a table with a registered `name` (an object passes as it is)."""
    import importlib

    if not isinstance(spec, dict):
        return
    module, table_name, what = COMPONENT_REGISTRIES[kind]
    table = getattr(importlib.import_module(module), table_name)
    name = spec.get("name")
    if name is None:
        raise RecipeError(path, f"missing 'name' (a {what}: {', '.join(table)})")
    if name not in table:
        raise RecipeError(f"{path}.name", f"unknown {what} {name!r}{_suggest(str(name), table)}; "
                                          f"choose one of {', '.join(table)}")


def parse_options(options_cls: type, options: dict[str, Any], path: str = "options"):
    """Build `options_cls` from a dict of reward options, checking names and types without
    loading anything. Component fields (extractor, localizer) may hold a built object
    instead of a table; it is passed through untouched."""
    own = {f.name for f in dataclasses.fields(options_cls)}
    tables, objects = {}, {}
    for key, value in options.items():
        if key in COMPONENT_REGISTRIES and key in own and not isinstance(value, dict):
            objects[key] = value
        else:
            tables[key] = value
    parsed = build(options_cls, tables, path)
    for key in COMPONENT_REGISTRIES:
        if key in tables and key in own:
            check_component(tables[key], f"{path}.{key}" if path else key, key)
    return dataclasses.replace(parsed, **objects) if objects else parsed
