"""Reading a PSRBench-format bench folder, and writing its files back with `result_path`.

A bench folder holds one JSON list per subset (`<Subset>.json`, UTF-8 with or without a byte
order mark); a JSON object (a table such as bench.json or results.json) is passed over, and
any other JSON file is refused (`_subset_files`). Each item has PSRBench's keys:
`instruction`, `input_path` (list), `category1` … `categoryN` (one per reference), for
Position items `position` (the relation phrase), after generation `result_path`; ToyWorld
benches add `gt_target_path` and `gt`. Items are kept as the parsed JSON dicts so they are
written back with every key and value unchanged.

Relative paths are resolved against the bench folder first, then the working directory
(PSRBench's own scripts write paths relative to where they ran).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from psr.core.recipe import _suggest
from psr.errors import UserError

# PSRBench's order, so tables list subsets the way the paper does.
SUBSET_ORDER = ("Attribute", "Action", "Background", "Position", "Complex", "Three", "Four")
_CATEGORY_KEY = re.compile(r"category(\d+)")

@dataclass
class Item:
    """One bench item; `data` is the parsed JSON dict, never modified."""

    subset: str
    index: int
    data: dict
    references: list[Path]
    categories: list[str]

    @property
    def instruction(self) -> str:
        return self.data["instruction"]

    @property
    def position(self) -> str | None:
        return self.data.get("position")

    @property
    def gt(self) -> dict | None:
        gt = self.data.get("gt")
        return gt if isinstance(gt, dict) else None

    @property
    def where(self) -> str:
        return f"{self.subset}[{self.index}]"


@dataclass
class Bench:
    root: Path
    subsets: dict[str, list[Item]]
    """Subset name → its items (all of them; `--limit` is applied by the caller)."""

    def resolve(self, path: str) -> Path:
        return resolve_path(self.root, path)


def resolve_path(root: Path, path: str) -> Path:
    """`path` as is when absolute; else under `root`, or under the working directory when
    only that exists (when neither exists, the bench-relative path, to report as missing)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if not (root / p).exists() and p.exists():
        return p.resolve()
    return root / p


def _read_json(path: Path):
    # utf-8-sig: a file saved by an editor that puts a byte order mark first reads the same
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"bench {path}: cannot read it ({err.__class__.__name__})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"bench {path}: invalid JSON ({err.msg} at line {err.lineno})") from None


def _kind(value) -> str:
    return {dict: "a JSON object", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}")


def _subset_files(root: Path, requested: Sequence[str] = ()) -> dict[str, tuple[Path, list]]:
    """Stem → (path, parsed list) of every subset file in `root`, in PSRBench's order.

    A subset file is a JSON list. A JSON object is a table (bench.json, results.json, an
    eval's samples.json) and is passed over, unless its name is a PSRBench subset or one
    asked for; every other file, one that does not parse or holds a bare value, is refused
    with its name: skipping it would drop a subset from the overall row without a word."""
    found = {p.stem: p for p in sorted(root.glob("*.json")) if not p.name.startswith(".")}
    lists = {}
    for stem, path in found.items():
        data = _read_json(path)
        if isinstance(data, list):
            lists[stem] = (path, data)
        elif not isinstance(data, dict) or stem in SUBSET_ORDER or stem in requested:
            raise UserError(f"bench {path}: holds {_kind(data)}, not a list of items (a subset file is a JSON "
                            "list; move other files out of the bench folder)")
    known = [s for s in SUBSET_ORDER if s in lists]
    return {s: lists[s] for s in known + sorted(set(lists) - set(known))}


def _check_item(subset: str, index: int, item, root: Path) -> Item:
    where = f"bench {subset}.json item {index}"
    if not isinstance(item, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(item).__name__}")
    instruction = item.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise UserError(f"{where}: 'instruction' must be a non-empty string")
    paths = item.get("input_path")
    if isinstance(paths, str):
        raise UserError(f"{where}: 'input_path' must be a list of paths, got a string")
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise UserError(f"{where}: 'input_path' must be a non-empty list of path strings")
    numbers = sorted(int(m.group(1)) for key in item if (m := _CATEGORY_KEY.fullmatch(key)))
    if numbers != list(range(1, len(numbers) + 1)):
        raise UserError(f"{where}: category keys must be category1..categoryN without gaps, got "
                        f"{', '.join(f'category{n}' for n in numbers) or 'none'}")
    if len(numbers) != len(paths):
        raise UserError(f"{where}: {len(paths)} input_path entries but {len(numbers)} category keys; "
                        "give one category per reference")
    categories = [item[f"category{n}"] for n in numbers]
    if not all(isinstance(c, str) and c.strip() for c in categories):
        raise UserError(f"{where}: every categoryN must be a non-empty string")
    for key in ("position", "result_path", "gt_target_path"):
        if key in item and not isinstance(item[key], str):
            raise UserError(f"{where}: '{key}' must be a string")
    return Item(subset, index, item, [resolve_path(root, p) for p in paths], categories)


def load_bench(folder: str | Path, subsets: Sequence[str] = ()) -> Bench:
    """Read and check every item of the chosen subsets (all subsets when empty)."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise UserError(f"bench {root}: no such folder")
    if not root.is_dir():
        raise UserError(f"bench {root}: is not a folder")
    files = _subset_files(root, subsets)
    if not files:
        raise UserError(f"bench {root}: holds no subset files (<Subset>.json lists, e.g. Position.json); "
                        "make one with psr synth --recipe recipes/bench-toy.toml")
    for name in subsets:
        if name not in files:
            raise UserError(f"subset {name!r}: not in bench {root}{_suggest(name, files)}; "
                            f"available: {', '.join(files)}")
    chosen = list(subsets) or list(files)
    result = {}
    for name in chosen:
        _, items = files[name]
        result[name] = [_check_item(name, i, item, root) for i, item in enumerate(items)]
    return Bench(root, result)


def with_result_paths(bench: Bench, subset: str, results: dict[int, str]) -> list[dict]:
    """The subset's items as read, with `result_path` set for the indices in `results`
    (every other key and value untouched, key order kept, a new key appended)."""
    out = []
    for item in bench.subsets[subset]:
        data = dict(item.data)
        if item.index in results:
            data["result_path"] = results[item.index]
        out.append(data)
    return out
