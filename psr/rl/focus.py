"""FocusDPO's spatial token weights (REFERENCE §4), on the target's token grid.

FocusDPO weights the Diffusion-DPO errors by where identity lives and where detail lives.
Its exact weights are not public; psr's choice, each step documented with its function:

    structure  s ∈ [0, 1]^L   similarity of each target token to the references' subjects
    detail     d ∈ [0, 1]^L   information density (local entropy) of the target image
    raw        = s + d·[σ_t < detail_on_below]     (detail only once semantics have settled)
    weights    = (floor + raw) / mean(floor + raw)    (mean 1; every token keeps a weight > 0)

Tokens are in row-major grid order, like `psr.core.packing`. numpy / scipy / torch only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# BT.601 luma: the grey image whose entropy the detail map measures.
_LUMA = np.array([0.299, 0.587, 0.114])


def _min_max(values: torch.Tensor) -> torch.Tensor:
    """Rescale to [0, 1]; a constant map says nothing about where to look and becomes 0."""
    lo, hi = values.min(), values.max()
    if hi - lo <= 0:
        return torch.zeros_like(values)
    return (values - lo) / (hi - lo)


def structure_map(target_features: torch.Tensor, reference_features: Sequence[torch.Tensor],
                  reference_masks: Sequence[torch.Tensor], top_k: int = 8) -> torch.Tensor:
    """Where each reference's subject appears in the target → [L] float32 in [0, 1].

    target_features: [L, D] per-token features of the target (any extractor's patch
        features or the transformer's hidden states; cosine makes the scale irrelevant).
    reference_features[i]: [Lr_i, D]; reference_masks[i]: [Lr_i] bool, the subject's tokens.
    For reference i: cosine of every target token with each masked reference token, the mean
    of each target token's top-k cosines (k = min(top_k, masked count); a mean over several
    matches is steadier than the single best), min-max normalised over the target tokens.
    References are combined by the per-token max, so each subject's region counts fully
    whatever the number of subjects.
    """
    if target_features.ndim != 2:
        raise ValueError(f"target_features must be [L, D], got shape {tuple(target_features.shape)}")
    if len(reference_features) != len(reference_masks) or not reference_features:
        raise ValueError(f"need one mask per reference and at least one reference, got "
                         f"{len(reference_features)} feature sets and {len(reference_masks)} masks")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    target = F.normalize(target_features.float(), dim=1)
    maps = []
    for i, (features, mask) in enumerate(zip(reference_features, reference_masks)):
        mask = torch.as_tensor(mask, dtype=torch.bool, device=features.device)
        if features.ndim != 2 or features.shape[1] != target.shape[1] or mask.shape != features.shape[:1]:
            raise ValueError(f"reference {i}: features {tuple(features.shape)} and mask {tuple(mask.shape)} "
                             f"do not match target features {tuple(target.shape)}")
        if not bool(mask.any()):
            raise ValueError(f"reference {i}: the subject mask selects no token")
        subject = F.normalize(features[mask].float().to(target.device), dim=1)
        cosine = target @ subject.T  # [L, M]
        best = cosine.topk(min(top_k, subject.shape[0]), dim=1).values.mean(dim=1)
        maps.append(_min_max(best))
    return torch.stack(maps).amax(dim=0)


def detail_map(image: torch.Tensor | np.ndarray, token_stride: int, sigma: float = 1.0,
               bins: int = 16) -> torch.Tensor:
    """Information density per token → [L] float32 in [0, 1], L = (H/stride)·(W/stride).

    image: [3, H, W] floats in [0, 1]. The BT.601 grey image is smoothed with a Gaussian of
    `sigma` pixels (so pixel noise does not count as detail), quantised into `bins` levels,
    and each token's stride × stride patch gets the Shannon entropy of its level histogram.
    The map is divided by its maximum: the densest token is 1, a flat image is all 0.
    """
    from scipy.ndimage import gaussian_filter

    pixels = image.detach().cpu().double().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, float)
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got shape {pixels.shape}")
    _, height, width = pixels.shape
    if token_stride < 1 or height % token_stride or width % token_stride:
        raise ValueError(f"image {height}x{width} is not a whole grid of {token_stride}-pixel tokens")
    if sigma < 0 or bins < 2:
        raise ValueError(f"need sigma >= 0 and bins >= 2, got sigma={sigma}, bins={bins}")
    grey = np.tensordot(_LUMA, np.clip(pixels, 0.0, 1.0), axes=1)
    if sigma > 0:
        grey = gaussian_filter(grey, sigma, mode="reflect")
    levels = np.clip((grey * bins).astype(np.int64), 0, bins - 1)
    rows, cols, s = height // token_stride, width // token_stride, token_stride
    patches = levels.reshape(rows, s, cols, s).transpose(0, 2, 1, 3).reshape(rows * cols, s * s)
    offsets = np.arange(rows * cols)[:, None] * bins
    counts = np.bincount((patches + offsets).ravel(), minlength=rows * cols * bins).reshape(rows * cols, bins)
    p = counts / (s * s)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    peak = entropy.max()
    return torch.from_numpy(entropy / peak if peak > 0 else entropy).float()


def focus_weights(structure: torch.Tensor, detail: torch.Tensor, sigma_t: float, detail_on_below: float = 0.5,
                  floor: float = 0.1) -> torch.Tensor:
    """Token weights [L] with mean 1 for `diffusion_dpo_loss` at noise level sigma_t.

    structure, detail: [L] maps in [0, 1] (structure_map, detail_map). At high noise the
    image's semantics (layout, which subject is where) are still forming, so only the
    structure map steers the loss; below `detail_on_below` the detail map is added. `floor`
    (> 0) keeps a weight on every token, so background and layout are still trained.
    """
    if structure.shape != detail.shape or structure.ndim != 1:
        raise ValueError(f"structure and detail must be [L] maps of one size, got "
                         f"{tuple(structure.shape)} and {tuple(detail.shape)}")
    if not floor > 0:
        raise ValueError(f"floor must be > 0 so that every token keeps a weight, got {floor}")
    if bool((structure < 0).any()) or bool((detail < 0).any()):
        raise ValueError("structure and detail maps must be >= 0")
    raw = structure.float()
    if sigma_t < detail_on_below:
        raw = raw + detail.float().to(raw.device)
    weights = floor + raw
    return weights / weights.mean()
