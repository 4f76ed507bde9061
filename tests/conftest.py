"""Shared fixtures. Everything runs on CPU: DeepSpeed on gloo, Triton in interpreter mode."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRITON_INTERPRET", "1")

import pathlib  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

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


def torchrun_cmd(script, *args: str, nproc: int = 2) -> list[str]:
    """The command line that runs `script` on `nproc` local ranks (gloo) with torchrun."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(script), *args]


def torchrun_env() -> dict[str, str]:
    """The environment for a torchrun started by the tests (with torchrun_cmd, or torchrun)."""
    return dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")


def torchrun(script, *args: str, nproc: int = 2, timeout=600) -> subprocess.CompletedProcess:
    """Run `script` on `nproc` (default 2) local ranks (gloo) with torchrun, from the repository root."""
    return subprocess.run(torchrun_cmd(script, *args, nproc=nproc), cwd=ROOT, env=torchrun_env(),
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *needles: str, exit_code: int | None = 2, warnings_ok: bool = True) -> None:
    """`proc` (a finished command) failed with one line on stderr, `error: ...` holding every needle,
    and no traceback.

    exit_code: the exact status expected (2: bad input, the `neon` command and the launchers), or
    None for any non-zero status. warnings_ok: DeepSpeed's `[WARNING]` lines (and blank lines) may
    come before the error line; with False, stderr is that one line and nothing else."""
    if exit_code is None:
        assert proc.returncode != 0, proc.stdout + proc.stderr
    else:
        assert proc.returncode == exit_code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    if warnings_ok:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "[WARNING]" not in ln]
    else:
        lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def kill(proc, *, children: bool = True, timeout: float = 30) -> None:
    """SIGKILL `proc` (a Popen) and, unless children=False, every process it started (torchrun's
    ranks too, each in a session of its own), then wait until they are gone."""
    import psutil

    family = [proc.pid]
    if children:
        try:
            family += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=timeout)
    left = []
    for pid in family[1:]:
        try:
            left.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=timeout)


def kill_when(proc, condition, timeout: float = 300, poll: float = 0.02) -> None:
    """Kill `proc` and its children (kill) as soon as `condition()` holds; the run must still be
    going then, and the condition must come within `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if condition():
                kill(proc)
                return
            if proc.poll() is not None:
                pytest.fail("the run ended before the kill point")
            time.sleep(poll)
        pytest.fail("kill point never reached")
    finally:
        if proc.poll() is None:
            kill(proc)


LAUNCHER = ROOT / "launchers" / "neon.py"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(args, world: int, log_dir: pathlib.Path, env_extra=None) -> list[subprocess.Popen]:
    """`launchers/neon.py *args` as `world` separate processes (as srun starts them: each with its
    own exit status), RANK/WORLD_SIZE/MASTER_* set; output of rank r in log_dir/rank{r}.log."""
    port, procs = free_port(), []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONUNBUFFERED="1", COLUMNS="200", NEON_DIST_TIMEOUT="900",
                   **(env_extra or {}))
        with open(log_dir / f"rank{rank}.log", "w") as out:
            procs.append(subprocess.Popen([sys.executable, str(LAUNCHER), *args], cwd=ROOT, env=env, stdout=out,
                                          stderr=subprocess.STDOUT))
    return procs


def wait_ranks(procs, log_dir: pathlib.Path, timeout=900) -> tuple[list[int], list[str]]:
    codes = [p.wait(timeout=timeout) for p in procs]
    return codes, [(log_dir / f"rank{r}.log").read_text() for r in range(len(procs))]


def signal_when(procs, marker: pathlib.Path, rank: int, sig, timeout=300) -> None:
    """Send `sig` to rank `rank` as soon as `marker` exists (the run must still be going)."""
    import time

    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert all(p.poll() is None for p in procs), f"the run ended before {marker} appeared"
        assert time.monotonic() < deadline, f"{marker} did not appear within {timeout} s"
        time.sleep(0.02)
    procs[rank].send_signal(sig)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: whole runs (through the launcher or not), multi-process runs, "
                                       "anything over ~5 s; the fast inner loop (`make test-fast`, under 2 min) is "
                                       "`pytest -m 'not slow and not matrix'`")
    config.addinivalue_line("markers", "matrix: the rest of a configuration matrix whose representative cases run "
                                       "in `make test`; all of it: `make bench-matrix`")


@pytest.fixture(scope="session")
def small_toy_run(tmp_path_factory):
    """The small toy run (every stage, 1 rank, SMALL settings), made once per session and shared
    (test_pipeline, test_tracking): tests must copy it before changing anything in it."""
    run_dir = tmp_path_factory.mktemp("small") / "run"
    proc = neon("run", "--config", str(TOY), "--run-dir", str(run_dir), *small_overrides())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run_dir, proc


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"


def write_image_set(folder: pathlib.Path, n: int, seed: int, brightness: float, size=(40, 48)) -> pathlib.Path:
    """n smooth random RGB PNGs (upsampled 8x8 noise + pixel noise): image-like, and a set's
    brightness shifts its feature distribution."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8))
        img = np.asarray(low.resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32)
        img = np.clip(img * brightness + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    return folder


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """Random InceptionV3 weights (torch-fidelity's layout) with calibrated batch norms, in a file."""
    from neon_scale.metrics.inception import random_inception_weights

    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    random_inception_weights(path, seed=0)
    return path


@pytest.fixture(scope="session")
def image_sets(tmp_path_factory):
    """Two small PNG folders with different distributions: (generated, reference)."""
    root = tmp_path_factory.mktemp("images")
    return write_image_set(root / "gen", 24, seed=0, brightness=1.0), write_image_set(root / "ref", 20, seed=1,
                                                                                        brightness=0.7)


class UInt8Images(Dataset):
    """A map-style dataset over a uint8 image tensor: torch-fidelity's in-memory input form."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]
