"""The model registry: an explicit list of the built-in specs, looked up by `model.name`."""
from __future__ import annotations

import difflib

from ..errors import NeonError
from .base import ModelSpec
from .dit import DiTSpec
from .toy import ToyAR, ToyDiffusion
from .xar import XARSpec

BUILTIN: tuple[type[ModelSpec], ...] = (ToyDiffusion, ToyAR, DiTSpec, XARSpec)
_SPECS: dict[str, ModelSpec] = {cls.name: cls() for cls in BUILTIN}


def get_spec(name: str, where: str = "<config>") -> ModelSpec:
    if name not in _SPECS:
        close = difflib.get_close_matches(name, list(_SPECS), n=1, cutoff=0.0)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise NeonError(f"{where}: unknown model 'model.name' = {name!r}{hint}; known: {sorted(_SPECS)}")
    return _SPECS[name]


def names() -> list[str]:
    return sorted(_SPECS)
