"""State that several methods keep, written once: a frozen teacher (KD, GD, CCD) and a replay buffer of
real samples (ER, A-GEM, CCD). Each mixin keeps its attribute, saves and restores it with the method's
state, and does its end-of-task work after the method's bookkeeping; combine them as
`class CCD(Teacher, Buffered, Method)`."""
from __future__ import annotations

from typing import Any, Optional

import torch

from cdgfast.data import ClassBalancedBuffer, ReplaceWhenFullBuffer, ReservoirBuffer

from ._hparams import HP, count
from .base import Method, frozen_copy, reusable


class Teacher(Method):
    """`teacher`: a frozen copy (eval mode, no grads) of the model at the end of the previous task, None
    during the first. After load_state_dict it is rebuilt from the model at the next begin_task or step
    (a copy of the model's structure with the saved weights)."""

    _state_attrs = ("teacher",)
    prepares_next_task = True  # its end_task only readies the next task

    def __init__(self, **overrides):
        super().__init__(**overrides)
        self.teacher: Optional[torch.nn.Module] = None
        self._pending_teacher = None

    def restore_pending(self, model):
        super().restore_pending(model)
        if self._pending_teacher is not None:
            self.teacher = frozen_copy(model)
            self.teacher.load_state_dict(self._pending_teacher)
            self._pending_teacher = None

    def end_task(self, model, data):
        super().end_task(model, data)
        self.teacher = frozen_copy(model)

    def load_state_attr(self, attr: str, saved: Any) -> None:
        if attr != "teacher":
            return super().load_state_attr(attr, saved)
        self.teacher = None
        self._pending_teacher = saved


# `buffer_policy` -> buffer class. "replace_when_full" is CLoG's buffer, offered only to reproduce its rows
# (PROTOCOLS.md, ccd-*): it is not a reservoir.
BUFFER_POLICIES = {"reservoir": ReservoirBuffer, "class_balanced": ClassBalancedBuffer,
                   "replace_when_full": ReplaceWhenFullBuffer}


class Buffered(Method):
    """`buffer`: a `BUFFER_POLICIES[buffer_policy]` buffer of at most `buffer_size` real samples,
    filled in `end_task` with one pass over the finished task's data, so during task n it holds a sample
    of tasks < n (None before the first end_task). `replay(n, like)` draws a batch of it with the
    method's generator."""

    defaults = {"buffer_size": 512, "replay_batch": None, "buffer_policy": "reservoir"}
    specs = {"buffer_size": count(), "replay_batch": count(none=True, none_means="as many as the current batch"),
             "buffer_policy": HP("choice", choices=tuple(BUFFER_POLICIES))}
    _state_attrs = ("buffer",)
    prepares_next_task = True  # its end_task only readies the next task

    def __init__(self, **overrides):
        super().__init__(**overrides)
        self.buffer = None

    def _make_buffer(self):
        return BUFFER_POLICIES[self.config["buffer_policy"]](int(self.config["buffer_size"]), seed=int(self.config["seed"]))

    def end_task(self, model, data):
        super().end_task(model, data)
        if self.buffer is None:
            self.buffer = self._make_buffer()
        for x, y in reusable(data)():
            self.buffer.add(x.detach().cpu(), y.detach().cpu().long())

    def replay(self, n: int, like: torch.Tensor) -> Optional[tuple]:
        """A buffer batch (x as `like`'s dtype and device, y long on that device) of `replay_batch`
        samples (None: n), or None while the buffer is empty."""
        if self.buffer is None or len(self.buffer) == 0:
            return None
        k = self.config["replay_batch"] or n
        xb, yb = self.buffer.sample(int(k), generator=self.generator)
        return xb.to(like), yb.to(like.device).long()

    def load_state_attr(self, attr: str, saved: Any) -> None:
        if attr != "buffer" or saved is None:
            return super().load_state_attr(attr, saved)
        self.buffer = self._make_buffer()
        self.buffer.load_state_dict(saved)


__all__ = ["Teacher", "Buffered"]
