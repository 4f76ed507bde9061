"""Training data stream over real webdataset tars: one global order, deterministic, the same
records per step on any world size, resumable at any step on another world size, endless,
decoding .npy/.png/.cls, and bad input named or skipped."""
import json

import pytest
import torch

from neon_scale.data.shards import MANIFEST, shard_name, write_shard
from neon_scale.data.stream import MicroBatchLoader
from neon_scale.errors import NeonError


def make_set(d, counts, images=False):
    """Shard c holds x = 1000 c + i (i < counts[c]), so every value names its shard and record."""
    d.mkdir(parents=True, exist_ok=True)
    for c, n in enumerate(counts):
        sample = {"x": (1000 * c + torch.arange(n)).float().unsqueeze(1), "cls": torch.arange(n) % 10}
        if images:
            sample["image"] = torch.randint(0, 256, (n, 3, 5, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(c))
        write_shard(d / shard_name(c), sample, {"sampler": {}}, key_prefix=f"{c:06d}")
    manifest = {"shards": [{"name": shard_name(c), "count": n} for c, n in enumerate(counts)]}
    (d / MANIFEST).write_text(json.dumps(manifest))
    return d


def values(loader, k):
    return [loader.next()["x"].flatten().long().tolist() for _ in range(k)]


def saved(loader):
    return json.loads(json.dumps(loader.state(loader.bad)))  # as a checkpoint's JSON holds it


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_any_batch_equals_the_uninterrupted_stream(tmp_path, workers):
    d = make_set(tmp_path / "set", [7, 7, 7, 7, 3])
    reference = values(MicroBatchLoader(d, 4, 1, 0, 1, workers), 14)
    assert values(MicroBatchLoader(d, 4, 1, 0, 1, workers), 14) == reference  # deterministic
    for cut in (1, 5, 8):  # resume from the saved state after `cut` batches, in a new loader
        first = MicroBatchLoader(d, 4, 1, 0, 1, workers)
        head = values(first, cut)
        tail = values(MicroBatchLoader(d, 4, 1, 0, 1, workers, state=saved(first)), 14 - cut)
        assert head + tail == reference, cut
    assert values(MicroBatchLoader(d, 4, 2, 0, 1, workers), 14) != reference  # another seed, another order


def test_an_epoch_visits_every_record_once(tmp_path):
    d = make_set(tmp_path / "set", [7, 5, 7, 2])
    seen = sum(values(MicroBatchLoader(d, 3, 1, 0, 1, 0), 7), [])
    assert sorted(seen) == sorted(1000 * c + i for c, n in enumerate([7, 5, 7, 2]) for i in range(n))


def global_steps(d, global_batch, world, workers, steps, grad_accum=1, state=None):
    """The records each step reads, put together from every rank's micro-batches (key -> count
    per step), and the loaders' final states."""
    micro = global_batch // (world * grad_accum)
    loaders = [MicroBatchLoader(d, micro, 7, r, world, workers, state=state, grad_accum=grad_accum)
               for r in range(world)]
    out = []
    for _ in range(steps):
        step = []
        for _ in range(grad_accum):
            for loader in loaders:
                batch = loader.next()
                assert batch["x"].shape[0] == micro
                step += batch["x"].flatten().long().tolist()
        out.append(sorted(step))
    return out, loaders


@pytest.mark.parametrize("workers", [0, 2])
def test_every_world_size_reads_the_same_records_per_step(tmp_path, workers):
    """The global order does not depend on the split: 1, 2 or 4 ranks (with or without gradient
    accumulation and workers) read the same records in each step."""
    d = make_set(tmp_path / "set", [9, 4, 9, 6])  # 28 records, 12 per step: steps straddle shards and epochs
    one, _ = global_steps(d, 12, 1, 0, 7)
    assert global_steps(d, 12, 2, workers, 7)[0] == one
    assert global_steps(d, 12, 4, workers, 7, grad_accum=3)[0] == one


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 4)])
def test_resume_on_another_world_size_skips_and_repeats_nothing(tmp_path, before, after):
    """Stopped after 3 steps on `before` ranks, resumed on `after`: the steps go on exactly as
    uninterrupted, and within a pass every record is read once (counted by key)."""
    counts = [9, 4, 9, 6]
    d = make_set(tmp_path / "set", counts)
    reference, _ = global_steps(d, 4, 1, 0, 7)  # 28 records: one pass in 7 steps
    head, loaders = global_steps(d, 4, before, 0, 3)
    states = [saved(x) for x in loaders]
    assert len({json.dumps(s) for s in states}) == 1 and states[0]["records"] == 12  # global terms
    tail, _ = global_steps(d, 4, after, 2, 4, state=states[0])
    assert head + tail == reference
    seen = sum(head + tail, [])
    assert sorted(seen) == sorted(1000 * c + i for c, n in enumerate(counts) for i in range(n))


def test_the_stream_is_endless_whatever_the_rank_holds(tmp_path):
    d = make_set(tmp_path / "set", [9, 2, 9])
    for rank in range(2):
        batches = values(MicroBatchLoader(d, 4, 1, rank, 2, 0), 20)
        assert len(batches) == 20 and all(len(b) == 4 for b in batches)


def test_an_older_checkpoint_position_is_one_error(tmp_path):
    d = make_set(tmp_path / "set", [4])
    with pytest.raises(NeonError, match=r"older format .*remove the train folder's ckpt/"):
        MicroBatchLoader(d, 2, 1, 0, 1, 0, state={"turn": 0, "streams": [{"epoch": 0}]})


def test_png_and_cls_decode_back_to_what_was_written(tmp_path):
    d = make_set(tmp_path / "set", [6], images=True)
    batch = MicroBatchLoader(d, 6, 1, 0, 1, 0).next()
    expected = torch.randint(0, 256, (6, 3, 5, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    order = batch["x"].flatten().long()
    assert batch["image"].dtype == torch.uint8 and torch.equal(batch["image"], expected[order])
    assert batch["cls"].dtype == torch.long and torch.equal(batch["cls"], order % 10)


def _truncate(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2 + 7])


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shard_is_one_error_naming_it(tmp_path, workers):
    d = make_set(tmp_path / "set", [40, 40])
    _truncate(d / shard_name(1))
    loader = MicroBatchLoader(d, 8, 1, 0, 1, workers)
    with pytest.raises(NeonError) as err:
        values(loader, 20)
    msg = str(err.value)
    assert msg.startswith(f"{d / shard_name(1)}: corrupt or truncated shard") and "train.skip_bad=true" in msg
    assert "\n" not in msg and "Traceback" not in msg


@pytest.mark.slow  # about 10 s here
def test_skip_bad_counts_and_goes_on(tmp_path):
    d = make_set(tmp_path / "set", [40, 40])
    _truncate(d / shard_name(1))
    loader = MicroBatchLoader(d, 8, 1, 0, 1, 0, skip_bad=True)
    got = sum(values(loader, 10), [])
    from_bad = {v % 1000 for v in got if v // 1000 == 1}
    assert from_bad and len(from_bad) < 40 and loader.bad == 40 - len(from_bad)


def test_undecodable_record_is_named_or_skipped(tmp_path):
    d = make_set(tmp_path / "set", [10])
    write_shard(d / shard_name(0), {"x": torch.zeros(10, 1), "cls": torch.zeros(10, dtype=torch.long)}, {}, "000000")
    raw = bytearray((d / shard_name(0)).read_bytes())
    at = raw.index(b"\x93NUMPY", raw.index(b"000000-000003.npy"))
    raw[at:at + 6] = b"XXXXXX"  # record 3's .npy payload no longer parses
    (d / shard_name(0)).write_bytes(bytes(raw))
    with pytest.raises(NeonError, match=r"shard-000000.tar: bad record '000000-000003'"):
        MicroBatchLoader(d, 3, 1, 0, 1, 0).next()
    loader = MicroBatchLoader(d, 3, 1, 0, 1, 0, skip_bad=True)
    values(loader, 3)
    assert loader.bad == 1
