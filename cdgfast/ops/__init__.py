"""Drop-in consolidation ops, registered as `torch.ops.cdgfast.*` (SPEC section 3).

Each family lives in one file: validation, torch.library registration, the CPU composite, autograd,
and the CUDA path that runs the Triton kernels in `cdgfast.kernels`. `dc_predictions` (dc_predictions.py) is
the model forward feeding the DC ops: plain PyTorch around the user's UNet, not a registered op.
"""
from .bregman import bregman_distill, hutchinson_metric
from .dc import dc_cross_entropy, dc_errors, dc_scores
from .dc_predictions import dc_predictions
from .lora import lora_overlap_penalty
from .penalties import diag_penalty, flat_parameters, lowrank_penalty, rank1_penalty

__all__ = [
    "dc_errors", "dc_scores", "dc_cross_entropy", "dc_predictions",
    "rank1_penalty", "lowrank_penalty", "diag_penalty", "flat_parameters",
    "bregman_distill", "hutchinson_metric",
    "lora_overlap_penalty",
]
