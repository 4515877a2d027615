"""Parameter-anchor penalties: L2, EWC / diagonal Fisher (optionally online), SI and MAS (SPEC section 2).

Every penalty goes through `cdgfast.ops.penalties.diag_penalty` (0.5 * sum w * (theta - anchor)^2) on
the flat trainable parameter vector, and every Fisher through `cdgfast.fisher.diag_fisher` (true
per-sample squared gradients) unless EWC's `fisher_estimator="batch_squared"` asks for CLoG's estimator
(the square of each batch's mean gradient, averaged over batches weighted by their sizes: biased towards
0 by a factor of about the batch size, offered only to reproduce CLoG's EWC rows).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..fisher import diag_fisher, online_update
from ..ops import diag_penalty
from ..params import flat_grads as flat_grads_of
from ._hparams import HP, count, flag, nonneg, positive
from ._registry import register, register_composition
from .base import Method, TinyRun, flat_grads, flat_params, params_of


class _AnchorPenalty(Method):
    """Shared machinery: a penalty `scale * diag_penalty(theta, anchor, weights)` summed over stored
    (anchor, weights) pairs. Subclasses fill `self.anchors` / `self.weights` in `end_task`."""

    _state_attrs = ("anchors", "weights")
    prepares_next_task = True  # its end_task only readies the next task

    def __init__(self, **overrides):
        super().__init__(**overrides)
        self.anchors: List[torch.Tensor] = []
        self.weights: List[torch.Tensor] = []

    def penalty_scale(self) -> float:
        raise NotImplementedError

    def extra_terms(self, model, batch) -> Dict[str, torch.Tensor]:
        if not self.anchors:
            return {}
        params = params_of(model)
        total = 0.0
        for anchor, w in zip(self.anchors, self.weights):
            total = total + diag_penalty(params, anchor, w)
        return {self.name: self.penalty_scale() * total}


class _SampleMean:
    """A running mean over samples of flat tensors, `add(value, n)` counting `value` for n samples;
    `value()` refuses an empty mean, naming what was averaged."""

    def __init__(self, what: str):
        self.what, self.total, self.count = what, None, 0

    def add(self, value: torch.Tensor, n: int = 1) -> None:
        self.total = n * value if self.total is None else self.total + n * value
        self.count += n

    def value(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError(f"data: expected at least one sample for {self.what}, got none")
        return self.total / self.count

@register("l2", order=50)
class L2(_AnchorPenalty):
    """`lam/2 * ||theta - theta_old||^2` towards the parameters at the end of the previous task."""

    defaults = {"lam": 1.0}
    specs = {"lam": nonneg()}
    tiny = TinyRun(terms={"l2"})

    def penalty_scale(self):
        return float(self.config["lam"])

    def end_task(self, model, data):
        super().end_task(model, data)
        theta = flat_params(model)
        self.anchors = [theta]
        self.weights = [torch.ones_like(theta)]


@register("ewc", order=60)
class EWC(_AnchorPenalty):
    """EWC: `lam/2 * sum_k sum_j F_k,j (theta_j - theta_k,j)^2` with `F = mean_i g_i * g_i` from true
    per-sample gradients (`cdgfast.fisher.diag_fisher`). `online=True` keeps one `F <- gamma F + F_new`
    (via `cdgfast.fisher.accumulator.online_update`) and one anchor; `online=False` keeps (F_k, theta_k)
    per task. `fisher_max_samples` caps the samples of the Fisher pass (None: the whole task)."""

    defaults = {"lam": 15000.0, "online": True, "gamma": 1.0, "fisher_max_samples": None,
                "fisher_estimator": "per_sample"}
    specs = {"lam": nonneg(), "online": flag(), "gamma": nonneg(),
             "fisher_max_samples": count(none=True, none_means="the whole task"),
             "fisher_estimator": HP("choice", choices=("per_sample", "batch_squared"))}
    text_defaults = {"lam": 1e6}  # the DC-score paper's EWC weight on LoRA parameters (App. H)
    tiny = TinyRun(terms={"ewc"})

    def penalty_scale(self):
        return float(self.config["lam"])

    def fisher(self, model, data) -> torch.Tensor:
        batches = self.fresh_batches(data, max_samples=self.config["fisher_max_samples"])
        if self.config["fisher_estimator"] == "batch_squared":
            return self._batch_squared_fisher(model, batches)
        return diag_fisher(model, self.loss_fn, batches, parallel=self.parallel, progress=self.progress)

    def _batch_squared_fisher(self, model, batches) -> torch.Tensor:
        """CLoG's EWC estimate (networks/regularize/ewc.py, update / save): sum_b n_b (grad of batch b's mean
        loss)^2 / sum_b n_b. Not the Fisher (whose diagonal is the mean of per-sample squares); kept to
        reproduce CLoG's numbers."""
        if self.parallel.world_size > 1:
            raise ValueError("fisher_estimator: 'batch_squared' runs in one process; use 'per_sample' under torchrun")
        params = params_of(model)
        mean = _SampleMean("the Fisher")
        for batch in batches():
            losses = self.loss_fn(model, batch)
            g = flat_grads_of(params, torch.autograd.grad(losses.mean(), params, allow_unused=True))
            mean.add(g.pow(2), int(losses.shape[0]))
        return mean.value()

    def end_task(self, model, data):
        super().end_task(model, data)
        f_new = self.fisher(model, data).detach()
        theta = flat_params(model)
        if self.config["online"]:
            online = self.weights[0] if self.weights else None
            self.weights = [online_update(online, f_new, float(self.config["gamma"]))]
            self.anchors = [theta]
        else:
            self.weights.append(f_new)
            self.anchors.append(theta)


@register("diag", order=110)
class Diag(EWC):
    """Diagonal-Fisher EWC as the rank-1 paper's baseline (Eq. 1 there: one (F_k, theta_k) per task,
    so `online=False` by default); usually composed with GD as `diag+gd`."""

    defaults = {"online": False}
    tiny = TinyRun(terms={"diag"})


@register("si", order=70)
class SI(_AnchorPenalty):
    """Synaptic Intelligence: `c * sum_j Omega_j (theta_j - theta*_j)^2`.

    `omega` accumulates `-g * dtheta` in `after_step` (g = the gradient the optimizer just used, still in
    `.grad`; dtheta = the step's parameter change). At the end of a task
    `Omega += max(omega / (Delta^2 + xi), 0)` with `Delta` the task's total parameter change; the
    clamp at zero (our choice) keeps the penalty convex when noisy steps make omega negative."""

    defaults = {"c": 1.0, "xi": 1e-3}
    specs = {"c": nonneg(), "xi": positive()}
    _state_attrs = ("omega", "theta_start", "theta_prev")
    tiny = TinyRun(terms={"si"})

    def __init__(self, **overrides):
        super().__init__(**overrides)
        self.omega: Optional[torch.Tensor] = None
        self.theta_start: Optional[torch.Tensor] = None
        self.theta_prev: Optional[torch.Tensor] = None

    def penalty_scale(self):
        return 2.0 * float(self.config["c"])  # diag_penalty carries a 0.5

    def begin_task(self, model, task=None):
        super().begin_task(model, task)
        self.theta_start = flat_params(model)
        self.theta_prev = self.theta_start.clone()
        self.omega = torch.zeros_like(self.theta_start)

    def after_step(self, model):
        g = flat_grads(model)
        theta = flat_params(model)
        if g is not None:
            self.omega.add_(-g.detach() * (theta - self.theta_prev))
        self.theta_prev = theta

    def end_task(self, model, data):
        super().end_task(model, data)
        theta = flat_params(model)
        delta = theta - self.theta_start
        big_omega = (self.omega / (delta.pow(2) + float(self.config["xi"]))).clamp_min(0)
        self.weights = [big_omega if not self.weights else self.weights[0] + big_omega]
        self.anchors = [theta]


@register("mas", order=80)
class MAS(_AnchorPenalty):
    """Memory Aware Synapses: `lam * sum_j Omega_j (theta_j - theta*_j)^2`,
    `Omega = mean_i |grad_theta ||eps_theta(x_t,i)||^2|` (squared L2 norm over pixels, per-sample
    gradients, fresh t per sample, true labels). The per-sample gradients are taken one sample at a
    time on at most `mas_max_samples` samples. Omega accumulates over tasks (sum), one anchor."""

    defaults = {"lam": 1.0, "mas_max_samples": 256}
    specs = {"lam": nonneg(), "mas_max_samples": count(none=True, none_means="the whole task")}
    tiny = TinyRun(config={"mas_max_samples": 4}, terms={"mas"})

    def penalty_scale(self):
        return 2.0 * float(self.config["lam"])  # diag_penalty carries a 0.5

    def importance(self, model, data) -> torch.Tensor:
        params = params_of(model)
        mean = _SampleMean("the MAS importance")
        for batch in self.fresh_batches(data, max_samples=self.config["mas_max_samples"])():
            for i in range(batch["x"].shape[0]):
                one = {k: v[i:i + 1] for k, v in batch.items()}
                out = self.predict(model, one).pow(2).sum()
                mean.add(flat_grads_of(params, torch.autograd.grad(out, params, allow_unused=True)).abs())
        return mean.value()

    def end_task(self, model, data):
        super().end_task(model, data)
        omega = self.importance(model, data).detach()
        self.weights = [omega if not self.weights else self.weights[0] + omega]
        self.anchors = [flat_params(model)]


register_composition("diag+gd", "diag", "gd", order=130)


__all__ = ["L2", "EWC", "Diag", "SI", "MAS"]
