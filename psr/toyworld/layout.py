"""Spatial relations between subjects, and placing subjects so they hold.

The relation rule (`relation_holds`) is the one ToyWorld guarantees for its
own layouts and the one an evaluator should apply to detected boxes. Boxes
are (x0, y0, x1, y1) in pixels with x1, y1 exclusive (any unit works: the
rule only uses ratios). With centre c = ((x0+x1)/2, (y0+y1)/2), width w,
height h, dx = c_b.x - c_a.x, dy = c_b.y - c_a.y (y grows downwards):

  every relation first needs IoU(a, b) < 0.1 (one is not on top of the other)
  "left of":  dx >  0.25 * (w_a + w_b) / 2  and  dx >= |dy|
  "right of": "left of" with a and b swapped
  "above":    dy >  0.25 * (h_a + h_b) / 2  and  dy >= |dx|
  "below":    "above" with a and b swapped
  "next to":  the boxes are side by side (their row ranges overlap and the
              horizontal gap <= t) or stacked (column ranges overlap and the
              vertical gap <= t), with t = 0.5 * mean(max(w_a, h_a), max(w_b, h_b))

The "dx >= |dy|" clauses make left/right and above/below exclusive: a
subject diagonally up-left of another is "above" or "left of", never both.

Placement works on boxes predicted from subject.silhouette_points, in
fractions of the image side; rendered mask boxes match them to about a
pixel at any size, and layouts keep margins far larger than that.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from psr.toyworld.identity import Identity
from psr.toyworld.pose import frame_for
from psr.toyworld.spec import RELATIONS, SubjectSpec
from psr.toyworld.subject import silhouette_points

IOU_MAX = 0.1
CENTRE_MARGIN = 0.25  # of the mean box side along the relation's axis
NEXT_TO_GAP = 0.5  # of the mean longer box side
BORDER = 0.02  # free margin kept around every subject, fraction of the side


def box_iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes (0 if both are empty)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def relation_holds(box_a, box_b, relation: str) -> bool:
    """Whether subject a stands in `relation` to subject b (see the module docstring).

    An empty box (zero width or height, e.g. an undetected subject) never
    satisfies a relation.
    """
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; known: {list(RELATIONS)}")
    ax0, ay0, ax1, ay1 = (float(c) for c in box_a)
    bx0, by0, bx1, by1 = (float(c) for c in box_b)
    wa, ha, wb, hb = ax1 - ax0, ay1 - ay0, bx1 - bx0, by1 - by0
    if min(wa, ha, wb, hb) <= 0 or box_iou(box_a, box_b) >= IOU_MAX:
        return False
    dx = (bx0 + bx1 - ax0 - ax1) / 2
    dy = (by0 + by1 - ay0 - ay1) / 2
    if relation == "left of":
        return dx > CENTRE_MARGIN * (wa + wb) / 2 and dx >= abs(dy)
    if relation == "right of":
        return -dx > CENTRE_MARGIN * (wa + wb) / 2 and -dx >= abs(dy)
    if relation == "above":
        return dy > CENTRE_MARGIN * (ha + hb) / 2 and dy >= abs(dx)
    if relation == "below":
        return -dy > CENTRE_MARGIN * (ha + hb) / 2 and -dy >= abs(dx)
    # "next to"
    limit = NEXT_TO_GAP * (max(wa, ha) + max(wb, hb)) / 2
    gap_x = max(bx0 - ax1, ax0 - bx1, 0.0)
    gap_y = max(by0 - ay1, ay0 - by1, 0.0)
    rows_overlap = min(ay1, by1) > max(ay0, by0)
    cols_overlap = min(ax1, bx1) > max(ax0, bx0)
    return (rows_overlap and gap_x <= limit) or (cols_overlap and gap_y <= limit)


def predicted_box(subject: SubjectSpec, image_size: float = 1.0, support: bool = False) -> np.ndarray:
    """Box (x0, y0, x1, y1) of a subject's mask (or, with support=True, of
    every pixel it touches) in units of `image_size`; float64 (4,)."""
    identity = Identity.from_id(subject.identity)
    points = silhouette_points(identity.shape, identity.top, subject.attributes, support)
    frame = frame_for(subject.x, subject.y, subject.size, subject.pose, image_size)
    x, y = frame.to_pixels(points[:, 0], points[:, 1])
    return np.array([x.min(), y.min(), x.max(), y.max()])


def _extent(subject: SubjectSpec) -> np.ndarray:
    """Predicted mask box relative to the canonical origin, fraction units."""
    return predicted_box(subject.moved(0.0, 0.0))


def _scaled(subjects, factor):
    return [replace(s, size=round(s.size * factor, 5)) for s in subjects]


def place_pair(rng: np.random.Generator, a: SubjectSpec, b: SubjectSpec, relation: str) -> tuple[SubjectSpec, SubjectSpec]:
    """Place a and b so that `a <relation> b` holds, both inside the image.

    Sizes shrink when the pair would not fit. Positions come from `rng`.
    """
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; known: {list(RELATIONS)}")
    if relation in ("right of", "below"):
        # Place b first then a: "a right of b" is "b left of a".
        flipped = {"right of": "left of", "below": "above"}[relation]
        b2, a2 = place_pair(rng, b, a, flipped)
        return a2, b2
    horizontal = relation == "left of" or (relation == "next to" and rng.random() < 0.6)
    gap_range = (0.01, 0.05) if relation == "next to" else (0.04, 0.16)
    gap = float(rng.uniform(*gap_range))
    available = 1.0 - 2 * BORDER
    ea, eb = _extent(a), _extent(b)
    axis = 0 if horizontal else 1  # along the relation
    across = 1 - axis
    along_len = (ea[axis + 2] - ea[axis]) + gap + (eb[axis + 2] - eb[axis])
    across_len = max(ea[across + 2] - ea[across], eb[across + 2] - eb[across])
    shrink = min(1.0, (available - gap) / (along_len - gap), available / across_len)
    if shrink < 1.0:
        # Boxes scale with size about the canonical origin, so shrinking the
        # sizes shrinks the extents by the same factor.
        a, b = _scaled([a, b], shrink * 0.98)
        ea, eb = _extent(a), _extent(b)
        along_len = (ea[axis + 2] - ea[axis]) + gap + (eb[axis + 2] - eb[axis])
    start = BORDER + rng.uniform(0.0, max(available - along_len, 0.0))
    pos_a = [0.0, 0.0]
    pos_b = [0.0, 0.0]
    pos_a[axis] = start - ea[axis]
    pos_b[axis] = start + (ea[axis + 2] - ea[axis]) + gap - eb[axis]
    # Across the relation: align box centres up to a small jitter so the
    # pair reads as side by side (or stacked), then fit both in the image.
    lo = max(BORDER + (e[across + 2] - e[across]) / 2 for e in (ea, eb))
    hi = min(1.0 - BORDER - (e[across + 2] - e[across]) / 2 for e in (ea, eb))
    centre = rng.uniform(lo, max(lo, hi))
    jitter = rng.uniform(-0.03, 0.03)
    for pos, e, j in ((pos_a, ea, -jitter), (pos_b, eb, jitter)):
        half = (e[across + 2] - e[across]) / 2
        c = float(np.clip(centre + j, BORDER + half, 1.0 - BORDER - half))
        pos[across] = c - (e[across] + e[across + 2]) / 2
    a = a.moved(round(pos_a[0], 5), round(pos_a[1], 5))
    b = b.moved(round(pos_b[0], 5), round(pos_b[1], 5))
    if not relation_holds(predicted_box(a), predicted_box(b), relation):
        raise AssertionError(f"layout bug: planned '{relation}' does not hold for {a} / {b}")
    return a, b


def place_free(rng: np.random.Generator, subjects: list[SubjectSpec], max_overlap: float = 0.05) -> list[SubjectSpec]:
    """Scatter subjects inside the image with little overlap.

    Two boxes may share at most `max_overlap` of the smaller one's area.
    Tries random positions; when a subject does not fit, all sizes shrink
    by 10% and placement starts over.
    """
    subjects = list(subjects)
    for _ in range(30):
        placed: list[SubjectSpec] = []
        boxes: list[np.ndarray] = []
        for s in subjects:
            e = _extent(s)
            w, h = e[2] - e[0], e[3] - e[1]
            if w > 1 - 2 * BORDER or h > 1 - 2 * BORDER:
                break
            for _try in range(60):
                x0 = rng.uniform(BORDER, 1 - BORDER - w)
                y0 = rng.uniform(BORDER, 1 - BORDER - h)
                box = np.array([x0, y0, x0 + w, y0 + h])
                if all(_overlap_fraction(box, other) <= max_overlap for other in boxes):
                    break
            else:
                break
            placed.append(s.moved(round(x0 - e[0], 5), round(y0 - e[1], 5)))
            boxes.append(box)
        if len(placed) == len(subjects):
            return placed
        subjects = _scaled(subjects, 0.9)
    raise RuntimeError(f"could not place {len(subjects)} subjects without overlap; use smaller sizes")


# Slot centres (x, y), fractions of the side, of each subject by count (and by relation for
# two subjects): the `slots` layout of a ToyWorld level. Every slot owns a cell of
# SLOT_CELL (one subject: the image), so neighbours never overlap. "next to" has no fixed
# slots: the pair stands side by side about the centre line (`place_slots`).
SLOTS: dict = {
    1: ((0.5, 0.5),),
    ("left of",): ((0.27, 0.5), (0.73, 0.5)),
    ("right of",): ((0.73, 0.5), (0.27, 0.5)),
    ("above",): ((0.5, 0.27), (0.5, 0.73)),
    ("below",): ((0.5, 0.73), (0.5, 0.27)),
    3: ((0.27, 0.28), (0.73, 0.28), (0.5, 0.73)),
    4: ((0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73)),
}
SLOT_CELL = 0.44


def place_slots(rng: np.random.Generator, subjects: list[SubjectSpec], relation: str | None,
                jitter: float = 0.03) -> list[SubjectSpec]:
    """Centre subject i's box on the i-th slot of SLOTS (by count, or by `relation` for two)
    up to `jitter`, shrinking a subject whose box would not fit its cell; for two subjects
    the relation is checked with `relation_holds`, as `place_pair` does."""
    k = len(subjects)
    cell = 1.0 - 2 * BORDER if k == 1 else SLOT_CELL
    fitted = []
    for subject in subjects:
        e = _extent(subject)
        longest = max(e[2] - e[0], e[3] - e[1])
        fitted.append(_scaled([subject], cell / longest)[0] if longest > cell else subject)
    if relation == "next to":  # side by side about the centre line, a small gap between the boxes
        gap = 0.03
        (ea, eb) = (_extent(s) for s in fitted)
        centres = ((0.5 - gap / 2 - (ea[2] - ea[0]) / 2, 0.5), (0.5 + gap / 2 + (eb[2] - eb[0]) / 2, 0.5))
    else:
        centres = SLOTS[(relation,)] if k == 2 else SLOTS[k]
    placed = []
    for subject, (cx, cy) in zip(fitted, centres):
        e = _extent(subject)
        spread = jitter
        if relation == "next to":  # a third of the jitter keeps the gap within the relation's limit
            cx += rng.uniform(-jitter, jitter) / 3
            cy += rng.uniform(-jitter, jitter) / 3
            spread = 0.0  # the zero-width draws below keep the stream the shipped data was drawn from
        half_w, half_h = (e[2] - e[0]) / 2, (e[3] - e[1]) / 2
        x = float(np.clip(cx + rng.uniform(-spread, spread), BORDER + half_w, 1 - BORDER - half_w))
        y = float(np.clip(cy + rng.uniform(-spread, spread), BORDER + half_h, 1 - BORDER - half_h))
        placed.append(subject.moved(round(x - (e[0] + e[2]) / 2, 5), round(y - (e[1] + e[3]) / 2, 5)))
    if k == 2 and not relation_holds(predicted_box(placed[0]), predicted_box(placed[1]), relation):
        raise AssertionError(f"layout bug: slots for '{relation}' do not hold for {placed}")
    return placed


def _overlap_fraction(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return max(iw, 0.0) * max(ih, 0.0) / smaller


def place_centred(rng: np.random.Generator, subject: SubjectSpec, jitter: float = 0.04) -> SubjectSpec:
    """Centre a lone subject's box in the image (up to `jitter`), shrinking it to fit."""
    e = _extent(subject)
    longest = max(e[2] - e[0], e[3] - e[1])
    if longest > 1 - 2 * BORDER - 2 * jitter:
        subject = _scaled([subject], (1 - 2 * BORDER - 2 * jitter) / longest)[0]
        e = _extent(subject)
    cx = 0.5 + rng.uniform(-jitter, jitter) - (e[0] + e[2]) / 2
    cy = 0.5 + rng.uniform(-jitter, jitter) - (e[1] + e[3]) / 2
    return subject.moved(round(cx, 5), round(cy, 5))
