"""Dataset rows → training tensors, and the resumable batch order.

Per row (`TrainRows[i]`):
- target pixels [3, H, W] in [-1, 1] (H, W multiples of the token stride);
- each reference resized by the model's rule (`psr.core.images.fit_reference` with
  `model.reference_resize`, `model.reference_size` and the token stride, as
  `MultiRefFlux.prepare_reference` does), [3, h_i, w_i] in [-1, 1];
- target token labels [H/s · W/s] long: 0 background, i+1 where reference i's subject
  covers the majority (≥ half) of the token's pixels (masks are disjoint after occlusion);
- per reference, its correspondence [h_i/s · w_i/s] long: the target token each reference
  token shows, −1 for none. The dataset stores pairs on its own token grids; when the
  model's grids differ (another stride or reference size) each new token takes the pair
  found at its centre in the old grid, and the target token is moved the same way.

Batches never pad references: a batch holds rows of one target size, and the training
step runs one forward per group of rows that share a reference layout (`Batch.groups`),
so every forward is exact, works with every fused attention backend and with
`AttentionCapture` (which refuses attention masks). The sampler puts rows with the same
reference layout into the same batch where it can, so most batches are one group.

Order: the batches of epoch e are a pure function of (seed, e), and a process's position
is just the count of micro-batches it has consumed, so resuming needs only the step. A
micro-batch is global: `batch_size` × processes rows, cut into one slice per process, so
the same rows meet in one optimizer step whatever the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from psr.core import images as imgs
from psr.errors import UserError
from psr.synth.dataset import SynthDataset


# ---------------------------------------------------------------------------- per row
def token_labels(masks: np.ndarray, labels: list[int], stride: int) -> np.ndarray:
    """Masks [N, H, W] bool, label per mask → [H/s · W/s] int64 majority labels (0 = none)."""
    n, h, w = masks.shape
    out = np.zeros((h // stride) * (w // stride), dtype=np.int64)
    if n == 0:
        return out
    cover = masks.reshape(n, h // stride, stride, w // stride, stride).mean(axis=(2, 4)).reshape(n, -1)
    best = cover.argmax(axis=0)
    hit = cover[best, np.arange(cover.shape[1])] >= 0.5
    out[hit] = np.asarray(labels, dtype=np.int64)[best[hit]]
    return out


def remap_correspondence(pairs, src_target: tuple[int, int] | None, src_ref: tuple[int, int] | None,
                         dst_target: tuple[int, int], dst_ref: tuple[int, int]) -> np.ndarray:
    """Pairs [(ref_token, target_token)] on the source grids → [dst_ref h·w] target token
    on the destination grids (−1 = none), sampled at token centres (module docstring)."""
    out = np.full(dst_ref[0] * dst_ref[1], -1, dtype=np.int64)
    if not pairs or src_target is None or src_ref is None:
        return out
    src_target, src_ref = tuple(src_target), tuple(src_ref)
    table = np.full(src_ref[0] * src_ref[1], -1, dtype=np.int64)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    ok = (pairs[:, 0] >= 0) & (pairs[:, 0] < table.size) & (pairs[:, 1] >= 0) & (
        pairs[:, 1] < src_target[0] * src_target[1])
    table[pairs[ok, 0]] = pairs[ok, 1]
    if src_ref == tuple(dst_ref) and src_target == tuple(dst_target):
        return table

    def centre(index, src, dst):  # token index on grid src → the dst token under its centre
        r, c = np.divmod(index, src[1])
        rr = np.minimum(((r + 0.5) * dst[0] / src[0]).astype(np.int64), dst[0] - 1)
        cc = np.minimum(((c + 0.5) * dst[1] / src[1]).astype(np.int64), dst[1] - 1)
        return rr * dst[1] + cc

    src_of_dst = centre(np.arange(out.size), tuple(dst_ref), src_ref)
    found = table[src_of_dst]
    keep = found >= 0
    out[keep] = centre(found[keep], src_target, tuple(dst_target))
    return out


class TrainRows(torch.utils.data.Dataset):
    """The usable rows of a `SynthDataset`, as training tensors (module docstring).

    Rows the model cannot take (target size not a multiple of the token stride, more than
    `max_references` references, a reference whose image header cannot be read) are skipped
    and added to `dataset.report`.
    """

    def __init__(self, dataset: SynthDataset, token_stride: int, reference_size: int, max_references: int,
                 reference_resize: str = "longest"):
        self.dataset = dataset
        self.stride = token_stride
        self.reference_size = reference_size
        self.reference_resize = reference_resize
        kept, self._reference_sizes = [], []
        for row in dataset.rows:
            h, w = row["size"]
            where = str(row.get("id", row.get("index", "?")))
            if h % token_stride or w % token_stride:
                dataset.report.add(where, f"target size not a multiple of the token stride {token_stride}")
            elif len(row["references"]) > max_references:
                dataset.report.add(where, f"more than data.max_references ({max_references}) references")
            else:
                sizes = self._header_sizes(row)
                if isinstance(sizes, str):
                    dataset.report.add(where, sizes)
                    continue
                kept.append(row)
                self._reference_sizes.append(sizes)
        dataset.rows = kept  # SynthDataset serves a replacement for an unreadable image from these
        if not kept:
            raise UserError(f"dataset {dataset.root}: no usable rows ({dataset.report.summary()})")

    def _header_sizes(self, row: dict) -> list[tuple[int, int]] | str:
        """(width, height) of each reference from its image header (no pixels decoded), or
        why a header cannot be read."""
        sizes = []
        for rel in row["references"]:
            try:
                with Image.open(self.dataset.root / rel) as im:
                    sizes.append(im.size)
            except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
                return f"reference {rel}: unreadable image ({err.__class__.__name__})"
        return sizes

    def __len__(self) -> int:
        return len(self.dataset.rows)

    def reference_grid(self, width: int, height: int) -> tuple[int, int]:
        w, h = imgs.reference_fit_size(width, height, self.reference_resize, self.reference_size, self.stride)
        return h // self.stride, w // self.stride

    def layout_keys(self, position_key: Callable[[str, int], str] | None = None) -> list[tuple]:
        """Per row (target (H, W), reference grids): what decides the sequence layout. Read
        from the manifest and the image headers, without decoding pixels. `position_key`
        (prompt, reference count) → key is part of it where reference positions depend on
        the prompt (the layout scheme), so that a batch shares one set of ids."""
        keys = []
        for row, sizes in zip(self.dataset.rows, self._reference_sizes):
            grids = [self.reference_grid(*size) for size in sizes]
            layout = tuple(grids)
            if position_key is not None:
                layout = (layout, position_key(row["prompt"], len(grids)))
            keys.append((tuple(row["size"]), layout))
        return keys

    def __getitem__(self, index: int) -> dict:
        asked = self.dataset.rows[index]
        item = self.dataset[index]
        row = item["row"]
        s = self.stride
        h, w = item["target"].shape[:2]
        target = torch.from_numpy(item["target"].astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        refs, grids = [], []
        for array in item["references"]:
            image = imgs.fit_reference(Image.fromarray(array), self.reference_resize, self.reference_size, s)
            refs.append(imgs.to_tensor(image)[0])
            grids.append((image.height // s, image.width // s))
        subjects = row["subjects"]
        labels = token_labels(item["masks"], [sub["reference"] + 1 for sub in subjects], s)
        correspondence = [np.full(gh * gw, -1, dtype=np.int64) for gh, gw in grids]
        for sub, pairs in zip(subjects, item["correspondences"]):
            corr = sub.get("correspondence") or {}
            k = sub["reference"]
            mapped = remap_correspondence(pairs, corr.get("target_grid"), corr.get("reference_grid"),
                                          (h // s, w // s), grids[k])
            correspondence[k] = np.where(mapped >= 0, mapped, correspondence[k])
        return {
            "index": int(row.get("index", index)),
            "substituted": row is not asked,  # the asked row's image failed to decode
            "prompt": item["prompt"],
            "target": target,
            "references": refs,
            "ref_grids": grids,
            "labels": torch.from_numpy(labels),
            "correspondence": [torch.from_numpy(c) for c in correspondence],
        }


# ---------------------------------------------------------------------------- batches
@dataclass
class Batch:
    """B rows of one target size; references stay per row (see `groups`)."""

    indices: list[int]
    prompts: list[str]
    target: torch.Tensor
    """[B, 3, H, W] in [-1, 1]."""
    labels: torch.Tensor
    """[B, H/s · W/s] long: 0 background, i+1 subject of reference i."""
    references: list[list[torch.Tensor]]
    """Per row, its references [3, h_i, w_i] in [-1, 1]."""
    ref_grids: list[tuple[tuple[int, int], ...]]
    correspondence: list[list[torch.Tensor]]
    """Per row, per reference [h_i·w_i] long target token or −1."""
    skipped: int = 0
    """Rows of this batch left out (unreadable image, or another target size)."""

    def __len__(self) -> int:
        return len(self.indices)

    def groups(self, keep_refs: list[bool],
               position_key: Callable[[str, int], str] | None = None) -> list[list[int]]:
        """Rows that can share one forward: same reference grids, and the same
        `position_key(prompt, reference count)` where one is given (rows whose references
        are dropped form the group with none), in first-appearance order."""
        out: dict[tuple, list[int]] = {}
        for b in range(len(self)):
            key = ()
            if keep_refs[b]:
                key = self.ref_grids[b]
                if position_key is not None:
                    key = (key, position_key(self.prompts[b], len(key)))
            out.setdefault(key, []).append(b)
        return list(out.values())


def collate(items: list[dict]) -> Batch:
    """Stack rows of the first row's target size; rows of another size (only possible when
    an unreadable image was replaced by another row) are left out and counted."""
    size = items[0]["target"].shape
    same = [it for it in items if it["target"].shape == size]
    return Batch(
        indices=[it["index"] for it in same],
        prompts=[it["prompt"] for it in same],
        target=torch.stack([it["target"] for it in same]),
        labels=torch.stack([it["labels"] for it in same]),
        references=[it["references"] for it in same],
        ref_grids=[tuple(it["ref_grids"]) for it in same],
        correspondence=[it["correspondence"] for it in same],
        skipped=sum(it["substituted"] for it in items) + len(items) - len(same),
    )


def epoch_batches(keys: list[tuple], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: rows shuffled by (seed, epoch), split by target size;
    within a size, full batches of one reference layout first, then the leftovers in
    mixed batches; an incomplete last batch per size is dropped; batch order shuffled.
    Gives floor(rows of size / batch_size) batches per size, whatever the shuffle."""
    rng = np.random.default_rng([seed, epoch, 0xDA7A])
    order = rng.permutation(len(keys))
    batches = []
    sizes = sorted({k[0] for k in keys})
    for size in sizes:
        by_layout: dict[tuple, list[int]] = {}
        for i in order:
            if keys[i][0] == size:
                by_layout.setdefault(keys[i][1], []).append(int(i))
        leftovers = []
        for rows in by_layout.values():
            full = len(rows) - len(rows) % batch_size
            batches += [rows[j:j + batch_size] for j in range(0, full, batch_size)]
            leftovers += rows[full:]
        full = len(leftovers) - len(leftovers) % batch_size
        batches += [leftovers[j:j + batch_size] for j in range(0, full, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


class ResumableBatchSampler:
    """Infinite batch sampler for one process, starting at micro-batch `start`.

    Epoch e's global batches (`epoch_batches` of batch_size·world rows) are cut into `world`
    consecutive slices of `batch_size` rows, and process `rank` takes slice `rank` of each:
    its k-th batch of epoch e, at position e·per_rank + k. So the rows of a global batch do
    not depend on how many processes share it (one process takes whole batches).
    """

    def __init__(self, keys: list[tuple], batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 start: int = 0):
        self.keys, self.batch_size, self.seed = keys, batch_size, seed
        self.rank, self.world, self.start = rank, world, start
        self.per_rank = len(epoch_batches(keys, batch_size * world, seed, 0))
        if self.per_rank == 0:
            raise UserError(f"dataset: {len(keys)} usable rows give no full batch of train.batch_size="
                            f"{batch_size} per process on {world} process(es) (rows of one target size "
                            f"share a batch); lower train.batch_size or add rows")

    def position(self, micro_batches: int) -> tuple[int, int]:
        """(epoch, index within the epoch) of a micro-batch count."""
        return divmod(micro_batches, self.per_rank)

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start
        epoch, cached = -1, []
        while True:
            e, k = self.position(position)
            if e != epoch:
                epoch = e
                size, first = self.batch_size, self.rank * self.batch_size
                cached = [b[first:first + size] for b in epoch_batches(self.keys, size * self.world, self.seed, e)]
            yield cached[k]
            position += 1


def open_dataset(path: str) -> SynthDataset:
    """A `SynthDataset`, or a one-line `UserError` for a missing or empty one."""
    from pathlib import Path

    root = Path(path)
    if not root.exists():
        raise UserError(f"data.path {path}: no such folder (make one with `psr synth --recipe "
                        f"recipes/synth-toy.toml --out {path}`)")
    if not root.is_dir():
        raise UserError(f"data.path {path}: not a folder")
    dataset = SynthDataset(root)
    if len(dataset) == 0:
        detail = f" ({dataset.report.summary()})" if len(dataset.report) else ""
        raise UserError(f"data.path {path}: no usable rows{detail}; is it a `psr synth` dataset?")
    return dataset
