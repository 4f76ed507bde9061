"""Typed settings: dataclass fields with ranges and choices, and the one checked constructor.

`setting(default, min=, max=, choices=, help=)` declares a field; `from_dict(cls, raw, where)`
builds the dataclass from plain YAML data, every error one line naming the file, key and value.
The run config and every model spec's Args/Sampler dataclasses use these two; this module imports
nothing from the package so that both can.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import field

from .errors import NeonError


def setting(default, *, min=None, max=None, choices=None, help=""):
    meta = {"min": min, "max": max, "choices": choices, "help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return field(default=default, metadata=meta)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(value, tp, key: str, where: str):
    """Return `value` converted to `tp`, or raise one line naming key and value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_value(value, args[0], key, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise NeonError(f"{where}: '{key}' must be a mapping, got {value!r}")
        return from_dict(tp, value, where, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, list):
            return value
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    raise NeonError(f"{where}: '{key}' must be {_type_name(tp)}, got {value!r}")


def _check_range(value, meta, key: str, where: str):
    if value is None:
        return
    if meta.get("choices") and value not in meta["choices"]:
        raise NeonError(f"{where}: '{key}' = {value!r} is not one of {meta['choices']}")
    if meta.get("min") is not None and value < meta["min"]:
        raise NeonError(f"{where}: '{key}' = {value!r} is below the minimum {meta['min']}")
    if meta.get("max") is not None and value > meta["max"]:
        raise NeonError(f"{where}: '{key}' = {value!r} is above the maximum {meta['max']}")


def unknown_key_error(key: str, valid: list[str], where: str, prefix: str) -> NeonError:
    full = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
    return NeonError(f"{where}: unknown key '{full}'{hint}")


def from_dict(cls, data: dict, where: str, prefix: str = ""):
    """Build dataclass `cls` from a plain dict, validating keys, types and ranges."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise unknown_key_error(str(key), list(fields), where, prefix)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        value = _check_value(value, hints[name], key, where)
        if isinstance(value, float) and not math.isfinite(value):
            raise NeonError(f"{where}: '{key}' = {value!r} is not a finite number")
        _check_range(value, fields[name].metadata, key, where)
        kwargs[name] = value
    return cls(**kwargs)
