"""Replay of real samples: ER and A-GEM (SPEC section 2).

Both keep a reservoir buffer (`cdgfast.data.ReservoirBuffer`, M = `buffer_size` real samples; the
`Buffered` mixin). The buffer is filled in `end_task` with one pass over the finished task's data, so
during task n it holds a uniform sample of tasks < n.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..params import flat_grads as flat_grads_of
from ._hparams import count
from ._mixins import Buffered
from ._registry import register
from .base import TinyRun, flat_grads, params_of, set_flat_grads, with_replay


@register("er", order=20)
class ER(Buffered):
    """Experience replay: task loss over `concat(current batch, buffer batch)`."""

    owns_task_loss = True
    tiny = TinyRun(config={"buffer_size": 16})

    def step_terms(self, model, batch) -> Dict[str, torch.Tensor]:
        x = batch["x"]
        x, y = with_replay(x, batch["y"], self.replay(x.shape[0], x))
        return {"task": self.task_loss(model, self.noisy_batch(x, y, dropout=True))}


@register("agem", order=30)
class AGEM(Buffered):
    """A-GEM: no extra loss; in `before_step`, with `g_ref` the gradient of the denoising loss on a
    buffer batch, `g <- g - (g . g_ref / ||g_ref||^2) g_ref` when `g . g_ref < 0`. `last_dot` keeps the
    last `g . g_ref` before projection (None when no projection was attempted)."""

    defaults = {"replay_batch": 64}
    specs = {"replay_batch": count()}  # A-GEM's reference batch has no "as many as the batch" fallback
    tiny = TinyRun(config={"buffer_size": 16, "replay_batch": 4})

    def __init__(self, **overrides):
        super().__init__(**overrides)
        self.last_dot: Optional[float] = None
        self.last_ref: Optional[torch.Tensor] = None

    def before_step(self, model):
        self.last_dot = None
        g = flat_grads(model)
        if g is None:
            return
        params = params_of(model)
        rep = self.replay(int(self.config["replay_batch"]), params[0])
        if rep is None:
            return
        ref_loss = self.denoising_loss(model, self.noisy_batch(*rep)).mean()
        grads = torch.autograd.grad(ref_loss, params, allow_unused=True)
        g_ref = flat_grads_of(params, grads)
        dot = torch.dot(g, g_ref)
        self.last_dot = float(dot)
        self.last_ref = g_ref
        if dot < 0:
            set_flat_grads(model, g - (dot / g_ref.pow(2).sum().clamp_min(1e-30)) * g_ref)


__all__ = ["ER", "AGEM"]
