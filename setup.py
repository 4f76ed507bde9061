"""Install neon_scale; `kernels/` is installed as `neon_scale.kernels`.

The C++/CUDA extension in `csrc/` arrives with the FID issue; until then nothing is compiled here.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["neon_scale", "neon_scale.*"]) + ["neon_scale.kernels"]

setup(
    name="neon_scale",
    version="0.1.0",
    description="Neon (negative extrapolation from self-training) for large image generators",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"neon_scale.kernels": "kernels"},
    install_requires=[
        "torch",
        "deepspeed",
        "triton",
        "webdataset",
        "safetensors",
        "rich",
        "ninja",
        "torch-fidelity",
        "pyyaml",
        "numpy",
        "matplotlib",
        "pillow",
    ],
    entry_points={"console_scripts": ["neon=neon_scale.cli:main"]},
)
