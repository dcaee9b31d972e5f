"""The ToyWorld localizer as a `Localizer` (`LOCALIZERS["toyworld"]`), plus `analyze`.

The net (nets.LocalizerNet) sees the image resized to 64x64 (bilinear, antialiased; the
aspect ratio is not kept, boxes are mapped back to the input's pixels) and predicts at
stride 4 (a 16x16 grid) a subject-centre heatmap, a box size and a sub-cell offset and,
for the whole image, the scene; its crop classifier then reads each found subject.

Decoding (CenterNet): a cell is an instance when its centre probability is a 3x3 local
maximum and >= `threshold`; its box is (centre ± size / 2) with centre = (cell + offset)
· 4 px. Boxes that overlap a better one by more than `nms_iou` IoU are dropped. Two
subjects of one category have two peaks, so they stay apart. Each box, grown by
CROP_PAD of its size on every side, is resampled to the classifier's crop (roi_align)
and classified: category = argmax of the category softmax, score = centre probability ×
that probability, attributes = sigmoid of the attribute logits.

`detect(image, queries)` keeps the instances whose category is a word of a query
("star", "the red star creature") and labels them with that query, best first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from psr.core.components import HoldsModel
from psr.core.detect import Detection
from psr.errors import UserError
from psr.toyworld.perception import LOCALIZER_ASSETS
from psr.toyworld.perception.weights import load_folder, save_folder

if TYPE_CHECKING:
    import torch
    from PIL import Image

STRIDE = 4
CROP_PAD = 0.1  # of the box size on every side, as the classifier was trained


@dataclass(frozen=True)
class ToyDetection:
    box: tuple[float, float, float, float]
    """(x0, y0, x1, y1) in pixels of the input image, clipped to it."""
    score: float
    """Centre probability × category probability, in [0, 1]."""
    category: str
    """A ToyWorld category (Identity.category, e.g. "star")."""
    attributes: dict[str, float] = field(default_factory=dict)
    """Probability of each added attribute (hat, scarf, glow, outline) on this instance."""


@dataclass(frozen=True)
class ToyAnalysis:
    detections: list[ToyDetection]
    """Best first."""
    scene: str
    """The most likely background scene (a key of psr.toyworld.SCENES)."""
    scene_scores: dict[str, float]
    """Softmax probability of every scene."""


def _pixels(image: "Image.Image", size: int) -> "torch.Tensor":
    """PIL image → [3, size, size] float in [0, 1] (bilinear with antialiasing)."""
    import numpy as np
    import torch
    from PIL import Image as PILImage

    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), PILImage.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def crop_subjects(x: "torch.Tensor", batch_index: "torch.Tensor", boxes: "torch.Tensor", size: int,
                  pad: float | "torch.Tensor" = 0.1) -> "torch.Tensor":
    """Crops [N, C, size, size] of images x [B, C, H, W]: box i (x0, y0, x1, y1) px of image
    batch_index[i], grown by `pad` of its width / height on every side (roi_align, bilinear,
    adaptive sampling: the same resampling as the identity encoder)."""
    import torch
    from torchvision.ops import roi_align

    w, h = (boxes[:, 2] - boxes[:, 0]).clamp(min=1), (boxes[:, 3] - boxes[:, 1]).clamp(min=1)
    grown = torch.stack([boxes[:, 0] - pad * w, boxes[:, 1] - pad * h, boxes[:, 2] + pad * w,
                         boxes[:, 3] + pad * h], 1)
    rois = torch.cat([batch_index.to(boxes.dtype)[:, None], grown], 1)
    return roi_align(x, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def find_centres(out: dict, index: int, threshold: float, nms_iou: float | None, max_detections: int):
    """(boxes [N, 4] in net pixels, centre probabilities [N]) of image `index`, best first."""
    import torch
    import torch.nn.functional as F

    heat = out["heatmap"][index, 0].float().sigmoid()                    # [h, w]
    peaks = (heat == F.max_pool2d(heat[None], 3, 1, 1)[0]) & (heat >= threshold)
    ys, xs = torch.nonzero(peaks, as_tuple=True)
    scores = heat[ys, xs]
    order = torch.argsort(scores, descending=True)[:max_detections]
    ys, xs, scores = ys[order], xs[order], scores[order]
    offset = out["offset"][index].float()
    size = out["size"][index].float().clamp(min=0) * 16.0                # net pixels
    cx = (xs + offset[0, ys, xs]) * STRIDE
    cy = (ys + offset[1, ys, xs]) * STRIDE
    w, h = size[0, ys, xs], size[1, ys, xs]
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    side = float(heat.shape[-1] * STRIDE)
    boxes = boxes.clamp(0, side)
    if nms_iou is not None and len(scores):
        from torchvision.ops import nms

        keep = nms(boxes, scores, nms_iou)
        boxes, scores = boxes[keep], scores[keep]
    return boxes, scores


def query_categories(query: str, categories: Sequence[str]) -> set[str]:
    """The categories named by a query: its words (lower case, letters only) that are categories."""
    return set(re.findall(r"[a-z]+", query.lower())) & set(categories)


class ToyLocalizer(HoldsModel):
    """ToyWorld subject instances, attributes and scene; see the module docstring."""

    name = "toyworld"

    def __init__(self, model, meta: dict, *, threshold: float = 0.5, nms_iou: float | None = 0.7,
                 max_detections: int = 32):
        self.model = model.eval()
        self.meta = meta
        labels = meta.get("labels", {})
        self.categories = tuple(labels["categories"])
        self.attribute_names = tuple(labels["attributes"])
        self.scenes = tuple(labels["scenes"])
        self.threshold, self.nms_iou, self.max_detections = threshold, nms_iou, max_detections

    def analyze_batch(self, images: Sequence["Image.Image"]) -> list[ToyAnalysis]:
        """`analyze` of several images in one pass of each net."""
        import torch

        if not images:
            return []
        size = self.model.input_size
        x = torch.stack([_pixels(im, size) for im in images]).to(self.device, self.dtype)
        with torch.no_grad():
            out = {k: v.float().cpu() for k, v in self.model(x).items()}
            found = [find_centres(out, i, self.threshold, self.nms_iou, self.max_detections)
                     for i in range(len(images))]
            boxes = torch.cat([b for b, _ in found])
            owner = torch.cat([torch.full((len(b),), i) for i, (b, _) in enumerate(found)])
            if len(boxes):
                crops = crop_subjects(x, owner.to(self.device), boxes.to(self.device, self.dtype),
                                      self.model.classifier.crop, CROP_PAD)
                cat_logits, attr_logits = (t.float().cpu() for t in self.model.classify(crops))
                cat_probs, attr_probs = cat_logits.softmax(-1), attr_logits.sigmoid()
        scene_probs = out["scene"].softmax(-1)
        result, start = [], 0
        for i, image in enumerate(images):
            sx, sy = image.width / size, image.height / size
            dets = []
            for j in range(start, start + len(found[i][0])):
                p, k = cat_probs[j].max(0)
                b = boxes[j]
                dets.append(ToyDetection(
                    box=(float(b[0]) * sx, float(b[1]) * sy, float(b[2]) * sx, float(b[3]) * sy),
                    score=float(found[i][1][j - start] * p), category=self.categories[int(k)],
                    attributes={name: float(attr_probs[j, a]) for a, name in enumerate(self.attribute_names)}))
            start += len(found[i][0])
            dets.sort(key=lambda d: -d.score)
            scores = {name: float(q) for name, q in zip(self.scenes, scene_probs[i])}
            result.append(ToyAnalysis(detections=dets, scene=max(scores, key=scores.get), scene_scores=scores))
        return result

    def analyze(self, image: "Image.Image") -> ToyAnalysis:
        """Every instance above the threshold (best first), with attributes, and the scene."""
        return self.analyze_batch([image])[0]

    def detect(self, image: "Image.Image", queries: Sequence[str]) -> list:
        """`Detection`s of the instances whose category a query names, labelled with that
        query (the first one naming it), best first."""
        if not queries:
            return []
        named = [(q, query_categories(q, self.categories)) for q in queries]
        out = []
        for d in self.analyze(image).detections:
            label = next((q for q, cats in named if d.category in cats), None)
            if label is not None:
                out.append(Detection(box=d.box, score=d.score, label=label))
        return out

    def save_pretrained(self, folder: str | Path) -> None:
        save_folder(folder, "localizer", self.model, self.meta.get("config", {}), self.meta.get("labels", {}))


def toyworld_localizer(device="cpu", *, path: str | None = None, threshold: float = 0.5,
                       nms_iou: float | None = 0.7, max_detections: int = 32) -> ToyLocalizer:
    """`path`: a weights folder; None loads the shipped psr/assets/toyworld/localizer/."""
    if not 0.0 < threshold < 1.0:
        raise UserError(f"toyworld localizer threshold {threshold}: must be in (0, 1)")
    if nms_iou is not None and not 0.0 < nms_iou <= 1.0:
        raise UserError(f"toyworld localizer nms_iou {nms_iou}: must be in (0, 1]")
    model, meta = load_folder(LOCALIZER_ASSETS if path is None else path, "localizer", device)
    labels = meta.get("labels", {})
    if not all(isinstance(labels.get(k), list) for k in ("categories", "attributes", "scenes")):
        raise UserError(f"toyworld localizer weights {path}: config.json lacks the category/attribute/scene labels")
    return ToyLocalizer(model, meta, threshold=threshold, nms_iou=nms_iou, max_detections=max_detections)
