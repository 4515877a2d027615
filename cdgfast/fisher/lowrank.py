"""Rank-k empirical Fisher F ~ sum_j lambda_j v_j v_j^T (the low-rank ablation of the rank-1 paper,
appendix E.4.1, Table 5), two estimators of the top-k eigenpairs of F = (1/n) sum_i g_i g_i^T:

* `lowrank_fisher_power`: stochastic block power iteration, as in the paper's baseline. One product
  F V costs, per batch, k per-sample projections g_i . v_j (`per_sample_grad_dot`: JVP or hooks, no
  per-sample gradients) and k weighted backward passes of one forward, since
  sum_i (g_i . v_j) g_i = grad_theta sum_i (g_i . v_j) l_i. Each iteration draws the batches afresh
  (new t / eps through a callable `batches`), so F V is a stochastic estimate; V is re-orthonormalised
  (QR) after each product. A last pass computes the k x k matrix M = V^T F V = (1/n) Pr^T Pr
  (Pr_ij = g_i . v_j) and rotates V onto its eigenvectors (Rayleigh-Ritz): lambda_j are M's
  eigenvalues, i.e. mean_i (g_i . v_j)^2 for the returned v_j.
* `lowrank_fisher_gram`: exact, beyond the paper. On one batch of n samples, K = G G^T [n, n] from
  `cdgfast.fisher.gram.per_sample_gram` (never G itself); if K u = s u with ||u|| = 1 and s > 0 then
  v = G^T u / sqrt(s) is a unit eigenvector of F = G^T G / n with eigenvalue s / n (F v = G^T K u /
  (n sqrt(s)) = (s / n) v), and F has no other nonzero eigenvalues. G^T u = grad_theta sum_i u_i l_i: k
  weighted backward passes over the same samples (same t / eps, the model in eval mode as in the Gram).

Both return directions [k, P] (orthonormal rows; a direction with a zero eigenvalue is 0 for the Gram
estimator when rank(G) < k) and eigenvalues [k] (descending, float64), detached, in the parameters'
result dtype (`_common.result_dtype`). Conventions (loss_fn, batches, parallel, modes) are those of
`cdgfast.fisher.estimators`.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, NamedTuple, Optional

import torch

from cdgfast._validation import check_choice, check_generator
from cdgfast.params import split_like, trainable_named
from cdgfast.parallel import DataParallel, resolve

from ._common import (autograd_call, call_loss, check_batch, check_loss_fn, check_loss_graph, param_device,
                      preserved_state, result_dtype, usable_batch)
from .estimators import DOT_METHODS, _passes, _tqdm, per_sample_grad_dot
from .gram import _split_batch, per_sample_gram


class LowRankFisher(NamedTuple):
    """F ~ sum_j eigenvalues_j directions_j directions_j^T: directions [k, P] (orthonormal rows),
    eigenvalues [k] (float64, descending), num_samples = samples behind the eigenvalues."""

    directions: torch.Tensor
    eigenvalues: torch.Tensor
    num_samples: int


def _check_k(k, P: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > P:
        raise ValueError(f"k: expected an integer in [1, P = {P}] (P: trainable parameter elements), got {k!r}")
    return k


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


def _orthonormal_rows(W: torch.Tensor) -> torch.Tensor:
    """Rows spanning the rows of W [k, P], orthonormal (QR of W^T); each row's sign makes it point
    along the row of W it came from, so the iteration does not flip signs from one step to the next."""
    Q, R = torch.linalg.qr(W.t())
    signs = torch.sign(torch.diagonal(R))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return (Q * signs).t().contiguous()


def _weighted_grads(losses: torch.Tensor, params, weights: torch.Tensor, views_per_row) -> None:
    """views_per_row[j] += grad_theta sum_i weights[i, j] l_i for every column j, one shared forward."""
    k = weights.shape[1]
    for j in range(k):
        grads = torch.autograd.grad(losses, params, grad_outputs=weights[:, j].to(losses.dtype),
                                    retain_graph=j < k - 1, allow_unused=True)
        for v, g in zip(views_per_row[j], grads):
            if g is not None:
                v.add_(g.detach().to(v.dtype))


def _projections(model, loss_fn, batch, V: torch.Tensor, method: str) -> torch.Tensor:
    """Pr [B, k], Pr_ij = g_i . v_j (float64)."""
    return torch.stack([per_sample_grad_dot(model, loss_fn, batch, V[j], method=method).to(torch.float64)
                        for j in range(V.shape[0])], dim=1)


@autograd_call("lowrank_fisher_power")
def lowrank_fisher_power(model: torch.nn.Module, loss_fn: Callable, batches, k: int, *, iters: int = 10,
                         method: str = "auto", generator: Optional[torch.Generator] = None,
                         progress: bool = False, parallel: Optional[DataParallel] = None) -> LowRankFisher:
    """Top-k eigenpairs of the empirical Fisher by stochastic block power iteration (module docstring).

    batches: as in `rank1_fisher`; iterated iters + 1 times (a callable returning a fresh iterable
        draws new t / eps each time; a list repeats the same samples, which makes the iteration the
        exact power method on that sample's Fisher). A one-shot iterator raises ValueError.
    k: rank, 1 <= k <= P. iters: power steps (>= 1) before the Rayleigh-Ritz pass.
    method: how g_i . v_j is computed (`per_sample_grad_dot`). generator: draws the Gaussian start
        V_0 (on the CPU unless the generator lives elsewhere); None: a fixed seed (0), so the estimate
        is reproducible. Every process of `parallel` must pass a generator in the same state.
    parallel: the data-parallel context; F V and V^T F V are sums over samples, all-reduced before any
        division, so every process gets the one-process estimate.
    """
    check_loss_fn(loss_fn)
    check_choice("method", method, DOT_METHODS)
    check_generator("generator", generator)
    _check_count("iters", iters)
    par = resolve(parallel)
    get = _passes(batches)
    _, params = trainable_named(model)
    dev = param_device(params)
    P = sum(p.numel() for p in params)
    _check_k(k, P)
    acc = result_dtype(params)
    bars = progress and par.is_main
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    V = torch.randn(k, P, generator=generator, dtype=torch.float64, device=generator.device).to(dev, acc)
    V = _orthonormal_rows(V)
    for it in range(iters):
        W = torch.zeros(k, P, dtype=acc, device=dev)
        rows = [split_like(W[j], params) for j in range(k)]
        n = 0
        for batch in _tqdm(par.batches(get()), bars, f"rank-{k} Fisher: power step {it + 1}/{iters}"):
            check_batch(batch)
            proj = _projections(model, loss_fn, batch, V, method)
            with preserved_state(model):
                losses = call_loss(loss_fn, model, usable_batch(batch))
                check_loss_graph(losses, params)
                _weighted_grads(losses, params, proj, rows)
            n += proj.shape[0]
            del losses
        par.all_reduce_sum(W)
        (n,) = par.sum_counts(n, device=dev)
        if n == 0:
            raise ValueError("batches: expected at least one non-empty batch in every pass, got none")
        if not torch.isfinite(W).all():
            raise ValueError("loss_fn: the Fisher-vector products are not finite (NaN or Inf gradients)")
        V = _orthonormal_rows(W / n)
    # Rayleigh-Ritz on span(V): M = V F V^T from a fresh pass, V rotated onto M's eigenvectors
    M = torch.zeros(k, k, dtype=torch.float64, device=dev)
    n = 0
    for batch in _tqdm(par.batches(get()), bars, f"rank-{k} Fisher: Rayleigh-Ritz"):
        proj = _projections(model, loss_fn, batch, V, method)
        M += proj.t() @ proj
        n += proj.shape[0]
    par.all_reduce_sum(M)
    (n,) = par.sum_counts(n, device=dev)
    if n == 0:
        raise ValueError("batches: the last pass yielded no batches; pass a list or a callable returning a "
                         "fresh iterable each time")
    M = M / n
    evals, U = torch.linalg.eigh(0.5 * (M + M.t()))
    evals, U = evals.flip(0).clamp_min(0), U.flip(1)
    V = (U.t().to(acc) @ V).contiguous()
    return LowRankFisher(directions=V, eigenvalues=evals, num_samples=int(n))


@autograd_call("lowrank_fisher_gram")
def lowrank_fisher_gram(model: torch.nn.Module, loss_fn: Callable, batch: Dict[str, torch.Tensor], k: int, *,
                        chunk_params: Optional[int] = None, micro_batch: int = 64,
                        progress: bool = False) -> LowRankFisher:
    """The exact top-k eigenpairs of the empirical Fisher of `batch` from its n x n Gram matrix
    (module docstring). batch: one dict of n >= 2 samples (with its t / eps); chunk_params,
    micro_batch: as in `cdgfast.fisher.gram.per_sample_gram` (micro_batch also bounds the weighted
    backward passes). The model is put in eval mode (as for the Gram matrix) and restored.
    When rank(G) < k the missing directions are zero with eigenvalue 0 (a RuntimeWarning says so).
    Cost: the Gram matrix (one vmapped per-sample backward per parameter group) plus k backward passes
    over the n samples. Under data parallelism every process computes the same estimate from the
    same batch (the Gram matrix is not sharded)."""
    check_loss_fn(loss_fn)
    tensors, constants, n = _split_batch(batch)
    _, params = trainable_named(model)
    dev = param_device(params)
    P = sum(p.numel() for p in params)
    _check_k(k, P)
    _check_count("micro_batch", micro_batch)
    gram = per_sample_gram(model, loss_fn, batch, chunk_params=chunk_params, micro_batch=micro_batch,
                           return_mean_grad=False, progress=progress, desc=f"rank-{k} Fisher: Gram matrix")
    K = gram.gram
    s, U = torch.linalg.eigh(0.5 * (K + K.t()))
    s, U = s.flip(0)[:k], U.flip(1)[:, :k]                        # top-k, descending
    if k > n:  # F has rank <= n: the rest of its top-k eigenvalues are zeros
        s = torch.cat([s, s.new_zeros(k - n)])
        U = torch.cat([U, U.new_zeros(n, k - n)], dim=1)
    # eigenvalues below round-off of the largest are the null space of G (rank(G) < k)
    tol = max(float(s[0]), 0.0) * n * torch.finfo(torch.float64).eps * 16
    live = s > tol
    if int(live.sum()) < k:
        warnings.warn(f"lowrank_fisher_gram: the {n} per-sample gradients span only {int(live.sum())} < k = {k} "
                      f"directions; the others are zero", RuntimeWarning, stacklevel=2)
    weights = torch.where(live[None, :], U / s.clamp_min(tol).sqrt()[None, :], torch.zeros_like(U))
    acc = result_dtype(params)
    V = torch.zeros(k, P, dtype=acc, device=dev)
    rows = [split_like(V[j], params) for j in range(k)]
    was_training = model.training
    model.eval()
    try:
        with preserved_state(model):
            for a in range(0, n, micro_batch):
                sub = {**{key: v[a:a + micro_batch] for key, v in tensors.items()}, **constants}
                losses = call_loss(loss_fn, model, usable_batch(sub))
                check_loss_graph(losses, params)
                _weighted_grads(losses, params, weights[a:a + micro_batch].to(dev), rows)
                del losses
    finally:
        model.train(was_training)
    evals = torch.where(live, s / n, torch.zeros_like(s)).clamp_min(0)
    return LowRankFisher(directions=V, eigenvalues=evals, num_samples=int(n))


__all__ = ["LowRankFisher", "lowrank_fisher_power", "lowrank_fisher_gram"]
