#!/usr/bin/env bash
# The one command that checks every CUDA path on a GPU machine without network, from the
# repository root (bench/gpu_check.py says what it checks):
#
#   bash tools/gpu_check.sh [gpu_check.py options, e.g. --quick or --only merge,fid]
#
# 1. installs the wheels that tools/gpu_wheels.sh put in .whl/ (DeepSpeed, torch-fidelity,
#    webdataset and their missing dependencies) into $SITE (default /tmp/site);
# 2. builds neon_scale with its csrc op (C++ and CUDA, for sm_90: H100/H200) against this
#    machine's torch and installs it there too; if that build fails, the Python package is
#    copied in without the op (the check then reports "csrc op not built" and the rest runs);
# 3. runs bench/gpu_check.py: the JSON and the whole log (install included) go to $OUT
#    (default /tmp/neon-gpu-check): gpu_check.json, gpu_check.log.
# About 1 minute of install and build, then 2-4 minutes of checks on one H100/H200.
# Exit status: gpu_check.py's (0 all pass or skip, 1 some fail or error, 2 bad arguments).
set -eo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/neon-gpu-check}
SITE=${SITE:-/tmp/site}
PY=${PY:-python3}
mkdir -p "$OUT" "$SITE"

install() {
    local t0=$SECONDS
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "error: no wheels in .whl/: run tools/gpu_wheels.sh where PyPI is reachable, and carry .whl"
        return 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || return 1
    echo "wheels installed in $SITE ($((SECONDS - t0)) s)"
    # setup.py maps kernels/ to neon_scale.kernels and builds neon_scale._fid_ops (a CUDAExtension when
    # torch has CUDA and nvcc is found); no build isolation: the build must see this machine's torch.
    if MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} "$PY" -m pip install -q \
            --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade --target "$SITE" .; then
        echo "neon_scale built and installed in $SITE ($((SECONDS - t0)) s)"
    else
        echo "warning: building neon_scale's csrc op failed (above); installing the package without it"
        rm -rf "$SITE/neon_scale"
        cp -r neon_scale "$SITE/neon_scale"
        rm -rf "$SITE/neon_scale/kernels" "$SITE"/neon_scale/_fid_ops*.so
        cp -r kernels "$SITE/neon_scale/kernels" || return 1
    fi
}

main() {
    install || return
    # the stack as the installed neon_scale sees it (from /tmp: not the source tree's package, which has no op)
    (cd /tmp && "$PY" -m neon_scale.cli doctor) || true
    PYTHONUNBUFFERED=1 "$PY" bench/gpu_check.py --out "$OUT/gpu_check.json" "$@"
}

export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
main "$@" 2>&1 | tee "$OUT/gpu_check.log"
