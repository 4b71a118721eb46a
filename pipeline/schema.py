"""A small typed schema for params sections: dataclasses whose fields carry checks.

``parse(cls, data, "pretrain")`` builds a frozen dataclass from a params dict and reports the first
problem with its full key path: an unknown key (typos never fall back to defaults), a missing key, a wrong
type or a value out of range. Ints are accepted where floats are expected; nothing else is coerced.

The schema holds types and checks, never values: params/ (composed into params.yaml) is the one source of
every value, so the two cannot disagree. ``spec_of`` builds the library's spec dataclasses from a section's
fields, so a spec field that no param sets is an error, not its library default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args, get_origin

from ijepa.errors import UserError


class ParamError(UserError, ValueError):
    """A params problem; the message starts with the offending key."""


def checked(check: Callable[[Any], bool], why: str) -> Any:
    """A dataclass field (no default) with a value check; ``why`` completes "must ..." in the error message."""
    return dataclasses.field(metadata={"check": check, "why": why})


def spec_of(section: Any, spec_cls: type, *, library_defaults: tuple[str, ...] = (), **given: Any) -> Any:
    """``spec_cls`` (a library spec dataclass) from ``given`` and the same-named fields of the parsed ``section``.

    Every field of ``spec_cls`` must come from one of them or be named in ``library_defaults`` (a field the
    params deliberately leave at the library's value); a new spec field that no param sets raises here instead
    of silently taking its default."""
    names = {f.name for f in dataclasses.fields(section)}
    values, missing = {}, []
    for f in dataclasses.fields(spec_cls):
        if f.name in given:
            values[f.name] = given[f.name]
        elif f.name in names:
            values[f.name] = getattr(section, f.name)
        elif f.name not in library_defaults:
            missing.append(f.name)
    if missing:
        raise TypeError(f"{spec_cls.__name__}: no param sets {', '.join(missing)} (add it to {type(section).__name__})")
    return spec_cls(**values)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ParamError as e:
                errors.append(str(e))
        raise ParamError(errors[0] if len(errors) == 1 else f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ParamError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, list | tuple):
            raise ParamError(f"{key}: expected a list, got {value!r}")
        return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ParamError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, key)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):  # YAML's .inf/.nan pass every range check that compares with them
            raise ParamError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ParamError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"schema type {tp} of {key} is not supported")


def parse(cls: type, data: Any, prefix: str) -> Any:
    """Build ``cls`` from ``data``, checking keys, types and ranges (errors name ``prefix.key``)."""
    if not isinstance(data, Mapping):
        raise ParamError(f"{prefix}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamError(f"{prefix}.{unknown[0]}: unknown key (valid keys: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}"
        if name not in data:  # params.yaml is composed in full: a missing key is a broken file, never a default
            raise ParamError(f"{key}: missing (every key must be set; see params/ for the defaults)")
        value = _convert(data[name], hints[name], key)
        check = f.metadata.get("check")
        if check is not None and value is not None and not check(value):
            raise ParamError(f"{key}: must {f.metadata.get('why') or 'pass its check'}, got {value!r}")
        values[name] = value
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        for name, message in validate():
            raise ParamError(f"{prefix}.{name}: {message}")
    return obj


def positive(x) -> bool:
    return x > 0


def non_negative(x) -> bool:
    return x >= 0


def fraction_range(x) -> bool:
    return 0 < x[0] <= x[1] <= 1


def ordered_positive(x) -> bool:
    return 0 < x[0] <= x[1]
