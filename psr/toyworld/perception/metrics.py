"""Measurements of the perception models on held-out ToyWorld renders.

Both tables use the evaluation id range only (DEFAULT_ID_RANGES["eval"]; training uses
"train"), fixed seeds, and the fixed degradations of `data.EVAL_CONDITIONS` applied to
the whole rendered image: "clean", "noise" (gaussian, std 0.06 of the range) and "blur"
(gaussian, sigma 1 px), at 64 px.

Retrieval: a gallery of N held-out identities, one reference-like render each (alone,
no attributes); query r = another render of the same identity in a different pose and
scene, either reference-like ("reference") or among 1-2 other subjects with added
attributes ("target"). Crops are ground-truth boxes padded by `pad`. top-k = share of
queries whose own identity is among the k gallery entries most similar to them.

Detection: targets of 1-4 subjects (categories may repeat, attributes at rate 0.3).
A detection is a true positive when it matches a not yet matched ground-truth subject of
its category with IoU >= 0.5 (greedy, best score first); precision = TP / detections,
recall = TP / subjects. Scene accuracy over images; attribute F1 (micro, threshold 0.5)
over the true-positive detections; subjects with fewer than 4 visible pixels are left out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from psr import toyworld as tw
from psr.core.detect import box_iou, crop_box
from psr.toyworld.perception.data import (
    ATTRIBUTE_NAMES,
    EVAL_CONDITIONS,
    apply_condition,
    localizer_scene,
    reference_view,
    target_view,
    to_float,
)
from psr.toyworld.sampling import poses_differ

if TYPE_CHECKING:
    from PIL import Image

MIN_AREA = 4


def _degraded_images(images: np.ndarray, condition: str, seed: int) -> list["Image.Image"]:
    """uint8 [N, H, W, 3] under a condition → PIL images."""
    from PIL import Image

    x = apply_condition(to_float(images), condition, seed)
    arr = (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def retrieval_sets(num_ids: int, seed: int = 12345, size: int = 64):
    """(gallery renders, reference-query renders, target-query renders), one per identity."""
    lo, hi = tw.DEFAULT_ID_RANGES["eval"]
    rng = np.random.default_rng([0x4E7, seed])
    ids = [lo + int(i) for i in rng.choice(hi - lo, size=num_ids, replace=False)]
    gallery, refs, targets = [], [], []
    for identity in ids:
        g = reference_view(rng, identity)
        for _ in range(50):
            q = reference_view(rng, identity, avoid_scene=g.scene)
            if poses_differ(q.subjects[0].pose, g.subjects[0].pose):
                break
        t = target_view(rng, identity, int(rng.integers(2, 4)), (lo, hi))
        gallery.append(tw.render(g, size)), refs.append(tw.render(q, size)), targets.append(tw.render(t, size))
    return gallery, refs, targets


def _crops(renders, condition: str, pad: float, seed: int) -> list["Image.Image"]:
    images = _degraded_images(np.stack([r.image for r in renders]), condition, seed)
    return [crop_box(im, r.boxes[-1].tolist(), pad) for im, r in zip(images, renders)]


def topk(similarity: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    """similarity [Q, G] with query i's match at gallery i → {"top1": ..., "top5": ...}."""
    similarity = np.asarray(similarity, dtype=np.float64)
    own = np.diag(similarity)[:, None]
    # Other gallery entries at least as close as the right one: a tie is not a hit (a
    # collapsed encoder that maps everything to one point must score 0, not 1), and a NaN
    # similarity to the right entry never counts as found.
    others = ~np.eye(*similarity.shape, dtype=bool)
    rank = ((similarity >= own) & others).sum(1).astype(np.float64)
    rank[np.isnan(own[:, 0])] = np.inf
    return {f"top{k}": round(float((rank < k).mean()), 4) for k in ks}


def retrieval_table(encoder, num_ids: int = 1000, seed: int = 12345, pad: float = 0.1, size: int = 64,
                    show_progress: bool = False) -> dict:
    """{"reference": {condition: {"top1", "top5"}}, "target": {...}}; see the module docstring."""
    from tqdm import tqdm

    gallery, refs, targets = retrieval_sets(num_ids, seed, size)
    g = encoder.embed_images(_crops(gallery, "clean", pad, seed)).numpy()
    table: dict = {"reference": {}, "target": {}}
    runs = [(kind, cond) for kind in table for cond in EVAL_CONDITIONS]
    for kind, cond in tqdm(runs, desc="retrieval", disable=not show_progress, leave=False):
        q = encoder.embed_images(_crops(refs if kind == "reference" else targets, cond, pad, seed + 1)).numpy()
        table[kind][cond] = topk(q @ g.T)
    return table


# ---------------------------------------------------------------------------- detection
def detection_renders(num_images: int, seed: int = 54321, size: int = 64) -> list:
    rng = np.random.default_rng([0xDE7, seed])
    return [tw.render(localizer_scene(rng, tw.DEFAULT_ID_RANGES["eval"], empty_rate=0.0), size)
            for _ in range(num_images)]


def match_detections(dets, boxes, cats, iou: float = 0.5) -> list[tuple[int, int]]:
    """Greedy (detection index, subject index) pairs: best score first, same category,
    IoU >= iou, each subject at most once. `dets` carry .box, .score, .category."""
    taken, pairs = set(), []
    for di in sorted(range(len(dets)), key=lambda i: -dets[i].score):
        best, best_iou = None, iou
        for si, (box, cat) in enumerate(zip(boxes, cats)):
            if si in taken or cat != dets[di].category:
                continue
            value = box_iou(dets[di].box, box)
            if value >= best_iou:
                best, best_iou = si, value
        if best is not None:
            taken.add(best)
            pairs.append((di, best))
    return pairs


def detection_table(localizer, renders, seed: int = 54321, show_progress: bool = False) -> dict:
    """{condition: {"precision", "recall", "scene_accuracy", "attribute_f1"}} of
    `localizer.analyze` on `renders` (see the module docstring)."""
    from tqdm import tqdm

    table = {}
    for cond in EVAL_CONDITIONS:
        images = _degraded_images(np.stack([r.image for r in renders]), cond, seed)
        tp = n_det = n_gt = scene_ok = 0
        attr = np.zeros(3)  # true positive, false positive, false negative
        for image, r in tqdm(list(zip(images, renders)), desc=f"detection {cond}", disable=not show_progress,
                             leave=False):
            analysis = localizer.analyze(image)
            keep = [i for i in range(len(r.spec.subjects)) if r.masks[i].sum() >= MIN_AREA]
            boxes = [r.boxes[i].tolist() for i in keep]
            cats = [tw.Identity.from_id(r.spec.subjects[i].identity).category for i in keep]
            pairs = match_detections(analysis.detections, boxes, cats)
            tp, n_det, n_gt = tp + len(pairs), n_det + len(analysis.detections), n_gt + len(keep)
            scene_ok += analysis.scene == r.spec.scene
            for di, si in pairs:
                truth = set(r.spec.subjects[keep[si]].attributes)
                for name in ATTRIBUTE_NAMES:
                    said = analysis.detections[di].attributes[name] >= 0.5
                    attr += (said and name in truth, said and name not in truth, not said and name in truth)
        precision = tp / n_det if n_det else 1.0
        recall = tp / n_gt if n_gt else 1.0
        f1 = 2 * attr[0] / (2 * attr[0] + attr[1] + attr[2]) if attr[0] + attr[1] + attr[2] else 1.0
        table[cond] = {"precision": round(precision, 4), "recall": round(recall, 4),
                       "scene_accuracy": round(scene_ok / len(renders), 4), "attribute_f1": round(float(f1), 4)}
    return table
