"""Geometry of the empirical Fisher from per-sample gradients, without ever forming a P x P matrix
(rank-1 paper, section 3.2 and appendix D).

Notation: n per-sample gradients g_i in R^P stacked as the rows of G [n, P]; mu = (1/n) sum_i g_i;
the empirical Fisher F = (1/n) sum_i g_i g_i^T = G^T G / n  [P, P]; K = G G^T [n, n] (the Gram matrix,
K_ij = g_i . g_j); d = sum_i g_i * g_i [P] (the unnormalised diagonal of F).

Every reported quantity is a function of K, d and n alone (derivations in `gram_statistics`), so the
work is: accumulate K and d over bounded groups of parameters (`cdgfast.fisher.gram.per_sample_gram`,
shared with the exact top-k Fisher of the `rankk` method). For one group of at most
`chunk_params` entries of the flat parameter vector, the per-sample gradients G_grp [n, P_grp] are
computed micro-batch by micro-batch (torch.func.vmap of torch.func.grad over a functional call of
`loss_fn` with only that group's tensors as differentiable arguments) into one [n, P_grp] buffer, then
K += G_grp G_grp^T (float64), d_grp = column sums of G_grp^2 and mu_grp = column means of G_grp.
Because the flat-vector coordinates split into disjoint groups, g_i . g_j = sum over groups of
g_i,grp . g_j,grp, so K is exact. Memory: O(n^2 + P + n * chunk_params + micro_batch * largest tensor);
no [P, P] and no [n, P] tensor exists (unless chunk_params >= P). The price is one forward/backward
over the n samples per group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from ..fisher.gram import _split_batch, param_groups, per_sample_gram  # noqa: F401 (param_groups: re-exported)
from ..params import trainable_parameters



@dataclass
class FisherGeometry:
    """What `fisher_geometry` measures. F = (1/n) sum_i g_i g_i^T, mu = (1/n) sum_i g_i (float64)."""

    num_samples: int
    num_params: int
    gram: torch.Tensor                  # K [n, n], K_ij = g_i . g_j (float64)
    sq_norms: torch.Tensor              # ||g_i||^2 = K_ii [n]
    projections: torch.Tensor           # mu . g_i = (K 1 / n)_i [n]
    cosine: torch.Tensor                # |cos(g_i, mu)| [n]
    mean_grad_sq_norm: float            # ||mu||^2
    eigenvalues: torch.Tensor           # top-k eigenvalues of F, descending [k]
    eig_ratio: float                    # lambda_2 / lambda_1
    fisher_fro: float                   # ||F||_F
    rank1_coeff: float                  # c* = mean_i (mu . g_i)^2 / ||mu||^4
    rank1_rel_err: float                # ||F - c* mu mu^T||_F / ||F||_F
    diag_rel_err: float                 # ||F - diag(F)||_F / ||F||_F
    best_rank1_rel_err: float           # Eckart-Young: ||F - lambda_1 v_1 v_1^T||_F / ||F||_F
    mean_grad: Optional[torch.Tensor] = None   # mu [P] (float64) unless return_mean_grad=False
    diagonal: Optional[torch.Tensor] = None    # diag(F) = d / n [P] (float64) unless return_diagonal=False

    def summary(self) -> dict:
        """JSON-ready scalars and short vectors (no [n, n] or [P] tensors)."""
        cos = self.cosine
        return {
            "num_samples": self.num_samples,
            "num_params": self.num_params,
            "eigenvalues": [float(v) for v in self.eigenvalues],
            "eig_ratio": self.eig_ratio,
            "fisher_fro": self.fisher_fro,
            "rank1_coeff": self.rank1_coeff,
            "rank1_rel_err": self.rank1_rel_err,
            "diag_rel_err": self.diag_rel_err,
            "best_rank1_rel_err": self.best_rank1_rel_err,
            "mean_grad_norm": math.sqrt(max(self.mean_grad_sq_norm, 0.0)),
            "cosine_mean": float(cos.mean()),
            "cosine_median": float(cos.median()),
            "cosine_min": float(cos.min()),
            "cosine_quantiles": {str(q): float(torch.quantile(cos, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
        }


def gram_statistics(gram: torch.Tensor, diag_sum: torch.Tensor, *, top_k: int = 5,
                    num_params: Optional[int] = None) -> Dict[str, object]:
    """All Fisher-geometry quantities from K = G G^T [n, n] and d = sum_i g_i*g_i [P].

    Identities (G [n, P] with rows g_i, F = G^T G / n, mu = G^T 1 / n):
      * G mu = G G^T 1 / n = K 1 / n                      -> projections mu . g_i: row sums of K over n.
      * ||mu||^2 = (G^T 1)^T (G^T 1) / n^2 = 1^T K 1 / n^2.
      * ||g_i||^2 = K_ii, so |cos(g_i, mu)| = |(K 1)_i / n| / sqrt(K_ii ||mu||^2).
      * Eigenvalues: F = G^T G / n and K / n = G G^T / n share their nonzero eigenvalues (if
        G G^T u = s u with s != 0 then G^T u != 0 and G^T G (G^T u) = s G^T u; and conversely), the rest
        are zeros. So the top-k eigenvalues of F are the top-k of eigvalsh(K / n), padded with zeros
        when k > n (F has P - rank(G) zero eigenvalues).
      * ||F||_F^2 = tr(F^T F) = tr(G^T G G^T G) / n^2 = tr(G G^T G G^T) / n^2 = ||K||_F^2 / n^2
        (cyclic trace).
      * Rank-1 reconstruction R = c mu mu^T:  ||F - R||_F^2 = ||F||_F^2 - 2 c <F, mu mu^T> + c^2 ||mu||^4
        with <F, mu mu^T> = mu^T F mu = (1/n) sum_i (mu . g_i)^2 = ||G mu||^2 / n, and the SPEC/paper
        coefficient c* = mean_i (mu . g_i)^2 / ||mu||^4 = mu^T F mu / ||mu||^4 (Eq. 5 and section 3.3).
        (With c = c* this equals ||F||^2 - (mu^T F mu)^2 / ||mu||^4.)
      * Diagonal approximation D = diag(F) = diag(d / n): <F, D> = sum_j F_jj D_jj = ||D||_F^2, hence
        ||F - D||_F^2 = ||F||_F^2 - 2 <F, D> + ||D||_F^2 = ||F||_F^2 - ||d / n||^2.
      * Best rank-1 approximation (Eckart-Young, an extra reference point): the error is
        sqrt(||F||_F^2 - lambda_1^2).
    Squared errors are clamped at 0 before the square root (float64 rounding when F is exactly rank-1).
    """
    if not isinstance(gram, torch.Tensor) or gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram: expected a square [n, n] tensor, got "
                         f"{tuple(gram.shape) if isinstance(gram, torch.Tensor) else type(gram).__name__}")
    n = gram.shape[0]
    if n < 2:
        raise ValueError(f"gram: expected at least 2 samples, got n = {n}")
    if not isinstance(diag_sum, torch.Tensor) or diag_sum.dim() != 1:
        raise ValueError("diag_sum: expected a flat [P] tensor (sum_i g_i * g_i)")
    P = diag_sum.numel() if num_params is None else int(num_params)
    if not isinstance(top_k, int) or top_k < 1 or top_k > P:
        raise ValueError(f"top_k: expected an integer in [1, num_params = {P}], got {top_k!r}")
    K = gram.to(torch.float64)
    d = diag_sum.to(torch.float64)
    K = 0.5 * (K + K.T)                               # exact symmetry for eigvalsh

    proj = K.sum(1) / n                               # G mu
    mu_sq = float(K.sum()) / n ** 2                   # ||mu||^2
    sq_norms = torch.diagonal(K).clone()              # ||g_i||^2
    denom = (sq_norms.clamp_min(0) * max(mu_sq, 0.0)).sqrt()
    # A zero gradient (or a zero mean) has no direction: report cosine 0 there.
    cosine = torch.where(denom > 0, proj.abs() / denom.clamp_min(torch.finfo(torch.float64).tiny),
                         torch.zeros_like(proj)).clamp_max(1.0)

    eig_all = torch.linalg.eigvalsh(K / n).flip(0)    # descending
    if top_k <= n:
        eig = eig_all[:top_k].clone()
    else:
        eig = torch.cat([eig_all, eig_all.new_zeros(top_k - n)])
    lam1 = float(eig_all[0])
    lam2 = float(eig_all[1]) if P >= 2 else 0.0
    eig_ratio = lam2 / lam1 if lam1 > 0 else float("nan")

    fro_sq = float((K * K).sum()) / n ** 2            # ||F||_F^2
    fro = math.sqrt(fro_sq)
    mFm = float((proj * proj).sum()) / n              # mu^T F mu
    c_star = mFm / mu_sq ** 2 if mu_sq > 0 else float("nan")
    rank1_sq = fro_sq - 2.0 * c_star * mFm + c_star ** 2 * mu_sq ** 2
    diag_sq = float((d / n).pow(2).sum())             # ||diag F||^2
    diag_err_sq = fro_sq - diag_sq
    best_sq = fro_sq - lam1 ** 2

    def rel(err_sq: float) -> float:
        return math.sqrt(max(err_sq, 0.0)) / fro if fro > 0 else float("nan")

    return {
        "num_samples": n, "num_params": P, "gram": K, "sq_norms": sq_norms, "projections": proj,
        "cosine": cosine, "mean_grad_sq_norm": mu_sq, "eigenvalues": eig, "eig_ratio": eig_ratio,
        "fisher_fro": fro, "rank1_coeff": c_star, "rank1_rel_err": rel(rank1_sq),
        "diag_rel_err": rel(diag_err_sq), "best_rank1_rel_err": rel(best_sq),
    }


def fisher_geometry(model: torch.nn.Module, loss_fn: Callable, batch: Dict[str, torch.Tensor], *,
                    top_k: int = 5, chunk_params: Optional[int] = None, micro_batch: int = 64,
                    return_mean_grad: bool = True, return_diagonal: bool = True,
                    progress: bool = True) -> FisherGeometry:
    """Measure the geometry of the empirical Fisher F = (1/n) sum_i g_i g_i^T of `model` on `batch`.

    model: module whose trainable parameters (requires_grad, in `model.parameters()` order) define g_i.
    loss_fn(model, batch) -> per-sample losses [B] (e.g. cdgfast.diffusion.DiffusionLoss); it is called
        on one-sample batches under torch.func.vmap, so it must treat samples independently.
    batch: dict whose tensors share the leading dimension n >= 2 (non-tensor values are passed as is);
        g_i is the gradient of loss_fn on sample i alone.
    top_k: how many leading eigenvalues of F to return (1 <= top_k <= P).
    chunk_params: most flat-parameter entries per group; None -> min(P, 2**27 // n), so the group
        buffer [n, chunk_params] stays under 2**27 elements.
    micro_batch: samples per vmapped forward/backward.
    Returns a FisherGeometry (see `gram_statistics` for the identities used). The model is put in eval
    mode during the measurement (per-sample gradients need sample-independent layers) and restored.
    """
    params = trainable_parameters(model)
    P = sum(p.numel() for p in params)
    if params and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1 or top_k > P):
        raise ValueError(f"top_k: expected an integer in [1, P = {P}], got {top_k!r}")
    gram = per_sample_gram(model, loss_fn, batch, chunk_params=chunk_params, micro_batch=micro_batch,
                           return_mean_grad=return_mean_grad, progress=progress, desc="fisher geometry")
    K, d, mu, n = gram.gram, gram.diag_sum, gram.mean_grad, gram.num_samples
    stats = gram_statistics(K, d, top_k=top_k, num_params=P)
    return FisherGeometry(**stats, mean_grad=mu, diagonal=(d / n) if return_diagonal else None)


def scaled_prediction_mse(model: torch.nn.Module, batch: Dict[str, torch.Tensor], schedule) -> torch.Tensor:
    """Fig. 1 of the rank-1 paper: per-sample MSE between the model input x_t and the scaled prediction
    x_hat_t = sqrt(1 - abar_t) * eps_hat, eps_hat = eps_theta(x_t, t, y).

    Our reading of section 3.2: the score is s = -eps / sqrt(1 - abar_t) and Proposition 1 says that at
    low SNR s*(x_t) ~ -x_t / (1 - abar_t); equating the two gives x_t ~ sqrt(1 - abar_t) eps_hat, the
    "scaled prediction" the paper compares with x_t ("Tweedie's identity"). The MSE is the mean over
    pixels of (x_t - x_hat_t)^2, one value per sample [B]; it tends to 0 as t grows.
    """
    from ..diffusion import as_schedule, predict_eps

    schedule = as_schedule(schedule)
    tensors, _, _ = _split_batch(batch)
    for key in ("x", "t", "eps"):
        if key not in tensors:
            raise ValueError(f"batch: expected key {key!r} (a batch is {{'x', 'y', 't', 'eps'}})")
    x0, t, eps = batch["x"], batch["t"], batch["eps"]
    with torch.no_grad():
        x_t = schedule.add_noise(x0, eps, t)
        eps_hat = schedule.eps_from_prediction(predict_eps(model, x_t, t, batch.get("y")), x_t, t)
        acc = torch.promote_types(x_t.dtype, torch.float32)  # 1 - abar in bf16 is 0 near t = 0
        abar = schedule.gather(schedule.alphas_cumprod, t, x_t, dtype=acc)
        x_hat = (1 - abar).sqrt() * eps_hat.to(acc)
        return (x_t.to(acc) - x_hat).pow(2).flatten(1).mean(1)
