"""The ops / fisher / data / sampling functions the methods build on, in one place. Methods only
call these; they never re-implement their math.

The estimators and the replay-pool generator are looked up here at call time (`_deps.rank1_fisher(...)`,
not a name bound at import), so that `cdgfast.train.distributed.sharded_estimators` can swap in the
sharded versions for a torchrun run. `local_rows` and `average_gradients` are the two data-parallel
hooks of a method's own optimisation of something besides the model's training step (DSC's
consolidation phase, CCD's label regressor): identity / no-op in one
process, "this rank's rows" / "all-reduce mean of the gradients" inside `sharded_estimators`."""
from __future__ import annotations

import importlib

from cdgfast.data import ClassBalancedBuffer, ReservoirBuffer, generate_replay_pool
from cdgfast.fisher import diag_fisher, online_update, rank1_fisher
from cdgfast.ops import (bregman_distill, dc_cross_entropy, dc_errors, dc_scores, diag_penalty,
                         hutchinson_metric, lora_overlap_penalty, rank1_penalty)
from cdgfast.sampling import ddim_sample

__all__ = ["ClassBalancedBuffer", "ReservoirBuffer", "generate_replay_pool", "diag_fisher", "online_update",
           "rank1_fisher", "bregman_distill", "dc_cross_entropy", "dc_errors", "dc_scores", "diag_penalty",
           "hutchinson_metric", "lora_overlap_penalty", "rank1_penalty", "ddim_sample", "lora_module",
           "local_rows", "average_gradients"]


def local_rows(*tensors):
    """This process's rows of a global batch (all of them in one process)."""
    return tensors


def average_gradients(params) -> None:
    """Average `.grad` over data-parallel processes (nothing to do in one process)."""
    return None


def lora_module():
    """cdgfast.models.lora (peft is imported only by the LoRA methods)."""
    return importlib.import_module("cdgfast.models.lora")
