"""Install neon_scale; `kernels/` is installed as `neon_scale.kernels`.

Also builds the FID pre-processing op `neon_scale._fid_ops` from `csrc/` (see csrc/README.md)
with torch's BuildExtension (ninja): always the C++ CPU path; the CUDA path as well (compiled
with -DWITH_CUDA) when this torch has CUDA and nvcc is found (CUDA_HOME). The op is compiled
against the torch already installed, so install after torch and without build isolation:

    pip install --no-build-isolation --no-deps -e .

(the Makefile's CPU .venv; tools/install_cluster.sh on a GPU cluster, README "On a GPU cluster";
pyproject.toml says why torch is not a build requirement). Without the extension,
neon_scale.metrics.preprocess falls back to pure torch (and warns).
"""
import os
import re
import sys

from setuptools import find_packages, setup

INSTALL = "pip install --no-build-isolation --no-deps -e ."
try:
    import torch
    from torch.utils import cpp_extension
except ImportError as e:  # pip's build isolation (no torch in it), or no torch installed at all
    sys.exit(f"error: neon_scale compiles its csrc op against your installed torch, but this build cannot "
             f"import torch ({e}). Run `{INSTALL}` from the repository root, after installing torch (pip's "
             f"default build isolation hides the installed torch). On a GPU cluster: bash "
             f"tools/install_cluster.sh (README \"On a GPU cluster\").")

# One version: neon_scale/__init__.py's __version__ (`neon --version` prints it).
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "neon_scale", "__init__.py")) as f:
    VERSION = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)

# The ninja next to this interpreter (the venv's) builds the extension, also when pip runs this
# without the venv's bin/ on PATH (as the Makefile's install line does).
_bin = os.path.dirname(sys.executable)
if os.access(os.path.join(_bin, "ninja"), os.X_OK):
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")

packages = find_packages(include=["neon_scale", "neon_scale.*"]) + ["neon_scale.kernels"]

# -ffp-contract=off / --fmad=false: no fused multiply-add, so the float32 rounding matches
# torch-fidelity's op-by-op arithmetic. -fopenmp: at::parallel_for runs on OpenMP in torch's
# CPU builds and is serial without it. The rpath lets `import neon_scale._fid_ops` find
# libc10/libtorch before torch is imported (the module then imports torch itself).
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]
TORCH_LIB = os.path.join(os.path.dirname(torch.__file__), "lib")
LINK_FLAGS = ["-fopenmp", f"-Wl,-rpath,{TORCH_LIB}"]

if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
    fid_ops = cpp_extension.CUDAExtension(
        "neon_scale._fid_ops",
        ["csrc/fid_preprocess.cpp", "csrc/fid_preprocess_cuda.cu"],
        define_macros=[("WITH_CUDA", None)],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3", "--fmad=false"]},
        extra_link_args=LINK_FLAGS,
    )
else:
    if torch.version.cuda is not None:  # pip shows this with -v; `neon doctor` reports the op's build
        print(f"setup.py: torch {torch.__version__} has CUDA {torch.version.cuda} but no CUDA toolkit (nvcc) was "
              "found: building the CPU op only; set CUDA_HOME to build the CUDA one", file=sys.stderr)
    fid_ops = cpp_extension.CppExtension(
        "neon_scale._fid_ops",
        ["csrc/fid_preprocess.cpp"],
        extra_compile_args=CXX_FLAGS,
        extra_link_args=LINK_FLAGS,
    )

setup(
    name="neon_scale",
    version=VERSION,
    description="Neon (negative extrapolation from self-training) for large image generators",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"neon_scale.kernels": "kernels"},
    # Nothing here can replace an installed torch: torch itself is unpinned (any installed one
    # satisfies it), and neither torchvision nor triton is named (torch's CUDA wheels bring their
    # triton; the CPU .venv pins both: requirements.txt + constraints.txt). torch-fidelity is left
    # to the requirements files too: its unpinned torchvision requirement, without a torchvision
    # installed, pulls the newest torchvision and the torch that one pins (requirements-cuda.txt).
    install_requires=[
        "torch",
        "deepspeed",
        "webdataset",
        "safetensors",
        "rich",
        "ninja",
        "pyyaml",
        "numpy",
        "matplotlib",
        "pillow",
        "tqdm",  # torch-fidelity's (installed with --no-deps on a GPU cluster)
        "tensorboard",  # training and sweep curves (neon_scale.tracking)
        "scikit-learn",  # the built-in real data set (data.source: digits)
    ],
    # diffusers: only the Stable Diffusion VAE (DiT) needs it (neon_scale.models.vae.load_sd_vae).
    extras_require={"sd-vae": ["diffusers"]},
    entry_points={"console_scripts": ["neon=neon_scale.cli:main"]},
    ext_modules=[fid_ops],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
