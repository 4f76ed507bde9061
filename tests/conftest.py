"""Shared fixtures. Everything runs on CPU: DeepSpeed on gloo, Triton in interpreter mode."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRITON_INTERPRET", "1")

import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOY = ROOT / "configs" / "toy2d.yaml"

# A small version of the default run: same stages and code paths, seconds instead of minutes.
SMALL = [
    "base.steps=300", "base.n_real=400",
    "synth.n=400", "synth.shard_size=100",
    "train.save_steps=[6,12]", "train.global_batch=400", "train.ckpt_every_images=1200", "train.log_every=3",
    "eval.n=4000", "eval.chunk=1000",
    "sweep.w_step=0.5", "sweep.tol=0.0", "sweep.refine_w=0.25",
]


def small_overrides(*extra: str) -> list[str]:
    args = []
    for item in [*SMALL, *extra]:
        args += ["--set", item]
    return args


def neon(*args: str, cwd=ROOT, env_extra=None, timeout=600) -> subprocess.CompletedProcess:
    """Run the real `neon` entry point in a fresh process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "neon_scale.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def torchrun(script, *args: str, timeout=600) -> subprocess.CompletedProcess:
    """Run `script` on 2 local ranks (gloo) with torchrun, from the repository root."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


LAUNCHER = ROOT / "launchers" / "neon.py"


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"
