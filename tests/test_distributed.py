"""2 ranks on gloo through the real launcher entry point (torchrun starts faster than the
deepspeed launcher; both run launchers/neon.py the same way)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from neon_scale.data.shards import read_shards

from .conftest import LAUNCHER, TOY, neon, small_overrides, torchrun

pytestmark = pytest.mark.slow  # whole runs on 2 ranks: `pytest -m 'not slow'` skips them


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    one, two = root / "one", root / "two"
    proc = neon("run", "--config", str(TOY), "--run-dir", str(one), *small_overrides())
    assert proc.returncode == 0, proc.stderr
    proc = torchrun(LAUNCHER, "--config", str(TOY), "--run-dir", str(two), *small_overrides())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return one, two, proc


def test_two_ranks_run_every_stage_with_zero2(runs):
    one, two, proc = runs
    assert proc.stdout.count("Neon sweep") == 1  # rank 0 prints; rank 1 stays quiet
    summary = json.loads((two / "sweep" / "summary.json").read_text())
    assert len(summary) == 4
    ckpt = two / "train" / "zeta_1.1" / "ckpt"
    tag = (ckpt / "latest").read_text().strip()
    parts = sorted(p.name for p in (ckpt / tag).iterdir() if "optim_states" in p.name)
    assert len(parts) == 2 and all("zero_pp_rank_" in p for p in parts)  # ZeRO partitions per rank
    losses = [json.loads(line)["loss"] for line in (two / "train" / "zeta_1.1" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(l == l for l in losses)


def test_synthetic_set_is_the_same_whatever_the_world_size(runs):
    one, two, _ = runs
    for tag in ("zeta_1.1", "zeta_0.9"):
        shards = sorted((one / "synth" / tag).glob("shard-*.tar"))
        assert len(shards) == 4
        a = read_shards(shards)
        b = read_shards([two / "synth" / tag / s.name for s in shards])
        assert torch.equal(a["x"], b["x"])
        first, second = read_shards(shards[:1])["x"], read_shards(shards[1:2])["x"]
        assert not torch.allclose(first, second)  # distinct seeds per shard


def test_two_rank_eval_equals_one_rank(runs, tmp_path):
    one, _, _ = runs
    copy = tmp_path / "copy"
    shutil.copytree(one, copy)
    shutil.rmtree(copy / "sweep")
    proc = torchrun(LAUNCHER, "sweep", "--config", str(TOY), "--run-dir", str(copy), *small_overrides())
    assert proc.returncode == 0, proc.stderr[-3000:]
    read = lambda d: [json.loads(x) for x in (d / "sweep" / "results.jsonl").read_text().splitlines()]  # noqa: E731
    # bit for bit, standard errors included: rank 0 sums the chunks' moments in chunk order
    assert read(one) == read(copy)


def test_two_rank_theta_s_matches_one_rank_closely(runs):
    one, two, _ = runs
    name = "train/zeta_1.1/theta_s-step000012.safetensors"
    a, b = load_file(str(one / name)), load_file(str(two / name))
    base = load_file(str(one / "base" / "model.safetensors"))
    for k in a:  # same data and optimizer; only the loss noise draws differ per rank
        moved = (a[k] - base[k]).abs().max()
        assert (b[k] - base[k]).abs().max() <= 3 * moved + 1e-6
