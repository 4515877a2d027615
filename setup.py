"""cdgfast: a consolidation engine for continual learning of diffusion models.

The Triton sources live inside the package (`cdgfast/kernels/`), never in a top-level folder `kernels/`:
transformers imports Hugging Face's `kernels`, which such a folder would shadow from the checkout.
"""
import platform
import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "cdgfast" / "__init__.py").read_text()).group(1)

packages = find_packages(include=["cdgfast", "cdgfast.*"]) + ["cdgfast.csrc"]

install_requires = [
    "torch>=2.4",
    "diffusers>=0.30",
    "scikit-learn>=1.3",
    "numpy>=1.24",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    "peft>=0.10",
    "safetensors>=0.4",  # checkpoints, method state and the shipped FID classifiers, without pickle
]
# Triton ships wheels for Linux x86_64 only; elsewhere the CPU path is used.
if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
    install_requires.append("triton>=3.0")

setup(
    name="cdgfast",
    version=VERSION,
    description="Fused consolidation ops and benchmark drivers for continual learning of diffusion models",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=packages,
    package_dir={"cdgfast.csrc": "csrc"},
    package_data={"cdgfast.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h"], "cdgfast": ["data/assets/*.safetensors"]},
    include_package_data=True,
    install_requires=install_requires,
    extras_require={
        # accelerate: tests/test_accelerate.py runs examples/accelerate_loop.py on two processes
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "ruff>=0.5", "accelerate>=0.26",
                 "torchmetrics>=1.0"],
        "accelerate": ["accelerate>=0.26"],
        "cuda": ["cupy-cuda12x"],
        # torchmetrics: the reference KID and pairwise cosine the personalization metrics are checked against
        "text": ["transformers>=4.30", "torchmetrics>=1.0"],
        "vision": ["torchvision"],
        # the FID Inception (TF-ported weights) of torch-fidelity, the network torchmetrics' FID wraps; pulls
        # torchvision, which must match the installed torch (pip install --no-deps to keep a CPU torch)
        "fid": ["torch-fidelity>=0.3"],
        # benchmark peers (benchmarks/bench_fisher.py). backpack-for-pytorch depends on torchvision, whose
        # latest release pins a newer torch: install these with `pip install --no-deps` (BENCHMARKS.md) so that
        # the torch build in place is never replaced; opacus needs only torch / numpy / scipy / opt_einsum.
        "bench": ["opacus==1.6.0", "backpack-for-pytorch==1.7.1", "einops==0.8.2", "unfoldNd==0.2.3",
                  "opt_einsum==3.4.0", "scipy"],
    },
    entry_points={"console_scripts": ["cdgfast-train=cdgfast.train.__main__:main"]},
)
