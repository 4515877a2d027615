"""Rank-1 EWC (SPEC section 2; rank-1 Fisher paper, Eq. 6):
`lam/2 * sum_k c_k (mu_k . (theta - theta_k))^2` with `mu_k = mean_i g_i` and
`c_k = mean_i (mu_k . g_i)^2 / ||mu_k||^4` from `cdgfast.fisher.rank1_fisher` (two passes over the
task's data with fresh t/eps in each; `coeff="optimal"`, the paper's c*), or `c_k = 1` (`coeff="one"`: the
official code's configurations, which weight the penalty by lam alone; the direction mu_k is the same),
the penalty from `cdgfast.ops.penalties.rank1_penalty`
(which already carries the 0.5, so the term is `lam * rank1_penalty(...)`).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..fisher import rank1_fisher
from ..ops import rank1_penalty
from ._hparams import HP, count, nonneg
from ._registry import register, register_composition
from .base import Method, TinyRun, flat_params


@register("rank1", order=100)
class Rank1(Method):
    defaults = {"lam": 15000.0, "fisher_max_samples": None, "coeff": "optimal"}
    specs = {"lam": nonneg(), "fisher_max_samples": count(none=True, none_means="the whole task"),
             "coeff": HP("choice", choices=("optimal", "one"))}
    tiny = TinyRun(terms={"rank1"})
    _state_attrs = ("anchors", "directions", "coeffs")
    prepares_next_task = True  # its end_task only readies the next task

    def __init__(self, **overrides):
        super().__init__(**overrides)
        self.anchors: Optional[torch.Tensor] = None      # [K, P]
        self.directions: Optional[torch.Tensor] = None   # [K, P]
        self.coeffs: Optional[torch.Tensor] = None       # [K]

    def extra_terms(self, model, batch) -> Dict[str, torch.Tensor]:
        return self._projection_terms(model, rank1_penalty, self.coeffs)

    def end_task(self, model, data):
        super().end_task(model, data)
        batches = self.fresh_batches(data, max_samples=self.config["fisher_max_samples"])
        est = rank1_fisher(model, self.loss_fn, batches, parallel=self.parallel, progress=self.progress)
        theta = flat_params(model)
        mu = est.mean_grad.detach().to(theta)
        c = torch.tensor([float(est.coeff) if self.config["coeff"] == "optimal" else 1.0], dtype=theta.dtype,
                         device=theta.device)
        if self.anchors is None:
            self.anchors, self.directions, self.coeffs = theta[None], mu[None], c
        else:
            self.anchors = torch.cat([self.anchors, theta[None]])
            self.directions = torch.cat([self.directions, mu[None]])
            self.coeffs = torch.cat([self.coeffs, c])


register_composition("rank1+gd", "rank1", "gd", order=120)


__all__ = ["Rank1"]
