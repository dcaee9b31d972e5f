"""Plugin tables whose entries may be named by a dotted path and loaded on first use.

Every plugin kind (feature extractors, localizers, rewards, synth stages, regularizers,
sources, presets) is one explicit table. A table that lives in a low layer names a plugin
from a higher one as ``"package.module:attribute"`` instead of importing it, so the layer
stays importable on its own:

    FEATURE_EXTRACTORS = Registry("feature extractor", {
        "dino": _dino,
        "toyworld": "psr.toyworld.perception.identity:toyworld_extractor",
    })

`table[name]` imports the module the first time and caches the object; `name in table`,
`list(table)` and `len(table)` never import anything. A table is a mutable mapping, so a
plugin of your own is one assignment.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def load_dotted(path: str) -> Any:
    """The object `path` ("package.module:attribute") names."""
    module, _, attribute = path.partition(":")
    if not module or not attribute:
        raise ValueError(f"{path!r}: a dotted plugin path is 'package.module:attribute'")
    return getattr(importlib.import_module(module), attribute)


class Registry(MutableMapping, Generic[T]):
    """A name → plugin table; string values are dotted paths loaded lazily. A plugin of
    your own is added like a dict entry: `FEATURE_EXTRACTORS["mine"] = my_factory`."""

    def __init__(self, what: str, entries: dict[str, T | str]):
        self.what = what
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> T:
        value = self._entries[name]
        if isinstance(value, str):
            value = self._entries[name] = load_dotted(value)
        return value

    def __setitem__(self, name: str, value: T | str) -> None:
        self._entries[name] = value

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {list(self._entries)})"
