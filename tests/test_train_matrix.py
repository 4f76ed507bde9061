"""2 ranks on gloo, ZeRO 2 and 3 x fp32 and bf16, through the real launcher: the loss goes down,
and a run SIGKILLed mid-training then resumed ends with the same loss trajectory and bit-identical
weights (EMA included) as an uninterrupted run. The EMA exported by `neon consolidate --ema` from
the last checkpoint equals the theta_s the stage wrote."""
import json
import shutil
import subprocess

import pytest
from safetensors.torch import load_file

from .conftest import LAUNCHER, ROOT, TOY, kill_when, neon, small_overrides, torchrun, torchrun_cmd, torchrun_env

pytestmark = pytest.mark.slow  # whole runs on 2 ranks: `pytest -m 'not slow'` skips them

STEPS = 60
TRAIN = ["synth.samplers=[{zeta: 1.1}]", f"train.save_steps=[{STEPS}]", "train.lr=3e-3", "train.log_every=1",
         "train.ckpt_every_images=2000", "train.keep_last=2", "train.ema_decay=0.9"]
TAG = "zeta_1.1"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """base + synth once (1 rank); every case trains from a copy."""
    run_dir = tmp_path_factory.mktemp("matrix") / "prepared"
    proc = neon("run", "--stage", "base", "--stage", "synth", "--config", str(TOY), "--run-dir", str(run_dir),
                *small_overrides(*TRAIN))
    assert proc.returncode == 0, proc.stderr
    return run_dir


def _args(run_dir, case):
    return ["train", "--config", str(TOY), "--run-dir", str(run_dir), *small_overrides(*TRAIN, *case)]


def _train(run_dir, case):
    proc = torchrun(LAUNCHER, *_args(run_dir, case), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _kill_mid_training(run_dir, case):
    ckpt, final = run_dir / "train" / TAG / "ckpt", run_dir / "train" / TAG / f"theta_s-step{STEPS:06d}.safetensors"
    latest = ckpt / "latest"
    proc = subprocess.Popen(torchrun_cmd(LAUNCHER, *_args(run_dir, case)), cwd=ROOT, env=torchrun_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # torchrun and both ranks (each in a session of its own) are killed, wherever they are
    kill_when(proc, lambda: latest.is_file() and int(latest.read_text().strip().removeprefix("step")) >= 10,
              timeout=600, poll=0.01)
    assert not final.exists(), "the run finished before the kill"
    return int(latest.read_text().strip().removeprefix("step"))


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "train" / TAG / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


@pytest.fixture(scope="module", ids=lambda c: "-".join(map(str, c)),
                params=[(2, "fp32", 0), pytest.param((2, "bf16", 0), marks=pytest.mark.matrix),
                        pytest.param((3, "fp32", 0), marks=pytest.mark.matrix), (3, "bf16", 2)])
def case(request):
    """(ZeRO stage, dtype, data workers) as overrides; every test below runs for each."""
    stage, dtype, workers = request.param
    return [f"train.zero_stage={stage}", f"train.dtype={dtype}", f"train.workers={workers}"]


@pytest.fixture(scope="module")
def reference(prepared, case, tmp_path_factory):
    """The uninterrupted run of the case (trained once, shared by the tests of the case)."""
    ref = tmp_path_factory.mktemp("ref") / "ref"
    shutil.copytree(prepared, ref)
    _train(ref, case)
    return ref


@pytest.fixture(scope="module")
def resumed(prepared, case, tmp_path_factory):
    """The same run SIGKILLed mid-training, then resumed: (run dir, step it resumed from, resume's output)."""
    killed = tmp_path_factory.mktemp("killed") / "killed"
    shutil.copytree(prepared, killed)
    at = _kill_mid_training(killed, case)
    proc = _train(killed, case)
    return killed, at, proc


def _theta_s(run_dir):
    return load_file(str(run_dir / f"train/{TAG}/theta_s-step{STEPS:06d}.safetensors"))


def test_loss_goes_down(reference):
    losses = [loss for _, loss in _losses(reference)]
    assert len(losses) == STEPS
    # The base is under-trained (300 steps): the loss falls from its first value (~1.04) to ~0.86.
    assert sum(losses[-20:]) / 20 < 0.92 * losses[0]


def test_kill_resume_has_the_same_loss_trajectory(reference, resumed):
    killed, at, proc = resumed
    assert f"resuming from step {at}" in proc.stdout
    assert _losses(killed) == _losses(reference)  # the same trajectory, exactly


def test_kill_resume_ends_with_bit_identical_weights(reference, resumed):
    a, b = _theta_s(reference), _theta_s(resumed[0])
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_kill_resume_keeps_the_last_two_checkpoints(resumed):
    killed = resumed[0]
    tags = sorted(p.name for p in (killed / "train" / TAG / "ckpt").iterdir() if p.is_dir())
    assert len(tags) == 2 and tags[-1] == f"step{STEPS:06d}"  # keep-last-2, nothing partial left


def test_consolidated_ema_is_theta_s(reference, tmp_path):
    a = _theta_s(reference)
    out = tmp_path / "ema"
    proc = neon("consolidate", str(reference / "train" / TAG / "ckpt"), "-o", str(out), "--ema")
    assert proc.returncode == 0, proc.stderr
    ema = load_file(str(out / "model.safetensors"))
    assert ema.keys() == a.keys() and all((ema[k] == a[k]).all() for k in a)  # theta_s is the EMA
    base = load_file(str(reference / "base" / "model.safetensors"))
    assert any((a[k] != base[k]).any() for k in a)
