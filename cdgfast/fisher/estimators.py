"""Public Fisher functions (SPEC section 3): per-sample projections and squared-gradient sums without
per-sample loops, and the rank-1 / diagonal empirical Fisher estimators.

Conventions shared by every function here:
* `loss_fn(model, batch)` returns the per-sample losses `[B]` (e.g. `cdgfast.diffusion.DiffusionLoss`);
  `g_i = grad_theta l_i` over the trainable parameters, flattened in `model.parameters()` order (P).
* The model is used in its current mode: call `model.eval()` first if it has dropout (the hook,
  JVP and reference paths draw dropout masks differently, so train-mode dropout makes the numbers
  depend on the path and on the RNG state). BatchNorm in train mode couples the samples of a batch;
  it is supported (exactly, through the slower per-sample autograd path), with g_i = gradient of
  l_i as computed in the batched forward.
* The model is left as it was: no hooks remain, `.grad` is not touched (only `torch.autograd.grad`
  is used), training flags, `requires_grad` and buffer values (BatchNorm running statistics) are
  restored, parameters are never written.
* Results are detached, on the parameters' device, in the widest parameter dtype but at least float32
  (float16 / bfloat16 models accumulate in float32).
* Every function runs with autograd on, also when called under `torch.no_grad()` or
  `torch.inference_mode()` (batch tensors made in inference mode are cloned into normal tensors), and
  refuses to run inside a `torch.func` transform or a forward-AD level.
* `loss_fn`'s losses must depend on the trainable parameters through autograd: losses computed under
  `torch.no_grad()` / `torch.inference_mode()`, detached, or from other parameters raise ValueError
  (the forward-mode path accepts `no_grad`, under which forward AD still differentiates).
* Progress bars (`progress=True`, tqdm) are off by default.
* The estimators take `parallel=` (a `cdgfast.parallel.DataParallel`; None: one process). Every
  process passes the same GLOBAL batch stream; each takes its batches of it, computes the sums and
  sample counts below with the same primitives, and the sums and counts are all-reduced before any
  division, so every process returns the one-process estimate (see `cdgfast.parallel`). Only the main
  process shows bars.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, NamedTuple, Optional, Sequence, Union

import torch

from cdgfast.params import split_like, trainable_named
from cdgfast._validation import check_choice
from cdgfast.parallel import DataParallel, resolve

from ._common import (autograd_call, call_loss, check_batch, check_loss_fn, check_loss_graph, direction_pieces,
                      param_device, preserved_state, result_dtype, usable_batch)
from .hooks import HookPlan, hooked_contractions
from .jvp import jvp_grad_dot

DOT_METHODS = ("auto", "jvp", "hooks", "autograd")
SQ_METHODS = ("auto", "hooks", "autograd")


class Rank1Fisher(NamedTuple):
    """The rank-1 empirical Fisher `F ~ coeff * mean_grad mean_grad^T` (rank-1 paper, Eq. 5):
    `mean_grad = mean_i g_i` [P], `coeff = mean_i (mean_grad . g_i)^2 / ||mean_grad||^4`,
    `num_samples` = samples in the first pass."""

    mean_grad: torch.Tensor
    coeff: float
    num_samples: int


def _tqdm(iterable, progress: bool, desc: str):
    if not progress:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    return tqdm(iterable, desc=desc, leave=False, unit="batch")


# --------------------------------------------------------------------------------------------------
# Per-batch primitives
# --------------------------------------------------------------------------------------------------
@autograd_call("per_sample_grad_dot")
def per_sample_grad_dot(model: torch.nn.Module, loss_fn: Callable, batch, direction: Union[torch.Tensor, Sequence[torch.Tensor]],
                        method: str = "auto", *, rows_per_sample: int = 1) -> torch.Tensor:
    """`direction . g_i` for every sample i of `batch`: a tensor [B], without per-sample gradients.

    direction: a flat [P] tensor (SPEC flat order) or a list of tensors shaped like the trainable
    parameters. method:
      * "jvp": forward-mode AD, `d/de l_i(theta + e*direction)` (about 2-3 forward costs; math SDPA
        backend and contiguous GroupNorm inputs during the call, see `cdgfast.fisher.jvp`);
      * "hooks": one batched forward + backward with per-layer contractions (Linear, Conv2d,
        GroupNorm, LayerNorm, Embedding) where the forward proves which dim holds the samples;
        parameters the rules do not cover, or whose layout is not proven, get exact per-sample
        gradients from the same batched graph (see `cdgfast.fisher.hooks`);
      * "autograd": per-sample gradients of every parameter from the batched graph (vmapped backward
        over one-hot cotangents in chunks): slow, exact, a reference;
      * "auto" (default): "hooks" when every trainable parameter is statically covered by the hook
        rules and no layer couples samples (`cdgfast.fisher.hooks.hook_coverage`), else "jvp".
    rows_per_sample: see `per_sample_sq_grad_sum` (used by the hook path).
    """
    check_choice("method", method, DOT_METHODS)
    _check_rows(rows_per_sample)
    check_loss_fn(loss_fn)
    names, params = trainable_named(model)
    param_device(params)
    pieces = direction_pieces(direction, params)
    check_batch(batch)
    acc = result_dtype(params)
    if method == "auto":
        plan = HookPlan(model, params)
        method = "hooks" if (plan.all_covered and not plan.coupled) else "jvp"
    with preserved_state(model):
        if method == "jvp":
            return jvp_grad_dot(model, loss_fn, batch, names, params, pieces, acc)
        return hooked_contractions(model, loss_fn, batch, params, acc, pieces=pieces,
                                   force_fallback=(method == "autograd"), rows_per_sample=rows_per_sample).detach()


@autograd_call("per_sample_sq_grad_sum")
def per_sample_sq_grad_sum(model: torch.nn.Module, loss_fn: Callable, batch, method: str = "auto", *,
                           out: Optional[torch.Tensor] = None, rows_per_sample: int = 1) -> torch.Tensor:
    """`sum_i g_i * g_i` over the samples of `batch`: a flat tensor [P]; never a B x P tensor.

    Computed layer by layer from activations and output gradients of one batched forward + backward
    and added straight into the flat buffer (method "hooks"; "auto" is the same). Parameters that the
    hook rules do not cover (unsupported layers, shared or reused parameters, sample-coupling layers)
    get exact per-sample gradients from the batched graph in chunks of samples, squared and summed:
    slower, documented in `cdgfast.fisher.hooks`. "autograd" sends every parameter that way.

    out: optional flat [P] float32 / float64 tensor on the parameters' device; the sum is added into it
    in place and it is returned (how `diag_fisher` accumulates over batches). Else a new zero buffer.

    rows_per_sample: r > 1 when `loss_fn` runs the model on r copies of every sample laid out
    sample-major (`x.repeat_interleave(r, 0)`, as the DC-score losses do with one row per condition).
    Layers that see B * r rows then keep the hook path, summing each sample's r rows; without it they
    fall back to exact per-sample autograd (same numbers, about B times the cost). The layout is
    checked, not trusted: rows laid out otherwise (e.g. `x.repeat(r, 1)`), or another row count, fall
    back as well (see `cdgfast.fisher.hooks`).
    """
    check_choice("method", method, SQ_METHODS)
    _check_rows(rows_per_sample)
    check_loss_fn(loss_fn)
    _, params = trainable_named(model)
    dev = param_device(params)
    P = sum(p.numel() for p in params)
    acc = result_dtype(params)
    if out is None:
        out = torch.zeros(P, dtype=acc, device=dev)
    elif not (isinstance(out, torch.Tensor) and out.dim() == 1 and out.numel() == P
              and out.dtype in (torch.float32, torch.float64) and out.device == dev):
        # a float16 / bfloat16 buffer would round every batch's sum: refuse rather than lose the mass
        got = f"shape {tuple(out.shape)}, {out.dtype}, {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"out: expected a flat float32 or float64 tensor of P={P} elements on {dev}, got {got}")
    check_batch(batch)
    with preserved_state(model):
        hooked_contractions(model, loss_fn, batch, params, acc, sq_views=split_like(out, params),
                            force_fallback=(method == "autograd"), rows_per_sample=rows_per_sample)
    return out


def _check_rows(rows_per_sample) -> None:
    if isinstance(rows_per_sample, bool) or not isinstance(rows_per_sample, int) or rows_per_sample < 1:
        raise ValueError(f"rows_per_sample: expected a positive integer, got {rows_per_sample!r}")


# --------------------------------------------------------------------------------------------------
# Estimators over a data set
# --------------------------------------------------------------------------------------------------
def _passes(batches, name: str = "batches", two_passes: bool = True) -> Callable[[], Iterable]:
    """A function returning a fresh iterable of batches per pass."""
    if isinstance(batches, (list, tuple)):
        return lambda: batches
    if callable(batches):
        def fresh():
            it = batches()
            try:
                iter(it)
            except TypeError:
                raise ValueError(f"{name}: the callable must return an iterable of batches, got {type(it).__name__}")
            return it
        return fresh
    try:
        it = iter(batches)
    except TypeError:
        raise ValueError(f"{name}: expected a list/tuple of batches, a re-iterable (e.g. a DataLoader) or a "
                         f"callable returning a fresh iterable, got {type(batches).__name__}")
    if it is batches:
        if two_passes:
            raise ValueError(f"{name}: got a one-shot iterator/generator, but two passes over the data are "
                             f"needed; pass a list of batches or a callable returning a fresh iterable "
                             f"(the callable is how each pass gets fresh t/eps)")
        used = []

        def once():
            if used:
                raise ValueError(f"{name}: a one-shot iterator can be consumed only once")
            used.append(True)
            return batches
        return once
    return lambda: batches  # re-iterable (DataLoader, custom container)


@autograd_call("rank1_fisher")
def rank1_fisher(model: torch.nn.Module, loss_fn: Callable, batches, *, method: str = "auto",
                 progress: bool = False, parallel: Optional[DataParallel] = None) -> Rank1Fisher:
    """Rank-1 empirical Fisher of the task data (rank-1 paper, section 3.3; SPEC `rank1`).

    Pass 1: `mu = mean_i g_i`, one batched backward of the sum of each batch's losses (never per
    sample). Pass 2: `mu . g_i` for every sample with `per_sample_grad_dot(..., mu, method)`;
    `coeff = mean_i (mu . g_i)^2 / ||mu||^4`. The two passes iterate `batches` separately.

    batches: a list/tuple of batches (iterated twice: same t/eps in both passes), a re-iterable such
    as a DataLoader, or a callable returning a fresh iterable (how each pass gets fresh t/eps, as in
    the paper). A one-shot iterator/generator raises ValueError. progress: tqdm bars over batches
    (off by default). If `mu` is exactly zero, coeff is 0.0 (with a warning): the penalty vanishes
    either way. parallel: the data-parallel context (module docstring); `batches` is then the global
    stream and every process gets the estimate over all of it.
    """
    check_choice("method", method, DOT_METHODS)
    check_loss_fn(loss_fn)
    par = resolve(parallel)
    get = _passes(batches)
    _, params = trainable_named(model)
    dev = param_device(params)
    bars = progress and par.is_main
    # Each pass reduces to sums over samples (a [P] gradient sum and a count; a squared-projection sum
    # and a count): the only state that crosses batches, and what the processes all-reduce.
    total, n1 = _grad_sum(model, loss_fn, par.batches(get()), params, bars)
    par.all_reduce_sum(total)
    (n1,) = par.sum_counts(n1, device=dev)
    if n1 == 0:
        raise ValueError("batches: expected at least one non-empty batch, got none")
    mu = total.div_(n1)
    sq, n2 = _sq_projection_sum(model, loss_fn, par.batches(get()), mu, method, bars)
    par.all_reduce_sum(sq)
    (n2,) = par.sum_counts(n2, device=dev)
    if n2 == 0:
        raise ValueError("batches: the second pass yielded no batches; pass a list or a callable returning a "
                         "fresh iterable each time")
    if n2 != n1:
        warnings.warn(f"rank1_fisher: the two passes saw {n1} and {n2} samples; coeff averages over the second",
                      RuntimeWarning, stacklevel=2)
    norm2 = mu.to(torch.float64).square().sum()
    if norm2.item() == 0.0:
        warnings.warn("rank1_fisher: the mean gradient is exactly zero; coeff set to 0.0", RuntimeWarning, stacklevel=2)
        coeff = 0.0
    else:
        coeff = (sq / n2 / norm2.square()).item()
    return Rank1Fisher(mean_grad=mu, coeff=float(coeff), num_samples=int(n1))


def _grad_sum(model, loss_fn, batches: Iterable, params: Sequence[torch.Tensor], progress: bool):
    """(sum_i g_i as a flat [P] buffer, number of samples): one batched backward per batch, written
    straight into the buffer through per-parameter views."""
    total = torch.zeros(sum(p.numel() for p in params), dtype=result_dtype(params), device=params[0].device)
    views = split_like(total, params)
    n = 0
    with preserved_state(model):
        for batch in _tqdm(batches, progress, "rank1 Fisher: mean gradient"):
            check_batch(batch)
            losses = call_loss(loss_fn, model, usable_batch(batch))
            check_loss_graph(losses, params)
            grads = torch.autograd.grad(losses.sum(), params, allow_unused=True)
            for v, g in zip(views, grads):
                if g is not None:
                    v.add_(g.detach())
            n += losses.shape[0]
            del losses, grads
    return total, n


def _sq_projection_sum(model, loss_fn, batches: Iterable, mu: torch.Tensor, method: str, progress: bool):
    """(sum_i (mu . g_i)^2 as a float64 scalar tensor on the device (no host sync per batch), number
    of samples)."""
    sq, n = torch.zeros((), dtype=torch.float64, device=mu.device), 0
    for batch in _tqdm(batches, progress, "rank1 Fisher: projections"):
        proj = per_sample_grad_dot(model, loss_fn, batch, mu, method=method).to(torch.float64)
        sq += torch.dot(proj, proj)
        n += proj.shape[0]
    return sq, n


@autograd_call("diag_fisher")
def diag_fisher(model: torch.nn.Module, loss_fn: Callable, batches, *, method: str = "auto",
                progress: bool = False, rows_per_sample: int = 1,
                parallel: Optional[DataParallel] = None) -> torch.Tensor:
    """Diagonal empirical Fisher `mean_i g_i * g_i` [P] from true per-sample gradients (not the
    square of a batch gradient), summed batch by batch into one flat buffer with
    `per_sample_sq_grad_sum(..., out=buffer)`. batches: as in `rank1_fisher` (one pass, so a
    one-shot iterator is accepted here). progress: tqdm bar over batches (off by default).
    rows_per_sample: see `per_sample_sq_grad_sum`. parallel: as in `rank1_fisher`."""
    check_choice("method", method, SQ_METHODS)
    _check_rows(rows_per_sample)
    check_loss_fn(loss_fn)
    par = resolve(parallel)
    get = _passes(batches, two_passes=False)
    _, params = trainable_named(model)
    dev = param_device(params)
    buf, n = _sq_grad_sum(model, loss_fn, par.batches(get()), params, method, rows_per_sample,
                          progress and par.is_main)
    par.all_reduce_sum(buf)
    (n,) = par.sum_counts(n, device=dev)
    if n == 0:
        raise ValueError("batches: expected at least one non-empty batch, got none")
    return buf.div_(n)


def _sq_grad_sum(model, loss_fn, batches: Iterable, params: Sequence[torch.Tensor], method: str,
                 rows_per_sample: int, progress: bool):
    """(sum_i g_i * g_i as a flat [P] buffer, number of samples), one batch at a time."""
    acc = result_dtype(params)
    buf = torch.zeros(sum(p.numel() for p in params), dtype=acc, device=params[0].device)
    views = split_like(buf, params)
    n = 0
    for batch in _tqdm(batches, progress, "diag Fisher"):
        check_batch(batch)
        with preserved_state(model):
            count = int(hooked_contractions(model, loss_fn, batch, params, acc, sq_views=views,
                                            force_fallback=(method == "autograd"), rows_per_sample=rows_per_sample))
        if count == 0:
            raise ValueError("batch: expected at least one sample")
        n += count
    return buf, n


__all__ = ["Rank1Fisher", "per_sample_grad_dot", "per_sample_sq_grad_sum", "rank1_fisher", "diag_fisher"]
