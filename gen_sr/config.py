"""Typed experiment configs: dataclass defaults, then a YAML file, then ``--section.key=value`` overrides.

Every value is checked against the dataclass annotations; a mistake raises :class:`ConfigError` (an
:class:`~gen_sr.errors.InputError`) naming the dotted key and the file or override it came from. YAML is read with
YAML 1.2 scalars: only ``true``/``false`` are booleans (``no`` stays a string) and ``1e-4`` is a float.

Example::

    @dataclass
    class Train:
        steps: int = 1000
        lr: float = 1e-4

    @dataclass
    class Experiment:
        seed: int = 0
        train: Train = field(default_factory=Train)

    cfg = load_config(Experiment, "configs/exp.yaml", ["--train.lr=3e-4", "--seed", "1"])
    save_config(cfg, run_dir / "config.yaml")  # load_config(Experiment, that file) == cfg
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gen_sr.errors import InputError
from gen_sr.io import atomic_write

__all__ = ["ConfigError", "config_from_dict", "config_to_dict", "known_fields", "load_config", "parse_cli",
           "record_from_dict", "save_config"]

T = TypeVar("T")
_KEY = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_FLOAT_RE = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$"
                       r"|^\.(?:nan|NaN|NAN)$")
_CLI_BOOL = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


class ConfigError(InputError):
    """A config key, value or file that does not fit the schema; the message names the dotted key and the source."""


class _Loader(yaml.SafeLoader):
    """Safe loading with YAML 1.2 booleans and floats."""


class _Dumper(yaml.SafeDumper):
    """Safe dumping that also quotes strings :class:`_Loader` would read as floats (``'1e-4'``)."""


_Loader.yaml_implicit_resolvers = {
    c: [r for r in rs if r[0] not in (_BOOL, _FLOAT)] for c, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))
_Dumper.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))


class _Text(str):
    """A raw command-line value, not parsed yet."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _tname(tp: Any) -> str:
    if _is_union(tp):
        return " | ".join(_tname(a) for a in typing.get_args(tp))
    return "None" if tp is type(None) else tp.__name__ if isinstance(tp, type) else repr(tp).replace("typing.", "")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _section(tp: Any) -> type | None:
    """The dataclass behind ``tp`` or ``tp | None``, else None."""
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.YAMLError:
        return str(text)  # not YAML: keep it as a plain string (the type check decides)


def _state(cls: type, obj: Any = None) -> dict[str, Any]:
    """Field values of ``obj`` (or the defaults of ``cls``) as a dict, with nested dataclasses as dicts too."""
    out: dict[str, Any] = {}
    for f in _fields(cls):
        if obj is not None:
            v = getattr(obj, f.name)
        elif f.default_factory is not dataclasses.MISSING:
            v = f.default_factory()
        else:
            v = f.default  # MISSING for a required key
        sub = _section(_hints(cls)[f.name])
        if sub is not None and (v is dataclasses.MISSING or dataclasses.is_dataclass(v)):
            v = _state(sub, None if v is dataclasses.MISSING else v)
        if v is not dataclasses.MISSING:
            out[f.name] = v
    return out


def _check_key(cls: type, name: Any, prefix: str, source: str | None) -> None:
    names = [f.name for f in _fields(cls)]
    if name not in names:
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f"did you mean '{prefix}{close[0]}'?" if close else f"known keys: {', '.join(prefix + n for n in names)}"
        raise ConfigError(f"unknown key '{prefix}{name}'", source, hint)


def _merge(cls: type, state: dict[str, Any], raw: dict, prefix: str, source: str | None) -> dict[str, Any]:
    """Check ``raw`` against ``cls`` and write its values into ``state``; sections are merged key by key."""
    for name, value in raw.items():
        _check_key(cls, name, prefix, source)
        key, tp = prefix + name, _hints(cls)[name]
        sub = _section(tp)
        if sub is None:
            state[name] = _coerce(value, tp, key, source)
            continue
        value = _yaml(value) if isinstance(value, _Text) else value
        if value is None and _is_union(tp):
            state[name] = None
        elif isinstance(value, dict):
            base = state.get(name)
            state[name] = _merge(sub, base if isinstance(base, dict) else _state(sub), value, key + ".", source)
        else:
            raise ConfigError(f"expected a mapping for section '{key}', got {value!r}", source)
    return state


def _coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Check (and convert, where lossless) one value against the annotation ``tp``."""
    text = str(value) if isinstance(value, _Text) else None  # a raw command-line value
    if text is not None:
        value = _yaml(text)
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)

    def fail(expected: str | None = None) -> typing.NoReturn:
        raise ConfigError(f"expected {expected or _tname(tp)} for '{key}', got {value!r}", source)

    if tp is Any:
        return value
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _coerce(_Text(text) if text is not None else value, option, key, source)
            except ConfigError:
                if len(options) == 1:
                    raise
        fail()
    if origin is typing.Literal:
        if any(value == c and type(value) is type(c) for c in args):
            return value
        if text is not None and text in args:
            return text
        fail(f"one of {', '.join(repr(c) for c in args)}")
    if tp is bool:
        if text is not None and text.strip().lower() in _CLI_BOOL:
            return _CLI_BOOL[text.strip().lower()]
        return value if isinstance(value, bool) else fail()
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else fail()
    if tp is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else fail()
    if tp in (str, Path):
        return tp(text) if text is not None else tp(value) if isinstance(value, str) else fail()
    if origin in (list, tuple):
        if text is not None and not isinstance(value, list):
            value = [_Text(s.strip()) for s in text.split(",")] if text.strip() else []
        elif text is not None:  # `[1, 2]`: numbers may still be meant as strings
            value = [_Text(v) if type(v) in (int, float) else v for v in value]
        if not isinstance(value, (list, tuple)):
            fail("a list")
        fixed = origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)
        if fixed and len(value) != len(args):
            raise ConfigError(f"expected {len(args)} items for '{key}', got {len(value)}: {list(value)!r}", source)
        types_ = args if fixed else [args[0] if args else Any] * len(value)
        items = [_coerce(v, t, f"{key}[{i}]", source) for i, (v, t) in enumerate(zip(value, types_, strict=True))]
        return origin(items)
    if origin is dict:
        if not isinstance(value, dict):
            fail("a mapping")
        kt, vt = args or (Any, Any)
        return {_coerce(k, kt, key, source): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if _section(tp) is not None:  # a dataclass inside a list or dict
        if not isinstance(value, dict):
            fail("a mapping")
        return _build(tp, _merge(tp, _state(tp), value, key + ".", source), key + ".")
    raise TypeError(f"unsupported config annotation {tp!r} for '{key}'")


def _build(cls: type[T], state: dict[str, Any], prefix: str = "") -> T:
    kwargs = {}
    for f in _fields(cls):
        key = prefix + f.name
        if f.name not in state:
            raise ConfigError(f"missing required key '{key}'", hint=f"set it in the config file or with --{key}=VALUE")
        value, sub = state[f.name], _section(_hints(cls)[f.name])
        kwargs[f.name] = _build(sub, value, key + ".") if sub is not None and isinstance(value, dict) else value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"invalid {f'section {prefix[:-1]!r}' if prefix else 'config'}: {e}") from e


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # _Loader is a SafeLoader
    except FileNotFoundError:
        raise ConfigError("no such config file", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file: {getattr(e, 'strerror', None) or e}", path) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"invalid YAML{where}: {getattr(e, 'problem', None) or e}", path) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"the top level must be a mapping of keys to values, got a {type(raw).__name__}", path)
    return raw


def _split_overrides(tokens: Sequence[str]) -> list[tuple[str, str]]:
    """``["--a.b=1", "--c", "2"]`` -> ``[("a.b", "1"), ("c", "2")]``."""
    out, i = [], 0
    while i < len(tokens):
        token, i = tokens[i], i + 1
        name, sep, text = token[2:].partition("=")
        if not token.startswith("--") or not _KEY.fullmatch(name):
            raise ConfigError(f"not a config override: {token!r}", hint="overrides look like --section.key=value")
        if not sep:
            if i >= len(tokens) or tokens[i].startswith("--"):
                raise ConfigError(f"missing value for {token}", hint=f"use {token}=VALUE")
            text, i = tokens[i], i + 1
        out.append((name, text))
    return out


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a ``schema`` instance from its defaults, an optional YAML file and ``--a.b=value`` overrides.

    Args:
        schema: a dataclass whose fields may be nested dataclasses (sections).
        path: a YAML file whose top level is a mapping; unknown keys at any depth are errors.
        overrides: command-line tokens, ``--a.b=value`` or ``--a.b value``; values are read as YAML
            (``[1, 2]`` or ``1,2`` for lists, ``{k: v}`` for a section or dict, ``null`` for None).

    Returns:
        The checked config.

    Raises:
        ConfigError: an unknown key, a wrong type, an unreadable file or a failed ``__post_init__`` check.
    """
    state = _state(schema)
    if path is not None:
        _merge(schema, state, _read_yaml(Path(path)), "", str(path))
    for name, text in _split_overrides(overrides):
        source, cls, node, prefix = f"--{name}={text}", schema, state, ""
        *sections, leaf = name.split(".")
        for part in sections:
            _check_key(cls, part, prefix, source)
            sub = _section(_hints(cls)[part])
            if sub is None:
                raise ConfigError(f"'{prefix}{part}' is not a section", source, f"use --{prefix}{part}=VALUE")
            if not isinstance(node.get(part), dict):
                node[part] = _state(sub)
            cls, node, prefix = sub, node[part], f"{prefix}{part}."
        _merge(cls, node, {leaf: _Text(text)}, prefix, source)
    return _build(schema, state)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain YAML/JSON types (tuples become lists, paths strings)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in _fields(type(v))}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return str(v) if isinstance(v, Path) else v

    return plain(cfg)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write ``cfg`` as YAML atomically (temp file in the same folder, then rename); returns the path."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError("the output directory does not exist", path.parent)
    text = yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def config_from_dict(schema: type[T], raw: dict, source: str | None = None) -> T:
    """Build a ``schema`` instance from its defaults and a plain mapping (as read from JSON), checked like a YAML
    file: unknown keys and wrong types raise :class:`ConfigError` naming the key and ``source``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping, got {type(raw).__name__}", source)
    state = _state(schema)
    _merge(schema, state, raw, "", source)
    return _build(schema, state)


def known_fields(schema: type, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The items of ``raw`` that name a field of the dataclass ``schema``: a record written by another version of
    gen_sr read back, whose keys this version does not know (a newer one's, or fields dropped since) are left out."""
    names = {f.name for f in _fields(schema)}
    return {k: v for k, v in raw.items() if k in names}


def record_from_dict(schema: type[T], raw: Any) -> T:
    """A ``schema`` record (a dataclass) from a mapping that gen_sr wrote as JSON, by this version or another: unlike
    :func:`config_from_dict` (for what a user writes), a key that is no field is left out (:func:`known_fields`),
    a field it lacks takes its default, values are not checked, and a field typed as a dataclass (or ``None``) is
    read the same way from its mapping. ``raw`` a ``schema`` already: returned as it is.

    Raises:
        ValueError: ``raw``, or a nested record's value, is not a mapping, or lacks a field without a default
            (one line naming the field); never ``TypeError``, so that a reader catches one kind.
    """
    if isinstance(raw, schema):
        return raw
    if not isinstance(raw, Mapping):
        raise ValueError(f"{schema.__name__}: expected a mapping, got {type(raw).__name__}")
    values = known_fields(schema, raw)
    required = [f.name for f in _fields(schema)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing := [name for name in required if name not in values]:
        raise ValueError(f"{schema.__name__}: no {' and '.join(missing)}")
    for name, value in values.items():
        if value is not None and (sub := _section(_hints(schema)[name])) is not None:
            try:
                values[name] = record_from_dict(sub, value)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
    return schema(**values)


def _key_lines(cls: type, state: dict[str, Any], prefix: str = "") -> list[str]:
    lines = []
    for f in _fields(cls):
        key, tp, value = prefix + f.name, _hints(cls)[f.name], state.get(f.name, dataclasses.MISSING)
        if _section(tp) is not None and isinstance(value, dict):
            lines += _key_lines(_section(tp), value, key + ".")
        else:
            shown = "(required)" if value is dataclasses.MISSING else f"= {config_to_dict({'v': value})['v']!r}"
            lines.append(f"  --{key}: {_tname(tp)} {shown}")
    return lines


def parse_cli(
    schema: type[T], argv: Sequence[str] | None = None, *, description: str | None = None
) -> tuple[T, argparse.Namespace]:
    """Command-line front end for training scripts: ``--config``, ``--resume``, ``--debug`` and overrides.

    Args:
        schema: the config dataclass.
        argv: the arguments (default: ``sys.argv[1:]``).
        description: shown by ``--help``, which also lists every config key with its type and default.

    Returns:
        The config and the namespace (``config``, ``resume`` - None, ``"latest"`` or a path - ``debug`` and
        ``overrides``, the override tokens as given).

    Raises:
        ConfigError: see :func:`load_config`; also for any extra argument that is not ``--a.b[=value]``.
    """
    keys = "\n".join(_key_lines(schema, _state(schema)))
    parser = argparse.ArgumentParser(
        description=description, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"config keys (override with --key=value or --key value):\n{keys}",
    )
    parser.add_argument("--config", type=Path, metavar="PATH", help="YAML experiment config (overrides the defaults)")
    parser.add_argument("--resume", metavar="latest|PATH", help="resume from the run's latest checkpoint or a path")
    parser.add_argument("--debug", action="store_true", help="show a full traceback on errors")
    ns, rest = parser.parse_known_args(argv)
    ns.overrides = rest
    return load_config(schema, ns.config, rest), ns
