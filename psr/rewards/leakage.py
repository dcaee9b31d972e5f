"""Identity leakage: does the instance matched to a reference look like another one?

For reference r matched to instance m(r) (see `matching.hungarian_match`):

    margin_r = S[m(r), r] − max_{r' ≠ r} S[m(r), r']

A positive margin means the instance resembles its own reference more than any other; a
margin near 0 or below means features of another subject leaked into it (or the two
references look alike). margin_r is undefined (NaN) for an unmatched reference and when
there is no other reference to compare with (NaN entries of S, e.g. a reference whose
crop failed, are left out of the max). A sample's margin is the mean over its defined margins (NaN
when none is defined); aggregates skip NaN and report how many samples had none.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def leakage_margins(similarity: np.ndarray, assignment: tuple[Sequence[int], Sequence[int]]) -> np.ndarray:
    """[R] float64 margins (NaN where undefined); `similarity` [I, R], `assignment` (rows, cols)."""
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be [instances, references], got shape {similarity.shape}")
    num_refs = similarity.shape[1]
    margins = np.full(num_refs, np.nan)
    if num_refs < 2:
        return margins
    for row, col in zip(*assignment):
        own = similarity[row, col]
        others = np.delete(similarity[row], col)
        others = others[~np.isnan(others)]  # a reference whose crop failed has no similarity
        if len(others) and not np.isnan(own):
            margins[col] = own - others.max()
    return margins


def sample_margin(margins: Sequence[float]) -> float:
    """Mean of the defined margins of one sample; NaN when none is defined."""
    values = [float(m) for m in margins if not math.isnan(float(m))]
    return sum(values) / len(values) if values else float("nan")


def margins_by_subset(sample_margins: Sequence[float], subsets: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per subset (and "all"): {"mean": mean over samples with a defined margin (NaN when
    none), "samples": count, "undefined": samples whose margin is NaN}."""
    if len(sample_margins) != len(subsets):
        raise ValueError(f"{len(sample_margins)} margins for {len(subsets)} subset names")
    groups: dict[str, list[float]] = {}
    for margin, subset in zip(sample_margins, subsets):
        groups.setdefault(subset, []).append(float(margin))
    groups["all"] = [float(m) for m in sample_margins]  # PSRBench has no subset called "all"
    summary = {}
    for subset, values in groups.items():
        defined = [v for v in values if not math.isnan(v)]
        summary[subset] = {"mean": sum(defined) / len(defined) if defined else float("nan"),
                           "samples": len(values), "undefined": len(values) - len(defined)}
    return summary
