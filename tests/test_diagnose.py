"""`neon diagnose`: the gradient-alignment prediction of the sign of Neon's best w.

Unit tests of the pieces (Gram-matrix bootstrap, per-batch gradients, the real-data sources) on the
real specs, then the command itself: bad input, and the acceptance runs on the two toys, whose
sweeps' best w are known (bench/RESULTS.md: zeta 1.1 -> +1.15, 0.9 -> -1.35; temperature 0.5 ->
+0.18, 1.6 -> -0.28).
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from neon_scale import rng
from neon_scale.config import load_config
from neon_scale.data.shards import shard_name, write_manifest, write_shard
from neon_scale.errors import NeonError
from neon_scale.stages import diagnose as D
from neon_scale.stages.common import RunContext

from .conftest import ROOT, TOY, assert_one_line_error, neon

TOY_AR = ROOT / "configs" / "toy2d_ar.yaml"
DIGITS = ROOT / "configs" / "digits_dit.yaml"


def _ctx(config, tmp_path, *overrides):
    return RunContext.from_config(load_config(str(config), [f"run_dir={tmp_path / 'run'}", *overrides]))


# ------------------------------------------------------------------------------------------ statistics

def test_gram_cosine_equals_the_cosine_of_the_weighted_means():
    gen = torch.Generator().manual_seed(0)
    s, r = (torch.randn(k, 50, generator=gen, dtype=torch.float64) for k in (6, 5))
    a = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 3, 1, 0, 2, 0]], dtype=torch.float64)  # the point, a resample
    b = torch.tensor([[1, 1, 1, 1, 1], [2, 0, 0, 1, 2]], dtype=torch.float64)
    got = D.gram_cosine(s @ s.T, r @ r.T, s @ r.T, a, b)
    want = torch.nn.functional.cosine_similarity(a @ s, b @ r, dim=1)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("true_cos", [-0.6, 0.3])
def test_cosine_stats_finds_the_sign_and_covers_the_truth(true_cos):
    gen = torch.Generator().manual_seed(1)
    u = torch.zeros(400, dtype=torch.float64)
    u[0] = 1.0
    v = torch.zeros(400, dtype=torch.float64)
    v[0], v[1] = true_cos, (1 - true_cos**2) ** 0.5
    # each batch gradient: the signal (norm 1) + noise of norm 4; the mean of 64 still has noise of norm 0.5
    s = u + 0.2 * torch.randn(64, 400, generator=gen, dtype=torch.float64)
    r = v + 0.2 * torch.randn(64, 400, generator=gen, dtype=torch.float64)
    st = D.cosine_stats(s.float(), r.float(), 1000, seed=0)
    assert st["predicted_w_sign"] == (1 if true_cos < 0 else -1)
    assert st["interval_excludes_zero"] and st["bootstrap_fraction"] > 0.99
    lo, hi = st["ci95"]
    assert hi - lo < 0.3
    # the raw cosine shrinks towards 0 with the noise; the noise-corrected one does not
    assert abs(st["cos"]) < 0.9 * abs(true_cos) and st["cos_noise_corrected"] == pytest.approx(true_cos, abs=0.1)


def test_cosine_stats_of_pure_noise_is_unsure():
    gen = torch.Generator().manual_seed(2)
    st = D.cosine_stats(torch.randn(32, 300, generator=gen), torch.randn(32, 300, generator=gen), 500, seed=0)
    assert not st["interval_excludes_zero"] and st["bootstrap_fraction"] < 0.99


# ------------------------------------------------------------------------------------------ gradients

def test_batch_gradient_rows_are_the_mean_gradients_whatever_the_passes(tmp_path):
    ctx = _ctx(TOY_AR, tmp_path)
    torch.manual_seed(0)
    model = ctx.spec.build(ctx.model_args())
    data = ctx.spec.real_data(103, rng.generator(0, "test"))
    rows = D.batch_gradients(ctx, model, data, 4, 1, ("t",), micro=1000, label_dropout=0.0, desc="t")
    assert rows.shape == (4, sum(p.numel() for p in model.parameters()))
    model.zero_grad()
    ctx.spec.loss(model, {"x": data["x"][25:50]}, None).backward()  # batch 1 of 25 records (3 left over)
    torch.testing.assert_close(rows[1], torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(D.batch_gradients(ctx, model, data, 4, 1, ("t",), 7, 0.0, "t"), rows)


def test_loss_noise_follows_the_row_not_the_pass_and_repeats_average_it(tmp_path):
    ctx = _ctx(TOY, tmp_path)
    torch.manual_seed(0)
    model = ctx.spec.build(ctx.model_args())
    data = ctx.spec.real_data(64, rng.generator(0, "test"))
    assert D.loss_is_random(ctx, model, data)
    assert not D.loss_is_random(_ctx(TOY_AR, tmp_path), _ctx(TOY_AR, tmp_path).spec.build(
        _ctx(TOY_AR, tmp_path).model_args()), data)
    one = D.batch_gradients(ctx, model, data, 4, 8, ("t",), micro=1000, label_dropout=0.0, desc="t")
    torch.testing.assert_close(D.batch_gradients(ctx, model, data, 4, 8, ("t",), 5, 0.0, "t"), one)
    other = D.batch_gradients(ctx, model, data, 4, 8, ("u",), 1000, 0.0, "t")
    assert not torch.equal(one, other)  # another noise stream


def test_displacement_cosines_read_theta_r_minus_theta_s_in_the_gradients_order(tmp_path):
    ctx = _ctx(TOY_AR, tmp_path)
    torch.manual_seed(0)
    model = ctx.spec.build(ctx.model_args())
    synth = D.batch_gradients(ctx, model, ctx.spec.real_data(96, rng.generator(1, "test")), 4, 1, ("s",), 1000, 0.0,
                              "t")
    real = D.batch_gradients(ctx, model, ctx.spec.real_data(96, rng.generator(2, "test")), 4, 1, ("r",), 1000, 0.0,
                             "t")
    step, at = synth.double().mean(0), 0  # one gradient step on S: theta_s = theta_r - 0.1 g_s
    theta_s = {}
    for name, p in model.named_parameters():
        theta_s[name] = p.detach().double() - 0.1 * step[at:at + p.numel()].view_as(p)
        at += p.numel()
    out = D.displacement_cosines(model, theta_s, synth, real)
    assert out["cos_synth"] == pytest.approx(1.0, abs=1e-9)
    mr = real.double().mean(0)
    assert out["cos_real"] == pytest.approx(float(mr @ step / (mr.norm() * step.norm())), abs=1e-9)
    assert abs(out["cos_real"]) < 0.999  # another direction: the test can tell them apart


# ------------------------------------------------------------------------------------------ real data

def test_real_data_from_data_source_is_the_held_out_split(tmp_path):
    ctx = _ctx(DIGITS, tmp_path)
    data, source = D.real_data(ctx, None, None, 0, 0)
    assert "held-out" in source and len(data["x"]) == 359 and data["x"].shape[1:] == (1, 8, 8)
    assert data["x"].min() >= -1 and data["x"].max() <= 1 and set(data["cls"].tolist()) == set(range(10))
    data, _ = D.real_data(_ctx(DIGITS, tmp_path, "data.holdout=0.0"), None, 100, 0, 0)
    assert len(data["x"]) == 100  # no held-out images: the training split, capped at n


def test_real_data_from_a_path(tmp_path):
    ctx = _ctx(DIGITS, tmp_path)
    folder = tmp_path / "images"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / c / f"{i}.png")
    data, source = D.real_data(ctx, str(folder), None, 0, 0)
    assert "images" in source and data["x"].shape == (6, 1, 8, 8) and data["cls"].tolist() == [0, 0, 0, 1, 1, 1]
    shards = tmp_path / "shards"  # the synth stage's layout: the network's input as is
    write_shard(shards / shard_name(0), {"x": torch.ones(5, 1, 8, 8), "cls": torch.arange(5)}, {}, "000000")
    write_manifest(shards, [{"name": shard_name(0), "count": 5}])
    data, source = D.real_data(ctx, str(shards), 4, 0, 0)
    assert "shards" in source and data["x"].shape == (4, 1, 8, 8) and data["cls"].tolist() == [0, 1, 2, 3]
    with pytest.raises(NeonError, match="--real .*no such file"):
        D.real_data(ctx, str(tmp_path / "missing"), None, 0, 0)


# ------------------------------------------------------------------------------------------ the command

@pytest.mark.slow  # a neon command in a fresh process
def test_no_real_data_is_one_line_and_writes_nothing(tmp_path):
    weights, stats = tmp_path / "inception.pth", tmp_path / "stats.npz"
    weights.touch()
    stats.touch()
    run_dir = tmp_path / "run"
    proc = neon("diagnose", "--config", str(ROOT / "configs" / "dit_tiny.yaml"), "--run-dir", str(run_dir),
                "--set", f"eval.inception_weights={weights}", "--set", f"eval.ref_stats={stats}")
    assert_one_line_error(proc, "no real data for model 'dit'", "--real PATH", exit_code=2)
    assert not run_dir.exists()


@pytest.mark.slow  # a neon command in a fresh process
def test_without_the_synth_stage_it_names_what_to_run(tmp_path):
    run_dir = tmp_path / "run"
    proc = neon("diagnose", "--config", str(TOY), "--run-dir", str(run_dir))
    assert_one_line_error(proc, "needs theta_r", "neon run --stage base --stage synth", exit_code=2)
    assert not run_dir.exists()


def _diagnose_toy(config, run_dir, *overrides):
    sets = [a for o in overrides for a in ("--set", o)]
    # the toy diffusion's base is 10k Adam steps: ~40 s alone, many minutes on a machine shared with other jobs
    proc = neon("run", "--config", str(config), "--run-dir", str(run_dir), "--stage", "base", "--stage", "synth", *sets,
                timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    proc = neon("diagnose", "--config", str(config), "--run-dir", str(run_dir), *sets)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Neon diagnose" in proc.stdout and "predicted w" in proc.stdout
    result = json.loads((run_dir / "diagnose" / "diagnose.json").read_text())
    assert not (run_dir / "train").exists()  # only base and synth were needed
    return {row["sampler_tag"]: row for row in result["settings"]}


@pytest.mark.slow  # the full toy base (10k Adam steps, ~40 s) + 2 x 1000 synthetic samples + diagnose
def test_toy_diffusion_signs_match_the_sweep(tmp_path):
    rows = _diagnose_toy(TOY, tmp_path / "run")
    assert rows["zeta_1.1"]["predicted_w_sign"] == +1  # sweep: best w +1.15 (50 steps), +0.35 (250)
    assert rows["zeta_0.9"]["predicted_w_sign"] == -1  # sweep: -1.35, -0.25
    assert all(row["interval_excludes_zero"] for row in rows.values()), rows


@pytest.mark.slow  # the AR toy's base (1000 steps) + 2 x 20k synthetic samples + diagnose
def test_toy_ar_signs_match_the_sweep(tmp_path):
    # S of 2e4 instead of 1e5: the same base and sampler, a smaller sample of the same distribution
    rows = _diagnose_toy(TOY_AR, tmp_path / "run", "synth.n=20000")
    assert rows["temperature_0.5"]["predicted_w_sign"] == +1  # sweep: +0.18 (50 epochs), +0.08 (250)
    assert rows["temperature_1.6"]["predicted_w_sign"] == -1  # sweep: -0.28, -0.15
    assert all(row["interval_excludes_zero"] for row in rows.values()), rows
