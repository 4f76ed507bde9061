"""Training data stream over real webdataset tars: deterministic, resumable at any micro-batch,
split by rank and worker, endless, decoding .npy/.png/.cls, and bad input named or skipped."""
import json

import pytest
import torch

from neon_scale.data.shards import MANIFEST, shard_name, write_shard
from neon_scale.data.stream import MicroBatchLoader, worker_shards
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


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_any_batch_equals_the_uninterrupted_stream(tmp_path, workers):
    d = make_set(tmp_path / "set", [7, 7, 7, 7, 3])
    reference = values(MicroBatchLoader(d, 4, 1, 0, 1, workers), 14)
    assert values(MicroBatchLoader(d, 4, 1, 0, 1, workers), 14) == reference  # deterministic
    for cut in (1, 5, 8):  # resume from the saved state after `cut` batches, in a new loader
        first = MicroBatchLoader(d, 4, 1, 0, 1, workers)
        head = values(first, cut)
        tail = values(MicroBatchLoader(d, 4, 1, 0, 1, workers, state=json.loads(json.dumps(first.state()))), 14 - cut)
        assert head + tail == reference, cut
    assert values(MicroBatchLoader(d, 4, 2, 0, 1, workers), 14) != reference  # another seed, another order


def test_an_epoch_visits_every_record_once(tmp_path):
    d = make_set(tmp_path / "set", [7, 5, 7, 2])
    seen = sum(values(MicroBatchLoader(d, 3, 1, 0, 1, 0), 7), [])
    assert sorted(seen) == sorted(1000 * c + i for c, n in enumerate([7, 5, 7, 2]) for i in range(n))


def test_shards_split_by_rank_and_worker(tmp_path):
    assert worker_shards(8, 1, 2, 0, 2) == [2, 6]                    # enough shards: one set per (rank, worker)
    assert worker_shards(3, 1, 2, 0, 2) == worker_shards(3, 1, 2, 1, 2) == [1]  # else per rank
    assert worker_shards(1, 1, 2, 1, 2) == [0]                       # else shared (seeds still differ)
    d = make_set(tmp_path / "set", [4] * 8)
    owners = {}
    for rank in range(2):
        for batch in values(MicroBatchLoader(d, 2, 1, rank, 2, 2), 8):
            for v in batch:
                owners.setdefault(v // 1000, set()).add(rank)
    assert sorted(owners) == list(range(8)) and all(len(r) == 1 for r in owners.values())
    assert {c for c, r in owners.items() if r == {0}} == {0, 1, 4, 5}


def test_the_stream_is_endless_whatever_the_rank_holds(tmp_path):
    d = make_set(tmp_path / "set", [9, 2, 9])  # rank 0 holds 18 records, rank 1 holds 2
    for rank in range(2):
        batches = values(MicroBatchLoader(d, 4, 1, rank, 2, 0), 20)
        assert len(batches) == 20 and all(len(b) == 4 for b in batches)


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
