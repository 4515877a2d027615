"""Rank-k EWC, the low-rank ablation of the rank-1 paper (appendix E.4.1, Table 5: GD + rank-2..5):
`lam/2 * sum_t sum_j lambda_tj (v_tj . (theta - theta_t))^2` with (lambda_tj, v_tj) the top-k
eigenpairs of task t's empirical Fisher, from `cdgfast.ops.lowrank_penalty` (which carries the 0.5).

Two estimators (hyperparameter `estimator`):
  * "power" (the paper's baseline): stochastic block power iteration, `power_iters` Fisher-vector
    products over the task's data (at most `fisher_max_samples` samples), each pass with fresh t / eps,
    then a Rayleigh-Ritz pass (`cdgfast.fisher.lowrank_fisher_power`); the start is drawn from the
    method's seeded generator.
  * "gram" (beyond the paper): the exact top-k eigenpairs of the empirical Fisher of `gram_samples`
    samples of the task (one draw of t / eps), from their n x n Gram matrix of per-sample gradients
    (`cdgfast.fisher.lowrank_fisher_gram`, the Gram matrix `cdgfast.analysis` measures). Memory
    O(n^2 + n * chunk); every process of a data-parallel run computes the same estimate.

`k` = 1 is the top eigenvector (power iteration or exact), which is not the mean-gradient rank-1 of
`rank1`: the paper's point is that the mean gradient gets the leading direction without iterations.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..fisher import lowrank_fisher_gram, lowrank_fisher_power
from ..ops import lowrank_penalty
from ._hparams import HP, count, nonneg
from ._registry import register, register_composition
from .base import Method, TinyRun, flat_params

ESTIMATORS = ("power", "gram")


@register("rankk", order=105)
class RankK(Method):
    defaults = {"lam": 15000.0, "k": 2, "estimator": "power", "power_iters": 10, "fisher_max_samples": None,
                "gram_samples": 256}
    specs = {"lam": nonneg(), "k": HP("int", lo=1, hi=5), "estimator": HP("choice", choices=ESTIMATORS),
             "power_iters": count(), "fisher_max_samples": count(none=True, none_means="the whole task"),
             "gram_samples": count(2)}
    tiny = TinyRun(config={"power_iters": 2, "fisher_max_samples": 8}, terms={"rankk"})
    _state_attrs = ("anchors", "directions", "eigenvalues")
    prepares_next_task = True  # its end_task only readies the next task

    def __init__(self, **overrides):
        super().__init__(**overrides)
        self.anchors: Optional[torch.Tensor] = None       # [T, P]
        self.directions: Optional[torch.Tensor] = None    # [T, k, P]
        self.eigenvalues: Optional[torch.Tensor] = None   # [T, k]

    def extra_terms(self, model, batch) -> Dict[str, torch.Tensor]:
        return self._projection_terms(model, lowrank_penalty, self.eigenvalues)

    def _estimate(self, model, data):
        k = int(self.config["k"])
        if self.config["estimator"] == "power":
            batches = self.fresh_batches(data, max_samples=self.config["fisher_max_samples"])
            return lowrank_fisher_power(model, self.loss_fn, batches, k, iters=int(self.config["power_iters"]),
                                        generator=self.generator, progress=self.progress, parallel=self.parallel)
        parts = list(self.fresh_batches(data, max_samples=int(self.config["gram_samples"]))())
        if not parts:
            raise ValueError("data: expected at least one batch for the rank-k Fisher, got none")
        batch = {key: torch.cat([b[key] for b in parts]) for key in parts[0]}
        return lowrank_fisher_gram(model, self.loss_fn, batch, k, progress=self.progress)

    def end_task(self, model, data):
        super().end_task(model, data)
        est = self._estimate(model, data)
        theta = flat_params(model)
        V = est.directions.detach().to(theta)
        lam = est.eigenvalues.detach().to(device=theta.device, dtype=torch.float32 if theta.dtype != torch.float64
                                          else torch.float64)  # eigenvalues ~1e-8 vanish in float16
        if self.anchors is None:
            self.anchors, self.directions, self.eigenvalues = theta[None], V[None], lam[None]
        else:
            self.anchors = torch.cat([self.anchors, theta[None]])
            self.directions = torch.cat([self.directions, V[None]])
            self.eigenvalues = torch.cat([self.eigenvalues, lam[None]])


register_composition("rankk+gd", "rankk", "gd", order=125)


__all__ = ["RankK", "ESTIMATORS"]
