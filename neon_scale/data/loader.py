"""Deterministic micro-batches over a rank's part of a synthetic set.

Each rank reads the shards with index = rank (mod world). The sample stream is a sequence of
epochs, each a permutation drawn from (seed, rank, epoch); micro-batch k of the run is the slice
[k * b, (k + 1) * b) of that stream, so resuming at any step needs no replay.
"""
from __future__ import annotations

import pathlib

import torch

from .. import rng
from ..errors import NeonError
from ..io import read_json
from .shards import MANIFEST, read_shards


def rank_shards(set_dir: pathlib.Path, rank: int, world: int) -> tuple[list[pathlib.Path], list[int]]:
    manifest = read_json(set_dir / MANIFEST)
    mine = [s for i, s in enumerate(manifest["shards"]) if i % world == rank]
    if not mine:
        raise NeonError(f"{set_dir}: {len(manifest['shards'])} shard(s) cannot feed rank {rank} of {world}; "
                        f"lower synth.shard_size to get at least {world} shards")
    return [set_dir / s["name"] for s in mine], [s["count"] for s in mine]


class MicroBatches:
    def __init__(self, data: dict[str, torch.Tensor], micro_batch: int, seed: int, rank: int):
        self.data = data
        self.n = len(next(iter(data.values())))
        self.micro_batch = micro_batch
        self.seed, self.rank = seed, rank
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) >= 2:
                self._perm_cache.clear()
            self._perm_cache[epoch] = torch.randperm(self.n, generator=rng.generator(self.seed, self.rank, epoch))
        return self._perm_cache[epoch]

    def get(self, index: int) -> dict[str, torch.Tensor]:
        """Micro-batch number `index` of the run (counting from 0 across steps)."""
        start, remaining, parts = index * self.micro_batch, self.micro_batch, []
        while remaining:
            epoch, offset = divmod(start, self.n)
            take = min(remaining, self.n - offset)
            parts.append(self._perm(epoch)[offset:offset + take])
            start, remaining = start + take, remaining - take
        sel = torch.cat(parts)
        return {k: v[sel] for k, v in self.data.items()}


def load_rank_batches(set_dir: pathlib.Path, micro_batch: int, seed: int, rank: int, world: int) -> MicroBatches:
    paths, counts = rank_shards(set_dir, rank, world)
    return MicroBatches(read_shards(paths, counts), micro_batch, seed, rank)
