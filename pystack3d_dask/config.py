"""Typed, strict loading of PyStack3D parameter files.

Each step declares its parameters once, as a frozen dataclass whose field names
are the TOML keys (see ``pystack3d_dask.steps``).  :func:`build_params` is the
only place that turns a TOML table (or API keyword arguments) into such an
object: it rejects unknown keys (suggesting the closest valid one), coerces
and checks types from the annotations, and lets the dataclass's
``__post_init__`` check ranges.  A typo is an error, never a silent default.

The user's TOML is read, never rewritten: run state lives in the store.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pystack3d_dask.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Default parameter file name looked for when a folder is given.
PARAMS_FILENAME = "params.toml"


def suggest(key: str, allowed: typing.Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest allowed key, or ``""``."""
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def fail(section: str, key: str, value: Any, allowed: str) -> typing.NoReturn:
    """Raise a :class:`ConfigError` naming the section, key, value and what is allowed."""
    where = f"[{section}] {key}" if section else key
    raise ConfigError(f"{where} = {value!r} is invalid: {allowed}.")


def check(cond: bool, section: str, key: str, value: Any, allowed: str) -> None:
    """Raise :func:`fail` unless ``cond`` holds."""
    if not cond:
        fail(section, key, value, allowed)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    if tp is type(None):
        return "nothing (omit the key)"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a table"}.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(value: Any, tp: Any, *, section: str, key: str) -> Any:
    """Return ``value`` converted to the annotation ``tp``, or raise :class:`ConfigError`.

    Lists become tuples (parameters are frozen); an integer is accepted where a
    number is expected, a bool never is.
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return coerce(value, arg, section=section, key=key)
            except ConfigError:
                continue
        fail(section, key, value, f"expected {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            hint = suggest(str(value), [str(a) for a in allowed]) if isinstance(value, str) else ""
            fail(section, key, value, f"expected {_type_name(tp)}{hint}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            fail(section, key, value, f"expected {_type_name(tp)}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                fail(section, key, value, f"expected {_type_name(tp)}")
            return tuple(coerce(v, a, section=section, key=key) for v, a in zip(value, args))
        item = args[0] if args else Any
        return tuple(coerce(v, item, section=section, key=key) for v in value)
    if tp is type(None):
        if value is not None:
            fail(section, key, value, "expected nothing")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            fail(section, key, value, "expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(section, key, value, "expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(section, key, value, "expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail(section, key, value, "expected a string")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            fail(section, key, value, "expected a table")
        return dict(value)
    raise TypeError(f"unsupported annotation {tp!r} for {section}.{key}")  # programming error


P = typing.TypeVar("P")


def build_params(cls: type[P], table: Mapping[str, Any] | None, *, section: str) -> P:
    """Build the frozen parameter dataclass ``cls`` from a TOML table.

    Parameters
    ----------
    cls : dataclass type
        Field names are the accepted keys; fields without a default are required.
        ``cls.ALIASES`` (optional) maps older key names onto current ones.
    table : mapping or None
        The TOML table (or API keyword arguments).
    section : str
        Name used in error messages (the TOML table name).

    Raises
    ------
    ConfigError
        Unknown, missing, mistyped or out-of-range keys.
    """
    table = dict(table or {})
    aliases: dict[str, str] = getattr(cls, "ALIASES", {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for old, new in aliases.items():
        if old in table:
            if new in table:
                raise ConfigError(f"[{section}] gives both {old!r} and its newer name {new!r}: keep one.")
            table[new] = table.pop(old)
    unknown = [k for k in table if k not in fields]
    if unknown:
        k = unknown[0]
        raise ConfigError(
            f"[{section}] unknown key {k!r}{suggest(k, fields)}; "
            f"allowed keys: {', '.join(sorted(fields))}."
        )
    kwargs = {}
    for name, f in fields.items():
        if name in table:
            kwargs[name] = coerce(table[name], hints[name], section=section, key=name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"[{section}] the key {name!r} is required ({_type_name(hints[name])}).")
    return cls(**kwargs)


def params_hash(params: Any) -> str:
    """A short stable digest of a parameter object (to detect changed parameters)."""
    import hashlib
    import json

    blob = json.dumps(dataclasses.asdict(params), sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_toml(path: str | os.PathLike) -> tuple[Path, dict]:
    """Read a parameter file given as a file or as a folder holding one.

    Returns the resolved file path and the parsed table.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        candidate = path / PARAMS_FILENAME
        if not candidate.is_file():
            tomls = sorted(path.glob("*.toml"))
            if len(tomls) != 1:
                raise ConfigError(
                    f"{path} holds {len(tomls)} .toml files and no {PARAMS_FILENAME}: "
                    "give the parameter file's path."
                )
            candidate = tomls[0]
        path = candidate
    if not path.is_file():
        raise ConfigError(f"parameter file {path} does not exist.")
    try:
        with open(path, "rb") as fh:
            return path.resolve(), tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
