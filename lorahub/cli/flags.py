"""The one way every ``lorahub`` command gets its options: flags built from config dataclasses, plus ``--config``.

Each command is a function of one or more config dataclasses. :func:`add_command` gives its parser one flag
per dataclass field (help from ``field(metadata={"help": ...})``, the default shown from the dataclass; bools
as ``--x/--no-x``; lists as ``--x a,b`` or ``--x a b``; ints and floats typed) and ``--config FILE.yaml``,
whose keys are the same field names. :func:`read_configs` builds the dataclasses: defaults < YAML < flags.
"""

from __future__ import annotations

import argparse
import collections.abc
import types
import typing
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import LorahubFileError, LorahubValueError

Convert = Callable[[str], Any]


def parse_names(value: str | Sequence[str] | None) -> list[str] | None:
    """Names given as ``a,b``, a list, or ``@file`` entries (one name a line, ``#`` comments); None stays None."""
    if not value:
        return None
    parts = value.split(",") if isinstance(value, str) else [p for v in value for p in str(v).split(",")]
    out: list[str] = []
    for part in (p.strip() for p in parts):
        if part.startswith("@"):
            try:
                text = Path(part[1:]).read_text(encoding="utf-8")
            except OSError as e:
                raise LorahubFileError(f"{part}: cannot read the name list ({e.strerror or e})") from None
            out += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        elif part:
            out.append(part)
    return out


def split_list(values: Sequence[str], convert: Convert = str) -> list[Any]:
    """``["a,b", "c"]`` -> ``[a, b, c]``, each converted; empty parts dropped (so ``''`` is the empty list)."""
    return [convert(p.strip()) for v in values for p in str(v).split(",") if p.strip()]


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def default_of(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return MISSING


def default_text(value: Any) -> str:
    """`` (default: X)`` for the help line: on/off for bools, lists comma-joined, nothing for None."""
    if value is MISSING:
        return " (required)"
    if value is None:
        return ""
    if isinstance(value, bool):
        return f" (default: {'on' if value else 'off'})"
    if isinstance(value, (list, tuple)):
        return f" (default: {','.join(map(str, value)) or 'none'})"
    return f" (default: {value})"


def field_kind(cls: type, f: Field) -> tuple[str, Convert]:
    """("bool" | "list" | "value", element converter) from the field's annotation (``X | None`` is X)."""
    try:
        hint: Any = typing.get_type_hints(cls)[f.name]
    except Exception:  # an annotation that does not resolve here: read its text
        hint = f.type
    if isinstance(hint, str):
        text = hint.replace("Optional[", "").replace(" ", "")
        kind = "bool" if text.startswith("bool") else "list" if text.startswith(("list[", "List[")) else "value"
        inner = text.split("[", 1)[1] if kind == "list" else text
        conv: Convert = int if inner.startswith("int") else float if inner.startswith("float") else str
        return kind, conv
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next((a for a in typing.get_args(hint) if a is not type(None)), str)
    if hint is bool:
        return "bool", str
    if typing.get_origin(hint) in (list, tuple, collections.abc.Sequence):
        elem = (typing.get_args(hint) or (str,))[0]
        return "list", elem if elem in (int, float) else str
    return "value", hint if hint in (int, float) else str


class ListAction(argparse.Action):
    """``--x a,b c`` -> ``[a, b, c]``; a repeat replaces the list, or extends it when ``repeatable``."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, convert: Convert = str,
                 repeatable: bool = False, **kwargs: Any):
        super().__init__(option_strings, dest, nargs="+", **kwargs)
        self.convert, self.repeatable = convert, repeatable

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        try:
            items = split_list(values, self.convert)
        except (ValueError, argparse.ArgumentTypeError) as e:
            parser.error(f"argument {option_string}: {e}")
        if self.repeatable and hasattr(namespace, self.dest):
            items = getattr(namespace, self.dest) + items
        setattr(namespace, self.dest, items)


def add_config_flags(parser: Any, cls: type, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """One flag per field of dataclass ``cls`` (inherited fields included) on ``parser`` (or an argument group).

    Flags default to "not given" (so YAML values and dataclass defaults apply); the help shows the
    dataclass default. ``overrides[field]`` may give ``flags`` (extra names, e.g. ``("--targets",)``),
    ``type`` (an element converter), ``metavar``, ``repeatable`` (a list flag that extends on repeat) and
    ``positional``; a field's ``metadata["positional"]`` makes it a positional argument too. A field named
    ``progress`` also gets ``--quiet``, the same as ``--no-progress``.
    """
    overrides = overrides or {}
    for f in fields(cls):
        if not f.init:
            continue
        opt = {**f.metadata, **overrides.get(f.name, {})}
        kind, convert = field_kind(cls, f)
        convert = opt.get("type", convert)
        if opt.get("positional"):  # always given on the command line: no default to show
            parser.add_argument(f.name, type=convert, help=opt.get("help", "").replace("%", "%%"), metavar=opt.get("metavar"))
            continue
        help_ = (opt.get("help", "") + default_text(default_of(f))).replace("%", "%%")
        names = [flag_name(f.name), *opt.get("flags", ())]
        common: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_)
        if kind == "bool":
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **common)
            if f.name == "progress":
                parser.add_argument("--quiet", dest="progress", action="store_false", default=argparse.SUPPRESS,
                                    help="the same as --no-progress")
        elif kind == "list":
            parser.add_argument(*names, action=ListAction, convert=convert, repeatable=bool(opt.get("repeatable")),
                                metavar=opt.get("metavar", f.name.rstrip("s").upper() or None), **common)
        else:
            metavar = opt.get("metavar", "N" if convert is int else "X" if convert is float else None)
            parser.add_argument(*names, type=convert, metavar=metavar, **common)


def add_command(subparsers: Any, name: str, run: Callable[..., int], *configs: type,
                titles: Mapping[type, str] | None = None, overrides: Mapping[str, Mapping[str, Any]] | None = None,
                **parser_kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand whose options are the fields of ``configs``, plus ``--config``; ``main`` calls
    ``run(*instances, command=...)`` with one instance per dataclass. ``titles`` name the argument
    groups when there are several dataclasses."""
    p = subparsers.add_parser(name, **parser_kwargs)
    p.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="YAML mapping of any of these options (their field names as keys); flags override it")
    for cls in configs:
        target = p if len(configs) == 1 else p.add_argument_group((titles or {}).get(cls, cls.__name__))
        add_config_flags(target, cls, overrides)
    p.set_defaults(run=run, configs=configs)
    return p


def read_yaml(path: str, known: Mapping[str, tuple[type, Field]]) -> dict[str, Any]:
    """The ``--config`` file as {field name: value}; an unknown key is an error naming it and the known ones."""
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise LorahubFileError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise LorahubValueError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from None
    loaded = {} if loaded is None else loaded
    if not isinstance(loaded, dict):
        raise LorahubValueError(f"{path}: expected a mapping of option: value, got {type(loaded).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in loaded.items()}
    unknown = [k for k, key in zip(loaded, data) if key not in known]
    if unknown:
        raise LorahubValueError(f"{path}: unknown key(s) {unknown}. Known keys: {', '.join(sorted(known))}")
    for key, value in data.items():
        cls, f = known[key]
        kind, convert = field_kind(cls, f)
        if kind == "list" and isinstance(value, str):
            data[key] = split_list([value], convert)
    return data


def read_configs(args: argparse.Namespace) -> list[Any]:
    """One instance per config dataclass of the command: dataclass defaults < ``--config`` YAML < flags."""
    configs: Sequence[type] = args.configs
    known = {f.name: (cls, f) for cls in configs for f in fields(cls) if f.init}
    data = read_yaml(args.config, known) if args.config else {}
    data.update({name: getattr(args, name) for name in known if hasattr(args, name)})
    missing = [name for name, (_, f) in known.items() if default_of(f) is MISSING and name not in data]
    if missing:
        where = f" (as flags, or keys of {args.config})" if args.config else ""
        raise LorahubValueError(f"missing required option(s) {', '.join(map(flag_name, missing))}{where}")
    return [cls(**{f.name: data[f.name] for f in fields(cls) if f.init and f.name in data}) for cls in configs]
