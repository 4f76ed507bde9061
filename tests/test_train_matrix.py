"""2 ranks on gloo, ZeRO 2 and 3 x fp32 and bf16, through the real launcher: the loss goes down,
and a run SIGKILLed mid-training then resumed ends with the same loss trajectory and bit-identical
weights (EMA included) as an uninterrupted run. The EMA exported by `neon consolidate --ema` from
the last checkpoint equals the theta_s the stage wrote."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from safetensors.torch import load_file

from .conftest import LAUNCHER, ROOT, TOY, neon, small_overrides

pytestmark = pytest.mark.slow  # whole runs on 2 ranks: `pytest -m 'not slow'` skips them

STEPS = 60
TRAIN = ["synth.samplers=[{zeta: 1.1}]", f"train.save_steps=[{STEPS}]", "train.lr=3e-3", "train.log_every=1",
         "train.ckpt_every_images=2000", "train.keep_last=2", "train.ema_decay=0.9"]
TAG = "zeta=1.1"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """base + synth once (1 rank); every case trains from a copy."""
    run_dir = tmp_path_factory.mktemp("matrix") / "prepared"
    proc = neon("run", "--stage", "base", "--stage", "synth", "--config", str(TOY), "--run-dir", str(run_dir),
                *small_overrides(*TRAIN))
    assert proc.returncode == 0, proc.stderr
    return run_dir


def _cmd(run_dir, case):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(LAUNCHER),
            "train", "--config", str(TOY), "--run-dir", str(run_dir), *small_overrides(*TRAIN, *case)]


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")


def _train(run_dir, case):
    proc = subprocess.run(_cmd(run_dir, case), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _kill_tree(proc):
    family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    psutil.wait_procs([p for p in map(_process, family[1:]) if p is not None], timeout=30)


def _process(pid):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _kill_mid_training(run_dir, case):
    ckpt, final = run_dir / "train" / TAG / "ckpt", run_dir / "train" / TAG / f"theta_s-step{STEPS:06d}.safetensors"
    proc = subprocess.Popen(_cmd(run_dir, case), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            latest = ckpt / "latest"
            if latest.is_file() and int(latest.read_text().strip().removeprefix("step")) >= 10:
                _kill_tree(proc)  # torchrun and both ranks (each in a session of its own), wherever they are
                assert not final.exists(), "the run finished before the kill"
                return int(latest.read_text().strip().removeprefix("step"))
            assert proc.poll() is None, "the run ended before the kill point"
            time.sleep(0.01)
        pytest.fail("kill point never reached")
    finally:
        if proc.poll() is None:
            _kill_tree(proc)


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "train" / TAG / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


@pytest.mark.parametrize("stage,dtype,workers", [(2, "fp32", 0), pytest.param(2, "bf16", 0, marks=pytest.mark.matrix),
                                                 pytest.param(3, "fp32", 0, marks=pytest.mark.matrix), (3, "bf16", 2)])
def test_loss_goes_down_and_kill_resume_is_bit_identical(prepared, tmp_path, stage, dtype, workers):
    case = [f"train.zero_stage={stage}", f"train.dtype={dtype}", f"train.workers={workers}"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    shutil.copytree(prepared, ref)
    shutil.copytree(prepared, killed)
    _train(ref, case)
    losses = [loss for _, loss in _losses(ref)]
    assert len(losses) == STEPS
    # The base is under-trained (300 steps): the loss falls from its first value (~1.04) to ~0.86.
    assert sum(losses[-20:]) / 20 < 0.92 * losses[0]

    at = _kill_mid_training(killed, case)
    proc = _train(killed, case)
    assert f"resuming from step {at}" in proc.stdout
    assert _losses(killed) == _losses(ref)  # the same trajectory, exactly
    name = f"train/{TAG}/theta_s-step{STEPS:06d}.safetensors"
    a, b = load_file(str(ref / name)), load_file(str(killed / name))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    tags = sorted(p.name for p in (killed / "train" / TAG / "ckpt").iterdir() if p.is_dir())
    assert len(tags) == 2 and tags[-1] == f"step{STEPS:06d}"  # keep-last-2, nothing partial left

    out = tmp_path / "ema"
    proc = neon("consolidate", str(ref / "train" / TAG / "ckpt"), "-o", str(out), "--ema")
    assert proc.returncode == 0, proc.stderr
    ema = load_file(str(out / "model.safetensors"))
    assert ema.keys() == a.keys() and all((ema[k] == a[k]).all() for k in a)  # theta_s is the EMA
    base = load_file(str(ref / "base" / "model.safetensors"))
    assert any((a[k] != base[k]).any() for k in a)
