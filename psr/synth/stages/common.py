"""Helpers every stage shares: per-step seeds and English joins."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Sequence


if TYPE_CHECKING:

    pass


def derive_seed(seed: int, *parts: Any) -> int:
    """A seed for one step of one sample: a hash of (seed, parts), in [0, 2**31).
    Independent of Python's hash randomisation, so every process agrees."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
