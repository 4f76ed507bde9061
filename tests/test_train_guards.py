"""Train-stage guards through the real command: a non-finite loss stops the run and leaves the
last good checkpoint as `latest`; a global batch the ranks cannot split is one clear error."""

from .conftest import LAUNCHER, TOY, neon, small_overrides, torchrun
from .test_cli import assert_one_line_error


def test_non_finite_loss_stops_with_the_last_good_checkpoint(run_dir):
    args = ["--config", str(TOY), "--run-dir", str(run_dir), *small_overrides()]
    assert neon("run", "--stage", "base", "--stage", "synth", *args).returncode == 0
    # An absurd learning rate blows the weights up within a few steps.
    proc = neon("train", *args, "--set", "train.lr=1e30", "--set", "train.ckpt_every_images=1", "--set", "train.save_steps=[40]")
    assert_one_line_error(proc, "train zeta=1.1: non-finite loss at step", "last good checkpoint kept in")
    ckpt = run_dir / "train" / "zeta=1.1" / "ckpt"
    tag = (ckpt / "latest").read_text().strip()
    bad_step = int(proc.stderr.split("non-finite loss at step ")[1].split(";")[0])
    assert tag == f"step{bad_step - 1:06d}" and (ckpt / tag).is_dir()
    assert not list((run_dir / "train").rglob("theta_s-*.safetensors"))


def test_global_batch_not_divisible_by_the_world_size(run_dir):
    args = ["--config", str(TOY), "--run-dir", str(run_dir), *small_overrides("train.global_batch=401")]
    proc = torchrun(LAUNCHER, *args, timeout=300)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors and all("train.global_batch=401 is not divisible by world size 2 x train.grad_accum 1" in ln
                          for ln in errors)
    # torchrun reports the failed children with a traceback of its own; the ranks print none
    assert "neon_scale/" not in proc.stderr
