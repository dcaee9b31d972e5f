"""TOML recipes mapped onto typed, frozen dataclasses.

A recipe is plain TOML. `build(cls, data)` walks the dataclass fields with their type hints
and converts the TOML values, so that every mistake is caught before any weights load and
is reported with its full dotted key path:

    model.lora.rnak: unknown key (did you mean 'rank'?)
    sample.steps: expected an integer, got a string ("ten")

Supported field types: bool, int, float (an int is accepted), str, `Literal[...]`,
`X | None` (the key may be left out), `tuple[T, ...]` (a TOML array), nested dataclasses
(a TOML table), `tuple[Dataclass, ...]` (an array of tables) and `dict[str, T]`.
Invariants that span fields live in each dataclass's `__post_init__`, which raises
`RecipeError(field, message)`; the loader prefixes the field with its section's path.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python < 3.11 is outside requires-python, kept for tools
    import tomli as tomllib

from psr.errors import RecipeError, UserError


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def lookup(table: dict, name: str, what: str):
    """`table[name]`, or a one-line `UserError` that suggests the nearest name."""
    if name not in table:
        raise UserError(f"{what} {name!r}: unknown{_suggest(name, table)}; choose one of {', '.join(table)}")
    return table[name]


def _describe(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
             list: "an array", dict: "a table"}
    shown = repr(value) if not isinstance(value, (dict, list)) else ""
    return kinds.get(type(value), type(value).__name__) + (f" ({shown})" if shown else "")


def _convert(value: Any, hint: Any, path: str) -> Any:
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(value, option, path)
            except RecipeError as err:
                errors.append(err.message)
        raise RecipeError(path, " or ".join(dict.fromkeys(errors)))
    if origin is Literal:
        choices = get_args(hint)
        if value in choices:
            return value
        listed = ", ".join(repr(c) for c in choices)
        hint_text = _suggest(value, [str(c) for c in choices]) if isinstance(value, str) else ""
        raise RecipeError(path, f"must be one of {listed}, got {value!r}{hint_text}")
    if origin is tuple:
        if not isinstance(value, list):
            raise RecipeError(path, f"expected an array, got {_describe(value)}")
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeError(path, f"expected an array of {len(args)} items, got {len(value)}")
        return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(path, f"expected a table, got {_describe(value)}")
        _, value_hint = get_args(hint)
        return {k: _convert(v, value_hint, _join(path, k)) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise RecipeError(path, f"expected a table, got {_describe(value)}")
        return build(hint, value, path)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(path, f"expected a boolean, got {_describe(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(path, f"expected an integer, got {_describe(value)}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # TOML has inf and nan; no recipe number means either, and one would only
            # surface as NaN weights or a silent no-op long after the run started.
            if not math.isfinite(value):
                raise RecipeError(path, f"expected a finite number, got {value!r}")
            return float(value)
        raise RecipeError(path, f"expected a number, got {_describe(value)}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise RecipeError(path, f"expected a string, got {_describe(value)}")
    raise TypeError(f"recipe field {path} has an unsupported type {hint!r}")  # a schema bug


def require(condition: bool, key: str, message: str) -> None:
    """A recipe invariant: raise `RecipeError(key, message)` unless `condition` holds."""
    if not condition:
        raise RecipeError(key, message)


def build(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from a TOML table, raising `RecipeError` with the key path."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    extra = getattr(cls, "RECIPE_EXTRA_KEYS", None)
    if extra is not None:
        # Plugin tables (`[[rewards]] name = "psr" weight = 1 extractor = {...}`) keep their
        # plugin's own options flat; the class validates them against the plugin's option list.
        flat = {k: v for k, v in data.items() if k not in fields}
        if flat:
            nested = data.get(extra, {})
            if not isinstance(nested, dict):
                raise RecipeError(_join(path, extra), f"expected a table, got {_describe(nested)}")
            data = {k: v for k, v in data.items() if k in fields} | {extra: {**nested, **flat}}
    for key in data:
        if key not in fields:
            raise RecipeError(_join(path, key), "unknown key" + _suggest(key, fields))
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(path, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise RecipeError(_join(path, name), "required key is missing")
    try:
        return cls(**kwargs)
    except RecipeError as err:
        raise RecipeError(_join(path, err.path), err.message) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b=value` into (["a", "b"], value); the value is parsed as TOML.

    A bare word that is not valid TOML (`--set model.preset=tiny`) is taken as a string, so
    shell users need not quote strings twice.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"--set {text!r}: expected KEY.PATH=VALUE, e.g. sample.steps=8")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of `data` with each `a.b=value` override applied (tables created as needed)."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        table = data
        for depth, key in enumerate(keys[:-1]):
            table = table.setdefault(key, {})
            if not isinstance(table, dict):
                raise RecipeError(".".join(keys[: depth + 1]), "is not a table, cannot set a key inside it")
        table[keys[-1]] = value
    return data


def read_toml(path: str | Path) -> dict:
    """Read a TOML file, turning I/O and syntax errors into one-line `UserError`s."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"recipe {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"recipe {path}: cannot read it ({err.__class__.__name__}: {err})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"recipe {path}: invalid TOML ({err})") from None


# ---------------------------------------------------------------------------- writing back
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def _is_table(value: Any) -> bool:
    return isinstance(value, dict)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, dict) for v in value)


def _emit(table: dict, prefix: str, lines: list[str]) -> None:
    for key, value in table.items():
        if value is None or _is_table(value) or _is_table_array(value):
            continue
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in table.items():
        name = _join(prefix, _toml_key(key))
        if _is_table(value):
            lines.extend(["", f"[{name}]"])
            _emit(value, name, lines)
        elif _is_table_array(value):
            for item in value:
                lines.extend(["", f"[[{name}]]"])
                _emit(item, name, lines)


def to_toml(recipe: Any, header: str = "") -> str:
    """Serialize a recipe dataclass to TOML that `build` reads back to an equal recipe.

    Fields left at None are omitted (TOML has no null), which `build` reads as the default.
    """
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    _emit(dataclasses.asdict(recipe), "", lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def load_recipe(schema: type, path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """Read a recipe for `schema` (a command's recipe dataclass, whose `command` field names
    the command) from TOML, or start from its defaults; apply `--set` overrides and build it.
    Raises `UserError`/`RecipeError` on any mistake, including a recipe of another command."""
    kind = schema.__dataclass_fields__["command"].default
    data = read_toml(path) if path else {}
    data = apply_overrides(data, list(overrides))
    declared = data.get("command", kind)
    if declared != kind:
        where = f"recipe {path}" if path else "recipe"
        raise RecipeError("command", f"{where} is a {declared!r} recipe, not a {kind!r} one")
    return build(schema, data)
