"""On-disk cache of everything eval computes from an image, so a rerun recomputes nothing.

Layout: `CACHE/<component>/<h[:2]>/<h>.json`, where `<component>` is the component's
registry name plus a hash of its options (so changing a threshold or weights misses), and
`<h>` is the SHA-256 of the image FILE's bytes (a regenerated image with other pixels
misses; the same image under another name hits). Each file maps a sub-key (the query, the
box, the prompt) to a JSON value. Files are written atomically, after every sample, so a
killed run keeps what it finished.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from psr.core.io import write_text_atomic

CACHE_VERSION = 1


def component_key(name: str, options: dict) -> str:
    """'<name>-<10 hex>': the hash covers the options and the cache format version."""
    text = json.dumps({"v": CACHE_VERSION, "name": name, "options": options}, sort_keys=True, default=str)
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class DiskCache:
    """`get_or_compute(component, content_hash, subkey, compute)` with hit/miss counts."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._files: dict[tuple[str, str], dict] = {}
        self._dirty: set[tuple[str, str]] = set()
        self.hits = 0
        self.misses = 0

    def _path(self, component: str, content_hash: str) -> Path:
        return self.folder / component / content_hash[:2] / f"{content_hash}.json"

    def _table(self, component: str, content_hash: str) -> dict:
        key = (component, content_hash)
        if key not in self._files:
            path = self._path(component, content_hash)
            table = {}
            if path.is_file():
                try:
                    table = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                    table = {}  # a damaged entry is recomputed, never trusted
            self._files[key] = table if isinstance(table, dict) else {}
        return self._files[key]

    def lookup(self, component: str, content_hash: str, subkey: str) -> tuple[bool, Any]:
        """(found, value), counting a hit or a miss."""
        table = self._table(component, content_hash)
        if subkey in table:
            self.hits += 1
            return True, table[subkey]
        self.misses += 1
        return False, None

    def put(self, component: str, content_hash: str, subkey: str, value: Any) -> None:
        self._table(component, content_hash)[subkey] = value
        self._dirty.add((component, content_hash))

    def get_or_compute(self, component: str, content_hash: str, subkey: str, compute: Callable[[], Any]) -> Any:
        found, value = self.lookup(component, content_hash, subkey)
        if not found:
            value = compute()
            self.put(component, content_hash, subkey, value)
        return value

    def flush(self) -> None:
        """Write every changed entry file (atomically)."""
        for component, content_hash in sorted(self._dirty):
            path = self._path(component, content_hash)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(self._files[(component, content_hash)], separators=(",", ":")))
        self._dirty.clear()
