"""Config files for the commands: YAML or TOML, read before the flags so that flags override.

    load_config_file("run.yaml") -> dict
    args = parse_args_with_config(parser, argv)   # flat commands: file keys are the flags' names

`pretrain` has a nested config tree (scaling/train.py); bench, finetune and profile take a flat
file whose keys are their long flags without dashes (`micro_batch: 8`, `tp: 2`). Every key and
value is checked before anything runs; an error names the file, the key and what was expected.
Bottom layer: imports nothing from the rest of rsscale.
"""

from __future__ import annotations

import argparse
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


def _coerce(path, key: str, value, action: argparse.Action):
    """`value` from the file as the flag `action` would have parsed it, or a ValueError naming key and type."""
    if action.nargs == 0:  # store_true / store_false switches: only real booleans
        if not isinstance(value, bool):
            raise ValueError(f"{path}: key {key!r} must be true or false, got {value!r}")
        return value if action.const is True else not value
    if isinstance(value, (dict, list)) or value is None:
        raise ValueError(f"{path}: key {key!r} must be a single value, got {value!r}")
    typ = action.type or str
    if typ in (int, float) and isinstance(value, bool):
        raise ValueError(f"{path}: key {key!r} must be {typ.__name__}, got {value!r}")
    if typ is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{path}: key {key!r} must be int, got {value!r}")
    try:
        value = typ(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: key {key!r} must be {getattr(typ, '__name__', 'valid')}, got {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{path}: key {key!r} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse `argv`; if it has --config FILE, the file's values become the defaults first."""
    args = parser.parse_args(argv)
    path = getattr(args, "config", None)
    if not path:
        return args
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    defaults = {}
    for key, value in load_config_file(path).items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise ValueError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(actions))})")
        defaults[dest] = _coerce(path, key, value, actions[dest])
    parser.set_defaults(**defaults)
    for dest in defaults:  # required flags given by the file are no longer required on the command line
        actions[dest].required = False
    return parser.parse_args(argv)
