"""Installing over an existing torch (README "On a GPU cluster"), `neon --version`, `neon doctor`,
the torchvision fix, and the Slurm scripts' choice of environment.

The whole install (tools/install_cluster.sh into a fresh venv holding only torch 2.13.0) needs a
package index, a few minutes and ~1.5 GB: it is marked slow and skips, saying why, when no index
answers. Everything else runs offline in seconds: the metadata the build declares, the files that
must not name a torch, the message of a build that cannot see torch, and the CLI.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

import neon_scale
from neon_scale import doctor

from .conftest import ROOT, neon

TORCH_PINNED = {"torch", "torchvision", "triton"}  # what an install must never replace on a cluster
TV_FIX = ROOT / "tools" / "fix_torchvision_cpu.py"
SBATCH = {name: ROOT / "launchers" / "slurm" / f"{name}.sbatch" for name in ("neon", "eval", "fid")}


def _name(requirement: str) -> str:
    """The normalised project name of a requirement line ("Torch_Fidelity==0.4" -> "torch-fidelity")."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)).lower()


def _source_copy(dest: pathlib.Path) -> pathlib.Path:
    """The repository's files (no .git, .venv, runs or built op) under dest: builds write there, not here."""
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "build", ".whl", "__pycache__", ".pytest_cache",
                                    "*.so", "*.egg-info", "logs")
    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)
    return dest


# ------------------------------------------------------------------ what the build declares (offline)

def test_pyproject_builds_with_setuptools_and_does_not_ask_for_a_torch():
    """torch as a build requirement would make pip fetch another torch to build against."""
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    assert {_name(r) for r in build["requires"]} == {"setuptools", "wheel"}
    assert "--no-build-isolation" in (ROOT / "pyproject.toml").read_text()


def test_requirements_cuda_leave_torch_torchvision_triton_alone():
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements-cuda.txt").read_text().splitlines()]
    names = {_name(ln) for ln in lines if ln}
    assert not any(ln.startswith("-") for ln in lines if ln), "no options (index URLs, -c, -r) in the file"
    assert not names & TORCH_PINNED, names & TORCH_PINNED
    assert "torch-fidelity" not in names  # installed --no-deps: its torchvision requirement would pull a torch
    runtime = {_name(r) for r in (ROOT / "requirements.txt").read_text().splitlines() if r.strip()
               and not r.startswith("#")} - TORCH_PINNED - {"torch-fidelity", "pytest"}
    assert runtime <= names, f"in requirements.txt, missing from requirements-cuda.txt: {runtime - names}"
    script = (ROOT / "tools" / "install_cluster.sh").read_text()
    assert "--no-deps torch-fidelity==" in script and "--no-build-isolation --no-deps -e ." in script


def test_metadata_requires_no_pinned_torch_and_no_torchvision_or_triton(tmp_path):
    """The wheel metadata the build declares (setuptools' PEP 517 hook in a copy of the sources, with this
    venv's torch visible as --no-build-isolation has it): torch unpinned, nothing that could pull one."""
    src = _source_copy(tmp_path / "src")
    out = tmp_path / "meta"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                           "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))", str(out)],
                          cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = (out / proc.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    assert re.search(r"^Version: (.+)$", meta, re.M).group(1) == neon_scale.__version__
    requires = [r for r in re.findall(r"^Requires-Dist: (.+)$", meta, re.M) if "extra ==" not in r]
    names = {_name(r) for r in requires}
    assert "torch" in names and not names & {"torchvision", "triton", "torch-fidelity"}, requires
    torch_req = next(r for r in requires if _name(r) == "torch")
    assert torch_req.strip() == "torch", f"torch must stay unpinned (any installed torch satisfies it): {torch_req}"


def test_a_build_that_cannot_import_torch_names_the_command(tmp_path):
    """What `pip install -e .` with build isolation shows: setup.py's one message, not a traceback."""
    src = _source_copy(tmp_path / "src")
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "pip install --no-build-isolation --no-deps -e ." in proc.stderr
    assert "tools/install_cluster.sh" in proc.stderr


def test_the_version_has_one_source():
    assert md.version("neon_scale") == neon_scale.__version__
    assert "version=VERSION" in (ROOT / "setup.py").read_text()


# ------------------------------------------------------------------ neon --version, neon doctor

def test_neon_version():
    proc = neon("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"neon_scale {neon_scale.__version__}"


@pytest.mark.slow  # imports the whole stack, DeepSpeed included (10-15 s here)
def test_neon_doctor_reports_the_stack():
    import torch

    proc = neon("doctor", env_extra={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    items = dict(re.match(r"(\S+)\s+(.*)", ln).groups() for ln in lines)
    for name in ("neon_scale", "python", "torch", "torchvision", "triton", "deepspeed", "torch-fidelity", "webdataset",
                 "safetensors", "neon_scale._fid_ops", "ninja", "nvcc", "summary"):
        assert name in items, proc.stdout
    assert items["torch"].startswith(f"{torch.__version__} (")
    assert ("CPU build" in items["torch"]) == (torch.version.cuda is None)
    assert "CUDA available: " in items["torch"]
    assert "DS_ACCELERATOR" in items["deepspeed"]
    assert items["neon_scale._fid_ops"].startswith("built, ")  # make install builds it
    assert lines[-1].startswith("summary")


def test_doctor_reports_missing_and_broken_pieces(monkeypatch):
    """A missing package, one that does not import and a missing op are lines, not exceptions."""
    real_version, real_import = doctor._version, doctor._import

    def version(dist):
        return None if dist in ("webdataset", "diffusers") else real_version(dist)

    def imp(module):
        if module in ("torch_fidelity", "neon_scale._fid_ops", "deepspeed.accelerator"):
            return None, "ImportError: simulated"
        return real_import(module)

    monkeypatch.setattr(doctor, "_version", version)
    monkeypatch.setattr(doctor, "_import", imp)
    items = {i.name: i for i in doctor.collect()}
    assert items["webdataset"].problem and items["webdataset"].text.startswith("not installed")
    assert not items["diffusers"].problem  # optional: reported, not counted
    assert items["torch-fidelity"].problem and "fails: ImportError: simulated" in items["torch-fidelity"].text
    ops = items["neon_scale._fid_ops"]
    assert ops.problem and "pip install --no-build-isolation" in ops.text
    assert items["deepspeed"].problem
    summary = doctor.report(list(items.values())).splitlines()[-1]
    assert re.match(r"summary\s+4 problem\(s\): ", summary), summary


# ------------------------------------------------------------------ the torchvision fix

def _unguarded(text: str) -> str:
    """The stock torchvision file back from a guarded one (the fix's inverse)."""
    helper = fix_module().HELPER.lstrip("\n")
    return text.replace(helper, "").replace(fix_module().NEW, fix_module().OLD)


def fix_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fix_torchvision_cpu", TV_FIX)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_torchvision_fix_patches_only_the_stock_file():
    fix = fix_module()
    stock = ("import functools\nimport torch\nimport torchvision\n\n@functools.lru_cache(None)\n"
             "def get_meta_lib():\n    pass\n\n@torch.library.register_fake(\"torchvision::nms\")\n"
             "def meta_nms(dets, scores, t):\n    pass\n")
    guarded = fix.patch_text(stock)
    assert guarded and fix.MARKER in guarded and fix.OLD not in guarded
    assert _unguarded(guarded) == stock
    assert fix.patch_text(guarded) is None  # idempotent
    assert fix.patch_text("import torch\n") is None  # another layout: left alone


def test_torchvision_fix_is_a_no_op_here():
    """This venv's torchvision is already guarded by `make install` (CPU torch), or needs nothing."""
    proc = subprocess.run([sys.executable, str(TV_FIX), "--check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stdout, proc.stdout


# ------------------------------------------------------------------ the Slurm scripts' environment

def _fake_job(tmp_path, python_ok: bool):
    """A submit dir (the repository's launchers/) and a bin/ with a `deepspeed` and an `srun` that print
    their arguments, a failing `nvidia-smi`, and a `python` that imports neon_scale or cannot."""
    submit = tmp_path / "repo"
    submit.mkdir()
    (submit / "launchers").symlink_to(ROOT / "launchers")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {"deepspeed": 'echo RAN deepspeed "$@"', "srun": 'echo RAN srun "$@"', "nvidia-smi": "exit 9",
               "python": f'exec "{sys.executable}" "$@"' if python_ok else "echo broken python >&2; exit 1"}
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin", "HOME": str(tmp_path), "SLURM_SUBMIT_DIR": str(submit),
           "SLURM_JOB_NODELIST": "gpu01", "SLURM_GPUS_ON_NODE": "1", "SLURM_JOB_ID": "4242"}
    return env


def _sbatch(name, env):
    return subprocess.run(["bash", str(SBATCH[name]), "--set", "train.lr=1e-5"], env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("name", sorted(SBATCH))
def test_sbatch_without_neon_scale_is_one_line(tmp_path, name):
    proc = _sbatch(name, _fake_job(tmp_path, python_ok=False))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "RAN" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "cannot import neon_scale" in lines[0], proc.stderr
    assert "NEON_ENV" in lines[0]


@pytest.mark.parametrize("kind", ["venv", "prefix"])
def test_sbatch_uses_neon_env(tmp_path, kind):
    """NEON_ENV=a venv (bin/activate sourced) or any prefix (bin/ first on PATH) wins over PATH's python."""
    env = _fake_job(tmp_path, python_ok=False)
    prefix = tmp_path / "env"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (prefix / "bin" / "python").chmod(0o755)
    if kind == "venv":
        (prefix / "bin" / "activate").write_text(f'export PATH="{prefix}/bin:$PATH"\nexport ACTIVATED=yes\n')
    proc = _sbatch("eval", dict(env, NEON_ENV=str(prefix)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RAN deepspeed" in proc.stdout and "train.lr=1e-5" in proc.stdout


def test_sbatch_with_a_neon_env_that_is_not_one(tmp_path):
    env = _fake_job(tmp_path, python_ok=True)
    proc = _sbatch("neon", dict(env, NEON_ENV=str(tmp_path / "nowhere")))
    assert proc.returncode == 2 and "RAN" not in proc.stdout
    assert proc.stderr.strip().splitlines() == [
        f"error: NEON_ENV={tmp_path / 'nowhere'} is not a Python environment (no bin/activate, no bin/python)"]


def test_sbatch_scripts_name_no_venv():
    for path in [*SBATCH.values(), ROOT / "launchers" / "slurm" / "environment.sh"]:
        code = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
        assert not any(".venv" in ln for ln in code), path


# ------------------------------------------------------------------ the whole install, over a torch

def _index_reachable(python: str, tmp: pathlib.Path) -> str | None:
    """None when pip can fetch a small pinned requirement now, else why not."""
    proc = subprocess.run([python, "-m", "pip", "download", "-q", "--no-deps", "--timeout", "15", "--retries", "0",
                           "-d", str(tmp), "webdataset==1.0.2"], capture_output=True, text=True, timeout=120)
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["pip download failed"])[-1]


@pytest.mark.slow  # a fresh venv, torch 2.13.0, then the cluster install from a package index: 3-6 min, ~1.5 GB
def test_cluster_install_over_an_existing_torch(tmp_path):
    """README "On a GPU cluster" in a fresh venv that holds only torch 2.13.0 (the CPU wheel here): the
    install leaves torch as it was and pulls no torchvision, triton or nvidia-* package; the csrc op is
    built against that torch; `neon --version` and `neon doctor` run."""
    why = _index_reachable(sys.executable, tmp_path / "probe")
    if why:
        pytest.skip(f"no package index reachable ({why}): the cluster install needs one")
    venv = tmp_path / "venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        py = str(venv / "bin" / "python")
        proc = subprocess.run([py, "-m", "pip", "install", "-q", "torch==2.13.0"], capture_output=True, text=True,
                              timeout=1200)
        if proc.returncode != 0:
            pytest.skip(f"torch 2.13.0 could not be installed into a fresh venv: {proc.stderr.strip()[-500:]}")

        def freeze():
            out = subprocess.run([py, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                                 check=True).stdout
            return {_name(ln): ln.split("==", 1)[1] for ln in out.splitlines() if "==" in ln}

        torch_before = freeze()["torch"]
        src = _source_copy(tmp_path / "src")
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        env.update(PYTHON=py, PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="1")
        proc = subprocess.run(["bash", "tools/install_cluster.sh"], cwd=src, env=env, capture_output=True, text=True,
                              timeout=1800)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        after = freeze()
        assert after["torch"] == torch_before
        assert not {"torchvision", "triton"} & set(after) and not [p for p in after if p.startswith("nvidia-")], after
        assert after["neon-scale"] == neon_scale.__version__ and after["torch-fidelity"] == "0.4.0"

        out = subprocess.run([py, "-c", "import neon_scale._fid_ops as o; print(o.__file__, o.with_cuda)"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and str(src) in out.stdout, out.stdout + out.stderr
        version = subprocess.run([str(venv / "bin" / "neon"), "--version"], cwd=tmp_path, env=env, capture_output=True,
                                 text=True, timeout=120)
        assert version.stdout.strip() == f"neon_scale {neon_scale.__version__}", version.stderr
        doc = subprocess.run([str(venv / "bin" / "neon"), "doctor"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
        assert doc.returncode == 0, doc.stderr
        items = dict(re.match(r"(\S+)\s+(.*)", ln).groups() for ln in doc.stdout.strip().splitlines())
        assert items["torch"].startswith(f"{torch_before} (CPU build)")
        assert items["neon_scale._fid_ops"].startswith("built, C++ only")
        assert items["torchvision"].startswith("not installed")  # the user's to bring: reported, not pulled
    finally:
        shutil.rmtree(venv, ignore_errors=True)
