"""Synthetic sets as real webdataset tars: round trip and corrupt shards (whole-shard reads)."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch

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
