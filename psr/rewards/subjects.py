"""Finding subjects: reference crops, detections in the generated image, embeddings.

Shared by the subject-consistency rewards (`psr`, `hungarian`). Every step records why it
failed instead of raising (see psr.rewards.base for the failure policy).

Reference crop of subject i: its known box when the batch gives one; else the best box
the localizer finds in the reference for the subject's category; else, when it finds
none, the whole reference (the reference shows the subject alone, so the whole image is
a fair stand-in). A localizer that raises, or a known box that cannot be cropped, is a
failure of that subject.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from psr.rewards.base import Box, RewardBatch, crop, embed_images, json_float, run_component

if TYPE_CHECKING:
    import torch
    from PIL import Image


@dataclass
class SubjectCrop:
    """A crop of one subject (from a reference or a generated image), or why there is none."""

    image: "Image.Image | None"
    box: Box | None = None
    source: str = "detected"
    """'given' (known box), 'detected', 'whole' (no detection in a reference)."""
    score: float | None = None
    """Detection confidence, for detected boxes."""
    failure: str | None = None
    label: str | None = None
    embedding: "torch.Tensor | None" = None
    """[D] L2-normalised, once `embed_crops` ran and succeeded."""

    @property
    def ok(self) -> bool:
        return self.failure is None and self.embedding is not None

    def to_json(self) -> dict:
        out = {"source": self.source, "box": None if self.box is None else [json_float(v) for v in self.box]}
        if self.score is not None:
            out["detection_score"] = json_float(self.score)
        if self.failure:
            out["failure"] = self.failure
        return out


def unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


class SubjectFinder:
    """A localizer, an extractor and a crop padding (fraction of the box size per side)."""

    def __init__(self, extractor, localizer, pad: float = 0.0):
        self.extractor = extractor
        self.localizer = localizer
        self.pad = pad

    def reference_crops(self, batch: RewardBatch) -> list[list[SubjectCrop]]:
        """[B][N] crops of every reference (see the module docstring), not yet embedded.
        The same reference object with the same category and box is cropped once."""
        memo: dict[tuple, SubjectCrop] = {}
        out = []
        for b, (refs, cats) in enumerate(zip(batch.references, batch.categories)):
            row = []
            for i, (ref, cat) in enumerate(zip(refs, cats)):
                box = batch.reference_box(b, i)
                key = (id(ref), cat, None if box is None else tuple(float(v) for v in box))
                if key not in memo:
                    memo[key] = self._reference_crop(ref, cat, box)
                row.append(memo[key])
            out.append(row)
        return out

    def _reference_crop(self, ref: "Image.Image", category: str, box) -> SubjectCrop:
        if box is not None:
            image, clipped, reason = crop(ref, box, self.pad)
            return SubjectCrop(image, clipped, "given", failure=reason and f"reference box: {reason}")
        found, reason = run_component(self.localizer.detect, ref, [category])
        if reason:
            return SubjectCrop(None, source="detected", failure=f"reference detector: {reason}")
        found = [d for d in found if d.label == category]
        if not found:
            return SubjectCrop(ref.convert("RGB"), (0.0, 0.0, float(ref.width), float(ref.height)), "whole")
        best = max(found, key=lambda d: d.score)
        image, clipped, reason = crop(ref, best.box, self.pad)
        return SubjectCrop(image, clipped, "detected", best.score,
                           failure=reason and f"reference crop: {reason}", label=category)

    def detect(self, image: "Image.Image", categories: Sequence[str]) -> tuple[dict[str, list[SubjectCrop]], dict[str, str]]:
        """Per category: crops of every box the localizer finds for it (queried one category
        at a time, best score first), and per category the reason when detection failed."""
        found, errors = {}, {}
        for category in unique(categories):
            detections, reason = run_component(self.localizer.detect, image, [category])
            if reason:
                errors[category] = f"detector: {reason}"
                found[category] = []
                continue
            crops = []
            for d in sorted((d for d in detections if d.label == category), key=lambda d: -d.score):
                cropped, clipped, why = crop(image, d.box, self.pad)
                crops.append(SubjectCrop(cropped, clipped if clipped else tuple(d.box), "detected", d.score,
                                         failure=why and f"crop: {why}", label=category))
            found[category] = crops
        return found, errors

    def embed_crops(self, crops: Sequence[SubjectCrop]) -> None:
        """Fill `embedding` of every crop that has an image, in one extractor call (each
        distinct crop object once); a crop whose embedding fails gets the reason."""
        import torch.nn.functional as F

        todo = list({id(c): c for c in crops if c.image is not None and c.failure is None}.values())
        if not todo:
            return
        rows, reasons = embed_images(self.extractor, [c.image for c in todo])
        rows = F.normalize(rows.float(), dim=-1)
        for c, row, reason in zip(todo, rows, reasons):
            if reason:
                c.failure = f"extractor: {reason}"
            else:
                c.embedding = row
