"""Position rules: does subject a stand in the named relation to subject b?

Boxes are (x0, y0, x1, y1) in pixels, y growing downwards; "a left of b" reads "subject a
is left of subject b" (a = the first subject / category1 of a PSRBench item).

Phrases. PSRBench items name relations in several ways; `RELATION_PHRASES` maps each
known phrase (lower case, single spaces) to one canonical relation of
`psr.toyworld.RELATIONS`. An unknown phrase raises a `UserError` naming the nearest known
one, so no sample vanishes silently (PSRBench's script drops every "next to" item).
PSRBench's left/right also need |dx| > |dy|; this variant reads the direction alone.

Two rules:

* `position_psrbench` — psr's variant of PSRBench's scoring (`protocol = "psr"` of psr
  eval; the exact script is `psr.eval.psrbench.position_score`), a soft score in [0, 1].
  The direction comes from the box centres (left of: c_a.x < c_b.x; right of: c_a.x > c_b.x; above:
  c_a.y < c_b.y; below: c_a.y > c_b.y); a wrong direction scores 0. With the right
  direction, IoU < 0.1 scores 1, else 0.1 / IoU (overlapping boxes are only partly
  credited). PSRBench's phrase list never reaches its own "next to" rule; psr adds one in
  the same style: the boxes must be close — their gap (the larger of the horizontal and vertical gaps
  between the boxes, 0 when they touch or overlap) at most `NEXT_TO_GAP` (0.5) times the
  mean of the two boxes' longer sides — and then score 1 for IoU < 0.1, else 0.1 / IoU.
* `position_correct` — psr's exact rule, a bool: the rule ToyWorld guarantees for its
  layouts (`psr.toyworld.relation_holds`, stated in psr/toyworld/layout.py), applied to
  the boxes clipped to the image. It needs a centre offset beyond a quarter of the mean
  box side, keeps left/right and above/below exclusive, and defines "next to" by
  overlapping rows (or columns) and a small gap.

A missing box (None, an undetected subject) scores 0 / False under both rules.
`POSITION_RULES` lists both under one signature (relation, box_a, box_b, image_size) → float.
"""

from __future__ import annotations

from typing import Callable, Sequence

from psr.core.detect import box_iou
from psr.core.recipe import _suggest
from psr.errors import UserError
from psr.toyworld.layout import relation_holds

CANONICAL = ("left of", "right of", "above", "below", "next to")
"""Equal to psr.toyworld.RELATIONS (a test checks it), kept here so the table reads alone."""

RELATION_PHRASES: dict[str, str] = {
    "left of": "left of", "on the left of": "left of", "to the left of": "left of", "left": "left of",
    "on the left side of": "left of",
    "right of": "right of", "on the right of": "right of", "to the right of": "right of", "right": "right of",
    "on the right side of": "right of",
    "above": "above", "on top of": "above", "over": "above",
    "below": "below", "under": "below", "beneath": "below", "underneath": "below",
    "next to": "next to", "near": "next to", "beside": "next to", "close to": "next to",
}

IOU_MAX = 0.1
NEXT_TO_GAP = 0.5


def canonical_relation(phrase: str) -> str:
    """The canonical relation of a phrase ("to the left of" → "left of"); `UserError` if unknown."""
    key = " ".join(str(phrase).lower().replace("_", " ").split())
    if key not in RELATION_PHRASES:
        raise UserError(f"position relation {phrase!r}: unknown phrase{_suggest(key, RELATION_PHRASES)}; "
                        f"known: {', '.join(RELATION_PHRASES)}")
    return RELATION_PHRASES[key]


def _box(box: Sequence[float] | None) -> tuple[float, float, float, float] | None:
    if box is None:
        return None
    x0, y0, x1, y1 = (float(v) for v in box)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _iou(a, b) -> float:
    return box_iou(a, b)


def _gap(a, b) -> float:
    """Distance between two boxes along the axis where they are apart (0 if they touch)."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3], 0.0)


def position_psrbench(relation: str, box_a: Sequence[float] | None, box_b: Sequence[float] | None) -> float:
    """PSRBench's soft position score in [0, 1] (see the module docstring)."""
    relation = canonical_relation(relation)
    a, b = _box(box_a), _box(box_b)
    if a is None or b is None:
        return 0.0
    ca = ((a[0] + a[2]) / 2, (a[1] + a[3]) / 2)
    cb = ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
    if relation == "next to":
        limit = NEXT_TO_GAP * (max(a[2] - a[0], a[3] - a[1]) + max(b[2] - b[0], b[3] - b[1])) / 2
        direction = _gap(a, b) <= limit
    else:
        direction = {"left of": ca[0] < cb[0], "right of": ca[0] > cb[0],
                     "above": ca[1] < cb[1], "below": ca[1] > cb[1]}[relation]
    if not direction:
        return 0.0
    iou = _iou(a, b)
    return 1.0 if iou < IOU_MAX else IOU_MAX / iou


def _size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    width, height = image_size
    return int(width), int(height)


def position_correct(relation: str, box_a: Sequence[float] | None, box_b: Sequence[float] | None,
                     image_size: int | Sequence[int]) -> bool:
    """psr's exact rule: `psr.toyworld.relation_holds` on the boxes clipped to the image.
    `image_size`: side of a square image, or (width, height)."""
    relation = canonical_relation(relation)
    width, height = _size(image_size)
    clipped = []
    for box in (box_a, box_b):
        box = _box(box)
        if box is None:
            return False
        clipped.append((min(max(box[0], 0.0), width), min(max(box[1], 0.0), height),
                        min(max(box[2], 0.0), width), min(max(box[3], 0.0), height)))
    return bool(relation_holds(clipped[0], clipped[1], relation))


POSITION_RULES: dict[str, Callable[..., float]] = {
    "psrbench": lambda relation, box_a, box_b, image_size=None: position_psrbench(relation, box_a, box_b),
    "exact": lambda relation, box_a, box_b, image_size: float(position_correct(relation, box_a, box_b, image_size)),
}
"""Rule name → (relation, box_a, box_b, image_size) → score in [0, 1]."""
