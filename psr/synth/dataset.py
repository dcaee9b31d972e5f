"""The psr dataset format: sharded PNGs plus a JSONL manifest, and a torch `Dataset` over it.

Layout of a dataset folder:

    dataset.json            format version, sample count, shard size, token stride, counts
    recipe.toml             the resolved recipe that made it
    shards/00000/           PNGs of shard 0: 000000-target.png, 000000-ref0.png, …
    manifest/00000.jsonl    rows of shard 0, written (atomically) only once its PNGs exist
    manifest/00000.rejected.jsonl   candidates a filter dropped, with reasons (if any)
    manifest.jsonl          every row in sample order, written when all shards are done

One manifest row (paths are relative to the dataset folder):

    {"id": "000123", "index": 123, "prompt": "...", "size": [H, W],
     "target": "shards/00000/000123-target.png",
     "references": ["shards/00000/000123-ref0.png", ...],
     "subjects": [{"name": "...", "category": "...", "identity": 17 | null,
                   "box": [x0, y0, x1, y1], "mask": {"size": [H, W], "counts": [...]},
                   "reference": 0,
                   "correspondence": {"target_grid": [gh, gw], "reference_grid": [rh, rw],
                                      "pairs": [[reference_token, target_token], ...]},
                   "extra": {...}}],
     "provenance": {"generator": "...", "seed": ..., "recipe_hash": "..."},
     "extra": {...}}

Masks are run-length encoded in row-major order: `counts` alternates runs of 0 and 1,
starting with a (possibly empty) run of 0. Token index = row * grid_w + col on the 2x2-packed
latent grid, whose stride in pixels is `token_stride` in dataset.json.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from psr.core.io import create_temp_dir, write_text_atomic
from psr.errors import UserError
from psr.synth.sample import Rejection, SynthSample

FORMAT_VERSION = 1


# ---------------------------------------------------------------------------- masks
def rle_encode(mask: np.ndarray) -> dict:
    """[H, W] bool → {"size": [H, W], "counts": [...]} (row-major, runs start with 0s)."""
    flat = np.asarray(mask, dtype=bool).ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def rle_decode(rle: dict) -> np.ndarray:
    h, w = rle["size"]
    counts = rle["counts"]
    if sum(counts) != h * w:
        raise ValueError(f"mask runs cover {sum(counts)} pixels, not {h}x{w}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape(h, w)


# ---------------------------------------------------------------------------- writing
def shard_name(shard: int) -> str:
    return f"{shard:05d}"


def _row(sample: SynthSample, index: int, shard_dir: str, token_stride: int) -> tuple[dict, dict]:
    """The manifest row of `sample` and the {relative path: image} it needs written."""
    sid = f"{index:06d}"
    files = {f"{shard_dir}/{sid}-target.png": sample.target}
    h, w = sample.target.height, sample.target.width
    references, subjects = [], []
    for k, subject in enumerate(sample.subjects):
        ref_path = f"{shard_dir}/{sid}-ref{k}.png"
        files[ref_path] = subject.reference
        references.append(ref_path)
        rw, rh = subject.reference.size
        subjects.append({
            "name": subject.name,
            "category": subject.category,
            "identity": subject.identity,
            "box": [float(v) for v in subject.box],
            "mask": rle_encode(subject.mask),
            "reference": k,
            "correspondence": {
                "target_grid": [h // token_stride, w // token_stride],
                "reference_grid": [rh // token_stride, rw // token_stride],
                "pairs": [[int(a), int(b)] for a, b in subject.correspondence],
            },
            "extra": subject.extra,
        })
    row = {"id": sid, "index": index, "prompt": sample.prompt, "size": [h, w], "target": f"{shard_dir}/{sid}-target.png",
           "references": references, "subjects": subjects, "provenance": sample.provenance, "extra": sample.extra}
    return row, files


@contextlib.contextmanager
def writing_to(root: Path, what: str):
    """Turn a failed write of `what` (a path under `root`) into one line: a full disk or a
    folder made read-only is the user's to fix, and a rerun then finishes the work. A
    failed write() names no file (only open() does), so the caller says which it was."""
    try:
        yield
    except OSError as err:
        raise UserError(f"output {root}: cannot write {what} ({err.strerror or err}); fix that and rerun the "
                        "same command to finish") from None


def write_shard(root: Path, shard: int, results: Iterable[tuple[int, SynthSample | Rejection]],
                token_stride: int) -> tuple[int, int]:
    """Write one shard: PNGs into a hidden staging folder renamed into place, then the
    manifest part. A kill at any point leaves no manifest part, so the shard is redone.

    Returns (rows written, candidates rejected).
    """
    name = shard_name(shard)
    final_dir = root / "shards" / name
    manifest = root / "manifest"
    part, rejected_part = manifest / f"{name}.jsonl", manifest / f"{name}.rejected.jsonl"
    with writing_to(root, f"shards/{name}"):
        staging = create_temp_dir(root / "shards", f".tmp-{name}-")
    rows, rejected = [], []
    try:
        for index, result in results:
            if isinstance(result, Rejection):
                rejected.append({"index": index, "reason": result.reason, "provenance": result.provenance})
                continue
            row, files = _row(result, index, f"shards/{name}", token_stride)
            for rel, image in files.items():
                with writing_to(root, rel):
                    image.save(staging / Path(rel).name, format="PNG", compress_level=1)
            rows.append(row)
        with writing_to(root, f"shards/{name}"):
            # A shard being redone (damaged, or cut to another sample count): its old parts
            # go before its files do, so a manifest part never names a file that is missing.
            part.unlink(missing_ok=True)
            rejected_part.unlink(missing_ok=True)
            if final_dir.exists():  # also left by a run killed between this rename and its manifest
                shutil.rmtree(final_dir)
            staging.rename(final_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if rejected:
        with writing_to(root, f"manifest/{rejected_part.name}"):
            write_text_atomic(rejected_part, "".join(json.dumps(r) + "\n" for r in rejected))
    with writing_to(root, f"manifest/{part.name}"):
        write_text_atomic(part, "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows), len(rejected)


def shard_indices(shard: int, shard_size: int, num_samples: int) -> range:
    return range(shard * shard_size, min((shard + 1) * shard_size, num_samples))


def _part_indices(path: Path) -> tuple[list, str]:
    """The `index` of each line of a manifest part, or a reason it cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as err:
        return [], f"{path.parent.name}/{path.name} cannot be read ({err.strerror or err})"
    indices = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except ValueError:  # not UTF-8, or not JSON
            return [], f"{path.parent.name}/{path.name} line {number} is not a JSON row"
        index = row.get("index") if isinstance(row, dict) else None
        if not isinstance(index, int) or isinstance(index, bool):
            return [], f"{path.parent.name}/{path.name} line {number} has no sample index"
        indices.append((index, row))
    return indices, ""


def check_shard(root: Path, shard: int, shard_size: int, num_samples: int) -> tuple[bool, str]:
    """(complete, damage). A shard is complete when its manifest part exists, its rows and
    rejections cover exactly its sample range once each, and every file its rows name is
    there and non-empty (a stat, no decode). `damage` says why a shard that was finished
    cannot be trusted; it is empty for one that is simply not (or no longer) finished: no
    part yet, or a part written for another --num-samples."""
    name = shard_name(shard)
    part = root / "manifest" / f"{name}.jsonl"
    if not part.is_file():
        return False, ""
    rows, damage = _part_indices(part)
    if damage:
        return False, damage
    rejected_part = root / "manifest" / f"{name}.rejected.jsonl"
    rejected: list = []
    if rejected_part.is_file():
        rejected, damage = _part_indices(rejected_part)
        if damage:
            return False, damage
    indices = [index for index, _ in rows + rejected]
    expected = shard_indices(shard, shard_size, num_samples)
    if len(set(indices)) != len(indices):
        return False, f"manifest/{name} names a sample twice"
    if set(indices) != set(expected):
        written_for = range(expected.start, expected.start + len(indices))
        if indices and set(indices) == set(written_for):  # made for another sample count: not damage
            return False, ""
        return False, f"manifest/{name} does not cover samples {expected.start}-{expected.stop - 1}"
    for index, row in rows:
        references = row.get("references")
        paths = [row.get("target"), *references] if isinstance(references, list) else [None]
        for rel in paths:
            if not isinstance(rel, str):
                return False, f"manifest/{name}.jsonl: sample {index} does not name its images"
            try:
                size = (root / rel).stat().st_size
            except (OSError, ValueError):  # ValueError: a NUL in the name
                return False, f"{rel} is missing"
            if size == 0:
                return False, f"{rel} is empty"
    return True, ""


def merge_manifest(root: Path, num_shards: int) -> int:
    """Concatenate the shard parts into manifest.jsonl in sample order; returns the row count."""
    parts = [(root / "manifest" / f"{shard_name(s)}.jsonl").read_text() for s in range(num_shards)]
    text = "".join(parts)
    write_text_atomic(root / "manifest.jsonl", text)
    return sum(1 for line in text.splitlines() if line.strip())


def num_shards_for(num_samples: int, shard_size: int) -> int:
    return max(1, math.ceil(num_samples / shard_size))


# ---------------------------------------------------------------------------- reading
class RowError(ValueError):
    """A manifest row that cannot be used; the message says why."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise RowError(message)


def _int(value: Any) -> bool:
    return type(value) is int  # JSON true/false load as bool, which is an int to isinstance


def _text(value: Any) -> bool:
    """A str that is valid Unicode: JSON's \\ud800-style escapes load as lone surrogates,
    which no tokenizer or file can take."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _image_file(root: Path, path: Any) -> None:
    _require(isinstance(path, str) and (root / path).is_file(), f"missing image file {path!r}")
    _require((root / path).stat().st_size > 0, f"empty image file {path!r}")


def validate_row(row: Any, root: Path) -> None:
    """Raise `RowError` with the reason if `row` is not a usable sample: every field a
    reader uses has its type and range, and every image it names is a non-empty file
    (a stat: images are decoded, and a broken one reported, when read)."""
    _require(isinstance(row, dict), "row is not a JSON object")
    for key, kind in (("prompt", str), ("target", str), ("references", list), ("subjects", list), ("size", list)):
        _require(isinstance(row.get(key), kind), f"'{key}' missing or not a {kind.__name__}")
    _require(row.get("id") is None or isinstance(row["id"], str) or _int(row["id"]),
             "'id' is not a string or an integer")
    _require(_text(row["prompt"]), "prompt is not valid Unicode text")
    _require(row["prompt"].strip() != "", "empty prompt")
    _require(len(row["size"]) == 2 and all(_int(v) and v > 0 for v in row["size"]), "bad 'size'")
    _require(row.get("extra") is None or isinstance(row["extra"], dict), "'extra' is not an object")
    h, w = row["size"]
    _require(len(row["subjects"]) >= 1, "no subjects")
    for path in [row["target"], *row["references"]]:
        _image_file(root, path)
    for k, subject in enumerate(row["subjects"]):
        _require(isinstance(subject, dict), f"subject {k} is not an object")
        for key in ("name", "category"):
            _require(subject.get(key) is None or _text(subject[key]), f"subject {k}: '{key}' is not text")
        _require(subject.get("identity") is None or _int(subject["identity"]), f"subject {k}: bad 'identity'")
        _require(subject.get("extra") is None or isinstance(subject["extra"], dict),
                 f"subject {k}: 'extra' is not an object")
        ref = subject.get("reference")
        _require(_int(ref) and 0 <= ref < len(row["references"]), f"subject {k}: bad 'reference'")
        box = subject.get("box")
        _require(isinstance(box, list) and len(box) == 4 and all(type(v) in (int, float) for v in box),
                 f"subject {k}: bad 'box'")
        x0, y0, x1, y1 = box
        _require(0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, f"subject {k}: box {box} outside the {w}x{h} image")
        mask = subject.get("mask")
        _require(isinstance(mask, dict) and mask.get("size") == [h, w], f"subject {k}: mask size is not {[h, w]}")
        counts = mask.get("counts")
        _require(isinstance(counts, list) and all(_int(c) and c >= 0 for c in counts),
                 f"subject {k}: bad mask 'counts'")
        _require(sum(counts) == h * w, f"subject {k}: mask runs do not cover the image")
        corr = subject.get("correspondence")
        corr = {"pairs": []} if corr is None else corr
        _require(isinstance(corr, dict) and isinstance(corr.get("pairs"), list), f"subject {k}: bad 'correspondence'")
        _require(all(type(p) is list and len(p) == 2 and _int(p[0]) and _int(p[1]) for p in corr["pairs"]),
                 f"subject {k}: correspondence pairs are not [reference token, target token]")
        for key in ("target_grid", "reference_grid"):
            grid = corr.get(key)
            _require(grid is None or isinstance(grid, list) and len(grid) == 2 and all(_int(v) and v > 0 for v in grid),
                     f"subject {k}: bad correspondence '{key}'")


@dataclass
class SkipReport:
    """Rows skipped while reading, with reasons: counted and listed, never silent."""

    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)

    def add(self, where: str, reason: str) -> None:
        self.skipped.append((where, reason))

    def __len__(self) -> int:
        return len(self.skipped)

    def summary(self) -> str:
        if not self.skipped:
            return "0 rows skipped"
        reasons: dict[str, int] = {}
        for _, reason in self.skipped:
            reasons[reason] = reasons.get(reason, 0) + 1
        listed = "; ".join(f"{n}x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        return f"{len(self.skipped)} rows skipped: {listed}"


def psrbench_rows(root: Path, report: SkipReport) -> list[dict]:
    """Rows from a PSRBench-format folder (`<Subset>.json` lists, as `psr synth` exports them).

    Items need psr's ground-truth fields (`gt_target_path`, `gt`) to become rows; a plain
    PSRBench item has no target and is reported as skipped.
    """
    rows = []
    for path in sorted(root.glob("*.json")):
        if path.name in ("bench.json", "dataset.json"):
            continue
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            report.add(path.name, "not UTF-8 text")
            continue
        except json.JSONDecodeError as err:
            report.add(path.name, f"not JSON ({err.msg})")
            continue
        if not isinstance(items, list):
            continue
        for k, item in enumerate(items):
            where = f"{path.name}[{k}]"
            try:
                _require(isinstance(item, dict) and "gt" in item and "gt_target_path" in item,
                         "no ground truth (gt, gt_target_path)")
                size = item["gt"]["size"]
                row = {
                    "id": f"{path.stem}-{k:04d}", "index": k, "prompt": item["instruction"],
                    "size": [size, size], "target": item["gt_target_path"], "references": item["input_path"],
                    "subjects": [{"name": s["name"], "category": s["category"], "identity": s.get("identity"),
                                  "box": s["box"], "mask": s["mask"], "reference": i,
                                  "correspondence": {"pairs": []}, "extra": {}}
                                 for i, s in enumerate(item["gt"]["subjects"])],
                    "provenance": {"generator": "psrbench", "subset": path.stem},
                    "extra": {"subset": path.stem, "position": item.get("position")},
                }
                validate_row(row, root)
            except (RowError, KeyError, TypeError, AttributeError) as err:
                report.add(where, str(err) if isinstance(err, RowError) else
                           f"missing field {err}" if isinstance(err, KeyError) else "a field of the wrong type")
                continue
            rows.append(row)
    return rows


def read_manifest(root: Path, report: SkipReport) -> list[dict]:
    """Rows of `root/manifest.jsonl` (or of the finished shard parts if it is missing, or of
    a PSRBench-format export)."""
    if not (root / "manifest.jsonl").is_file() and not (root / "manifest").is_dir():
        return psrbench_rows(root, report)
    files = [root / "manifest.jsonl"] if (root / "manifest.jsonl").is_file() else sorted(
        p for p in (root / "manifest").glob("*.jsonl") if not p.name.endswith(".rejected.jsonl"))
    rows = []
    first_at: dict[Any, str] = {}  # id → where its first row is
    for path in files:
        # Bytes, line by line: one line that is not UTF-8 is one bad row, not a bad file.
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path.name}:{number}"
            try:
                row = json.loads(line.decode("utf-8"))
                validate_row(row, root)
            except UnicodeDecodeError:
                report.add(where, "not UTF-8 text")
                continue
            except json.JSONDecodeError as err:
                report.add(where, f"not JSON ({err.msg})")
                continue
            except RowError as err:
                report.add(where, str(err))
                continue
            # Rows are told apart by id (sample grids, RL items, reports); a second row with
            # an id already read is skipped like any bad row, naming where the first one is.
            key = row.get("id")
            if key is not None:
                if key in first_at:
                    report.add(where, f"id {key!r} repeats the row at {first_at[key]}")
                    continue
                first_at[key] = where
            rows.append(row)
    return rows


class SynthDataset:
    """A torch-style map dataset over a psr dataset folder.

    Rows are validated on construction; bad rows are skipped and reported in `self.report`.
    An image that fails to decode at read time is reported too, and the next good row is
    returned instead, so a training loop never dies on one corrupt file.

    Each item: {"prompt": str, "target": uint8 [H, W, 3], "references": [uint8 [h, w, 3]],
    "masks": bool [N, H, W], "boxes": float [N, 4], "identities": [int | None],
    "correspondences": [[(ref_token, target_token), ...]], "row": the manifest row}.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"dataset {self.root}: no such folder")
        self.report = SkipReport()
        self.rows = read_manifest(self.root, self.report)

    def __len__(self) -> int:
        return len(self.rows)

    def _load(self, row: dict) -> dict:
        def image(rel):
            with Image.open(self.root / rel) as im:
                return np.asarray(im.convert("RGB"))

        return {
            "prompt": row["prompt"],
            "target": image(row["target"]),
            "references": [image(p) for p in row["references"]],
            "masks": np.stack([rle_decode(s["mask"]) for s in row["subjects"]]),
            "boxes": np.array([s["box"] for s in row["subjects"]], dtype=np.float32),
            "identities": [s.get("identity") for s in row["subjects"]],
            "correspondences": [[tuple(p) for p in (s.get("correspondence") or {}).get("pairs", [])]
                                for s in row["subjects"]],
            "row": row,
        }

    def __getitem__(self, index: int) -> dict:
        if not -len(self.rows) <= index < len(self.rows):
            raise IndexError(f"index {index} out of range for {len(self.rows)} rows")
        for attempt in range(len(self.rows)):
            row = self.rows[(index + attempt) % len(self.rows)]
            try:
                return self._load(row)
            except (OSError, ValueError) as err:
                self.report.add(row.get("id", "?"), f"unreadable at load time ({err.__class__.__name__})")
        raise RuntimeError(f"dataset {self.root}: no readable row left ({self.report.summary()})")
