"""PSRBench's own scoring, as its public scripts compute it (`protocol = "psrbench"`).

The scripts are `eval/suject-consistency/eval-{2,3,4}-subject-sc.py` and
`eval/semantic-alignment/position-alignment.py` of the PSR repository. What they do, and
what this module reproduces, rule by rule:

- **Images** are opened as they are on disk: no EXIF rotation, no mode conversion. Grounding
  DINO's input transform only works on 3-channel images, so an image that is not RGB
  (RGBA, L, P, …) has no detection and its whole image is used.
- **Detection**: Grounding DINO's `predict` with the category as caption (lower-cased,
  stripped, a period appended), keeping every query whose highest probability over ALL
  caption tokens (the special tokens and the period included) exceeds the box threshold
  (0.35). Boxes stay in the decoder's query order: no NMS, no sorting, no clipping.
- **Box choice**: box 0 of the subject's category. Only the 2-subject script has a
  same-category rule (the two subjects take boxes 0 and 1); the 3- and 4-subject scripts
  take box 0 for every subject. References always take box 0.
- **Crop**: each coordinate truncated with `int()`, then `array[y1:y2, x1:x2]` with numpy's
  slicing rules (a negative start counts from the far edge). When detection finds no box
  (or too few for the same-category rule), or the crop is empty, the whole image is
  embedded instead of the crop.
- **Consistency**: DINO ViT-S/16 class tokens (resize 256 bicubic, centre crop 224, RGB,
  ImageNet normalisation), cosine per subject, mean over the item's subjects.
- **Position**: the relation is the first phrase of `PSRBENCH_PHRASES`, in that list's
  order, found as a substring of the instruction; an item with none is not scored (the
  script's `zip` drops it). Both subjects take box 0 of their category, even when the two
  categories are the same. `position_score` is the script's `determine_position`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

PSRBENCH_PHRASES = ("to the left of", "to the right of", "on the left of", "on the right of",
                    "above", "on top of", "below", "under")
"""The position script's phrase list, in its order (it takes the first one found)."""
BOX_THRESHOLD = 0.35
IOU_THRESHOLD = 0.1
DISTANCE_THRESHOLD = 150
"""Pixels, for the script's "next to" / "near" / "on side of" rule, which its phrase list
never selects (kept so `position_score` is the script's whole function)."""


def relation_from_instruction(instruction: str) -> str | None:
    """The first phrase of PSRBENCH_PHRASES (list order) that occurs in the instruction."""
    return next((phrase for phrase in PSRBENCH_PHRASES if phrase in instruction), None)


def box_indices(categories: Sequence[str]) -> list[int]:
    """Which detection of its category each subject takes: the 2-subject script's rule
    (boxes 0 and 1 for one shared category), box 0 otherwise and for every other count."""
    if len(categories) == 2 and categories[0] == categories[1]:
        return [0, 1]
    return [0] * len(categories)


def truncated_box(box: Sequence[float]) -> tuple[int, int, int, int]:
    """`int()` of each coordinate (truncation toward zero), as the scripts do."""
    x1, y1, x2, y2 = (int(v) for v in box)
    return x1, y1, x2, y2


def crop(image: "Image.Image", box: Sequence[float] | None) -> "Image.Image | None":
    """The scripts' crop of `box` from the image's pixels as stored, or None when there is
    no box or the slice is empty (the scripts then embed the whole image)."""
    from PIL import Image

    if box is None:
        return None
    x1, y1, x2, y2 = truncated_box(box)
    pixels = np.asarray(image)[y1:y2, x1:x2]
    if pixels.size == 0:
        return None
    return Image.fromarray(pixels)


def position_score(locality: str | None, box1, box2) -> float:
    """The position script's `determine_position(locality, box1, box2)`: box1 is the first
    subject's (category1), box2 the second's, (x_min, y_min, x_max, y_max) with integer
    pixels; any failure (a missing box, a degenerate union) scores 0, as its `except` does."""
    if locality is None or box1 is None or box2 is None:
        return 0.0
    a, b = truncated_box(box1), truncated_box(box2)
    dx = (b[0] + b[2]) / 2 - (a[0] + a[2]) / 2
    dy = (b[1] + b[3]) / 2 - (a[1] + a[3]) / 2
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    if union == 0:
        return 0.0
    iou = inter / union

    def overlap_credit() -> float:
        return 1.0 if iou < IOU_THRESHOLD else IOU_THRESHOLD / iou

    if locality in ("next to", "on side of", "near"):
        if abs(dx) < DISTANCE_THRESHOLD or abs(dy) < DISTANCE_THRESHOLD:
            return 1.0
        return DISTANCE_THRESHOLD / max(abs(dx), abs(dy))
    if locality in ("on the right of", "to the right of"):  # subject 1 right of 2: box 2 lies left
        return overlap_credit() if dx < 0 and abs(dx) > abs(dy) else 0.0
    if locality in ("on the left of", "to the left of"):
        return overlap_credit() if dx > 0 and abs(dx) > abs(dy) else 0.0
    if locality in ("under", "below"):  # no |dy| > |dx| condition in the script
        return overlap_credit() if dy < 0 else 0.0
    if locality in ("on top of", "above"):
        return overlap_credit() if dy > 0 else 0.0
    return 0.0


def subject_boxes(categories: Sequence[str], detections: dict[str, list[dict]]) -> list[list | None]:
    """Each subject's box under the consistency scripts' rule (see `box_indices`), None
    when its category has too few detections."""
    boxes = []
    for category, k in zip(categories, box_indices(categories)):
        found = detections[category]
        boxes.append(found[k]["box"] if len(found) > k else None)
    return boxes
