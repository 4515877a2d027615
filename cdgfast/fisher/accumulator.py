"""Streaming Fisher accumulation on flat buffers (SPEC sections 2 and 4).

`FisherAccumulator` keeps O(P) running sums over per-sample gradients g_i, never a B x P matrix:

* `add_sq_grads(sq, count)`  sq = sum_i g_i * g_i over `count` samples -> `diagonal()` = mean_i g_i * g_i
  (EWC / diag Fisher);
* `add_grads(g, count)`      g = sum_i g_i over `count` samples -> `mean_grad()` = mu (rank-1 direction);
* `add_projections(proj)`    proj[i] = mu . g_i -> `coeff()` = mean_i (mu . g_i)^2 / ||mu||^4 (rank-1 coefficient).

Sums may come flat ([P]) or as a list of per-parameter tensors (in `model.parameters()` order), which are
streamed into consecutive slices of the flat buffer without building a flat copy first. Paths, fastest first:

* a flat [P] tensor (e.g. `FlatParameters.grad` of a model flattened by `cdgfast.params.flatten_parameters_`):
  ONE elementwise op over P elements (the Triton kernel of `cdgfast.kernels.fisher_update` on CUDA, gamma
  folded into the same pass);
* a list whose tensors tile one storage back to back (`[p.grad for p in model.parameters()]` after
  `flatten_parameters_`): detected without a copy (`cdgfast.ops.penalties._shared_flat_buffer`) and
  remembered per list (same tensor objects at the same data pointers), then the same ONE flat op;
* any other list: CUDA: one launch of csrc/fisher_update.cu per source dtype (when a runtime CUDA
  compiler is there, see `cdgfast._cuda`); else `torch._foreach_*` over views of the buffer's slices,
  cached per (buffer, shapes), a decay applied group by group of ~_FLAT_CHUNK elements as one flat `mul_`
  each.

`_fisher_update` is the one place that picks among these implementations (one signature, chosen from the
source's layout, the device and what is installed, falling back to plain PyTorch); `fisher_update_`
validates and resolves the layout in front of it.

`online_update(online, new, gamma)` is online EWC's F <- gamma F + F_new, in place.
"""
from __future__ import annotations

import math
import numbers
import operator
import weakref
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from cdgfast._dispatch import use_triton
from cdgfast._validation import FLOAT_DTYPES, check_tensor
from cdgfast.ops.penalties import _shared_flat_buffer

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


# ----------------------------------------------------------------------------------------------------
# Plans: what a list of per-parameter tensors means for one destination buffer, cached so that repeated calls
# with the same parameter layout do no Python-side slicing or reshaping (a profile of the uncached version
# spent half its time rebuilding views).

# Elements per chunk of a gamma != 1 update on the CPU (mul_, then the accumulation while the chunk is in
# L2). On this project's 2-core Xeon (2 MB L2 per core) 256k-element chunks measured ~5% faster than two
# full passes over 8M elements, and 64k chunks no faster (per-op overhead eats the saved traffic).
_FLAT_CHUNK = 1 << 18
_MAX_TILED = 4  # tiled source lists remembered per destination (they hold strong references)


class _DstPlans:
    """Per-destination cache. `views`: (dst data_ptr, shapes) -> views of dst's consecutive slices shaped like
    the sources. `tiled`: ids of a source list whose tensors tile one storage back to back -> (the tensors
    themselves, so their ids stay theirs; their data pointers; a flat alias of them)."""

    __slots__ = ("views", "tiled")

    def __init__(self):
        self.views = {}
        self.tiled = {}


# id(dst) -> (weak reference to dst, its plans); keyed by identity (WeakKeyDictionary would compare tensors
# with ==), dropped when dst is collected.
_PLANS: "dict[int, tuple]" = {}


def _plans(dst: Tensor) -> _DstPlans:
    entry = _PLANS.get(id(dst))
    if entry is not None and entry[0]() is dst:
        return entry[1]
    key = id(dst)

    def _drop(ref, key=key):
        cur = _PLANS.get(key)
        if cur is not None and cur[0] is ref:
            del _PLANS[key]

    plans = _DstPlans()
    _PLANS[key] = (weakref.ref(dst, _drop), plans)
    return plans


def _slice_views(dst_flat: Tensor, tensors: Sequence[Tensor], shapes: Optional[tuple] = None):
    """(views, keep, groups): views of consecutive slices of `dst_flat` shaped like the non-empty
    `tensors`; the indices of those tensors (None when none is empty); and groups of consecutive views of
    about _FLAT_CHUNK elements or more as (the flat slice they tile, first view, end view), so that a
    decay can be applied group by group while the group is in cache. None when the sizes do not add up
    to dst_flat.numel(). Cached per dst and shapes; the key holds dst's data pointer, so a re-pointed or
    resized dst never sees stale views."""
    if shapes is None:
        shapes = tuple([t.shape for t in tensors])
    plans = _plans(dst_flat)
    key = (dst_flat.data_ptr(), dst_flat.numel(), shapes)
    entry = plans.views.get(key)
    if entry is None:
        sizes = [math.prod(shape) for shape in shapes]
        if sum(sizes) != dst_flat.numel():
            return None
        views, keep, groups, off, g_off, g_view = [], [], [], 0, 0, 0
        for i, (shape, n) in enumerate(zip(shapes, sizes)):
            if n:  # empty tensors add nothing (and some _foreach kernels reject empty pairs)
                views.append(dst_flat[off:off + n].view(shape))
                keep.append(i)
            off += n
            if off - g_off >= _FLAT_CHUNK or i == len(shapes) - 1:
                groups.append((dst_flat[g_off:off], g_view, len(views)))
                g_off, g_view = off, len(views)
        entry = (views, None if len(keep) == len(shapes) else keep, groups)
        if len(plans.views) >= 16:  # a handful of layouts per buffer in practice; never grow without bound
            plans.views.clear()
        plans.views[key] = entry
    return entry


def _tiled_hit(plans: _DstPlans, tensors: List[Tensor]) -> Optional[Tensor]:
    """The flat alias remembered for this very list of tensors (same objects, validated before, at the same
    data pointers), else None. Two C-level passes over the list, no Python loop."""
    if not plans.tiled:
        return None
    ids = tuple(map(id, tensors))
    hit = plans.tiled.get(ids)
    if hit is None:
        return None
    if list(map(Tensor.data_ptr, tensors)) == hit[1]:
        return hit[2]
    del plans.tiled[ids]  # same objects, new storage (e.g. `p.data = ...`, `model.to(...)`): re-detect
    return None


def _tiled_source(dst: Tensor, tensors: List[Tensor]) -> Optional[Tensor]:
    """A flat [P] alias of validated `tensors` (one dtype, dst's device, P elements in all) if they tile one
    storage back to back (e.g. the parameters or gradients of a model after
    `cdgfast.params.flatten_parameters_`), else None; a hit is remembered for `_tiled_hit`."""
    if len(tensors) > 1:  # cheap reject before the full check: the first two must be neighbours
        t0, t1 = tensors[0], tensors[1]
        if t1.data_ptr() != t0.data_ptr() + t0.numel() * t0.element_size():
            return None
    flat = _shared_flat_buffer(tensors)
    if flat is None or flat.numel() != dst.numel():
        return None
    plans = _plans(dst)
    ids = tuple(map(id, tensors))
    if len(plans.tiled) >= _MAX_TILED:
        plans.tiled.pop(next(iter(plans.tiled)))
    plans.tiled[ids] = (tuple(tensors), list(map(Tensor.data_ptr, tensors)), flat)
    return flat


def _update_one_(dst: Tensor, src: Tensor, gamma: float, scale: float, square: bool) -> None:
    """dst <- gamma*dst + scale*(src*src if square else src) as in-place ATen ops on one tensor (src of
    any floating dtype: the in-place ops promote to dst's)."""
    if gamma != 1.0:
        dst.mul_(gamma)
    if square:
        dst.addcmul_(src, src, value=scale)
    else:
        dst.add_(src, alpha=scale)


def _single_fisher_update_(dst: Tensor, src: Tensor, gamma: float, scale: float, square: bool) -> Tensor:
    """The plain-PyTorch flat path, on flat tensors of P elements in one pass over memory: one op for
    gamma == 1 and for the online-EWC form (scale 1, not squared: torch.add(src, dst, alpha=gamma, out=dst)),
    else mul_ and the accumulation per L2-sized chunk, so that the second op reads dst from cache."""
    if gamma != 1.0 and not square and scale == 1.0:  # online EWC: src + gamma*dst is one op (out= aliases dst)
        return torch.add(src, dst, alpha=gamma, out=dst)
    n = dst.numel()
    if gamma == 1.0 or n <= _FLAT_CHUNK:
        _update_one_(dst, src, gamma, scale, square)
        return dst
    for lo in range(0, n, _FLAT_CHUNK):
        _update_one_(dst[lo:lo + _FLAT_CHUNK], src[lo:lo + _FLAT_CHUNK], gamma, scale, square)
    return dst


def _foreach_update_(views: List[Tensor], srcs: List[Tensor], gamma: float, scale: float, square: bool,
                     same_dtype: bool, groups=None) -> None:
    """views[i] <- gamma*views[i] + scale*(srcs[i] squared or not). With gamma != 1 and `groups` (see
    _slice_views), group by group: one flat mul_ over the group's slice, then the accumulation while the
    slice is still in cache (one memory pass; `_foreach_mul_` over many small views costs more)."""
    if gamma != 1.0:
        if groups is None or len(groups) == 1:
            if groups is None:
                torch._foreach_mul_(views, gamma)
            else:
                groups[0][0].mul_(gamma)
        else:
            for flat_slice, a, b in groups:
                flat_slice.mul_(gamma)
                if b > a:
                    _foreach_update_(views[a:b], srcs[a:b], 1.0, scale, square, same_dtype)
            return
    if same_dtype:
        if square:
            torch._foreach_addcmul_(views, srcs, srcs, value=scale)
        else:
            torch._foreach_add_(views, srcs, alpha=scale)
    else:  # mixed dtypes: per-tensor in-place ops promote to the buffer's dtype
        for v, s in zip(views, srcs):
            _update_one_(v, s, 1.0, scale, square)


def _foreach_fisher_update_(dst: Tensor, tensors: List[Tensor], gamma: float, scale: float, square: bool,
                            entry=None, dtypes=None) -> Tensor:
    """The plain-PyTorch multi-tensor path: torch._foreach_* over the cached views of dst's slices
    (`entry` = `_slice_views(dst, tensors)` and `dtypes` = the set of the tensors' dtypes, when the caller
    has them already)."""
    views, keep, groups = _slice_views(dst, tensors) if entry is None else entry
    if keep is not None:
        tensors = [tensors[i] for i in keep]
        dtypes = None  # the dtypes of the empty tensors, which were dropped, do not count
    if views:
        if dtypes is None:
            dtypes = {t.dtype for t in tensors}
        _foreach_update_(views, tensors, gamma, scale, square, len(dtypes) == 1 and dst.dtype in dtypes, groups)
    return dst


@torch.no_grad()
def foreach_fisher_update(dst_flat: Tensor, tensors: Sequence[Tensor], gamma: float = 1.0, scale: float = 1.0,
                          square: bool = False) -> None:
    """torch._foreach_* over views of consecutive slices of `dst_flat` (multi-tensor launches on CUDA, a
    loop in C++ on the CPU): `_foreach_mul_` by gamma (when gamma != 1), then `_foreach_addcmul_` /
    `_foreach_add_`. The views are cached per (dst_flat, shapes). No validation (callers check sizes): the
    reference for every multi-tensor path."""
    _foreach_fisher_update_(dst_flat, list(tensors), float(gamma), float(scale), bool(square))


# ----------------------------------------------------------------------------------------------------
# The choice of implementation, in one place. Every path takes (dst, src, gamma, scale, square) on
# validated inputs (dst: a contiguous 1-D buffer of P elements; src: a flat [P] tensor, or a list of
# tensors whose sizes add up to P, on dst's device) and updates dst in place.

def _fisher_update(dst: Tensor, src: TensorOrList, gamma: float, scale: float, square: bool, *,
                   entry=None, dtypes=None) -> Tensor:
    """dst <- gamma*dst + scale*(src*src if square else src):

    * flat src: the Triton kernel on CUDA (`cdgfast.kernels.fisher_update.fisher_update_`) when Triton is
      usable, else the plain-PyTorch single-tensor path;
    * a list: on CUDA the single-launch kernel of csrc/fisher_update.cu when a runtime compiler is there,
      it has a kernel for every (dst, source) dtype pair and it passed its check on this device; else
      torch._foreach_* (`entry`, `dtypes`: see `_foreach_fisher_update_`).
    """
    if isinstance(src, Tensor):
        if dst.is_cuda and use_triton(dst):
            from cdgfast.kernels.fisher_update import fisher_update_ as triton_fisher_update_
            return triton_fisher_update_(dst, src, gamma, scale, square)
        return _single_fisher_update_(dst, src, gamma, scale, square)
    if dst.is_cuda:
        if dtypes is None:
            dtypes = {t.dtype for t in src}
        if _cuda_kernel_usable(dst, dtypes):
            from cdgfast.kernels.fisher_update import cuda_fisher_update_
            return cuda_fisher_update_(dst, src, gamma, scale, square)
    return _foreach_fisher_update_(dst, src, gamma, scale, square, entry, dtypes)


def _cuda_kernel_usable(dst: Tensor, dtypes) -> bool:
    from cdgfast import _cuda  # the runtime loader: reached only from this CUDA branch
    from cdgfast.kernels import fisher_update as kf

    return (_cuda.available() and all((dst.dtype, dt) in kf.CUDA_KERNELS for dt in dtypes)
            and _cuda.trusted(kf.CUDA_SOURCE, dst.device, _check_cuda_kernel, fallback="torch._foreach_*"))


def _check_cuda_kernel(device: torch.device) -> None:
    """csrc/fisher_update.cu against the torch._foreach_* path on a small problem (chunk edges, a float16
    source), both forms; raises on a mismatch."""
    from cdgfast.kernels.fisher_update import cuda_fisher_update_

    gen = torch.Generator(device="cpu").manual_seed(0)
    srcs = [torch.randn(n, generator=gen).to(device) for n in (1, 4095, 4097, 9000)]
    srcs.append(torch.randn(37, generator=gen).to(device=device, dtype=torch.float16))
    total = sum(s.numel() for s in srcs)
    base = torch.randn(total, generator=gen).to(device)
    for square in (False, True):
        a, b = base.clone(), base.clone()
        cuda_fisher_update_(a, srcs, 0.5, 1.5, square)
        _foreach_fisher_update_(b, srcs, 0.5, 1.5, square)
        if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
            raise RuntimeError("mismatch against torch._foreach_* on a test problem")


_is_cpu = operator.attrgetter("is_cpu")


def _describe(t) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    return f"{t.dtype} tensor of shape {tuple(t.shape)}{'' if t.is_contiguous() else ', not contiguous'}"


def _validate_list(dst: Tensor, tensors: List[Tensor], name: str) -> None:
    """The slow, precise check (only reached when the fast one in fisher_update_ fails): raises ValueError."""
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


def fisher_update_(dst: Tensor, src: TensorOrList, *, gamma: float = 1.0, scale: float = 1.0,
                   square: bool = False, name: str = "src") -> Tensor:
    """In place on the flat buffer `dst` [P]: dst <- gamma*dst + scale*(src*src if square else src).

    `src` is a flat [P] tensor or a list of tensors whose sizes add up to P (streamed into consecutive
    slices). Paths, fastest first:

    * flat src, or a list whose tensors tile one storage back to back (a flattened model's parameters or
      gradients, see `cdgfast.params.flatten_parameters_`; detected without a copy and remembered per
      list -- up to 4 lists per dst, holding references to their tensors; a repeat costs an id and a
      data-pointer comparison, so a tensor re-pointed with `.data =` or `.set_()` is re-detected, but one
      whose shape or strides are changed in place at the same address is not): ONE elementwise op over
      P elements (the Triton kernel on CUDA), gamma folded into the same memory pass;
    * any other list: torch._foreach_* over cached views of dst's slices (on CUDA the single-launch
      multi-tensor kernel of cdgfast._cuda).

    Returns dst. Raises ValueError naming `name` on a size, dtype or device mismatch, and naming `dst`
    unless dst is a contiguous 1-D floating tensor.
    """
    if not isinstance(dst, Tensor) or dst.dim() != 1 or not dst.is_contiguous() or dst.dtype not in FLOAT_DTYPES:
        raise ValueError(f"dst: expected a contiguous 1-D floating tensor (the flat buffer, updated in place), "
                         f"got {_describe(dst)}")
    # running sums are data: a source that requires grad must not pull dst into a graph (set_grad_enabled
    # as a call, not the no_grad decorator: this is on the per-batch hot path, a few microseconds count)
    prev = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        return _fisher_update_impl(dst, src, float(gamma), float(scale), bool(square), name)
    finally:
        torch.set_grad_enabled(prev)


def _fisher_update_impl(dst: Tensor, src: TensorOrList, gamma: float, scale: float, square: bool,
                        name: str) -> Tensor:
    if isinstance(src, Tensor):
        check_tensor(name, src)
        if src.numel() != dst.numel():
            raise ValueError(f"{name}: expected {dst.numel()} elements (P), got shape {tuple(src.shape)}")
        if src.device != dst.device:
            raise ValueError(f"{name}: expected device {dst.device} (the accumulator's), got {src.device}")
        return _fisher_update(dst, src.reshape(-1), gamma, scale, square)
    try:
        tensors = src if type(src) is list else list(src)
    except TypeError:
        raise ValueError(f"{name}: expected a flat tensor or a list of per-parameter tensors, "
                         f"got {type(src).__name__}")
    if not tensors:
        raise ValueError(f"{name}: expected a non-empty list of per-parameter tensors")
    flat = _tiled_hit(_plans(dst), tensors)  # a list validated and found tiled before: nothing to check
    if flat is not None and flat.numel() == dst.numel():
        return _fisher_update(dst, flat, gamma, scale, square)
    # fast check: every element a tensor, one (dtype, device) pair or a few floating dtypes on dst's device
    if not all(issubclass(c, Tensor) for c in set(map(type, tensors))):
        _validate_list(dst, tensors, name)
    dtypes = {t.dtype for t in tensors}
    if not dtypes.issubset(FLOAT_DTYPES) or not (all(map(_is_cpu, tensors)) if dst.is_cpu
                                                 else {t.device for t in tensors} == {dst.device}):
        _validate_list(dst, tensors, name)
    flat = _tiled_source(dst, tensors) if len(dtypes) == 1 else None
    if flat is not None:
        return _fisher_update(dst, flat, gamma, scale, square)
    entry = _slice_views(dst, tensors)
    if entry is None:
        _validate_list(dst, tensors, name)  # the sizes do not add up to P: raises with the count
    return _fisher_update(dst, tensors, gamma, scale, square, entry=entry, dtypes=dtypes)


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
    Fastest input: a flat [P] tensor such as `FlatParameters.grad` (`cdgfast.params.flatten_parameters_`);
    a list of a flattened model's gradients is detected and costs one flat op too (see `fisher_update_`).
    """

    def __init__(self, num_params: int, *, device=None, dtype: torch.dtype = torch.float32):
        if isinstance(num_params, bool) or not isinstance(num_params, numbers.Integral) or int(num_params) <= 0:
            raise ValueError(f"num_params: expected a positive integer, got {num_params!r}")
        if dtype not in (torch.float32, torch.float64):
            # running sums over thousands of samples in a half-precision buffer stop growing (bf16 keeps 8 bits):
            # a quietly wrong Fisher. Half-precision inputs are fine; the sums are not.
            raise ValueError(f"dtype: expected torch.float32 or torch.float64 for the running sums, got {dtype}")
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
