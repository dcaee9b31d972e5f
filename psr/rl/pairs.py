"""ToyWorld preference pairs for FocusDPO: disrupted-instance negatives (REFERENCE §4).

The winner is the example's target scene. The loser is the same SceneSpec (scene, layout,
poses, added attributes, every other subject) with one subject's identity swapped for a
different identity of the same category, so the only change is that instance's appearance:
the silhouette family stays, the details that make it *this* subject do not. The swapped
identity also has a different body colour, so the disruption is visible at any resolution,
and it is none of the example's own identities, so the loser never shows another reference.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import numpy as np

from psr.toyworld import DEFAULT_ID_RANGES, Example, Identity, Render, render

_SALT = 0xD15C  # separates this stream from other users of the same seed
_MAX_DRAWS = 10_000  # a same-shape, other-colour id is ~1 draw in 11: never reached in practice


class DisruptedPair(NamedTuple):
    winner: Render
    loser: Render
    subject: int
    """Index of the disrupted subject in both specs."""


def replacement_identity(identity: int, avoid: set[int], rng: np.random.Generator,
                         id_range: tuple[int, int]) -> int:
    """An id from [lo, hi) with identity's category, another body colour, and an appearance
    unlike every id in `avoid`."""
    original = Identity.from_id(identity)
    avoided = {Identity.from_id(i).attributes for i in avoid}
    lo, hi = id_range
    if not 0 <= lo < hi:
        raise ValueError(f"id_range {id_range} must be a non-empty range of non-negative ids")
    for _ in range(_MAX_DRAWS):
        candidate = int(rng.integers(lo, hi))
        other = Identity.from_id(candidate)
        if other.category == original.category and other.colour != original.colour and other.attributes not in avoided:
            return candidate
    raise ValueError(f"id_range {id_range} holds no other-coloured {original.category} identity to swap in")


def disrupted_pair(example: Example, seed: int, size: int = 64,
                   id_range: tuple[int, int] = DEFAULT_ID_RANGES["train"]) -> DisruptedPair:
    """(winner, loser, subject) renders at `size` px; `seed` picks the subject and the new id.

    The disrupted subject is drawn among the subjects visible in the winner; the new identity
    comes from `id_range` (default the training ids, so evaluation identities never appear).
    """
    winner = render(example.target, size)
    visible = [i for i in range(len(example.target.subjects)) if winner.masks[i].any()]
    if not visible:
        raise ValueError(f"example {example.seed}: no subject is visible at {size} px")
    rng = np.random.default_rng([_SALT, int(seed)])
    index = visible[int(rng.integers(len(visible)))]
    subjects = list(example.target.subjects)
    new_id = replacement_identity(subjects[index].identity, {s.identity for s in subjects}, rng, id_range)
    subjects[index] = replace(subjects[index], identity=new_id)
    loser = render(replace(example.target, subjects=tuple(subjects)), size)
    return DisruptedPair(winner=winner, loser=loser, subject=index)
