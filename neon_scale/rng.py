"""Deterministic random streams keyed by tuples, so work split over any number of ranks (or
resumed after a kill) draws exactly the same numbers."""
from __future__ import annotations

import hashlib

import torch


def seed_of(*keys) -> int:
    digest = hashlib.sha256(repr(tuple(keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*keys) -> torch.Generator:
    return torch.Generator().manual_seed(seed_of(*keys))
