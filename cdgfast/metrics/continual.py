"""Continual-learning summaries of a per-task FID matrix, and the class-distribution KLD.

Convention: `M[k, i] = FID_i(m_k)`, the FID on task i of the model after training through task k
(0-based, T tasks); entries with i > k are NaN (a task not yet seen is not evaluated).

    AFID@k = mean_{i <= k} FID_i(m_k)
    F      = (1/T) sum_{k < T} (FID_k(m_T) - FID_k(m_k))    forgetting (rank-1 paper, Sec. 4: divided by T,
                                                             the last term being 0; 0-based: the last row
                                                             minus the diagonal)
    MF     = AFID@T                                          (CCD paper)
    IMF    = mean_k AFID@k                                   (CCD paper; a reconstruction, see SPEC section 5)
    KLD    = KL(p_true || p_gen) = sum_c p_true(c) log(p_true(c) / p_gen(c))
             with p_gen the histogram of a classifier's predictions on generated images, smoothed by
             `eps` so an absent class gives a large finite value instead of infinity.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional, Sequence

import torch

from .._validation import check_nonnegative, check_real


def _matrix(fid, name: str = "fid", what: str = "FID", diagonal: bool = True) -> torch.Tensor:
    """A [T, T] float64 matrix, row k = after task k: finite below the diagonal and on it (unless
    `diagonal=False`), anything (NaN, None in a nested list) above. `name` / `what`: the argument and the
    quantity the messages name."""
    if isinstance(fid, torch.Tensor):
        m = fid.detach().to(torch.float64)
    else:
        try:
            rows = [[float("nan") if v is None else float(v) for v in row] for row in fid]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}: expected a square matrix [T, T] of numbers (a tensor or nested lists), "
                             f"got {type(fid).__name__} ({exc})") from None
        if len({len(r) for r in rows}) > 1:
            raise ValueError(f"{name}: expected a square matrix [T, T] (row k = after task k, None above the "
                             f"diagonal), got rows of lengths {[len(r) for r in rows]}")
        m = torch.tensor(rows, dtype=torch.float64)
    if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 1:
        raise ValueError(f"{name}: expected a square matrix [T, T] with T >= 1 (row k = after task k), "
                         f"got shape {tuple(m.shape)}")
    for k in range(m.shape[0]):
        end = k + 1 if diagonal else k
        if not torch.isfinite(m[k, :end]).all():
            raise ValueError(f"{name}: row {k} needs a finite {what} for every task i {'<=' if diagonal else '<'} "
                             f"{k}, got {m[k, :end].tolist()}")
    return m


def afid_at_k(fid) -> List[float]:
    """[AFID@0, ..., AFID@(T-1)]: mean of the lower-triangle row k (tasks seen so far)."""
    m = _matrix(fid)
    return [float(m[k, :k + 1].mean()) for k in range(m.shape[0])]


def forgetting(fid) -> float:
    """(1/T) sum over tasks k of FID_k(m_final) - FID_k(m_k) (the rank-1 paper's F, Sec. 4: the sum over all
    T tasks, whose last term is 0, divided by T); NaN when T = 1 (nothing to forget)."""
    m = _matrix(fid)
    t = m.shape[0]
    if t == 1:
        return float("nan")
    return float((m[t - 1, :t - 1] - torch.diagonal(m)[:t - 1]).sum() / t)


def mf(fid) -> float:
    """MF = AFID after the last task."""
    return afid_at_k(fid)[-1]


def imf(fid) -> float:
    """IMF = mean over k of AFID@k (reconstruction of the CCD paper's incremental mean FID)."""
    a = afid_at_k(fid)
    return sum(a) / len(a)


def _check_num_classes(num_classes) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")


def _check_classes(classes, num_classes: Optional[int] = None) -> List[int]:
    """Distinct integer class indices (in [0, num_classes) when given); a negative index would
    otherwise wrap around to the last classes."""
    out = []
    for c in classes:
        if not isinstance(c, numbers.Integral) or isinstance(c, bool):
            raise ValueError(f"classes: expected integer class indices, got {c!r}")
        out.append(int(c))
    if not out:
        raise ValueError("classes: expected at least one class")
    if len(set(out)) != len(out):
        raise ValueError(f"classes: expected distinct classes, got {out}")
    if min(out) < 0:
        raise ValueError(f"classes: expected non-negative class indices, got {out}")
    if num_classes is not None and max(out) >= num_classes:
        raise ValueError(f"classes: expected values in [0, {num_classes}) (num_classes = {num_classes}), got {out}")
    return out


def class_histogram(predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Normalised histogram [num_classes] (float64) of integer predictions [N]."""
    if not isinstance(predictions, torch.Tensor) or predictions.dim() != 1 or predictions.dtype.is_floating_point:
        raise ValueError(f"predictions: expected an integer tensor [N], got {getattr(predictions, 'shape', type(predictions))}")
    if predictions.numel() == 0:
        raise ValueError("predictions: expected at least one prediction")
    if predictions.dtype == torch.bool or predictions.dtype.is_complex:
        raise ValueError(f"predictions: expected integer class indices, got {predictions.dtype}")
    _check_num_classes(num_classes)
    if int(predictions.min()) < 0 or int(predictions.max()) >= num_classes:
        raise ValueError(f"predictions: expected values in [0, {num_classes - 1}], got "
                         f"[{int(predictions.min())}, {int(predictions.max())}]")
    h = torch.bincount(predictions.cpu(), minlength=num_classes).to(torch.float64)
    return h / h.sum()


def kl_divergence(p_true: torch.Tensor, p_gen: torch.Tensor, eps: float = 1e-6) -> float:
    """KL(p_true || p_gen) in nats; terms with p_true = 0 contribute 0; p_gen is smoothed by eps
    and renormalised."""
    p = torch.as_tensor(p_true, dtype=torch.float64)
    q = torch.as_tensor(p_gen, dtype=torch.float64)
    if p.dim() != 1 or p.shape != q.shape or p.numel() == 0:
        raise ValueError(f"p_true, p_gen: expected two non-empty vectors of equal length, got {tuple(p.shape)} "
                         f"and {tuple(q.shape)}")
    check_nonnegative("eps", eps)
    # a NaN entry passes `< 0` and `> 0` tests alike: it would drop out of the sum silently
    for name, v in (("p_true", p), ("p_gen", q)):
        if not torch.isfinite(v).all():
            raise ValueError(f"{name}: contains NaN or Inf, got {v.tolist()}")
    if (p < 0).any() or (q < 0).any() or abs(float(p.sum()) - 1) > 1e-6 or abs(float(q.sum()) - 1) > 1e-6:
        raise ValueError("p_true, p_gen: expected probability vectors (non-negative, summing to 1)")
    q = (q + eps) / (1 + eps * q.numel())
    mask = p > 0
    return float((p[mask] * (p[mask] / q[mask]).log()).sum())


def class_kld(predictions: torch.Tensor, classes: Sequence[int], num_classes: int,
              true_probs: Optional[torch.Tensor] = None) -> float:
    """KLD between the true class distribution (uniform over `classes` unless given) and the
    histogram of a classifier's `predictions` on generated images."""
    _check_num_classes(num_classes)
    classes = _check_classes(classes, num_classes)
    if true_probs is None:
        true_probs = torch.zeros(num_classes, dtype=torch.float64)
        true_probs[classes] = 1.0 / len(classes)
    return kl_divergence(true_probs, class_histogram(predictions, num_classes))


def class_balanced_labels(classes: Sequence[int], total: int) -> torch.Tensor:
    """`total` labels over `classes`, as balanced as possible (counts differ by at most one; the first
    classes get the extra ones), grouped by class."""
    classes = _check_classes(classes)
    if not isinstance(total, numbers.Integral) or isinstance(total, bool):
        raise ValueError(f"total: expected an integer, got {total!r}")
    if total < len(classes):
        raise ValueError(f"total: expected at least one sample per class ({len(classes)}), got {total}")
    base, extra = divmod(int(total), len(classes))
    return torch.cat([torch.full((base + (1 if j < extra else 0),), c, dtype=torch.long)
                      for j, c in enumerate(classes)])


def summarize(fid, kld: Optional[float] = None) -> Dict[str, object]:
    """All summaries of one method's FID matrix as plain Python values (JSON-ready; NaN -> None)."""
    m = _matrix(fid)
    if kld is not None and not (isinstance(kld, float) and math.isnan(kld)):  # NaN -> None below
        kld = check_real("kld", kld, finite=False)

    def clean(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    return {
        "fid": [[clean(float(v)) if i <= k else None for i, v in enumerate(row)] for k, row in enumerate(m.tolist())],
        "afid_at_k": afid_at_k(m),
        "forgetting": clean(forgetting(m)),
        "mf": mf(m),
        "imf": imf(m),
        "kld": clean(kld),
    }
