"""The ops / fisher / data / sampling / LoRA functions the methods build on, imported on first use so
that `cdgfast.methods` imports (and `available()` / `create()` work) before every dependency is
loaded. Methods never re-implement these: they only call them."""
from __future__ import annotations

import importlib


def _lazy(module: str, name: str):
    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)
    call.__name__ = name
    call.__qualname__ = name
    call.__doc__ = f"Calls {module}.{name} (imported on first use)."
    return call


# cdgfast.ops
dc_errors = _lazy("cdgfast.ops.dc", "dc_errors")
dc_scores = _lazy("cdgfast.ops.dc", "dc_scores")
dc_cross_entropy = _lazy("cdgfast.ops.dc", "dc_cross_entropy")
bregman_distill = _lazy("cdgfast.ops.bregman", "bregman_distill")
hutchinson_metric = _lazy("cdgfast.ops.bregman", "hutchinson_metric")
rank1_penalty = _lazy("cdgfast.ops.penalties", "rank1_penalty")
diag_penalty = _lazy("cdgfast.ops.penalties", "diag_penalty")
lora_overlap_penalty = _lazy("cdgfast.ops.lora", "lora_overlap_penalty")
# cdgfast.fisher
rank1_fisher = _lazy("cdgfast.fisher", "rank1_fisher")
diag_fisher = _lazy("cdgfast.fisher", "diag_fisher")
online_update = _lazy("cdgfast.fisher.accumulator", "online_update")
# cdgfast.data / sampling
ReservoirBuffer = _lazy("cdgfast.data", "ReservoirBuffer")
ClassBalancedBuffer = _lazy("cdgfast.data", "ClassBalancedBuffer")
generate_replay_pool = _lazy("cdgfast.data", "generate_replay_pool")
ddim_sample = _lazy("cdgfast.sampling", "ddim_sample")


def lora_module():
    return importlib.import_module("cdgfast.models.lora")
