"""`neon doctor`: what this environment runs neon_scale with, one line per piece.

Each piece is probed on its own (a missing or broken one is reported, never raised): python, torch
(its build, CUDA, the GPUs), torchvision (its compiled ops), triton, DeepSpeed (DS_ACCELERATOR and
the accelerator it picks), the other requirements, the csrc op neon_scale._fid_ops (built? with
CUDA?), and the tools that build ops (ninja, the C++ compiler, nvcc). The last line counts the
problems: required pieces missing or not importable. Packages are imported by name
(importlib), so this module needs none of them to load.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

from . import __version__

INSTALL = "pip install --no-build-isolation --no-deps -e ."


@dataclass
class Item:
    name: str
    text: str
    problem: bool = False  # a required piece missing or broken: counted on the last line


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _import(module: str):
    """(module, None) or (None, 'ErrorType: message' on one line)."""
    try:
        return importlib.import_module(module), None
    except BaseException as e:  # noqa: BLE001 - a broken package may raise anything, even SystemExit
        if isinstance(e, KeyboardInterrupt):
            raise
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}".rstrip(": ")


def _run_first_line(cmd: list[str], last: bool = False) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"({type(e).__name__})"
    lines = [ln.strip() for ln in (out.stdout or out.stderr).splitlines() if ln.strip()]
    return (lines[-1] if last else lines[0]) if lines else f"(exit status {out.returncode})"


def _package(name: str, dist: str, module: str, required: bool, why: str = "") -> Item:
    """A package: its installed version, and whether it imports."""
    version = _version(dist)
    if version is None:
        return Item(name, f"not installed{f' ({why})' if why else ''}", problem=required)
    _, err = _import(module)
    if err:
        return Item(name, f"{version}, but `import {module}` fails: {err}", problem=required)
    return Item(name, version)


def _torch() -> list[Item]:
    version = _version("torch")
    torch, err = _import("torch")
    if torch is None:
        what = "not installed" if version is None else f"{version}, but `import torch` fails: {err}"
        return [Item("torch", f"{what} (install your torch first: pip never installs one for neon_scale)",
                     problem=True)]
    if torch.version.cuda:
        build = f"CUDA {torch.version.cuda} build"
    elif getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip} build"
    else:
        build = "CPU build"
    try:
        available = torch.cuda.is_available()
        count = torch.cuda.device_count() if available else 0
        names = [torch.cuda.get_device_name(i) for i in range(count)]
    except Exception as e:  # noqa: BLE001 - a driver problem is a finding, not a crash
        return [Item("torch", f"{torch.__version__} ({build}); CUDA check failed: {type(e).__name__}: {e}",
                     problem=True)]
    if available:
        groups = {n: names.count(n) for n in names}
        gpus = ", ".join(f"{c} x {n}" for n, c in groups.items())
        cuda = f"CUDA available: yes, {count} GPU(s): {gpus}"
    else:
        cuda = "CUDA available: no" + (" (no GPU visible, or the driver is missing)" if torch.version.cuda else "")
    return [Item("torch", f"{torch.__version__} ({build}); {cuda}")]


def _torchvision() -> Item:
    version = _version("torchvision")
    if version is None:
        return Item("torchvision", "not installed (torch-fidelity needs it: install the torchvision built for "
                                   "your torch, from the same index)", problem=True)
    tv, err = _import("torchvision")
    if tv is None:
        fix = " (CPU torch: python tools/fix_torchvision_cpu.py)" if "torchvision::" in (err or "") else ""
        return Item("torchvision", f"{version}, but `import torchvision` fails: {err}{fix}", problem=True)
    local = str(getattr(getattr(tv, "version", None), "__version__", "")).partition("+")[2]  # 0.28.0+cu130
    build = f"{local} build" if local else "build not stated"
    try:
        ops = tv.extension._has_ops()
    except Exception:  # noqa: BLE001
        ops = False
    ops_text = "compiled ops load" if ops else \
        "compiled ops do not load (nms, roi_align, image decoding unavailable; torch-fidelity does not need them)"
    return Item("torchvision", f"{version} ({build}); {ops_text}")


def _deepspeed() -> Item:
    env = os.environ.get("DS_ACCELERATOR")
    env_text = f"DS_ACCELERATOR={env}" if env else "DS_ACCELERATOR unset (auto-detected)"
    version = _version("deepspeed")
    if version is None:
        return Item("deepspeed", f"not installed; {env_text}", problem=True)
    acc, err = _import("deepspeed.accelerator")
    if acc is None:
        return Item("deepspeed", f"{version}, but `import deepspeed` fails: {err}; {env_text}", problem=True)
    try:
        name = acc.get_accelerator().device_name()
    except Exception as e:  # noqa: BLE001
        name = f"? ({type(e).__name__}: {e})"
    return Item("deepspeed", f"{version}; accelerator {name}; {env_text}")


def _fid_ops() -> Item:
    ops, err = _import("neon_scale._fid_ops")
    if ops is None:
        return Item("neon_scale._fid_ops", f"not built ({err}): FID pre-processing falls back to pure torch; "
                                           f"build it with `{INSTALL}`", problem=True)
    cuda = "C++ and CUDA" if getattr(ops, "with_cuda", False) else "C++ only (no CUDA path)"
    return Item("neon_scale._fid_ops", f"built, {cuda} ({ops.__file__})")


def _tools() -> list[Item]:
    items = []
    ninja = shutil.which("ninja", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    items.append(Item("ninja", f"{_run_first_line([ninja, '--version'])} ({ninja})" if ninja else
                      "not found (torch builds ops with it: pip install ninja)", problem=ninja is None))
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    items.append(Item("c++", f"{_run_first_line([cxx, '--version'])} ({cxx})" if cxx else
                      "not found (the csrc op and DeepSpeed's ops are compiled with it)"))
    cuda_home = None
    ext, _ = _import("torch.utils.cpp_extension")
    if ext is not None:
        cuda_home = ext.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if nvcc and os.access(nvcc, os.X_OK):
        items.append(Item("nvcc", f"{_run_first_line([nvcc, '--version'], last=True)} ({nvcc})"))
    else:
        torch = sys.modules.get("torch")
        needed = torch is not None and bool(torch.version.cuda)
        items.append(Item("nvcc", "not found" + (" (set CUDA_HOME to build the CUDA op)" if needed else
                                                 " (only a CUDA torch needs it)")))
    return items


def collect() -> list[Item]:
    """Every line of the report, the summary excluded."""
    items = [Item("neon_scale", f"{__version__} ({os.path.dirname(os.path.abspath(__file__))})"),
             Item("python", f"{sys.version.split()[0]} ({sys.executable})")]
    items += _torch()
    items.append(_torchvision())
    items.append(_package("triton", "triton", "triton", required=True,
                          why="neon_scale.kernels imports it; CUDA torch wheels bring the one they need"))
    items.append(_deepspeed())
    for name, dist, module, required, why in [
        ("torch-fidelity", "torch-fidelity", "torch_fidelity", True, "pip install --no-deps torch-fidelity==0.4.0"),
        ("webdataset", "webdataset", "webdataset", True, ""),
        ("safetensors", "safetensors", "safetensors", True, ""),
        ("rich", "rich", "rich", True, ""),
        ("numpy", "numpy", "numpy", True, ""),
        ("pyyaml", "PyYAML", "yaml", True, ""),
        ("tensorboard", "tensorboard", "tensorboard", False, "only run.tensorboard needs it"),
        ("scikit-learn", "scikit-learn", "sklearn", False, "only data.source: digits needs it"),
        ("diffusers", "diffusers", "diffusers", False, "only the Stable Diffusion VAE needs it"),
    ]:
        items.append(_package(name, dist, module, required, why))
    items.append(_fid_ops())
    items += _tools()
    return items


def report(items: list[Item]) -> str:
    width = max(len(i.name) for i in items) + 2
    lines = [f"{i.name:<{width}}{i.text}" for i in items]
    problems = [i.name for i in items if i.problem]
    lines.append(f"{'summary':<{width}}" + (f"{len(problems)} problem(s): {', '.join(problems)}" if problems
                                            else "no problem found"))
    return "\n".join(lines)


def doctor() -> int:
    """Print the report; always 0 (the report is the result, problems included)."""
    print(report(collect()), flush=True)
    return 0
