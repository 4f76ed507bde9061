#!/usr/bin/env bash
# neon_scale into an environment that already has torch (on a GPU cluster: your CUDA build of torch,
# with its torchvision and triton), without changing torch, torchvision or triton:
#
#   bash tools/install_cluster.sh                       # the `python` on PATH (the active environment)
#   PYTHON=/path/to/env/bin/python bash tools/install_cluster.sh    # another one (= make install-cluster)
#
# From the repository root (or anywhere: it goes there). The steps, each a plain pip command:
# 1. requirements-cuda.txt (DeepSpeed, webdataset, safetensors, ...; no torch/torchvision/triton);
# 2. torch-fidelity==0.4.0 with --no-deps (its torchvision requirement must not pull a torch);
# 3. neon_scale itself: `pip install --no-build-isolation --no-deps -e .`, which compiles the csrc op
#    against this torch (C++, and CUDA when torch has CUDA and nvcc is found: set CUDA_HOME, and
#    TORCH_CUDA_ARCH_LIST, e.g. "8.0;9.0", when building on a node without GPUs);
# 4. tools/fix_torchvision_cpu.py (does something only for a CPU torch with a CUDA torchvision);
# 5. `neon doctor`: one line per piece of the stack.
# The versions of torch, torchvision and triton found before step 1 are passed to every pip step as
# constraints, so pip stops with a conflict rather than replace them.
# Needs a package index (PyPI, or your mirror: pip's own configuration applies).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3 || true)}
if [[ -z "$PY" ]] || ! command -v "$PY" >/dev/null; then
    echo "error: no python on PATH: activate the environment (or set PYTHON)" >&2
    exit 2
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "error: $("$PY" -c 'import sys; print(sys.executable)') has no torch: install your torch (and its" \
         "torchvision) first; this script never installs one" >&2
    exit 2
fi

pins=$(mktemp "${TMPDIR:-/tmp}/neon-installed-torch.XXXXXX")
trap 'rm -f "$pins"' EXIT
"$PY" - >"$pins" <<'EOF'
import importlib.metadata as md
for name in ("torch", "torchvision", "triton"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
EOF
echo "keeping: $(tr '\n' ' ' <"$pins")"

PIP=("$PY" -m pip install --disable-pip-version-check -c "$pins")
"${PIP[@]}" -r requirements-cuda.txt
"${PIP[@]}" --no-deps torch-fidelity==0.4.0
"${PIP[@]}" --no-build-isolation --no-deps -e .
"$PY" tools/fix_torchvision_cpu.py
"$PY" -m neon_scale.cli doctor
