"""Streaming a shard set for training: one global order of records, split over any number of ranks
and DataLoader workers, deterministic, resumable at any step on any world size.

The order. Epoch e visits the set's shards in the order perm(seed, "shards", e) and each shard's
records in the order perm(seed, "records", e, shard); epochs follow each other without end. A
record's place in this sequence is its global position p (epoch p // N, N records in the set).

The split. Optimizer step s consumes positions [s G, (s + 1) G) (G = train.global_batch). Its
micro-batch k (of grad_accum A) on rank r holds the m = G / (A world) positions starting at
s G + k G/A + r m: the step reads the same G records whatever the number of ranks, and the
trainer's noise follows the record's offset in the step (rng.StepNoise), so a step's gradient is
the same sum whoever computes it. Micro-batch t = s A + k of a rank goes to worker t mod workers.

Resuming. The state is the number of micro-batches consumed, t = s A, which does not depend on
the world size or the workers: a checkpoint written by N ranks continues on M with no record
skipped or repeated within the pass. Each rank decodes the shards its positions fall in (whole
shards, cached up to `cache_bytes` per worker); a synthetic set (1k-50k records) is then read
about once per rank per pass.

Bad input: a shard that cannot be read, a record that does not decode or does not match the set's
schema (fields, dtypes, shapes: every batch then concatenates), or fewer records than the manifest
lists is an error naming the shard. With `skip_bad`, a shard keeps its place in the order and the
places of its bad records are taken by its good ones again (record j -> good record j mod good);
each such place is counted in `bad`. A shard with no good record lends the places to the next
shard of the epoch that has one.
"""
from __future__ import annotations

import bisect
import gc
import pathlib

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .. import rng, stop
from ..errors import NeonError
from ..io import read_json
from .shards import MANIFEST, manifest_schema, read_shard

SKIP_HINT = "; set train.skip_bad=true to skip and count bad records"


class GlobalOrder:
    """Global position -> (epoch, shard, record index in the shard), for a set of shard sizes."""

    def __init__(self, counts: list[int], seed: int):
        self.counts, self.seed, self.total = counts, seed, sum(counts)
        self._epochs: dict[int, tuple[list[int], list[int]]] = {}
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def shards_of_epoch(self, epoch: int) -> tuple[list[int], list[int]]:
        """(shard order, first position of each in the epoch)."""
        if epoch not in self._epochs:
            order = torch.randperm(len(self.counts), generator=rng.generator(self.seed, "shards", epoch)).tolist()
            starts = np.cumsum([0] + [self.counts[i] for i in order[:-1]]).tolist()
            self._epochs = {epoch: (order, starts)}  # positions move forward: keep one epoch
        return self._epochs[epoch]

    def record_order(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        if key not in self._perms:
            if len(self._perms) > 64:
                self._perms.clear()
            gen = rng.generator(self.seed, "records", epoch, shard)
            self._perms[key] = torch.randperm(self.counts[shard], generator=gen).numpy()
        return self._perms[key]

    def locate(self, position: int) -> tuple[int, int, int]:
        epoch, q = divmod(position, self.total)
        order, starts = self.shards_of_epoch(epoch)
        i = bisect.bisect_right(starts, q) - 1  # empty shards share a start with the next: the last wins
        shard = order[i]
        return epoch, shard, int(self.record_order(epoch, shard)[q - starts[i]])


class Split:
    """Which global positions micro-batch t of a rank holds (see the module docstring)."""

    def __init__(self, global_batch: int, grad_accum: int, rank: int, world: int):
        # global_batch = micro x grad_accum x world by construction (MicroBatchLoader)
        self.global_batch, self.grad_accum, self.rank = global_batch, grad_accum, rank
        self.micro = global_batch // (grad_accum * world)

    def offset(self, t: int) -> int:
        """Where micro-batch t starts within its step."""
        return (t % self.grad_accum) * (self.global_batch // self.grad_accum) + self.rank * self.micro

    def positions(self, t: int) -> range:
        start = (t // self.grad_accum) * self.global_batch + self.offset(t)
        return range(start, start + self.micro)


class ShardStream(IterableDataset):
    def __init__(self, set_dir: pathlib.Path, split: Split, seed: int, workers: int, skip_bad: bool = False,
                 start: int = 0, cache_bytes: int = 1 << 30):
        manifest = read_json(set_dir / MANIFEST)
        self.set_dir = set_dir
        self.shards = [(set_dir / s["name"], int(s["count"])) for s in manifest["shards"]]
        self.schema = manifest_schema(set_dir, manifest)  # one for the whole set, read once here
        if not sum(count for _, count in self.shards):
            raise NeonError(f"{set_dir / MANIFEST}: the set holds no record")
        self.order = GlobalOrder([count for _, count in self.shards], seed)
        self.split, self.workers, self.skip_bad, self.start = split, max(workers, 1), skip_bad, start
        self.cache_bytes = cache_bytes
        self._cache: dict[int, tuple[tuple[dict[str, np.ndarray], int, int], int]] = {}  # -> (shard, bytes)

    def _read(self, index: int) -> tuple[dict[str, np.ndarray], int, int]:
        """A shard's decoded columns (good records only); shards stay decoded up to `cache_bytes` per
        worker (small sets are then decoded once), the oldest dropped first."""
        if index not in self._cache:
            entry = read_shard(*self.shards[index], skip_bad=self.skip_bad, hint=SKIP_HINT, schema=self.schema)
            size = sum(a.nbytes for a in entry[0].values())
            while self._cache and sum(held for _, held in self._cache.values()) + size > self.cache_bytes:
                self._cache.pop(next(iter(self._cache)))
            self._cache[index] = (entry, size)
        return self._cache[index][0]

    def _good_record(self, epoch: int, shard: int, record: int) -> tuple[int, int, bool]:
        """(shard, row of its good records, True when a bad record's place is filled)."""
        columns, good, _bad = self._read(shard)
        if good == self.shards[shard][1]:
            return shard, record, False
        if good:
            return shard, record % good, record >= good
        order, _ = self.order.shards_of_epoch(epoch)
        at = order.index(shard)
        for lender in order[at + 1:] + order[:at]:  # a shard with no good record: the next one lends
            lent = self._read(lender)[1]
            if lent:
                return lender, record % lent, True
        raise NeonError(f"{self.set_dir}: no readable record in any shard")

    def micro_batch(self, t: int) -> tuple[dict[str, np.ndarray], int]:
        """Micro-batch t of this rank as {field: array}, and how many bad-record places it filled."""
        rows: list[tuple[int, int]] = []
        filled = 0
        for p in self.split.positions(t):
            shard, row, bad = self._good_record(*self.order.locate(p))
            rows.append((shard, row))
            filled += bad
        parts, i = [], 0
        while i < len(rows):  # consecutive positions mostly share a shard: gather them in one take
            j = i
            while j < len(rows) and rows[j][0] == rows[i][0]:
                j += 1
            columns = self._read(rows[i][0])[0]
            take = np.array([r for _, r in rows[i:j]])
            parts.append({k: v[take] for k, v in columns.items()})
            i = j
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, filled

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        t = self.start + worker
        try:
            while True:
                batch, filled = self.micro_batch(t)
                out = {k: torch.from_numpy(v) for k, v in batch.items()}
                out["__offset__"], out["__bad__"] = self.split.offset(t), filled
                yield out
                t += self.workers
        except NeonError as e:  # an exception raised in a worker reaches the trainer as a traceback
            yield {"__error__": str(e)}


def _forked_iter(loader: DataLoader):
    """The loader's iterator (its workers fork here) with the parent's objects frozen out of the
    collector: a forked worker then never finalizes garbage it inherited in the middle of its own
    work. Measured: under Python 3.11 such a finalizer, run inside numpy's .npy header parse
    (ast.literal_eval), broke the parse ("AST constructor recursion depth mismatch") after some
    test sequences. Also the pattern Python's gc docs give for fork: no copy-on-write by the
    child's collections."""
    gc.freeze()
    try:
        return iter(loader)
    finally:
        gc.unfreeze()


class MicroBatchLoader:
    """This rank's micro-batches in order (round-robin over the workers, as the DataLoader hands
    them out), each with "__offset__" (where it starts within its step), and the state to save
    with a checkpoint. `workers = 0` reads in the training process."""

    def __init__(self, set_dir: pathlib.Path, micro_batch: int, seed: int, rank: int, world: int, workers: int = 0,
                 skip_bad: bool = False, state: dict | None = None, grad_accum: int = 1):
        state = state or {}
        if state and "micro_batches" not in state:
            raise NeonError(f"{set_dir}: the checkpoint's data-stream position is in an older format (per-worker "
                            f"streams); remove the train folder's ckpt/ to restart this fine-tune")
        self.split = Split(micro_batch * world * grad_accum, grad_accum, rank, world)
        self.consumed = int(state.get("micro_batches", 0))
        # bad-record places served before the checkpoint, a global total: counted once, on rank 0
        self._bad_before = int(state.get("bad", 0)) if rank == 0 else 0
        self._bad_here = 0
        self.dataset = ShardStream(set_dir, self.split, seed, workers, skip_bad, start=self.consumed)
        self._loader = DataLoader(self.dataset, batch_size=None, num_workers=workers,
                                  prefetch_factor=4 if workers else None,
                                  worker_init_fn=stop.ignore_in_worker if workers else None)
        self._it = _forked_iter(self._loader) if workers else iter(self._loader)

    def next(self) -> dict[str, torch.Tensor]:
        batch = next(self._it)
        if "__error__" in batch:
            raise NeonError(batch["__error__"])
        self._bad_here += int(batch.pop("__bad__"))
        self.consumed += 1
        return batch

    @property
    def bad(self) -> int:
        """Bad-record places this rank filled (plus, on rank 0, the total before the checkpoint)."""
        return self._bad_before + self._bad_here

    def state(self, bad_total: int) -> dict:
        """The stream position in global terms (with the all-reduced bad count): any world resumes it."""
        return {"micro_batches": self.consumed, "records": self.consumed * self.split.global_batch
                // self.split.grad_accum, "bad": bad_total}
