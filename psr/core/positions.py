"""Position ids for the in-context sequence `[text | target | ref_1 | … | ref_N]`.

FLUX's rotary embedding reads three ids per image token: (index, h, w), where h and w are
the token's row and column in its 2x2-packed grid. The target always has index 0 and
(h, w) from 0. Two schemes place the references:

- `frame` (FLUX.1 Kontext; PSR's frame-wise encoding for N references): reference i
  (counted from 0) has index i + 1 and (h, w) from 0, so a Kontext checkpoint reads one
  reference exactly as it was trained to.
- `diagonal` (UNO's UnoPE): index 0; each reference's (h, w) start one past the largest h
  and the largest w of everything placed before it, so references sit on a diagonal
  that never overlaps the target or each other.
- `layout` (psr's): index i + 1 as in `frame`, but each reference's (h, w) ids are spread
  over the box of the target where its subject is to be drawn, at the subject's scale, so
  a target token and the reference token showing the same part of the subject share their
  (h, w) and rotary attention finds it by position alone. The boxes come from the model's
  reference layout table (`ReferenceLayout`: boxes by reference count, and for two
  references by the relation the prompt names), so training and sampling place them alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from psr.errors import UserError

SCHEMES = ("frame", "diagonal", "layout")


def grid_ids(grid_h: int, grid_w: int, index: int = 0, h0: int = 0, w0: int = 0) -> torch.Tensor:
    """Ids of a grid_h x grid_w token grid in row-major order: [grid_h·grid_w, 3] float32."""
    ids = torch.zeros(grid_h, grid_w, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(grid_h)[:, None] + h0
    ids[..., 2] = torch.arange(grid_w)[None, :] + w0
    return ids.reshape(grid_h * grid_w, 3)


@dataclass(frozen=True)
class ReferenceLayout:
    """Where the `layout` scheme puts each reference: `boxes[key]` lists one (cx, cy, side)
    per reference, the centre as fractions of the target's width and height and `side` the
    span of the reference image's longer side as a fraction of the target's longer side.
    `key` is the reference count ("3"), or for two references "2:" + the relation the prompt
    names ("2:left of"), with "2" when it names none of the table's relations."""

    boxes: Mapping[str, tuple[tuple[float, float, float], ...]]

    @classmethod
    def from_dict(cls, table: Mapping, where: str) -> "ReferenceLayout":
        """Read and check a JSON table {key: [[cx, cy, side], ...]}; `where` names it in errors."""
        if not isinstance(table, Mapping) or not table:
            raise UserError(f"{where}: the reference layout must be a non-empty table of key -> boxes")
        boxes = {}
        for key, entries in table.items():
            count = str(key).split(":")[0]
            if not count.isdigit() or not isinstance(entries, (list, tuple)) or len(entries) != int(count) or not all(
                    isinstance(e, (list, tuple)) and len(e) == 3 and all(isinstance(v, (int, float)) for v in e)
                    and e[2] > 0 for e in entries):
                raise UserError(f"{where}: reference layout entry {key!r} must list one [cx, cy, side] "
                                f"(side > 0) per reference, {count} in all")
            boxes[str(key)] = tuple(tuple(float(v) for v in e) for e in entries)
        return cls(boxes)

    def to_dict(self) -> dict:
        return {key: [list(box) for box in boxes] for key, boxes in self.boxes.items()}

    @property
    def relations(self) -> tuple[str, ...]:
        return tuple(key.split(":", 1)[1] for key in self.boxes if ":" in key)

    def key(self, prompt: str, count: int) -> str:
        """The table key for `count` references and `prompt`: for two, the relation named
        first in the prompt (whole words, case-insensitive; the longer phrase on a tie)."""
        if count != 2:
            return str(count)
        text, found = prompt.lower(), None
        for relation in self.relations:
            match = re.search(r"\b" + re.escape(relation.lower()) + r"\b", text)
            if match and (found is None or (match.start(), -len(relation)) < (found[0], -len(found[1]))):
                found = (match.start(), relation)
        return f"2:{found[1]}" if found else "2"

    def boxes_for(self, prompt: str, count: int) -> tuple[tuple[float, float, float], ...]:
        """The boxes of `count` references for `prompt`; a count the table lacks is refused."""
        key = self.key(prompt, count)
        if key not in self.boxes:
            known = sorted({k.split(":")[0] for k in self.boxes}, key=int)
            raise UserError(f"this model places references by its layout table, which covers "
                            f"{', '.join(known)} reference(s), not {count}")
        return self.boxes[key]


def box_ids(target_grid: tuple[int, int], grid: tuple[int, int], box: tuple[float, float, float],
            index: int) -> torch.Tensor:
    """Ids of a reference grid spread over `box` (cx, cy, side) of the target grid: token
    (i, j)'s centre lands on the target position its pixels are drawn at."""
    (th, tw), (h, w) = target_grid, grid
    cx, cy, side = box
    span = side * max(th, tw)  # target tokens covered by the reference's longer side
    extent_h, extent_w = span * h / max(h, w), span * w / max(h, w)
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = index
    ids[..., 1] = (cy * th - extent_h / 2 + (torch.arange(h, dtype=torch.float32)[:, None] + 0.5) * extent_h / h
                   - 0.5)
    ids[..., 2] = (cx * tw - extent_w / 2 + (torch.arange(w, dtype=torch.float32)[None, :] + 0.5) * extent_w / w
                   - 0.5)
    return ids.reshape(h * w, 3)


def reference_ids(target_grid: tuple[int, int], reference_grids: Sequence[tuple[int, int]],
                  scheme: str, boxes: Sequence[tuple[float, float, float]] | None = None) -> list[torch.Tensor]:
    """One [h_i·w_i, 3] id tensor per reference, for the given target grid and scheme
    (`boxes`, one per reference, only for `layout`: `ReferenceLayout.boxes_for`)."""
    if scheme == "layout":
        if boxes is None or len(boxes) != len(reference_grids):
            raise ValueError("the layout scheme needs one box per reference")
        return [box_ids(target_grid, g, box, i + 1) for i, (g, box) in enumerate(zip(reference_grids, boxes))]
    if scheme == "frame":
        return [grid_ids(h, w, index=i + 1) for i, (h, w) in enumerate(reference_grids)]
    if scheme == "diagonal":
        out, next_h, next_w = [], target_grid[0], target_grid[1]
        for h, w in reference_grids:
            out.append(grid_ids(h, w, index=0, h0=next_h, w0=next_w))
            next_h, next_w = next_h + h, next_w + w
        return out
    raise ValueError(f"unknown position scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def sequence_ids(target_grid: tuple[int, int], reference_grids: Sequence[tuple[int, int]],
                 scheme: str, boxes: Sequence[tuple[float, float, float]] | None = None) -> torch.Tensor:
    """Ids of `[target | ref_1 | … | ref_N]`: [L_target + Σ L_ref_i, 3]."""
    return torch.cat([grid_ids(*target_grid), *reference_ids(target_grid, reference_grids, scheme, boxes)])
