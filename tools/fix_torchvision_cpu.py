"""Make `import torchvision` (hence torch-fidelity) work with the CPU build of torch.

The torchvision 0.28.0 wheel on PyPI is a CUDA build. Under a CPU torch its compiled ops fail to
load (silently), and `torchvision/_meta_registrations.py` then registers fake kernels for
`torchvision::nms` / `torchvision::qnms` unconditionally, so `import torchvision` raises
"operator torchvision::nms does not exist". This script guards those two registrations with
`torchvision.extension._has_ops()`, as every other registration in that file already is.
Idempotent: a second run changes nothing. Usage: python tools/fix_torchvision_cpu.py
"""
import importlib.util
import pathlib
import sys

MARKER = "# neon_scale: guarded for CPU torch"
OLD = '@torch.library.register_fake("torchvision::'
NEW = '@_register_fake_if_ops("torchvision::'
HELPER = f'''
{MARKER}
def _register_fake_if_ops(name):
    if torchvision.extension._has_ops():
        return torch.library.register_fake(name)
    return lambda fn: fn

'''


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("torchvision is not installed: nothing to fix")
        return 0
    path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if MARKER in text:
        return 0
    if OLD not in text:
        print(f"{path}: no unguarded register_fake found: nothing to fix")
        return 0
    anchor = "@functools.lru_cache(None)"
    if anchor not in text:
        print(f"{path}: unexpected layout (no '{anchor}'); cannot patch", file=sys.stderr)
        return 1
    text = text.replace(OLD, NEW).replace(anchor, HELPER.lstrip("\n") + anchor, 1)
    tmp = path.with_suffix(".py.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    print(f"patched {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
