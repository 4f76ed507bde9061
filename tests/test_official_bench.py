"""bench/official.py without the official code or the network: its help names the checkouts it
needs, and a missing or wrong checkout path is one line and status 2 (before anything is built)."""
import os
import subprocess
import sys

import pytest

from .conftest import ROOT, assert_one_line_error

SCRIPT = ROOT / "bench" / "official.py"


def official(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_help_says_what_it_needs():
    proc = official("--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for needle in ("--dit-repo PATH", "--xar-repo PATH", "timm", "github.com/facebookresearch/DiT",
                   "github.com/OliverRensu/xAR", "git clone", "pip install"):
        assert needle in text, needle


@pytest.mark.parametrize("args, needle", [
    (["--dit-repo", "/nonexistent/DiT", "--xar-repo", "/nonexistent/xAR"], "/nonexistent/DiT"),
    (["--cases", "xar-train", "--xar-repo", "/nonexistent/xAR"], "/nonexistent/xAR"),
    (["--cases", "dit-sample"], "--dit-repo"),
    (["--cases", "dit-sample,nope", "--dit-repo", "/nonexistent/DiT"], "'nope'"),
])
def test_a_missing_checkout_is_one_line(tmp_path, args, needle):
    out = tmp_path / "x.json"
    proc = official(*args, "--out", str(out))
    assert_one_line_error(proc, needle, exit_code=2, warnings_ok=False)
    assert not out.exists()


def test_a_folder_that_is_not_the_checkout_is_one_line(tmp_path):
    (tmp_path / "DiT").mkdir()
    (tmp_path / "xAR" / "models").mkdir(parents=True)
    (tmp_path / "xAR" / "models" / "xar.py").write_text("")
    proc = official("--cases", "dit-train", "--dit-repo", str(tmp_path / "DiT"), "--out", str(tmp_path / "x.json"))
    assert_one_line_error(proc, str(tmp_path / "DiT"), "models.py", exit_code=2, warnings_ok=False)
    proc = official("--cases", "xar-sample", "--xar-repo", str(tmp_path / "xAR"), "--out", str(tmp_path / "x.json"))
    assert_one_line_error(proc, str(tmp_path / "xAR"), "models/sampler.py", exit_code=2, warnings_ok=False)
