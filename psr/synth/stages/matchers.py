"""Matcher stages: reference↔target token correspondences for MOSAIC's alignment loss."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from psr.core.features import as_feature_extractor
from psr.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from psr.core.features import FeatureExtractor


# ---------------------------------------------------------------------------- matcher
def mutual_nearest_neighbours(a: "torch.Tensor", b: "torch.Tensor",
                              min_similarity: float = -1.0) -> list[tuple[int, int]]:
    """Pairs (i, j) with b[j] the nearest of b to a[i] and a[i] the nearest of a to b[j]
    (cosine; a [Na, D], b [Nb, D] L2-normalised), similarity >= min_similarity, sorted."""
    if len(a) == 0 or len(b) == 0:
        return []
    sim = a.float() @ b.float().T
    best_b = sim.argmax(dim=1)
    best_a = sim.argmax(dim=0)
    return [(i, int(j)) for i, j in enumerate(best_b.tolist())
            if int(best_a[j]) == i and float(sim[i, j]) >= min_similarity]


def patch_tokens(grid: tuple[int, int], size: tuple[int, int], token_stride: int,
                 mask: "np.ndarray | None" = None) -> list[int | None]:
    """For each patch of an h x w patch grid over a W x H image (row-major), the dataset
    token under its centre (row * (W // stride) + col), or None when the centre falls
    outside `mask` ([H, W] bool) or outside the token grid."""
    h, w = grid
    width, height = size
    grid_w, grid_h = width // token_stride, height // token_stride
    out: list[int | None] = []
    for r in range(h):
        for c in range(w):
            x, y = (c + 0.5) * width / w, (r + 0.5) * height / h
            px, py = min(int(x), width - 1), min(int(y), height - 1)
            row, col = int(y // token_stride), int(x // token_stride)
            inside = row < grid_h and col < grid_w and (mask is None or bool(mask[py, px]))
            out.append(row * grid_w + col if inside else None)
    return out


def mnn_token_pairs(ref_features: "torch.Tensor", tgt_features: "torch.Tensor",
                    ref_size: tuple[int, int], tgt_size: tuple[int, int], token_stride: int,
                    ref_mask: "np.ndarray | None" = None, tgt_mask: "np.ndarray | None" = None,
                    min_similarity: float = -1.0) -> list[tuple[int, int]]:
    """(reference token, target token) pairs from mutual nearest patches.

    ref_features [hr, wr, D], tgt_features [ht, wt, D]: patch grids over the whole images
    of (width, height) `ref_size` / `tgt_size`. Only patches whose centres lie in the masks
    take part; matched patches are mapped to the dataset token grid (stride in pixels).
    Unique pairs, sorted.
    """
    ref_tokens = patch_tokens(tuple(ref_features.shape[:2]), ref_size, token_stride, ref_mask)
    tgt_tokens = patch_tokens(tuple(tgt_features.shape[:2]), tgt_size, token_stride, tgt_mask)
    ref_idx = [i for i, t in enumerate(ref_tokens) if t is not None]
    tgt_idx = [j for j, t in enumerate(tgt_tokens) if t is not None]
    a = ref_features.reshape(-1, ref_features.shape[-1])[ref_idx]
    b = tgt_features.reshape(-1, tgt_features.shape[-1])[tgt_idx]
    pairs = {(ref_tokens[ref_idx[i]], tgt_tokens[tgt_idx[j]])
             for i, j in mutual_nearest_neighbours(a, b, min_similarity)}
    return sorted(pairs)


def agree(pairs: Sequence[tuple[int, int]], other: Sequence[tuple[int, int]], grid_w: int,
          radius: int = 0) -> list[tuple[int, int]]:
    """Pairs of `pairs` whose reference token `other` also matches, to a target token at
    most `radius` tokens away (Chebyshev, on a target grid `grid_w` tokens wide)."""
    by_ref: dict[int, list[int]] = {}
    for r, t in other:
        by_ref.setdefault(r, []).append(t)
    kept = []
    for r, t in pairs:
        row, col = divmod(t, grid_w)
        if any(abs(row - o // grid_w) <= radius and abs(col - o % grid_w) <= radius for o in by_ref.get(r, ())):
            kept.append((r, t))
    return kept


class MnnMatcher:
    """Mutual-nearest-neighbour patch matching (DINOv2), optionally kept only where a second
    extractor (e.g. DINO) agrees, as MOSAIC builds its correspondences."""

    name = "dinov2-mnn"

    def __init__(self, extractor: "FeatureExtractor", *, agreement: "FeatureExtractor | None" = None,
                 agreement_radius: int = 0, min_similarity: float = 0.0):
        self.extractor = extractor
        self.agreement = agreement
        self.agreement_radius = agreement_radius
        self.min_similarity = min_similarity

    def _pairs(self, extractor, reference, target, ref_mask, tgt_mask, token_stride):
        return mnn_token_pairs(extractor.patch_features(reference), extractor.patch_features(target),
                               reference.size, target.size, token_stride, ref_mask, tgt_mask, self.min_similarity)

    def __call__(self, reference: "Image.Image", target: "Image.Image", ref_mask: "np.ndarray | None",
                 tgt_mask: "np.ndarray | None", token_stride: int) -> list[tuple[int, int]]:
        pairs = self._pairs(self.extractor, reference, target, ref_mask, tgt_mask, token_stride)
        if self.agreement is not None:
            other = self._pairs(self.agreement, reference, target, ref_mask, tgt_mask, token_stride)
            pairs = agree(pairs, other, target.width // token_stride, self.agreement_radius)
        return pairs


def _dinov2_mnn(device="cpu", *, extractor: Any = None, agreement: Any = None, agreement_radius: int = 0,
                min_similarity: float = 0.0) -> MnnMatcher:
    """`extractor`: {"name": "dinov2", "path": ...} or a built FeatureExtractor;
    `agreement`: a second one (e.g. {"name": "dino", ...}) whose matches must agree."""
    if extractor is None:
        raise UserError("matcher 'dinov2-mnn': set extractor, "
                        "e.g. {name = \"dinov2\", path = \"facebook/dinov2-small\"}")
    if agreement_radius < 0:
        raise UserError(f"matcher.agreement_radius {agreement_radius}: must be >= 0")
    return MnnMatcher(as_feature_extractor(extractor, device),
                      agreement=as_feature_extractor(agreement, device) if agreement is not None else None,
                      agreement_radius=agreement_radius, min_similarity=min_similarity)
