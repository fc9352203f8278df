"""Config files for the commands: YAML or TOML, read before the flags so that flags override.

    load_config_file("run.yaml") -> dict
    tree = check_tree("run.yaml", data, TrainConfig)   # a nested tree against its dataclasses
    check_number("--steps", value, ge=1)               # one-line range errors naming the flag

A command's file is nested like its options tree (scaling/runtime/options.py: `parallel: {tp: 2}`;
a key may be spelled like its flag, `micro-batch`). Every key and value is checked before anything
runs; an error names the file, the key and what was expected.
Bottom layer: imports nothing from the rest of rsscale.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path


def load_config_file(path) -> dict:
    """A YAML (.yaml/.yml) or TOML (.toml) mapping; one-line errors for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    try:
        if path.suffix == ".toml":
            import tomllib

            with open(path, "rb") as f:
                data = tomllib.load(f)
        else:
            import yaml

            data = yaml.safe_load(path.read_text()) or {}
    except Exception as e:  # noqa: BLE001 - any parser error becomes one line naming the file
        raise ValueError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {e}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a mapping of keys to values, got {type(data).__name__}")
    return data


def coerce_value(path, key: str, value, typ):
    """`value` from file `path` as type `typ` (bool, int, float, str, a `X | None` hint, or any
    callable), or a one-line ValueError naming the file, the key and the expected type. Booleans
    must be real booleans ("no" or "false" in quotes are strings, not false)."""
    optional = isinstance(typ, types.UnionType) and type(None) in typ.__args__
    if optional:
        if value is None:
            return None
        typ = next(t for t in typ.__args__ if t is not type(None))
    if isinstance(value, (dict, list)) or value is None:
        raise ValueError(f"{path}: key {key!r} must be a single {_type_name(typ)} value, got {value!r}")
    if typ is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path}: key {key!r} must be true or false (unquoted), got {value!r}")
        return value
    if typ is str:
        if not isinstance(value, str):
            raise ValueError(f"{path}: key {key!r} must be a string, got {value!r}")
        return value
    if typ in (int, float) and isinstance(value, bool):
        raise ValueError(f"{path}: key {key!r} must be {typ.__name__}, got {value!r}")
    if typ is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{path}: key {key!r} must be int, got {value!r}")
    try:
        return typ(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: key {key!r} must be {_type_name(typ)}, got {value!r}") from None


def _type_name(typ) -> str:
    return getattr(typ, "__name__", "valid")


def check_tree(path, data: dict, cls, prefix: str = "") -> dict:
    """A nested config mapping checked against dataclass `cls` (nested dataclasses are sections):
    unknown keys, non-mapping sections and mistyped values are one-line ValueErrors naming the
    file, the dotted key and the expected type. Returns the mapping with values coerced."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {prefix.rstrip('.') or 'the file'} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    data = {str(k).replace("-", "_"): v for k, v in data.items()}  # `micro-batch:` as the flag spells it is `micro_batch`
    unknown = sorted(str(k) for k in data if k not in hints)
    if unknown:
        known = ", ".join(prefix + k for k in hints)
        raise ValueError(f"{path}: unknown config key(s) {'; '.join(_unknown_key(k, hints, prefix) for k in unknown)} (known: {known})")
    out = {}
    for key, value in data.items():
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            out[key] = check_tree(path, value if value is not None else {}, typ, f"{prefix}{key}.")
        elif _list_of(typ) is not None and value is not None:  # a repeatable flag: one value or a list of them
            out[key] = [coerce_value(path, prefix + key, v, _list_of(typ)) for v in (value if isinstance(value, list) else [value])]
        else:
            out[key] = coerce_value(path, prefix + key, value, typ)
    return out


def _list_of(typ):
    """T for a `list[T]` or `list[T] | None` hint, else None."""
    if isinstance(typ, types.UnionType):
        typ = next(t for t in typ.__args__ if t is not type(None))
    return typing.get_args(typ)[0] if typing.get_origin(typ) is list else None


def _unknown_key(key: str, hints: dict, prefix: str) -> str:
    """An unknown key of a section, with where it belongs (a key of a nested section written at
    this level) or the closest known key."""
    homes = [name for name, typ in hints.items() if dataclasses.is_dataclass(typ) and key in typing.get_type_hints(typ)]
    if homes:
        return f"{prefix}{key} (belongs under '{prefix}{homes[0]}:', as {prefix}{homes[0]}.{key})"
    return prefix + key + _did_you_mean(key, hints, prefix)


def _did_you_mean(key: str, known, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def check_number(name: str, value, *, ge=None, gt=None, le=None, lt=None) -> None:
    """ValueError naming `name` (a flag, or a flag and its config key) unless `value` is a finite
    number within the bounds given; None is allowed (an unset optional value)."""
    if value is None:
        return
    bounds = [(">=", ge, value >= ge if ge is not None else True), (">", gt, value > gt if gt is not None else True),
              ("<=", le, value <= le if le is not None else True), ("<", lt, value < lt if lt is not None else True)]
    if not math.isfinite(value) or not all(ok for *_, ok in bounds):
        want = " and ".join(f"{op} {bound:g}" for op, bound, _ in bounds if bound is not None) or "finite"
        raise ValueError(f"{name} must be {want}, got {value!r}")
