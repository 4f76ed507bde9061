"""Make `import torchvision` (hence torch-fidelity) work when a CPU build of torch meets a CUDA build
of torchvision; a no-op, saying so, in every other case.

The torchvision 0.28.0 wheel on PyPI is a CUDA build. Under a CPU torch its compiled ops fail to
load (silently), and `torchvision/_meta_registrations.py` then registers fake kernels for
`torchvision::nms` / `torchvision::qnms` unconditionally, so `import torchvision` raises
"operator torchvision::nms does not exist". This script guards those two registrations with
`torchvision.extension._has_ops()`, as every other registration in that file already is.

It patches only when all of these hold: torch is a CPU build (torch.version.cuda is None),
torchvision is a CUDA build (its version.py says `+cu...`), and `import torchvision` fails (tried
in a fresh process); then it checks that the import works. A CUDA torch (a GPU cluster), a CPU
torchvision, a torchvision that imports, or one already patched is left untouched.
Idempotent. Usage: python tools/fix_torchvision_cpu.py [--check]
  --check: say what would be done, change nothing (exit 0 either way).
"""
from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys

MARKER = "# neon_scale: guarded for CPU torch"
OLD = '@torch.library.register_fake("torchvision::'
NEW = '@_register_fake_if_ops("torchvision::'
ANCHOR = "@functools.lru_cache(None)"
HELPER = f'''
{MARKER}
def _register_fake_if_ops(name):
    if torchvision.extension._has_ops():
        return torch.library.register_fake(name)
    return lambda fn: fn

'''


def patch_text(text: str) -> str | None:
    """The guarded file, or None when `text` has no unguarded registration or an unknown layout."""
    if MARKER in text or OLD not in text or ANCHOR not in text:
        return None
    return text.replace(OLD, NEW).replace(ANCHOR, HELPER.lstrip("\n") + ANCHOR, 1)


def _import_error() -> str | None:
    """None if `import torchvision` works in a fresh process, else the error's last line."""
    proc = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit status {proc.returncode}"


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("fix_torchvision_cpu: torchvision is not installed: nothing to do")
        return 0
    root = pathlib.Path(spec.origin).parent
    path = root / "_meta_registrations.py"
    try:
        import torch
    except ImportError as e:
        print(f"fix_torchvision_cpu: torch does not import ({e}): nothing to do")
        return 0
    if torch.version.cuda is not None:
        print(f"fix_torchvision_cpu: torch {torch.__version__} is a CUDA build: nothing to do")
        return 0
    version_py = root / "version.py"
    tv_version = re.search(r"^__version__ = '([^']+)'", version_py.read_text(), re.M) if version_py.exists() else None
    tv_version = tv_version.group(1) if tv_version else "?"
    if "+cu" not in tv_version:
        print(f"fix_torchvision_cpu: torchvision {tv_version} is not a CUDA build: nothing to do")
        return 0
    if path.exists() and MARKER in path.read_text():
        print(f"fix_torchvision_cpu: {path} is already guarded: nothing to do")
        return 0
    err = _import_error()
    if err is None:
        print(f"fix_torchvision_cpu: torchvision {tv_version} imports with torch {torch.__version__}: nothing to do")
        return 0
    new = patch_text(path.read_text()) if path.exists() else None
    if new is None:
        print(f"fix_torchvision_cpu: `import torchvision` fails ({err}) and {path} does not have the layout "
              f"this fix knows (unguarded register_fake before '{ANCHOR}'): cannot fix", file=sys.stderr)
        return 1
    if check:
        print(f"fix_torchvision_cpu: would guard {path} (`import torchvision` fails: {err})")
        return 0
    tmp = path.with_suffix(".py.tmp")
    tmp.write_text(new)
    tmp.replace(path)
    err = _import_error()
    if err is not None:
        print(f"fix_torchvision_cpu: patched {path}, but `import torchvision` still fails: {err}", file=sys.stderr)
        return 1
    print(f"fix_torchvision_cpu: patched {path} (CPU torch {torch.__version__}, torchvision {tv_version}): "
          f"torchvision imports; its compiled ops stay unavailable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
