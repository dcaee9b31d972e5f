"""Prompts for RL: items read from a `psr synth` dataset or a PSRBench-format bench folder,
and the order in which a run draws them.

An item is what one group (or one preference pair) needs: the prompt, the reference
images with the category each is queried by, and where known the ground-truth target and
the ToyWorld example that re-renders it (dataset rows: `extra.example`; ToyWorld benches:
`gt.example`). Images are read when an item is used, not when the source is opened.

Order: the items of epoch e are a permutation that is a pure function of (seed, e); the
k-th prompt of process `rank` at step s sits at position (s·world + rank)·per_step + k, so a
resumed run draws exactly what an uninterrupted one would, and every group lives in one
process.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from psr.core.images import load_image
from psr.errors import UserError
from psr.eval.bench import load_bench
from psr.train.data import open_dataset


@dataclass
class PromptItem:
    key: str
    """Where it came from: "row 000123" or "Position[3]"."""
    prompt: str
    reference_paths: list[Path]
    categories: list[str]
    """The detector query of each reference, in reference order."""
    target_path: Path | None = None
    example: dict | None = None
    """The ToyWorld example (`Example.to_dict()`), when the item is a ToyWorld render."""
    size: tuple[int, int] | None = None
    """Target (height, width) in pixels, when known."""

    def references(self):
        """The reference images, 8-bit RGB PIL."""
        return [load_image(p, f"{self.key} reference") for p in self.reference_paths]

    def target(self):
        if self.target_path is None:
            raise UserError(f"{self.key}: has no ground-truth target")
        return load_image(self.target_path, f"{self.key} target")


@dataclass
class PromptSource:
    root: Path
    kind: str
    """"dataset" or "bench"."""
    items: list[PromptItem]
    skipped: dict[str, int] = field(default_factory=dict)
    """Reason → count of items left out."""

    def summary(self) -> str:
        left = "; ".join(f"{n} skipped: {why}" for why, n in self.skipped.items())
        return f"{len(self.items)} {self.kind} items" + (f" ({left})" if left else "")


def _dataset_items(root: Path, max_references: int, skipped: dict[str, int]) -> list[PromptItem]:
    dataset = open_dataset(str(root))
    if len(dataset.report):
        skipped["invalid manifest row"] = len(dataset.report)
    items = []
    for row in dataset.rows:
        refs = row["references"]
        if len(refs) > max_references:
            why = f"more than data.max_references ({max_references}) references"
            skipped[why] = skipped.get(why, 0) + 1
            continue
        categories = [""] * len(refs)
        for subject in row["subjects"]:
            categories[subject["reference"]] = subject.get("category") or subject.get("name") or ""
        if not all(c.strip() for c in categories):
            skipped["a reference without a subject category"] = skipped.get(
                "a reference without a subject category", 0) + 1
            continue
        example = (row.get("extra") or {}).get("example")
        items.append(PromptItem(key=f"row {row.get('id', row.get('index'))}", prompt=row["prompt"],
                                reference_paths=[root / r for r in refs], categories=categories,
                                target_path=root / row["target"], example=example, size=tuple(row["size"])))
    return items


def _bench_items(root: Path, subsets: Sequence[str], max_references: int, skipped: dict[str, int],
                 held_out_ok: bool) -> list[PromptItem]:
    info = root / "bench.json"
    if not held_out_ok and info.is_file():
        try:
            split = json.loads(info.read_text()).get("id_split")
        except (OSError, ValueError):
            split = None
        if split == "eval":
            raise UserError(f"data.path {root}: a bench of held-out (eval) identities; RL trains on the train "
                            f"split: psr synth --recipe recipes/bench-toy.toml --set toyworld.id_split=train "
                            f"--set seed=2000 --out DIR")
    bench = load_bench(root, subsets)
    items = []
    for entries in bench.subsets.values():
        for item in entries:
            if len(item.references) > max_references:
                why = f"more than {max_references} references"
                skipped[why] = skipped.get(why, 0) + 1
                continue
            gt = item.gt or {}
            target = item.data.get("gt_target_path")
            size = gt.get("size")
            items.append(PromptItem(key=item.where, prompt=item.instruction, reference_paths=list(item.references),
                                    categories=list(item.categories),
                                    target_path=bench.resolve(target) if target else None,
                                    example=gt.get("example"), size=(size, size) if isinstance(size, int) else None))
    return items


def open_source(path: str, subsets: Sequence[str] = (), max_references: int = 8, what: str = "data.path",
                held_out_ok: bool = False) -> PromptSource:
    """Read a dataset (manifest.jsonl / dataset.json) or a bench (<Subset>.json lists) folder;
    a one-line `UserError` when it is missing, empty or neither."""
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"{what} {path}: no such folder (make one with `psr synth --recipe "
                        f"recipes/synth-toy.toml --out {path}`)")
    if not root.is_dir():
        raise UserError(f"{what} {path}: not a folder")
    skipped: dict[str, int] = {}
    if any((root / name).exists() for name in ("manifest.jsonl", "manifest", "dataset.json")):
        if subsets:
            raise UserError(f"{what} {path}: a dataset has no subsets; leave data.subsets empty")
        kind, items = "dataset", _dataset_items(root, max_references, skipped)
    else:
        kind, items = "bench", _bench_items(root, subsets, max_references, skipped, held_out_ok)
    if not items:
        raise UserError(f"{what} {path}: no usable items" + (f" ({'; '.join(skipped)})" if skipped else ""))
    return PromptSource(root, kind, items, skipped)


def eval_items(bench: str, subsets: Sequence[str], limit: int, max_references: int) -> list[PromptItem]:
    """The first `limit` items of each chosen subset of a held-out bench."""
    source = open_source(bench, subsets, max_references, what="eval.bench", held_out_ok=True)
    if source.kind != "bench":
        raise UserError(f"eval.bench {bench}: a training dataset, not a bench (<Subset>.json lists)")
    taken: dict[str, int] = {}
    chosen = []
    for item in source.items:
        subset = item.key.split("[")[0]
        if taken.get(subset, 0) < limit:
            taken[subset] = taken.get(subset, 0) + 1
            chosen.append(item)
    return chosen


def check_source(recipe, source: PromptSource, stride: int) -> None:
    """What the recipe needs from its items and sizes, checked before any weights load."""
    if recipe.objective == "focusdpo" and recipe.dpo.pairs == "toyworld-disrupted":
        bad = [i for i in source.items if not i.example or i.target_path is None]
        if bad:
            raise UserError(f"dpo.pairs toyworld-disrupted: {bad[0].key} of {recipe.data.path} has no ToyWorld "
                            "example and target; use a ToyWorld dataset (psr synth recipes/synth-toy.toml) or "
                            "set dpo.pairs = \"self-ranked\"")
    for key, size in (("rollout.size", recipe.rollout.size), ("eval.size", recipe.eval.size)):
        if size % stride:
            raise UserError(f"{key} {size}: must be a multiple of {stride} (this preset's pixels per token)")


def draw_indices(count: int, seed: int, step: int, rank: int, world: int, per_step: int) -> list[int]:
    """Item indices of process `rank`'s prompts at `step` (module docstring)."""
    out, cached = [], {}
    for k in range(per_step):
        epoch, index = divmod((step * world + rank) * per_step + k, count)
        if epoch not in cached:
            cached[epoch] = np.random.default_rng([seed, epoch, 0x5071]).permutation(count)
        out.append(int(cached[epoch][index]))
    return out
