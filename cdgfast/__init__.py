"""cdgfast: the consolidation engine for continual learning of diffusion models.

Submodules (imported on first use):
    cdgfast.ops       drop-in torch ops (torch.ops.cdgfast.*): DC scores, penalties, Bregman distillation
    cdgfast.fisher    per-sample gradient projections, squared-gradient sums, rank-1 / diagonal Fisher
    cdgfast.methods   consolidation methods as regularisers for any training loop
    cdgfast.data      class-incremental data, replay buffers and pools
    cdgfast.models    UNet presets and LoRA helpers
    cdgfast.metrics   FID (Inception or classifier features) and continual-learning metrics
    cdgfast.train     `python -m cdgfast.train`
    cdgfast.analysis  Fisher geometry without a P x P matrix
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = ("ops", "fisher", "methods", "data", "models", "metrics", "train", "analysis", "kernels", "diffusion", "sampling")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'cdgfast' has no attribute {name!r}")


__all__ = list(_SUBMODULES) + ["__version__"]
