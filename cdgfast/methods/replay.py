"""Replay of real samples: ER and A-GEM (SPEC section 2).

Both keep a reservoir buffer (`cdgfast.data.ReservoirBuffer`, M = `buffer_size` real samples). The
buffer is filled in `end_task` with one pass over the finished task's data, so during task n it holds
a uniform sample of tasks < n.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ._deps import ReservoirBuffer
from ._hparams import count
from .base import Method, flat_grads, params_of, reusable, set_flat_grads


class _Buffered(Method):
    defaults = {"buffer_size": 512, "replay_batch": None}
    specs = {"buffer_size": count(), "replay_batch": count(none=True, none_means="as many as the current batch")}

    def __init__(self, **overrides):
        super().__init__(**overrides)
        size = self.config["buffer_size"]
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"buffer_size: expected a positive integer, got {size!r}")
        self.buffer = None

    def _make_buffer(self):
        return ReservoirBuffer(int(self.config["buffer_size"]), seed=int(self.config["seed"]))

    def end_task(self, model, data):
        super().end_task(model, data)
        if self.buffer is None:
            self.buffer = self._make_buffer()
        for x, y in reusable(data)():
            self.buffer.add(x.detach().cpu(), y.detach().cpu().long())

    def replay(self, n: int, device) -> Optional[tuple]:
        """A buffer batch of n samples on `device`, or None while the buffer is empty."""
        if self.buffer is None or len(self.buffer) == 0:
            return None
        k = self.config["replay_batch"] or n
        xb, yb = self.buffer.sample(int(k), generator=self.generator)
        return xb.to(device), yb.to(device).long()

    def state_dict(self):
        state = super().state_dict()
        state["buffer"] = None if self.buffer is None else self.buffer.state_dict()
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if state.get("buffer") is not None:
            self.buffer = self._make_buffer()
            self.buffer.load_state_dict(state["buffer"])


class ER(_Buffered):
    """Experience replay: task loss over `concat(current batch, buffer batch)`."""

    name = "er"
    owns_task_loss = True

    def loss(self, model, batch) -> Dict[str, torch.Tensor]:
        self._require_setup()
        self.steps_in_task += 1
        x, y = batch["x"], batch["y"]
        rep = self.replay(x.shape[0], x.device)
        if rep is not None:
            x, y = torch.cat([x, rep[0].to(x.dtype)]), torch.cat([y.long(), rep[1]])
        nb = self.noisy_batch(x, y, dropout=True)
        return {"task": self.denoising_loss(model, nb).mean()}


class AGEM(_Buffered):
    """A-GEM: no extra loss; in `before_step`, with `g_ref` the gradient of the denoising loss on a
    buffer batch, `g <- g - (g . g_ref / ||g_ref||^2) g_ref` when `g . g_ref < 0`. `last_dot` keeps the
    last `g . g_ref` before projection (None when no projection was attempted)."""

    name = "agem"
    defaults = {"replay_batch": 64}
    specs = {"replay_batch": count()}  # A-GEM's reference batch has no "as many as the batch" fallback

    def __init__(self, **overrides):
        super().__init__(**overrides)
        self.last_dot: Optional[float] = None
        self.last_ref: Optional[torch.Tensor] = None

    def before_step(self, model):
        self.last_dot = None
        g = flat_grads(model)
        if g is None:
            return
        rep = self.replay(int(self.config["replay_batch"]), g.device)
        if rep is None:
            return
        params = params_of(model)
        ref_loss = self.denoising_loss(model, self.noisy_batch(rep[0].to(params[0].dtype), rep[1])).mean()
        grads = torch.autograd.grad(ref_loss, params, allow_unused=True)
        g_ref = torch.cat([(gr if gr is not None else torch.zeros_like(p)).reshape(-1)
                           for gr, p in zip(grads, params)])
        dot = torch.dot(g, g_ref)
        self.last_dot = float(dot)
        self.last_ref = g_ref
        if dot < 0:
            set_flat_grads(model, g - (dot / g_ref.pow(2).sum().clamp_min(1e-30)) * g_ref)
