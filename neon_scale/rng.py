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


class StepNoise:
    """The random numbers of one optimizer step, drawn so that they follow the samples, not the
    split: each draw makes the whole step's block ([global_batch, ...] from the stream (keys,
    draw number)) and keeps the rows of this micro-batch, [offset, offset + rows). A sample gets
    the same noise whether 1 rank or 8 (or a resumed run on another count) compute its loss;
    the cost is global_batch / micro_batch times the numbers one micro-batch needs."""

    def __init__(self, keys: tuple, global_batch: int, offset: int):
        self.keys, self.global_batch, self.offset, self.draws = keys, global_batch, offset, 0
        self.device = torch.device("cpu")  # like a CPU torch.Generator: callers move the result

    def _block(self, draw, shape) -> torch.Tensor:
        rows = shape[0]
        if self.offset + rows > self.global_batch:
            raise ValueError(f"StepNoise: rows [{self.offset}, {self.offset + rows}) outside the step's "
                             f"{self.global_batch} samples")
        gen = generator(*self.keys, self.draws)
        self.draws += 1
        return draw((self.global_batch, *shape[1:]), gen)[self.offset:self.offset + rows]


def randn(gen, shape, dtype=None) -> torch.Tensor:
    """Standard normals of `shape` from a torch.Generator (on its device) or a StepNoise (rows =
    samples)."""
    shape = tuple(shape)
    if isinstance(gen, StepNoise):
        return gen._block(lambda s, g: torch.randn(s, generator=g, dtype=dtype), shape)
    return torch.randn(shape, generator=gen, device=gen.device, dtype=dtype)


def rand(gen, shape, dtype=None) -> torch.Tensor:
    shape = tuple(shape)
    if isinstance(gen, StepNoise):
        return gen._block(lambda s, g: torch.rand(s, generator=g, dtype=dtype), shape)
    return torch.rand(shape, generator=gen, device=gen.device, dtype=dtype)


def randint(gen, high: int, shape) -> torch.Tensor:
    shape = tuple(shape)
    if isinstance(gen, StepNoise):
        return gen._block(lambda s, g: torch.randint(0, high, s, generator=g), shape)
    return torch.randint(0, high, shape, generator=gen, device=gen.device)
