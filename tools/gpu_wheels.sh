#!/usr/bin/env bash
# Wheels for a GPU machine that has torch, triton, numpy, scipy, pillow, torchvision, pyyaml, rich,
# safetensors, ninja, psutil, py-cpuinfo, msgpack, einops, tqdm, packaging (CPython 3.12, x86-64)
# but no network: the pure-Python packages neon_scale needs that such a machine lacks, plus
# pydantic-core (binary), into .whl/ at the repository root. Run here (with PyPI), then carry .whl
# to the GPU machine, where tools/gpu_check.sh installs them with --no-index.
#
#   bash tools/gpu_wheels.sh            # .whl/ holds about 10 MB afterwards
#
# Versions: the pins of requirements.txt (deepspeed, webdataset, torch-fidelity) and the versions
# this project's .venv resolved for their dependencies. .whl/ is kept out of git by
# .git/info/exclude (a local ignore, not .gitignore: the folder is a per-machine artefact).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEST=.whl
mkdir -p "$DEST" .git/info
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude

# pip's configured extra indexes may point at folders that do not exist: drop that noise only.
quiet() {
    "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

pin() {  # the version of $1 in requirements.txt
    sed -n "s/^$1==\([^ ]*\).*/\1/p" requirements.txt
}
DEEPSPEED=$(pin deepspeed)
WEBDATASET=$(pin webdataset)
FIDELITY=$(pin torch-fidelity)

# Pure-Python wheels (any platform). pydantic pins pydantic-core exactly; typing-extensions is
# there on the GPU machine but pydantic 2.14 needs >= 4.16, so it travels too.
PURE=(
    "webdataset==$WEBDATASET" braceexpand==0.1.7
    "torch-fidelity==$FIDELITY"
    hjson==3.1.0 pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
)
quiet "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$DEST" "${PURE[@]}"

# pydantic-core is compiled: the CPython 3.12 manylinux x86-64 build.
quiet "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" \
    pydantic-core==2.50.5

# DeepSpeed is an sdist: build a wheel without its C++/CUDA ops (they are JIT-built when used;
# the trainer uses none of them: torch's AdamW, no shared-memory op on one rank).
if ! ls "$DEST"/deepspeed-"$DEEPSPEED"-*.whl >/dev/null 2>&1; then
    quiet env DS_BUILD_OPS=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$DEST" "deepspeed==$DEEPSPEED"
fi

echo "wheels in $DEST/ ($(du -sh "$DEST" | cut -f1)):"
ls -1 "$DEST"
