"""interpolatron: fused interpolation / extrapolation optimizers for PyTorch.

The pure-Python package (reference backend, optimizers, Triton kernels) always
installs. The C++/CUDA extension is built by the code in ``csrc/`` (see the
environment switches documented in the README).
"""

from setuptools import setup

setup(
    name="interpolatron",
    version="0.1.0",
    description="Interpolatron, Anderson mixing and RNA optimizers with fused Triton and C++/CUDA kernels",
    python_requires=">=3.10",
    packages=["interpolatron", "interpolatron.backends", "interpolatron.optim",
              "interpolatron.triton_kernels"],
    package_dir={"interpolatron.triton_kernels": "triton_kernels"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton"],
        "demo": ["scikit-learn", "matplotlib", "tqdm"],
        "test": ["pytest", "pytest-benchmark", "scipy", "scikit-learn", "matplotlib", "tqdm", "ruff"],
    },
    entry_points={"console_scripts": ["interpolatron = interpolatron.cli:main"]},
)
