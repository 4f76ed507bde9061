"""Records of the wrong shape, dtype or kind in real webdataset tars: one error naming the shard, the
record and the field, or with skip_bad skipped and counted; never a numpy error, never a silent cast."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from neon_scale.data.shards import MANIFEST, read_shard, read_shards, shard_name, write_manifest, write_shard
from neon_scale.data.stream import SKIP_HINT, MicroBatchLoader
from neon_scale.errors import NeonError

from .conftest import TOY, assert_one_line_error, neon, small_overrides

BAD_AT = 3


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


# What record BAD_AT holds instead of its float32 [2] `x` and int `cls`, and what the error says about it.
HOSTILE = {
    "shape": ({"npy": _npy(np.zeros(3, np.float32))},
              "field 'x' has dtype float32 shape [3], expected dtype float32 shape [2]"),
    "int64": ({"npy": _npy(np.arange(2, dtype=np.int64))},
              "field 'x' has dtype int64 shape [2], expected dtype float32 shape [2]"),
    "string": ({"npy": _npy(np.array(["1.0", "2.0"]))}, "field 'x' has dtype <U3 shape [2]"),
    "float label": ({"cls": b"2.5"}, "ValueError: invalid literal for int()"),
    "label array": ({"cls": None, "cls.npy": _npy(np.float32(2.0))}, "field 'cls' has dtype float32 shape []"),
    "missing field": ({"npy": None}, "fields ['cls'], expected ['cls', 'x']"),
}


def hostile_shard(path, shard: int, n: int, payload: dict | None = None, x_shape=(2,)):
    """Shard `shard` written record by record as write_shard does (x = 1000 shard + i), record BAD_AT
    changed by `payload` (a None value drops that member)."""
    with open(path, "wb") as f, wds.TarWriter(f) as writer:
        for i in range(n):
            record = {"__key__": f"{shard:06d}-{i:06d}", "json": b"{}",
                      "npy": _npy(np.full(x_shape, 1000 * shard + i, np.float32)), "cls": str(i % 10).encode()}
            if i == BAD_AT and payload:
                record.update(payload)
            writer.write({k: v for k, v in record.items() if v is not None})
    return path


def hostile_set(d, payload, counts=(10, 11), bad_shard=1, schema=True):
    """A set whose shard `bad_shard` holds one hostile record; `schema=False`: a manifest written
    before manifests recorded the schema."""
    d.mkdir(parents=True, exist_ok=True)
    for c, n in enumerate(counts):
        hostile_shard(d / shard_name(c), c, n, payload if c == bad_shard else None)
    shards = [{"name": shard_name(c), "count": n} for c, n in enumerate(counts)]
    if schema:
        write_manifest(d, shards)
    else:
        (d / MANIFEST).write_text(json.dumps({"shards": shards}))
    return d


def stream(loader, k):
    return [loader.next() for _ in range(k)]


@pytest.mark.parametrize("case", HOSTILE)
def test_read_shard_names_the_record_or_skips_it(tmp_path, case):
    payload, needle = HOSTILE[case]
    path = hostile_shard(tmp_path / shard_name(0), 0, 10, payload)
    with pytest.raises(NeonError) as err:
        read_shard(path, 10, hint=SKIP_HINT)
    msg = str(err.value)
    assert msg.startswith(f"{path}: bad record '000000-{BAD_AT:06d}' (") and needle in msg, msg
    assert msg.endswith(SKIP_HINT) and "\n" not in msg
    columns, good, bad = read_shard(path, 10, skip_bad=True)
    assert (good, bad) == (9, 1)
    assert columns["x"].dtype == np.float32 and columns["x"].shape == (9, 2) and columns["cls"].dtype == np.int64
    assert BAD_AT not in columns["x"][:, 0].astype(int).tolist()


@pytest.mark.parametrize("case", ["shape", "int64", "string", "label array"])
def test_the_training_stream_names_the_record_or_skips_and_counts_it(tmp_path, case):
    payload, needle = HOSTILE[case]
    d = hostile_set(tmp_path / "set", payload)
    assert json.loads((d / MANIFEST).read_text())["schema"] == {"x": {"dtype": "float32", "shape": [2]},
                                                                "cls": {"dtype": "int64", "shape": []}}
    with pytest.raises(NeonError) as err:
        stream(MicroBatchLoader(d, 4, 1, 0, 1, 0), 5)
    msg = str(err.value)
    assert msg.startswith(f"{d / shard_name(1)}: bad record '000001-{BAD_AT:06d}'") and needle in msg, msg
    assert msg.endswith(SKIP_HINT)
    loader = MicroBatchLoader(d, 4, 1, 0, 1, 0, skip_bad=True)
    batches = stream(loader, 10)  # exactly two epochs of the 20 good records
    assert loader.bad == 2  # the bad record, once per visit
    assert all(b["x"].dtype == torch.float32 and b["x"].shape == (4, 2) for b in batches)
    seen = {int(v) for b in batches for v in b["x"][:, 0]}
    assert 1000 + BAD_AT not in seen and len(seen) == 20


def test_the_manifest_records_the_schema_every_record_is_checked_against(tmp_path):
    d = tmp_path / "set"
    d.mkdir()
    write_shard(d / shard_name(0), {"x": torch.zeros(4, 2, 3), "cls": torch.arange(4),
                                    "image": torch.zeros(4, 1, 5, 4, dtype=torch.uint8)}, {}, "000000")
    write_manifest(d, [{"name": shard_name(0), "count": 4}], n=4)
    manifest = json.loads((d / MANIFEST).read_text())
    assert manifest["n"] == 4 and manifest["schema"] == {"x": {"dtype": "float32", "shape": [2, 3]},
                                                         "cls": {"dtype": "int64", "shape": []},
                                                         "image": {"dtype": "uint8", "shape": [1, 5, 4]}}
    # The manifest decides, not the shard's first record: a set of float64 records is all bad.
    manifest["schema"]["x"]["dtype"] = "float64"
    (d / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(NeonError, match=r"bad record '000000-000000' \(field 'x' has dtype float32 shape \[2, 3\], "
                                        r"expected dtype float64 shape \[2, 3\]\)"):
        MicroBatchLoader(d, 2, 1, 0, 1, 0).next()
    manifest["schema"]["x"]["dtype"] = "<U3"
    (d / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(NeonError, match=rf"{d / MANIFEST}: bad 'schema' \(field 'x' has dtype <U3"):
        MicroBatchLoader(d, 2, 1, 0, 1, 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_old_manifest_checks_against_the_sets_first_record(tmp_path, workers):
    """Shards each consistent but of different shapes used to fail in np.concatenate, unnamed."""
    d = tmp_path / "set"
    d.mkdir()
    for c in range(4):  # with 2 workers, shard 1 is worker 1's with shard 3
        hostile_shard(d / shard_name(c), c, 6, x_shape=(3,) if c == 1 else (2,))
    (d / MANIFEST).write_text(json.dumps({"shards": [{"name": shard_name(c), "count": 6} for c in range(4)]}))
    with pytest.raises(NeonError) as err:
        stream(MicroBatchLoader(d, 4, 1, 0, 1, workers), 4)
    assert str(err.value).startswith(f"{d / shard_name(1)}: bad record '000001-000000' (field 'x' has dtype "
                                     f"float32 shape [3], expected dtype float32 shape [2])")
    with pytest.raises(NeonError, match=rf"{d / shard_name(1)}: bad record '000001-000000'"):
        read_shards([d / shard_name(0), d / shard_name(1)])
    loader = MicroBatchLoader(d, 3, 1, 0, 1, workers, skip_bad=True)
    batches = stream(loader, 12)
    assert all(b["x"].shape == (3, 2) for b in batches) and loader.bad > 0 and loader.bad % 6 == 0
    assert not any(1000 <= v < 2000 for b in batches for v in b["x"][:, 0].tolist())


def test_an_old_manifest_int64_record_is_not_trained_on(tmp_path):
    d = hostile_set(tmp_path / "set", HOSTILE["int64"][0], schema=False)
    with pytest.raises(NeonError, match=r"bad record '000001-000003' \(field 'x' has dtype int64"):
        stream(MicroBatchLoader(d, 4, 1, 0, 1, 0), 5)


@pytest.mark.slow  # trains the toy (base and synth first)
def test_train_stops_naming_the_shard_and_record(run_dir):
    args = ["--config", str(TOY), "--run-dir", str(run_dir), *small_overrides("synth.samplers=[{zeta: 1.1}]")]
    assert neon("run", "--stage", "base", "--stage", "synth", *args).returncode == 0
    set_dir = run_dir / "synth" / "zeta_1.1"
    assert json.loads((set_dir / MANIFEST).read_text())["schema"]["x"] == {"dtype": "float32", "shape": [2]}
    shard = set_dir / "shard-000002.tar"
    with tarfile.open(shard) as tar:  # record 5's x, same values, as int64
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name == "000002-000005.npy":
                data = _npy(np.load(io.BytesIO(data)).astype(np.int64))
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    proc = neon("train", *args)
    assert proc.returncode == 2
    assert_one_line_error(proc, f"{shard}: bad record '000002-000005' (field 'x' has dtype int64 shape [2], "
                                "expected dtype float32 shape [2])", "train.skip_bad=true", exit_code=2)
