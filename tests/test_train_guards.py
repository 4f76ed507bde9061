"""Train-stage guards through the real command: a non-finite loss stops the run and leaves the
last good checkpoint as `latest`; a global batch the ranks cannot split, a corrupt shard and bad
train settings are one clear error each; a save cut short is never resumed from."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import LAUNCHER, TOY, assert_one_line_error, neon, small_overrides, torchrun


@pytest.mark.slow  # trains the toy (base and synth first, or 2 ranks)
def test_non_finite_loss_stops_with_the_last_good_checkpoint(run_dir):
    args = ["--config", str(TOY), "--run-dir", str(run_dir), *small_overrides()]
    assert neon("run", "--stage", "base", "--stage", "synth", *args).returncode == 0
    # An absurd learning rate blows the weights up within a few steps.
    proc = neon("train", *args, "--set", "train.lr=1e30", "--set", "train.ckpt_every_images=1", "--set", "train.save_steps=[40]")
    assert_one_line_error(proc, "train zeta_1.1: non-finite loss at step", "last good checkpoint kept in", exit_code=2)
    ckpt = run_dir / "train" / "zeta_1.1" / "ckpt"
    tag = (ckpt / "latest").read_text().strip()
    bad_step = int(proc.stderr.split("non-finite loss at step ")[1].split(";")[0])
    assert tag == f"step{bad_step - 1:06d}" and (ckpt / tag).is_dir()
    assert not list((run_dir / "train").rglob("theta_s-*.safetensors"))


@pytest.mark.slow  # trains the toy (base and synth first, or 2 ranks)
def test_global_batch_not_divisible_by_the_world_size(run_dir):
    args = ["--config", str(TOY), "--run-dir", str(run_dir), *small_overrides("train.global_batch=401")]
    proc = torchrun(LAUNCHER, *args, timeout=300)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors and all("train.global_batch=401 is not divisible by world size 2 x train.grad_accum 1" in ln
                          for ln in errors)
    # torchrun reports the failed children with a traceback of its own; the ranks print none
    assert "neon_scale/" not in proc.stderr


@pytest.mark.slow  # trains the toy (base and synth first, or 2 ranks)
def test_corrupt_shard_stops_train_naming_it_or_is_skipped_and_counted(run_dir):
    args = ["--config", str(TOY), "--run-dir", str(run_dir), *small_overrides("synth.samplers=[{zeta: 1.1}]")]
    assert neon("run", "--stage", "base", "--stage", "synth", *args).returncode == 0
    shard = run_dir / "synth" / "zeta_1.1" / "shard-000002.tar"
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2 + 7])
    proc = neon("train", *args)
    assert_one_line_error(proc, f"{shard}: corrupt or truncated shard", "train.skip_bad=true", exit_code=2)
    assert not list((run_dir / "train").rglob("theta_s-*.safetensors"))
    proc = neon("train", *args, "--set", "train.skip_bad=true")
    assert proc.returncode == 0, proc.stderr
    done = json.loads((run_dir / "train" / "zeta_1.1" / "done.json").read_text())
    assert done["bad_records"] > 0
    assert json.loads((run_dir / "train" / "zeta_1.1" / "metrics.jsonl").read_text().splitlines()[-1])["bad_records"] > 0


@pytest.mark.slow  # trains the toy (base and synth first, or 2 ranks)
def test_a_save_cut_short_is_never_resumed_from(run_dir):
    """As if killed while writing step 12: its directory exists, `latest` still names step 9."""
    args = ["--config", str(TOY), "--run-dir", str(run_dir),
            *small_overrides("synth.samplers=[{zeta: 1.1}]", "train.save_steps=[12]", "train.keep_last=3")]
    assert neon("run", "--stage", "base", "--stage", "synth", "--stage", "train", *args).returncode == 0
    out = run_dir / "train" / "zeta_1.1"
    ckpt, theta = out / "ckpt", out / "theta_s-step000012.safetensors"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step000006", "step000009", "step000012"]
    reference = load_file(str(theta))
    (ckpt / "latest").write_text("step000009")
    for f in (ckpt / "step000012").glob("*optim_states.pt"):
        f.write_bytes(f.read_bytes()[:100])  # half written
    for done in (out / "done.json", run_dir / "train" / "done.json", theta):
        done.unlink()
    proc = neon("train", *args)
    assert proc.returncode == 0, proc.stderr
    assert "resuming from step 9" in proc.stdout
    again = load_file(str(theta))
    assert all(torch.equal(reference[k], again[k]) for k in reference)
    assert (ckpt / "latest").read_text() == "step000012"


@pytest.mark.slow  # one neon command per setting (about 12 s)
def test_train_settings_are_checked_when_the_config_loads(run_dir):
    for setting, needle in [("train.label_dropout=0.1", "'train.label_dropout' = 0.1 but model 'toy2d_diffusion' "
                                                        "is not class-conditional"),
                            ("train.ema_decay=1.0", "'train.ema_decay' = 1.0 must be below 1"),
                            ("train.ckpt_every=5", "unknown key 'train.ckpt_every'")]:
        proc = neon("train", "--config", str(TOY), "--run-dir", str(run_dir), "--set", setting)
        assert_one_line_error(proc, needle, exit_code=2)


@pytest.mark.slow  # trains the toy (base and synth first, or 2 ranks)
def test_non_finite_gradient_norm_with_a_finite_loss_stops_the_run(run_dir):
    """A last layer scaled by 1e17: the loss (~1e34) is finite, the squared gradients are not."""
    args = ["--config", str(TOY), "--run-dir", str(run_dir), *small_overrides("synth.samplers=[{zeta: 1.1}]")]
    assert neon("run", "--stage", "base", "--stage", "synth", *args).returncode == 0
    base = run_dir / "base" / "model.safetensors"
    weights = load_file(str(base))
    weights["net.9.weight"] = weights["net.9.weight"] * 1e17
    save_file(weights, str(base))
    proc = neon("train", *args)
    assert_one_line_error(proc, "train zeta_1.1: non-finite gradient norm at step 1;", "last good checkpoint kept in",
                          exit_code=2)
    assert not list((run_dir / "train").rglob("theta_s-*.safetensors"))
    assert not (run_dir / "train" / "zeta_1.1" / "ckpt" / "latest").exists()
