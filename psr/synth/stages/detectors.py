"""Detector stages: the best box per category and its crop."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from psr.core.detect import assign_boxes, build_localizer, crop_box

if TYPE_CHECKING:
    from PIL import Image

    from psr.core.detect import Detection


# ---------------------------------------------------------------------------- detector
class GroundingDinoDetector:
    """Best box per category (`psr.core.detect.assign_boxes`: two subjects of one category
    get two different boxes) and the padded crop of each."""

    name = "grounding-dino"

    def __init__(self, localizer, *, pad: float = 0.05, max_overlap: float = 0.5):
        self.localizer = localizer
        self.pad = pad
        self.max_overlap = max_overlap

    def __call__(self, image: "Image.Image", categories: Sequence[str]) -> list["Detection | None"]:
        queries = list(dict.fromkeys(categories))
        return assign_boxes(self.localizer.detect(image, queries), list(categories), self.max_overlap)

    def crop(self, image: "Image.Image", box: Sequence[float]) -> "Image.Image":
        return crop_box(image, box, self.pad)


def _grounding_dino_detector(device="cpu", *, path: str | None = None, tiny: bool = False,
                             config: dict | None = None, words: Sequence[str] = (), seed: int = 0,
                             threshold: float = 0.35, nms_iou: float | None = 0.5,
                             max_detections: int | None = None, dtype: str = "float32",
                             pad: float = 0.05, max_overlap: float = 0.5, localizer=None) -> GroundingDinoDetector:
    """Model options as `psr.core.detect.LOCALIZERS['grounding-dino']` takes them; `pad`:
    crop margin as a fraction of the box; `max_overlap`: IoU above which a second subject
    of the same category may not reuse a box; `localizer`: an already built Localizer."""
    if localizer is None:
        localizer = build_localizer("grounding-dino", device, path=path, tiny=tiny, config=config, words=words,
                                    seed=seed, threshold=threshold, nms_iou=nms_iou,
                                    max_detections=max_detections, dtype=dtype)
    return GroundingDinoDetector(localizer, pad=pad, max_overlap=max_overlap)
