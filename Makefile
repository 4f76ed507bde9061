# Set-up and entry points. `make demo` and `make test` install what they need first.
SHELL := bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pip's configured extra indexes may point at folders that do not exist: drop that noise only.
PIP := $(PY) -m pip install -q --disable-pip-version-check
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
# The venv's bin first: its ninja must build extensions, not the system one.
RUN := PATH="$(CURDIR)/$(VENV)/bin:$$PATH" DS_ACCELERATOR=cpu

.PHONY: install install-cluster demo digits bench-digits bench-selection bench-kills bench-matrix bench-gpu-check bench-scale bench-official test test-fast tiny-assets clean-runs

install: $(STAMP)

$(STAMP): setup.py pyproject.toml requirements.txt constraints.txt tools/fix_torchvision_cpu.py csrc/fid_preprocess.cpp csrc/fid_preprocess_cuda.cu csrc/fid_preprocess.h
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0 $(QUIET)
	$(PIP) -c constraints.txt -r requirements.txt $(QUIET)
	$(PIP) -c constraints.txt --no-build-isolation --no-deps -e . $(QUIET)
	$(PY) tools/fix_torchvision_cpu.py
	$(RUN) $(PY) -c "import torch, deepspeed, triton, webdataset, safetensors, rich, torch_fidelity, neon_scale.kernels, neon_scale._fid_ops, diffusers, sklearn, tensorboard"
	touch $(STAMP)

# neon_scale into the active Python environment (or PYTHON=/path/to/env/bin/python) over the torch,
# torchvision and triton it already has, changing none of them: a GPU cluster's CUDA torch
# (README "On a GPU cluster"). Not the CPU .venv: `make install` is that.
install-cluster:
	bash tools/install_cluster.sh

demo: install
	$(RUN) $(VENV)/bin/neon run --config configs/toy2d.yaml

digits: install
	$(RUN) $(VENV)/bin/neon run --config configs/digits_dit.yaml

# 3 base seeds of the digits run and the real-data control (about 45 min on 2 cores; not part of `make test`)
bench-digits: install
	$(RUN) $(PY) bench/digits.py --seeds 0,1,2
	$(RUN) $(PY) bench/digits_control.py runs/digits_dit-seed0

# race vs early_stop vs grid on the toy and the digits, 5 eval seeds each, and neon diagnose beside
# the picks (about 1 h on 2 cores; 1 thread per process: 2 threads on a shared machine ran 10-40x slower)
bench-selection: install
	OMP_NUM_THREADS=1 $(RUN) $(PY) bench/selection.py
	OMP_NUM_THREADS=1 $(RUN) $(PY) bench/calibration.py --config configs/digits_dit.yaml \
		--run runs/bench-selection/digits_dit/base --out bench/calibration-digits_dit.json

# a toy run killed at every rename and every unlink (strace), each resumed and compared with an
# uninterrupted run, and consolidate --overwrite at every point (about 100 kill points, 30 min on
# 2 cores; `make test` takes 2 points of the run and consolidate's renames)
bench-kills: install
	NEON_KILL_POINTS=all $(RUN) $(PY) -m pytest -q tests/test_kills.py -k "run_killed or consolidate"

# every CUDA path checked against its reference and timed (bench/gpu_check.py); with this CPU venv
# it is the reference mode: the same checks at tiny sizes, Triton interpreted (under 2 min on 2
# cores). On a GPU machine: bash tools/gpu_check.sh (README "Checking the CUDA paths")
bench-gpu-check: install
	OMP_NUM_THREADS=1 $(RUN) $(PY) bench/gpu_check.py --out runs/gpu_check.json

# every stage at the real sizes (DiT-XL/2, xAR-L, xAR-H with random weights; ZeRO-3 bf16 on 2 ranks): wall time and
# peak RSS per rank beside the ZeRO formula and the merge bound (bench/scale.py --help; ~25 min on 2 cores, a quiet
# machine with 24 GiB, where xAR-H is skipped with the memory it would need; glibc's heap set to give freed
# tensors back; resumable in runs/bench-scale-full; not part of `make test`). BENCH_SCALE_ARGS="--scale small"
# checks the bench itself in minutes.
bench-scale: install
	MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 $(RUN) $(PY) bench/scale.py --models dit_xl2,xar_l,xar_h --out runs/bench-scale.json $(BENCH_SCALE_ARGS)

# our DiT / xAR samplers and training steps against the official code on the same small weights
# (bench/official.py --help; about 7 min on 2 cores). Needs your checkouts of facebookresearch/DiT and
# OliverRensu/xAR and a folder with timm (pip install --no-deps --target DIR timm); none of it is part
# of this project: make bench-official DIT_REPO=/path/DiT XAR_REPO=/path/xAR OFFICIAL_DEPS=/path/deps
bench-official: install
	OMP_NUM_THREADS=1 PYTHONPATH="$(OFFICIAL_DEPS)" $(RUN) $(PY) bench/official.py --dit-repo "$(DIT_REPO)" \
		--xar-repo "$(XAR_REPO)" --out runs/bench-official.json $(BENCH_OFFICIAL_ARGS)

tiny-assets: install
	$(RUN) $(PY) tools/make_tiny_assets.py runs/tiny-assets

# every test but the rest of the configuration matrices (their representative cases run here)
test: install
	$(RUN) $(PY) -m pytest -q -m "not matrix" tests

# the fast inner loop: the unit tests of every module, without whole runs through the launcher,
# multi-process runs or anything else over a few seconds (under 2 min on 2 cores)
test-fast: install
	$(RUN) $(PY) -m pytest -q -m "not slow and not matrix" tests

# the whole matrices: train kill/resume (ZeRO 2/3 x fp32/bf16), resume on another world size and
# the reshard (ZeRO 1/2/3 x fp32/bf16 x 2->1/1->2); about 10 min on 2 cores
bench-matrix: install
	$(RUN) $(PY) -m pytest -q -m matrix tests

clean-runs:
	rm -rf runs
