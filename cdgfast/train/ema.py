"""An exponential moving average (EMA) of the trainable weights during one task.

`ScaleConfig.ema_decay` (None: off). During a task of the training loop, after every optimiser step,

    shadow <- d_n * shadow + (1 - d_n) * param,   d_n = min(ema_decay, (1 + n) / (10 + n)),

n = the number of updates made before this one (0 at the first), so the average forgets its
starting point quickly on short tasks (d_0 = 0.1) and settles at `ema_decay`. At the end of the
task's training the model's weights are replaced by the average (`copy_to`): everything after that
sees the averaged model, in this order: the method's end_task (GD's frozen teacher and its replay
pool, Fisher estimates, buffers), the evaluation (FID, KLD, accuracy on samples), the checkpoint,
and the next task, which trains on from the averaged weights with a fresh average. So the generator
GD replays from and distils towards is exactly the model that was evaluated, and a checkpoint after
a task holds the whole state (the average restarts at the next task), so `--resume` continues
exactly. The shadow is kept in float64 so that a long average does not drift with rounding.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch


def check_ema_decay(decay) -> Optional[float]:
    """`decay` itself (None: no EMA) or a ValueError: a number in [0, 1)."""
    if decay is None:
        return None
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not math.isfinite(decay) \
            or not 0.0 <= decay < 1.0:
        raise ValueError(f"ema_decay: expected None (no EMA) or a number in [0, 1), got {decay!r}")
    return float(decay)


def ema_decay_at(n: int, decay: float) -> float:
    """The decay of update `n` (0-based): min(decay, (1 + n) / (10 + n))."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n: expected an integer >= 0, got {n!r}")
    return min(float(check_ema_decay(decay)), (1.0 + n) / (10.0 + n))


class WeightEMA:
    """The EMA of `params` (a list of tensors, e.g. cdgfast.params.trainable_parameters(model)),
    started at their current values."""

    def __init__(self, params: List[torch.Tensor], decay: float):
        self.decay = check_ema_decay(decay)
        if self.decay is None:
            raise ValueError("decay: expected a number in [0, 1), got None")
        params = list(params)
        if not params or not all(isinstance(p, torch.Tensor) and p.is_floating_point() for p in params):
            raise ValueError("params: expected a non-empty list of floating-point tensors")
        self.params = params
        self.shadow = [p.detach().to(torch.float64).clone() for p in params]
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> float:
        """One update from the current values of the parameters; returns the decay used."""
        d = ema_decay_at(self.num_updates, self.decay)
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach().to(torch.float64), alpha=1.0 - d)
        self.num_updates += 1
        return d

    @torch.no_grad()
    def copy_to(self) -> None:
        """Write the average into the parameters (in their own dtype)."""
        for s, p in zip(self.shadow, self.params):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> Dict[str, object]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        shadow = state.get("shadow")
        if (not isinstance(shadow, (list, tuple)) or len(shadow) != len(self.shadow)
                or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(shadow, self.shadow))):
            raise ValueError("state: its shadow weights do not match these parameters")
        if state.get("decay") != self.decay:
            raise ValueError(f"state: made with decay {state.get('decay')!r}, this EMA has {self.decay!r}")
        self.shadow = [torch.as_tensor(s, dtype=torch.float64).clone() for s in shadow]
        self.num_updates = int(state["num_updates"])


__all__ = ["check_ema_decay", "ema_decay_at", "WeightEMA"]
