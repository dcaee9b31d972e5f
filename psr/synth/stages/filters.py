"""Filter stages: keep a sample only if references match their target crops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from psr.core.features import as_feature_extractor
from psr.errors import UserError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from psr.core.features import FeatureExtractor


# ---------------------------------------------------------------------------- filter
@dataclass
class FilterVerdict:
    reason: str | None
    """None when the sample is kept, else why it was dropped."""
    similarity: list[float]
    """Per subject: cosine(reference embedding, target crop embedding)."""
    max_pairwise: float | None
    """Highest cosine between two different references (None with one subject)."""

    @property
    def keep(self) -> bool:
        return self.reason is None


def cosine_verdict(references: "torch.Tensor", crops: "torch.Tensor", *, threshold: float,
                   distinct_threshold: float, labels: Sequence[str] | None = None) -> FilterVerdict:
    """Keep iff every cosine(references[i], crops[i]) >= threshold and every pair of
    references has cosine < distinct_threshold. references, crops: [N, D] L2-normalised."""
    if references.shape != crops.shape:
        raise ValueError(f"references {tuple(references.shape)} and crops {tuple(crops.shape)} differ in shape")
    def who(i: int) -> str:
        return f"{i} ({labels[i]})" if labels is not None else str(i)

    sims = [float(v) for v in (references.float() * crops.float()).sum(-1)]
    pair = references.float() @ references.float().T
    n = len(sims)
    off = [(float(pair[i, j]), i, j) for i in range(n) for j in range(i + 1, n)]
    max_pairwise = max(off)[0] if off else None
    reason = None
    for i, s in enumerate(sims):
        if s < threshold:
            reason = (f"filter: subject {who(i)} reference vs target crop cosine "
                      f"{s:.3f} < {threshold}")
            break
    if reason is None and off:
        value, i, j = max(off)
        if value >= distinct_threshold:
            reason = (f"filter: references {who(i)} and {who(j)} are not distinct "
                      f"(cosine {value:.3f} >= {distinct_threshold})")
    return FilterVerdict(reason=reason, similarity=sims, max_pairwise=max_pairwise)


class FeatureCosineFilter:
    name = "feature-cosine"

    def __init__(self, extractor: "FeatureExtractor", *, threshold: float, distinct_threshold: float):
        self.extractor = extractor
        self.threshold = threshold
        self.distinct_threshold = distinct_threshold

    def __call__(self, references: Sequence["Image.Image"], crops: Sequence["Image.Image"],
                 labels: Sequence[str] | None = None) -> FilterVerdict:
        embeds = self.extractor.embed_images(list(references) + list(crops))
        n = len(references)
        return cosine_verdict(embeds[:n], embeds[n:], threshold=self.threshold,
                              distinct_threshold=self.distinct_threshold, labels=labels)


def _feature_cosine(device="cpu", *, extractor: Any = None, threshold: float = 0.6,
                    distinct_threshold: float = 0.95) -> FeatureCosineFilter:
    """`extractor`: {"name": "dino", "path": ...} (PSR's DINO ViT-S/16 protocol) or a built
    FeatureExtractor; `threshold`: least reference↔crop cosine; `distinct_threshold`:
    references at or above this cosine to each other count as duplicates (above 1: never)."""
    if extractor is None:
        raise UserError("filter 'feature-cosine': set extractor, "
                        "e.g. {name = \"dino\", path = \"facebook/dino-vits16\"}")
    if not -1.0 <= threshold <= 1.0:
        raise UserError(f"filter.threshold {threshold}: a cosine, in [-1, 1]")
    return FeatureCosineFilter(as_feature_extractor(extractor, device), threshold=threshold,
                               distinct_threshold=distinct_threshold)
