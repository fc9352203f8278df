"""A command's options as one dataclass tree: its flags, help, ranges, choices, config file and
`--print-config` are all derived from the tree's fields, so no option is written twice.

    @dataclass
    class Optim:
        lr: float = option(1e-3, "peak learning rate", gt=0)

    @dataclass
    class Run:
        optim: Optim = section(Optim)
        steps: int = option(50, "optimizer steps", ge=1)

        def __post_init__(self):
            check(self)                          # ranges and choices; errors name the flag and the key

    add_options(parser, Run)                     # --lr, --steps: absent flags stay absent
    run = resolve(Run, args)                     # defaults <- --config file (nested like the tree) <- flags
    as_config(run)                               # the nested mapping --print-config writes and resolve reads back
    to_argv(run)                                 # the flags that give `run` back (a subprocess's command line)

A leaf's flag is its name with dashes (`micro_batch` -> `--micro-batch`); a boolean whose default is
True is switched off by `--no-<name>`. Flags are unique over the whole tree, so a command can share
sections with another (the layout, the optimizer) and both get the same flags. Bottom layer.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing

from rsscale.scaling.runtime.config_file import check_number, check_tree, load_config_file

MISSING = dataclasses.MISSING


def option(default=MISSING, help: str = "", *, flag: str | None = None, cli: bool = True, hidden: bool = False,
           required: bool = False, positional: bool = False, metavar: str | None = None, choices=None, ge=None, gt=None, le=None, lt=None):
    """A leaf of the tree: its default, help line, valid range or choices, and how the command line
    names it (`flag`; `positional`: a bare argument, `rsscale evaluate RUN`; `cli=False`: config file
    only; `hidden`: a flag left out of --help; `required`: `resolve` refuses None, so the command
    line or the file must give it; `metavar`: how --help names its value)."""
    bounds = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    meta = dict(help=help, flag=flag, cli=cli, hidden=hidden, required=required, positional=positional, metavar=metavar,
                choices=tuple(choices) if choices else None, bounds=bounds)
    return dataclasses.field(default=default, metadata=meta)


def section(cls, **defaults):
    """A nested part of the tree (a config-file section, `parallel:`), defaulting to cls(**defaults):
    a command may share a section with its own defaults (fine-tuning's warmup)."""
    return dataclasses.field(default_factory=(lambda: cls(**defaults)) if defaults else cls)


class Leaf(typing.NamedTuple):
    path: str  # dotted config key: "optim.lr"
    field: dataclasses.Field
    type: typing.Any

    @property
    def meta(self) -> dict:
        return self.field.metadata

    @property
    def positional(self) -> bool:
        return bool(self.meta.get("positional"))

    @property
    def flag(self) -> str:
        """`--micro-batch`; a positional's metavar, `RUN`."""
        if self.positional:
            return self.field.name.upper()
        if self.meta.get("flag"):
            return self.meta["flag"]
        name = self.field.name.replace("_", "-")
        return f"--no-{name}" if self.type is bool and self.field.default is True else f"--{name}"

    @property
    def dest(self) -> str:
        return self.field.name if self.positional else self.flag[2:].replace("-", "_")

    @property
    def negated(self) -> bool:
        return self.type is bool and self.flag.startswith("--no-")

    def name(self) -> str:
        """How an error names this value: '--lr (config key 'optim.lr')'."""
        if not self.meta.get("cli", True):
            return f"config key {self.path!r}"
        return f"{'the argument ' if self.positional else ''}{self.flag} (config key {self.path!r})"


def leaves(cls, prefix: str = "") -> list[Leaf]:
    """Every non-section field of the tree, depth first, with its dotted path and resolved type;
    each must be an `option(...)` (its flag, help and checks come from there)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            out += leaves(typ, f"{prefix}{f.name}.")
        elif "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} is not an option(...) or a section")
        else:
            out.append(Leaf(prefix + f.name, f, typ))
    return out


def _base(typ):
    """int for `int | None`; typ otherwise."""
    if isinstance(typ, types.UnionType):
        return next(t for t in typ.__args__ if t is not type(None))
    return typ


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per leaf with a command-line name. Absent flags stay out of args (SUPPRESS), so a
    config file's values survive; --help still shows each default."""
    seen, defaults = {}, cls()
    for leaf in leaves(cls):
        if not leaf.meta.get("cli", True):
            continue
        if leaf.flag in seen:
            raise TypeError(f"{cls.__name__}: {leaf.path} and {seen[leaf.flag]} would both be {leaf.flag}")
        seen[leaf.flag] = leaf.path
        help_ = argparse.SUPPRESS if leaf.meta.get("hidden") else _help(leaf, _value(defaults, leaf.path))
        kwargs = dict(dest=leaf.dest, default=argparse.SUPPRESS, help=help_)
        typ = _base(leaf.type)
        if leaf.positional:  # optional on the line, so a --config file may give it instead
            parser.add_argument(leaf.dest, nargs="?", type=typ, choices=leaf.meta.get("choices"), metavar=leaf.flag,
                                default=argparse.SUPPRESS, help=help_)
        elif typ is bool:
            parser.add_argument(leaf.flag, action="store_true", **kwargs)
        elif typing.get_origin(typ) is list:  # repeatable: --micro-batch 4 --micro-batch 8
            parser.add_argument(leaf.flag, type=typing.get_args(typ)[0], action="append", metavar=leaf.meta.get("metavar"), **kwargs)
        else:
            parser.add_argument(leaf.flag, type=typ, choices=leaf.meta.get("choices"), metavar=leaf.meta.get("metavar"), **kwargs)


def _help(leaf: Leaf, default) -> str:
    help_ = leaf.meta.get("help", "")
    if default not in (None, "", (), []) and not isinstance(default, bool) and "default" not in help_:
        help_ = f"{help_} (default: {default})"
    return help_


def resolve(cls, args, adjust=None):
    """The tree: defaults <- the --config file (nested like the tree) <- flags given. `adjust(tree,
    given)` may fill in values that depend on others before the tree is built (and checked);
    `given` holds the dotted keys the file or the flags set."""
    path = getattr(args, "config", None)
    tree, given = defaults_with(cls, _own_keys(cls, load_config_file(path), path, getattr(args, "command", None)) if path else {}, path)
    values = vars(args)
    for leaf in leaves(cls):
        if leaf.meta.get("cli", True) and leaf.dest in values:
            _set(tree, leaf.path, not values[leaf.dest] if leaf.negated else values[leaf.dest])
            given.add(leaf.path)
    for leaf in leaves(cls):
        if leaf.meta.get("required") and _get(tree, leaf.path) is None:
            raise ValueError(f"{'the argument ' if leaf.positional else ''}{leaf.flag} is required (or the key {leaf.path!r} in a --config file)")
    if adjust:
        adjust(tree, given)
    return build(cls, tree)


_SAID: set[tuple[str, str]] = set()


def _own_keys(cls, data: dict, path, command: str | None) -> dict:
    """A config file's keys that `command` reads. A file --print-config wrote names its command
    (`command: pretrain`); read by another command, the writer's keys that this tree lacks
    (pretrain's optim, bench's measure) are left out with one line saying so, and the sections they
    share (parallel, compute, ...) are checked as strictly as ever. Any other file: every key is
    checked (a misspelt one is an error)."""
    data = dict(data)
    writer = data.pop("command", None)
    if writer is None or writer == command or command is None:
        return data
    names = {f.name for f in dataclasses.fields(cls)}
    foreign = [k for k in data if k not in names]
    if foreign and (str(path), command) not in _SAID and os.environ.get("RANK", "0") == "0":  # once per file and run
        _SAID.add((str(path), command))  # (--layout auto resolves it twice; torchrun's ranks each read it)
        print(f"rsscale {command}: {path} was written by `rsscale {writer}`; its keys {', '.join(foreign)} are not {command}'s and "
              f"are not read", file=sys.stderr)
    return {k: v for k, v in data.items() if k in names}


def defaults_with(cls, data: dict, source) -> tuple[dict, set[str]]:
    """cls's defaults as a nested mapping with `data` (nested like the tree, checked against it and
    named `source` in errors) laid over them, and the dotted keys `data` set."""
    tree = as_config(cls())
    given = check_tree(source, data, cls) if data else {}
    _merge(tree, given)
    return tree, _paths(given)


def build(cls, tree: dict):
    """cls from a nested mapping (sections built first); the dataclasses check themselves."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in tree.items():
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = build(typ, value or {})
        elif typing.get_origin(_base(typ)) is list and value is not None:
            kwargs[key] = list(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def as_config(obj) -> dict:
    """The nested mapping of a tree: what --print-config writes (tuples as lists, for YAML)."""
    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
    return {f.name: as_config(getattr(obj, f.name)) if dataclasses.is_dataclass(getattr(obj, f.name)) else plain(getattr(obj, f.name))
            for f in dataclasses.fields(obj)}


def to_argv(obj) -> list[str]:
    """The flags that give `obj` back from the defaults (what a relaunch or a subprocess runs);
    positional values first, in field order."""
    argv, bare, defaults = [], [], type(obj)()
    for leaf in leaves(type(obj)):
        value = _value(obj, leaf.path)
        if value == _value(defaults, leaf.path) or value is None:
            continue
        if not leaf.meta.get("cli", True):
            raise ValueError(f"{leaf.name()} = {value!r} has no command-line flag: pass it in a --config file")
        if leaf.positional:
            bare.append(str(value))
        elif _base(leaf.type) is bool:
            argv.append(leaf.flag)
        else:
            for v in value if isinstance(value, (list, tuple)) else [value]:
                argv += [leaf.flag, str(v)]
    return bare + argv


def _value(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def check(obj) -> None:
    """Every leaf of `obj` within its range and choices, or a one-line ValueError naming the flag
    and the config key."""
    for leaf in leaves(type(obj)):
        value = _value(obj, leaf.path)
        items = value if isinstance(value, (list, tuple)) else [value]
        for v in items:
            if leaf.meta.get("bounds"):
                check_number(leaf.name(), v, **leaf.meta["bounds"])
            choices = leaf.meta.get("choices")
            if choices and v is not None and v not in choices:
                raise ValueError(f"{leaf.name()} must be one of {', '.join(map(str, choices))}, got {v!r}")


def _merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _paths(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        out |= _paths(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
    return out


def _get(tree: dict, path: str):
    for part in path.split("."):
        tree = tree[part]
    return tree


def _set(tree: dict, path: str, value) -> None:
    *sections, key = path.split(".")
    for s in sections:
        tree = tree[s]
    tree[key] = value
