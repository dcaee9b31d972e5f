"""Instance ↔ reference assignment and the Hungarian reward's penalty rule.

`hungarian_match(S)` pairs detected instances (rows of S) with references (columns) by
`scipy.optimize.linear_sum_assignment(S, maximize=True)`. Pairs marked not `allowed` (a
different category, a crop that failed) are never returned: among the matchings that use
only allowed pairs it returns one of largest size, and among those one of highest total
similarity (with every pair allowed that is exactly the plain assignment).

`alignment_reward` turns the assignment into the reward of one sample, with R references
and I instances:

    s_r   = S[m(r), r]           for a reference r matched to instance m(r)
    s_r   = -missing_penalty     for an unmatched reference (a missing subject)
    d     = number of unmatched instances e whose best allowed reference
            r* = argmax_r S[e, r] is matched and S[e, r*] >= duplicate_threshold
            (a second copy of an identity that is already in the image)
    total = (1/R) · Σ_r s_r  −  duplicate_penalty · d

Unmatched instances below the threshold are background boxes or other things the
detector found, and cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _check(similarity: np.ndarray, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be [instances, references], got shape {similarity.shape}")
    allowed = np.ones(similarity.shape, bool) if allowed is None else np.asarray(allowed, bool)
    if allowed.shape != similarity.shape:
        raise ValueError(f"allowed {allowed.shape} does not match similarity {similarity.shape}")
    if np.isnan(similarity[allowed]).any():
        raise ValueError("similarity has NaN at allowed pairs; mark failed rows as not allowed")
    return similarity, allowed


def hungarian_match(similarity: np.ndarray, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols): instance rows[k] is matched to reference cols[k]; int64, sorted by
    reference. `similarity` [I, R]; `allowed` [I, R] bool (None: all pairs)."""
    from scipy.optimize import linear_sum_assignment

    similarity, allowed = _check(similarity, allowed)
    if similarity.size == 0 or not allowed.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    n = min(similarity.shape)
    scale = float(np.abs(similarity[allowed]).max()) + 1.0
    # One forbidden pair costs more than any rearrangement of allowed pairs can gain, so
    # the solver first minimises the forbidden pairs it must use, then maximises similarity.
    forbidden = -(2 * n + 1) * scale
    values = np.where(allowed, np.nan_to_num(similarity), forbidden)
    rows, cols = linear_sum_assignment(values, maximize=True)
    keep = allowed[rows, cols]
    rows, cols = rows[keep], cols[keep]
    order = np.argsort(cols, kind="stable")
    return rows[order].astype(np.int64), cols[order].astype(np.int64)


@dataclass
class Alignment:
    """One sample's assignment and reward (see the module docstring)."""

    rows: np.ndarray
    cols: np.ndarray
    per_reference: np.ndarray
    """[R]: s_r, the matched similarity or -missing_penalty."""
    matched: np.ndarray
    """[R] bool."""
    duplicates: list[int] = field(default_factory=list)
    """Rows of the instances counted as duplicated identities."""
    duplicate_of: list[int] = field(default_factory=list)
    """The reference each duplicate copies."""
    total: float = 0.0

    @property
    def missing(self) -> int:
        return int((~self.matched).sum())

    @property
    def matched_similarity(self) -> float:
        """Mean similarity over matched pairs; NaN when nothing matched."""
        return float(self.per_reference[self.matched].mean()) if self.matched.any() else float("nan")

    def instance_of(self, reference: int) -> int | None:
        hit = np.nonzero(self.cols == reference)[0]
        return int(self.rows[hit[0]]) if len(hit) else None


def alignment_reward(similarity: np.ndarray, allowed: np.ndarray | None = None, *, missing_penalty: float = 0.0,
                     duplicate_penalty: float = 0.25, duplicate_threshold: float = 0.5) -> Alignment:
    """The Hungarian multi-ID reward of one sample; `similarity` [I, R] with R >= 1."""
    similarity, allowed = _check(similarity, allowed)
    num_refs = similarity.shape[1]
    if num_refs == 0:
        raise ValueError("alignment_reward needs at least one reference")
    rows, cols = hungarian_match(similarity, allowed)
    matched = np.zeros(num_refs, bool)
    matched[cols] = True
    per_reference = np.full(num_refs, -float(missing_penalty))
    per_reference[cols] = similarity[rows, cols]
    duplicates, duplicate_of = [], []
    for e in sorted(set(range(similarity.shape[0])) - set(rows.tolist())):
        if not allowed[e].any():
            continue
        candidates = np.where(allowed[e], similarity[e], -np.inf)
        best = int(np.argmax(candidates))
        if matched[best] and candidates[best] >= duplicate_threshold:
            duplicates.append(e)
            duplicate_of.append(best)
    total = float(per_reference.mean()) - duplicate_penalty * len(duplicates)
    return Alignment(rows=rows, cols=cols, per_reference=per_reference, matched=matched,
                     duplicates=duplicates, duplicate_of=duplicate_of, total=total)
