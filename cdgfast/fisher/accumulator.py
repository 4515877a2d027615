"""Streaming Fisher accumulation on flat buffers (SPEC sections 2 and 4).

`FisherAccumulator` keeps O(P) running sums over per-sample gradients g_i, never a B x P matrix:

* `add_sq_grads(sq, count)`  sq = sum_i g_i * g_i over `count` samples -> `diagonal()` = mean_i g_i * g_i
  (EWC / diag Fisher);
* `add_grads(g, count)`      g = sum_i g_i over `count` samples -> `mean_grad()` = mu (rank-1 direction);
* `add_projections(proj)`    proj[i] = mu . g_i -> `coeff()` = mean_i (mu . g_i)^2 / ||mu||^4 (rank-1 coefficient).

Sums may come flat ([P]) or as a list of per-parameter tensors (in `model.parameters()` order), which are
streamed into consecutive slices of the flat buffer without building a flat copy first:

* CUDA: `cdgfast._cuda.multi_tensor_fisher_update` -- one launch of csrc/fisher_update.cu per source dtype
  when a runtime CUDA compiler is there, else `torch._foreach_*` (multi-tensor launches too); flat inputs
  use the Triton kernel of `cdgfast.kernels.fisher_update` when `use_triton`;
* CPU: `torch._foreach_*` over views of the slices.

`online_update(online, new, gamma)` is online EWC's F <- gamma F + F_new, in place.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from cdgfast._dispatch import use_triton
from cdgfast._validation import FLOAT_DTYPES, check_tensor

__all__ = ["FisherAccumulator", "online_update", "fisher_update_", "foreach_fisher_update"]

TensorOrList = Union[Tensor, Sequence[Tensor]]


def _check_number(name: str, value, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (float(value) >= minimum) \
            or value != value or float(value) == float("inf"):
        raise ValueError(f"{name}: expected a finite real number >= {minimum}, got {value!r}")
    return float(value)


def _check_count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) <= 0:
        raise ValueError(f"count: expected a positive integer (the number of samples summed), got {value!r}")
    return int(value)


@torch.no_grad()
def foreach_fisher_update(dst_flat: Tensor, tensors: Sequence[Tensor], gamma: float = 1.0, scale: float = 1.0,
                          square: bool = False) -> None:
    """torch._foreach_* over views of consecutive slices of `dst_flat` (multi-tensor launches on CUDA, a
    loop on the CPU); no validation (callers check sizes): the reference for every multi-tensor path."""
    views, srcs, off = [], [], 0
    for t in tensors:
        n = t.numel()
        if n:
            views.append(dst_flat[off:off + n])
            srcs.append(t.reshape(-1))
        off += n
    if not views:
        return
    if gamma != 1.0:
        dst_flat.mul_(gamma)  # one pass over the whole buffer: the slices tile it
    if all(s.dtype == dst_flat.dtype for s in srcs):
        if square:
            torch._foreach_addcmul_(views, srcs, srcs, value=scale)
        else:
            torch._foreach_add_(views, srcs, alpha=scale)
    else:  # mixed dtypes: per-tensor in-place ops promote to the buffer's dtype
        for v, s in zip(views, srcs):
            if square:
                v.addcmul_(s, s, value=scale)
            else:
                v.add_(s, alpha=scale)


@torch.no_grad()  # running sums are data: a source that requires grad must not pull dst into a graph
def fisher_update_(dst: Tensor, src: TensorOrList, *, gamma: float = 1.0, scale: float = 1.0,
                   square: bool = False, name: str = "src") -> Tensor:
    """In place on the flat buffer `dst` [P]: dst <- gamma*dst + scale*(src*src if square else src).

    `src` is a flat [P] tensor or a list of tensors whose sizes add up to P (streamed into consecutive
    slices). Returns dst. Raises ValueError naming `name` on a size, dtype or device mismatch.
    """
    if isinstance(src, Tensor):
        check_tensor(name, src)
        if src.numel() != dst.numel():
            raise ValueError(f"{name}: expected {dst.numel()} elements (P), got shape {tuple(src.shape)}")
        if src.device != dst.device:
            raise ValueError(f"{name}: expected device {dst.device} (the accumulator's), got {src.device}")
        src = src.reshape(-1)
        if use_triton(dst):
            from cdgfast.kernels.fisher_update import fisher_update_ as _triton_update
            return _triton_update(dst, src, gamma, scale, square)
        if gamma != 1.0:
            dst.mul_(gamma)
        if square:
            dst.addcmul_(src, src, value=scale)
        else:
            dst.add_(src, alpha=scale)
        return dst
    try:
        tensors = list(src)
    except TypeError:
        raise ValueError(f"{name}: expected a flat tensor or a list of per-parameter tensors, "
                         f"got {type(src).__name__}")
    if not tensors:
        raise ValueError(f"{name}: expected a non-empty list of per-parameter tensors")
    total = 0
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name}[{i}]: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}[{i}]: expected a floating dtype, got {t.dtype}")
        if t.device != dst.device:
            raise ValueError(f"{name}[{i}]: expected device {dst.device} (the accumulator's), got {t.device}")
        total += t.numel()
    if total != dst.numel():
        raise ValueError(f"{name}: expected {dst.numel()} elements in all (P), got {total}")
    if dst.is_cuda:
        from cdgfast import _cuda  # lazy: never imported on CPU-only paths
        return _cuda.multi_tensor_fisher_update(dst, tensors, gamma, scale, square)
    foreach_fisher_update(dst, tensors, gamma, scale, square)
    return dst


class FisherAccumulator:
    """Running sums for Fisher estimates over P parameters (flat buffers, allocated on first use).

    FisherAccumulator(num_params, *, device=None, dtype=torch.float32). With device=None the buffers go
    to the device of the first tensor added.

    .add_sq_grads(sq, count)   sq: sum over `count` samples of g_i * g_i, flat [P] or per-parameter list
    .add_squared(g, count=1)   adds g * g for a gradient g (flat or list) that stands for `count` samples
    .add_grads(g, count)       g: sum over `count` samples of g_i (flat or per-parameter list)
    .add_projections(proj)     proj[B] = mu . g_i for B samples
    .diagonal() -> [P]         mean_i g_i * g_i = sum / num_sq
    .mean_grad() -> [P]        mean_i g_i = sum / num_grad
    .coeff(mean_grad=None)     mean_i (mu . g_i)^2 / ||mu||^4 as a float (mu = mean_grad() by default;
                               0.0 when mu = 0, where the rank-1 penalty vanishes anyway)
    .num_sq, .num_grad, .num_proj   sample counts; .reset() zeroes everything.

    Sums are kept in `dtype` (float32 by default; inputs of other floating dtypes are promoted when
    added); the projection sum of squares is kept in float64 on the device (no host sync per batch).
    """

    def __init__(self, num_params: int, *, device=None, dtype: torch.dtype = torch.float32):
        if isinstance(num_params, bool) or not isinstance(num_params, numbers.Integral) or int(num_params) <= 0:
            raise ValueError(f"num_params: expected a positive integer, got {num_params!r}")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype: expected a floating dtype, got {dtype}")
        self.num_params = int(num_params)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self._sq: Optional[Tensor] = None
        self._grad: Optional[Tensor] = None
        self._proj_sq: Optional[Tensor] = None
        self.num_sq = 0
        self.num_grad = 0
        self.num_proj = 0

    # -- buffers ---------------------------------------------------------------------------------------
    def _first_device(self, src, name: str) -> torch.device:
        if self.device is None:
            first = src if isinstance(src, Tensor) else next(iter(src), None)
            if not isinstance(first, Tensor):
                raise ValueError(f"{name}: expected a flat tensor or a non-empty list of tensors")
            self.device = first.device
        return self.device

    def _buffer(self, attr: str, src, name: str) -> Tensor:
        buf = getattr(self, attr)
        if buf is None:
            buf = torch.zeros(self.num_params, device=self._first_device(src, name), dtype=self.dtype)
            setattr(self, attr, buf)
        return buf

    # -- adding ------------------------------------------------------------------------------------------
    def add_sq_grads(self, sq: TensorOrList, count: int) -> None:
        """Add sum_i g_i * g_i over `count` samples (flat [P] or per-parameter list)."""
        count = _check_count(count)
        fisher_update_(self._buffer("_sq", sq, "sq"), sq, name="sq")
        self.num_sq += count

    def add_squared(self, g: TensorOrList, count: int = 1) -> None:
        """Add g * g (squared in the kernel) for a per-sample gradient g, counted as `count` samples."""
        count = _check_count(count)
        fisher_update_(self._buffer("_sq", g, "g"), g, square=True, name="g")
        self.num_sq += count

    def add_grads(self, g: TensorOrList, count: int) -> None:
        """Add sum_i g_i over `count` samples (flat [P] or per-parameter list)."""
        count = _check_count(count)
        fisher_update_(self._buffer("_grad", g, "g"), g, name="g")
        self.num_grad += count

    def add_projections(self, proj: Tensor) -> None:
        """Add proj[i] = mu . g_i for a batch of samples (1-D)."""
        check_tensor("proj", proj, ndim=1)
        dev = self._first_device(proj, "proj")
        if proj.device != dev:
            raise ValueError(f"proj: expected device {dev} (the accumulator's), got {proj.device}")
        p = proj.detach().to(torch.float64)
        sq = torch.dot(p, p)
        self._proj_sq = sq if self._proj_sq is None else self._proj_sq + sq
        self.num_proj += proj.shape[0]

    # -- results -------------------------------------------------------------------------------------------
    def diagonal(self) -> Tensor:
        """mean_i g_i * g_i [P] (a new tensor)."""
        if self.num_sq == 0:
            raise RuntimeError("FisherAccumulator.diagonal: no squared gradients were added (add_sq_grads)")
        return self._sq / self.num_sq

    def mean_grad(self) -> Tensor:
        """mean_i g_i [P] (a new tensor)."""
        if self.num_grad == 0:
            raise RuntimeError("FisherAccumulator.mean_grad: no gradients were added (add_grads)")
        return self._grad / self.num_grad

    def coeff(self, mean_grad: Optional[Tensor] = None) -> float:
        """mean_i (mu . g_i)^2 / ||mu||^4 with mu = `mean_grad` (default: self.mean_grad())."""
        if self.num_proj == 0:
            raise RuntimeError("FisherAccumulator.coeff: no projections were added (add_projections)")
        mu = self.mean_grad() if mean_grad is None else mean_grad
        check_tensor("mean_grad", mu)
        if mu.numel() != self.num_params:
            raise ValueError(f"mean_grad: expected {self.num_params} elements (P), got shape {tuple(mu.shape)}")
        m = mu.detach().reshape(-1).to(torch.float64)
        norm2 = float(torch.dot(m, m))
        if norm2 == 0.0:
            return 0.0
        return float(self._proj_sq) / self.num_proj / (norm2 * norm2)

    def reset(self) -> None:
        for buf in (self._sq, self._grad):
            if buf is not None:
                buf.zero_()
        self._proj_sq = None
        self.num_sq = self.num_grad = self.num_proj = 0

    def __repr__(self) -> str:
        return (f"FisherAccumulator(num_params={self.num_params}, device={self.device}, dtype={self.dtype}, "
                f"num_sq={self.num_sq}, num_grad={self.num_grad}, num_proj={self.num_proj})")


def online_update(online: Optional[Tensor], new: Tensor, gamma: float) -> Tensor:
    """Online EWC: F <- gamma * F + F_new, in place on the flat buffer `online`, which is returned.
    With online=None, returns a copy of `new` (so later in-place updates never touch the caller's tensor).
    Raises ValueError naming the argument on a shape, device or dtype mismatch or a bad gamma."""
    check_tensor("new", new)
    gamma = _check_number("gamma", gamma)
    if online is None:
        return new.detach().clone()
    check_tensor("online", online)
    if online.shape != new.shape:
        raise ValueError(f"new: expected shape {tuple(online.shape)} (online's), got {tuple(new.shape)}")
    if online.device != new.device:
        raise ValueError(f"new: expected device {online.device} (online's), got {new.device}")
    if not online.is_contiguous():
        raise ValueError("online: expected a contiguous buffer (it is updated in place)")
    with torch.no_grad():
        fisher_update_(online.view(-1), new.detach().reshape(-1), gamma=gamma, name="new")
    return online
