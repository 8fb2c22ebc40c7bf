"""Typed configuration: nested dataclasses, presets, file and command-line overrides, validation.

Every stage describes its settings as a dataclass (fields may themselves be dataclasses). A config is built as
    defaults -> preset -> --config FILE (YAML/TOML/JSON) -> --a.b VALUE overrides -> validate()
Any dataclass may define `validate(self)` raising ConfigError; it is called on every nested level.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

from minichat.errors import ConfigError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dc(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn a value from a file or the command line (often a string) into the field's declared type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if tp is str:
        return str(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""] if value else []
        inner = args[0] if args else str
        out = [_coerce(v, inner, name) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = json.loads(value)
        return dict(value)
    if _is_dc(tp):
        if isinstance(value, dict):
            return from_dict(tp, value, prefix=name + ".")
        raise ConfigError(f"{name}: expected a table of fields")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "", base: T | None = None) -> T:
    """Build (or update `base`) a dataclass from a nested dict; unknown keys are errors naming the field."""
    obj = base if base is not None else cls()
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        key_norm = key.replace("-", "_")
        if key_norm not in names:
            raise ConfigError(f"unknown config field {prefix}{key!r}; known: {', '.join(sorted(names))}")
        tp = hints[key_norm]
        if _is_dc(tp) and isinstance(value, dict):
            setattr(obj, key_norm, from_dict(tp, value, prefix=f"{prefix}{key_norm}.", base=getattr(obj, key_norm)))
        else:
            setattr(obj, key_norm, _coerce(value, tp, prefix + key_norm))
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def set_path(obj: Any, dotted: str, value: Any) -> None:
    """Set `a.b.c` on nested dataclasses from a string, with type coercion and a clear error."""
    parts = dotted.replace("-", "_").split(".")
    target = obj
    for i, p in enumerate(parts):
        if not dataclasses.is_dataclass(target):
            raise ConfigError(f"unknown config field {'.'.join(parts[:i+1])!r}")
        names = {f.name for f in dataclasses.fields(target)}
        if p not in names:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"unknown config field {dotted!r}: {p!r} is not in {where} (known: {', '.join(sorted(names))})")
        if i == len(parts) - 1:
            tp = _field_types(type(target))[p]
            if _is_dc(tp):
                raise ConfigError(f"{dotted} is a group of fields; set one of its fields, e.g. {dotted}.<field>")
            setattr(target, p, _coerce(value, tp, dotted))
        else:
            target = getattr(target, p)


def validate(obj: Any, prefix: str = "") -> None:
    """Call validate() on every nested dataclass, innermost first."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            validate(v, prefix + f.name + ".")
    fn = getattr(obj, "validate", None)
    if callable(fn):
        fn()


def load_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {p}: use .yaml, .yml, .toml or .json")
    except ConfigError:
        raise
    except Exception as e:  # parse errors from yaml/tomllib/json carry line numbers in their text
        raise ConfigError(f"config file {p} does not parse: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a table of fields at the top level")
    return data


def parse_overrides(tokens: list[str]) -> list[tuple[str, str]]:
    """['--model.n_layer', '6', '--train.lr=3e-4'] -> [('model.n_layer', '6'), ('train.lr', '3e-4')]."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if not t.startswith("--"):
            raise ConfigError(f"unexpected argument {t!r}; overrides look like --section.field VALUE")
        key = t[2:]
        if "=" in key:
            key, val = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens) or (tokens[i + 1].startswith("--") and not _looks_number(tokens[i + 1])):
                val = "true"  # a bare flag sets a boolean
                i += 1
            else:
                val = tokens[i + 1]
                i += 2
        out.append((key, val))
    return out


def _looks_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def build(
    cls: type[T],
    argv: list[str],
    presets: dict[str, Callable[[], T]] | None = None,
    prog: str = "minichat",
    description: str = "",
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[T, argparse.Namespace]:
    """Parse `--preset`, `--config`, stage-specific options (via `extra`) and dotted overrides into a config."""
    presets = presets or {}
    ap = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="Any config field can be set as --section.field VALUE (e.g. --model.n_layer 6). "
        "Fields:\n" + describe(cls()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if presets:
        ap.add_argument("--preset", choices=sorted(presets), help="named starting configuration")
    ap.add_argument("--config", action="append", default=[], help="YAML/TOML/JSON file of fields (repeatable)")
    ap.add_argument("--print-config", action="store_true", help="print the final config as JSON and exit")
    if extra:
        extra(ap)
    ns, rest = ap.parse_known_args(argv)
    cfg = presets[ns.preset]() if getattr(ns, "preset", None) else cls()
    for f in ns.config:
        cfg = from_dict(cls, load_file(f), base=cfg)
    for key, val in parse_overrides(rest):
        set_path(cfg, key, val)
    validate(cfg)
    if ns.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        raise SystemExit(0)
    return cfg, ns


def describe(obj: Any, prefix: str = "") -> str:
    lines = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            lines.append(describe(v, prefix + f.name + "."))
        else:
            lines.append(f"  --{prefix}{f.name} (default {v!r})")
    return "\n".join(lines)
