"""Synthetic sets as real webdataset tars: round trip, corrupt shards, deterministic batches."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch

from neon_scale.data.loader import MicroBatches
from neon_scale.data.shards import read_shards, write_shard
from neon_scale.errors import NeonError


def _shard(tmp_path, n=50, name="shard-000000.tar"):
    x = torch.randn(n, 2)
    path = tmp_path / name
    write_shard(path, {"x": x, "cls": torch.arange(n)}, {"sampler": {"zeta": 1.1}}, key_prefix="000000")
    return path, x


def test_round_trip_and_record_layout(tmp_path):
    path, x = _shard(tmp_path)
    with tarfile.open(path) as tar:
        names = tar.getnames()
        settings = json.loads(tar.extractfile("000000-000007.json").read())
        sample = np.load(io.BytesIO(tar.extractfile("000000-000007.npy").read()))
    assert set(names[:3]) == {"000000-000000.npy", "000000-000000.json", "000000-000000.cls"}
    assert len(names) == 150 and settings == {"sampler": {"zeta": 1.1}}
    assert np.array_equal(sample, x[7].numpy())
    data = read_shards([path], [50])
    assert torch.equal(data["x"], x) and torch.equal(data["cls"], torch.arange(50))
    assert not list(tmp_path.glob("*.tmp"))


def test_truncated_shard_names_the_file(tmp_path):
    path, _ = _shard(tmp_path, n=200)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2 + 7])
    with pytest.raises(NeonError, match=rf"{path}: corrupt or truncated shard"):
        read_shards([path], [200])


def test_shard_cut_at_a_record_boundary_is_caught_by_the_count(tmp_path):
    path, _ = _shard(tmp_path, n=20)
    with pytest.raises(NeonError, match=r"holds 20 samples, the manifest says 30"):
        read_shards([path], [30])


def test_micro_batches_are_deterministic_epochs():
    data = {"x": torch.arange(10).float().unsqueeze(1)}
    a, b = MicroBatches(data, 4, seed=3, rank=0), MicroBatches(data, 4, seed=3, rank=0)
    seq = [a.get(i)["x"].flatten() for i in range(5)]
    assert all(torch.equal(s, b.get(i)["x"].flatten()) for i, s in reversed(list(enumerate(seq))))
    first_epoch = torch.cat(seq)[:10]
    assert sorted(first_epoch.tolist()) == list(range(10))  # each sample once per epoch
    other_rank = MicroBatches(data, 4, seed=3, rank=1)
    assert not torch.equal(other_rank.get(0)["x"], seq[0].unsqueeze(1))
