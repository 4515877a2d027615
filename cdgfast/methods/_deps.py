"""The ops / fisher / data / sampling functions the methods build on, in one place. Methods only
call these; they never re-implement their math."""
from __future__ import annotations

import importlib

from cdgfast.data import ClassBalancedBuffer, ReservoirBuffer, generate_replay_pool
from cdgfast.fisher import diag_fisher, online_update, rank1_fisher
from cdgfast.ops import (bregman_distill, dc_cross_entropy, dc_errors, dc_scores, diag_penalty,
                         hutchinson_metric, lora_overlap_penalty, rank1_penalty)
from cdgfast.sampling import ddim_sample

__all__ = ["ClassBalancedBuffer", "ReservoirBuffer", "generate_replay_pool", "diag_fisher", "online_update",
           "rank1_fisher", "bregman_distill", "dc_cross_entropy", "dc_errors", "dc_scores", "diag_penalty",
           "hutchinson_metric", "lora_overlap_penalty", "rank1_penalty", "ddim_sample", "lora_module"]


def lora_module():
    """cdgfast.models.lora (peft is imported only by the LoRA methods)."""
    return importlib.import_module("cdgfast.models.lora")
