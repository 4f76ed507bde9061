"""Streaming a synthetic set for training: resampled webdataset shards, split by rank and by
DataLoader worker, deterministic, resumable at any micro-batch.

Every (rank, worker) reads an endless stream, so every rank runs the same number of steps and no
rank waits at the end of an epoch. The stream of worker w on rank r is a sequence of epochs:
epoch e visits the worker's shards in the order perm(seed, r, w, e), and each shard's records in
the order perm(seed, r, w, e, shard) (the shard's records shuffled in memory). A shard is split to the worker `i % (world * workers)` when
there are enough shards, else to the rank `i % world`, else shared by everyone (the streams still
differ: their seeds do).

A micro-batch is `micro_batch` consecutive records of one worker's stream; the DataLoader hands
them out round-robin over the workers. Each batch carries `__pos__`, where its worker's stream
stands after it (epoch, shard, record, bad), so a saved list of positions restarts every worker
exactly where it stopped without replaying anything.

Bad input: a shard that cannot be read, a record that does not decode or does not match the set's
schema (fields, dtypes, shapes: every batch then concatenates), or fewer records than the manifest
lists is an error naming the shard; with `skip_bad` the bad records are skipped and counted
instead (`__pos__["bad"]`: records the worker skipped so far, a bad record once per visit).
"""
from __future__ import annotations

import pathlib
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .. import rng
from ..errors import NeonError
from ..io import read_json
from .shards import MANIFEST, manifest_schema, read_shard


@dataclass
class StreamPos:
    """Where one worker's stream stands: `record` records of the `shard`-th shard of `epoch` are
    consumed (record 0: that shard is not opened yet); `bad` counts skipped records so far."""
    epoch: int = 0
    shard: int = 0
    record: int = 0
    bad: int = 0


def worker_shards(n_shards: int, rank: int, world: int, worker: int, workers: int) -> list[int]:
    units = world * workers
    if n_shards >= units:
        return list(range(rank * workers + worker, n_shards, units))
    if n_shards >= world:
        return list(range(rank, n_shards, world))
    return list(range(n_shards))


SKIP_HINT = "; set train.skip_bad=true to skip and count bad records"


class ShardStream(IterableDataset):
    def __init__(self, set_dir: pathlib.Path, micro_batch: int, seed: int, rank: int, world: int, workers: int,
                 skip_bad: bool = False, start: list[dict] | None = None, cache_bytes: int = 1 << 30):
        manifest = read_json(set_dir / MANIFEST)
        self.shards = [(set_dir / s["name"], int(s["count"])) for s in manifest["shards"]]
        self.schema = manifest_schema(set_dir, manifest)  # one for the whole set, read once here
        self.micro_batch, self.seed, self.rank, self.world = micro_batch, seed, rank, world
        self.workers, self.skip_bad, self.cache_bytes = max(workers, 1), skip_bad, cache_bytes
        self.start = [StreamPos(**p) for p in start] if start else [StreamPos() for _ in range(self.workers)]
        self._cache: dict[int, tuple[tuple[dict[str, np.ndarray], int, int], int]] = {}  # -> (shard, bytes)
        if len(self.start) != self.workers:
            raise NeonError(f"{set_dir}: the checkpoint holds {len(self.start)} loader positions, "
                            f"train.workers gives {self.workers}")

    def _order(self, mine: list[int], worker: int, epoch: int) -> list[int]:
        perm = torch.randperm(len(mine), generator=rng.generator(self.seed, "shards", self.rank, worker, epoch))
        return [mine[i] for i in perm.tolist()]

    def _read(self, index: int) -> tuple[dict[str, np.ndarray], int, int]:
        """A shard's decoded columns; shards stay decoded up to `cache_bytes` per worker (small sets
        are then decoded once), the oldest dropped first."""
        if index not in self._cache:
            entry = read_shard(*self.shards[index], skip_bad=self.skip_bad, hint=SKIP_HINT, schema=self.schema)
            size = sum(a.nbytes for a in entry[0].values())
            while self._cache and sum(held for _, held in self._cache.values()) + size > self.cache_bytes:
                self._cache.pop(next(iter(self._cache)))
            self._cache[index] = (entry, size)
        return self._cache[index][0]

    def batches(self, worker: int):
        """(micro-batch as {field: array}, position after it) forever, for one worker."""
        mine = worker_shards(len(self.shards), self.rank, self.world, worker, self.workers)
        pos = StreamPos(**asdict(self.start[worker]))
        parts, need, empty_epochs = [], self.micro_batch, 0
        while True:
            order = self._order(mine, worker, pos.epoch)
            got_any = False
            while pos.shard < len(order):
                index = order[pos.shard]
                columns, count, bad = self._read(index)
                if pos.record == 0:
                    pos.bad += bad  # counted when the visit starts (not again on resuming inside it)
                gen = rng.generator(self.seed, "records", self.rank, worker, pos.epoch, index)
                perm = torch.randperm(count, generator=gen).numpy()
                while True:
                    take = max(min(need, count - pos.record), 0)
                    if take:
                        parts.append({k: v[perm[pos.record:pos.record + take]] for k, v in columns.items()})
                        pos.record, need, got_any = pos.record + take, need - take, True
                    finished = pos.record >= count
                    if finished:
                        pos.shard, pos.record = pos.shard + 1, 0
                    if need == 0:
                        yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, asdict(pos)
                        parts, need = [], self.micro_batch
                    if finished:
                        break
            pos.epoch, pos.shard, pos.record = pos.epoch + 1, 0, 0
            empty_epochs = 0 if got_any else empty_epochs + 1
            if empty_epochs >= 2:
                names = ", ".join(self.shards[i][0].name for i in mine)
                raise NeonError(f"{self.shards[0][0].parent}: no readable record in shard(s) {names}")

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        try:
            for batch, pos in self.batches(worker):
                out = {k: torch.from_numpy(v) for k, v in batch.items()}
                out["__pos__"], out["__worker__"] = pos, worker
                yield out
        except NeonError as e:  # an exception raised in a worker reaches the trainer as a traceback
            yield {"__error__": str(e)}


class MicroBatchLoader:
    """Micro-batches in a fixed order, round-robin over the workers, and the state to save with a
    checkpoint: every worker's stream position and whose turn is next. `workers = 0` reads in the
    training process (one stream)."""

    def __init__(self, set_dir: pathlib.Path, micro_batch: int, seed: int, rank: int, world: int, workers: int,
                 skip_bad: bool = False, state: dict | None = None):
        state = state or {}
        self.dataset = ShardStream(set_dir, micro_batch, seed, rank, world, workers, skip_bad, state.get("streams"))
        self.positions = [asdict(p) for p in self.dataset.start]
        self.turn = int(state.get("turn", 0))
        self._waiting: dict[int, dict] = {}  # batches that came before their turn (after a resume)
        self._loader = DataLoader(self.dataset, batch_size=None, num_workers=workers,
                                  prefetch_factor=4 if workers else None)
        self._it = iter(self._loader)

    def next(self) -> dict[str, torch.Tensor]:
        # The DataLoader always starts with worker 0; a resumed run may be at another's turn.
        while self.turn not in self._waiting:
            batch = next(self._it)
            if "__error__" in batch:
                raise NeonError(batch["__error__"])
            self._waiting[batch.pop("__worker__")] = batch
        batch = self._waiting.pop(self.turn)
        self.positions[self.turn] = batch.pop("__pos__")
        self.turn = (self.turn + 1) % self.dataset.workers
        return batch

    @property
    def bad(self) -> int:
        return sum(p["bad"] for p in self.positions)

    def state(self) -> dict:
        return {"turn": self.turn, "streams": [dict(p) for p in self.positions]}
