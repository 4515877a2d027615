"""Flat-buffer consolidation penalties (SPEC section 2: `rank1`, `ewc`/`diag`; section 4: one pass over
flat buffers).

    rank1_penalty(params, anchors[K,P], directions[K,P], coeffs[K]) = 0.5 sum_k c_k (d_k . (theta - a_k))^2
    diag_penalty(params, anchor[P], fisher[P])                      = 0.5 sum_j F_j (theta_j - a_j)^2
    lowrank_penalty(params, anchors[K,P], directions[K,k,P], lambdas[K,k])
                                                  = 0.5 sum_{t,j} lambda_tj (v_tj . (theta - a_t))^2

`theta` is the flat parameter vector of SPEC section 1. The weight `lam` is applied by the caller.

torch.library ops (namespace `cdgfast`):

* `rank1_penalty(theta, anchors, directions, coeffs) -> loss` and `diag_penalty(theta, anchor, fisher) -> loss`:
  the public ops on a flat theta. They are CompositeImplicitAutograd wrappers that return the first
  output of the ops below, which carry the autograd formula; that is how the forward can hand the
  backward what it already computed (a custom op can only save its inputs and outputs).
* `rank1_penalty_fwd(theta, anchors, directions, coeffs) -> (loss, s)`, s_k = d_k . (theta - a_k).
  Autograd with w_k = g c_k s_k + grad_s_k: d/dtheta = sum_k w_k d_k, d/da_k = -w_k d_k,
  d/dd_k = w_k (theta - a_k), d/dc_k = 0.5 g s_k^2 (all closed forms, no second pass over the
  data for s). The theta/anchor/direction gradients are one registered op, `rank1_penalty_backward`.
* `lowrank_penalty_fwd(theta, anchors, directions, lambdas) -> (loss, s)`, s_tj = v_tj . (theta - a_t)
  (a rank-k Fisher per consolidated task t: k directions share one anchor). Autograd with
  w_tj = g lambda_tj s_tj + grad_s_tj: d/dtheta = sum_tj w_tj v_tj, d/da_t = -sum_j w_tj v_tj,
  d/dv_tj = w_tj (theta - a_t), d/dlambda_tj = 0.5 g s_tj^2; the first three are one registered op,
  `lowrank_penalty_backward`. No Triton kernel yet: the composite (one [P] difference per task and a
  [k, P] matrix-vector product) runs on every device.
* `diag_penalty_fwd(theta, anchor, fisher, save_grad) -> (loss, r)`: with `save_grad`, r = F (theta - a)
  is written in the same pass as the loss, so the backward only scales it (`diag_penalty_backward`).
  d/dtheta = g r, d/da = -g r, d/dF = 0.5 g (theta - a)^2.

Every op has a plain-PyTorch composite (all devices), a fake (meta) implementation and, on CUDA, the
Triton kernels of `cdgfast.kernels.penalties` when `cdgfast._dispatch.use_triton(theta)`.

Higher-order derivatives: a backward with create_graph=True differentiates the plain-PyTorch reference
(`_rank1_ref`, `_lowrank_ref`, `_diag_ref`, also used under torch.func transforms) instead of calling the first-order
backward ops, so double backward is exact (see `_common`).

Dtypes: inputs may mix floating dtypes (say bfloat16 parameters and float32 Fisher/anchors). Sums are
accumulated in float32, or float64 when any input is float64, and the loss has that dtype; each
gradient has the dtype of its input. `coeffs` given as numbers become float32 (float64 beside float64
anchors). The saved r is float32 for float16 theta (`_common.saved_grad_dtype`: a Fisher of 1e-8
times a small difference is below float16's range, and the backward's scale, lam, can be 1e4).

Inference tensors (anchors, directions or a Fisher computed under torch.inference_mode) are accepted.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from cdgfast._dispatch import transform_active, triton_or_composite
from cdgfast.params import as_param_list
from cdgfast._validation import check_same_device, check_tensor

from ._common import acc_dtype as _acc_dtype, empty_unless, recorded_vjp, save, saved, saved_grad_dtype, usable

__all__ = ["rank1_penalty", "lowrank_penalty", "diag_penalty", "flat_parameters"]


# ----------------------------------------------------------------------------------------------------
# params -> flat theta

class _Flatten(torch.autograd.Function):
    """theta = the parameters as one flat vector: `flat` when they already tile one storage (a detached
    alias, no copy), else one torch.cat. The backward hands each parameter a view of the flat gradient
    (one split, no copy and no per-parameter autograd view nodes)."""

    @staticmethod
    def forward(ctx, flat: Optional[Tensor], *params: Tensor) -> Tensor:
        ctx.numels = [p.numel() for p in params]
        ctx.shapes = [p.shape for p in params]
        if flat is not None:
            return flat.view(-1)
        return torch.cat([p.reshape(-1) for p in params])

    @staticmethod
    def backward(ctx, grad: Tensor):
        parts = torch.split(grad, ctx.numels)
        return (None,) + tuple(g.view(shape) if need else None
                               for g, shape, need in zip(parts, ctx.shapes, ctx.needs_input_grad[1:]))


def _shared_flat_buffer(params: Sequence[Tensor]) -> Optional[Tensor]:
    """A detached 1-D alias of the storage if `params` are contiguous, in order and back to back in one
    storage (apex-style flat parameters); else None."""
    p0 = params[0]
    if p0.device.type == "meta" or torch.compiler.is_compiling():
        return None
    try:
        base = p0.untyped_storage().data_ptr()
    except Exception:  # tensor subclasses without storage
        return None
    if base == 0:
        return None
    offset = p0.storage_offset()
    for p in params:
        if (type(p) not in (Tensor, torch.nn.Parameter) or p.dtype != p0.dtype or p.device != p0.device
                or not p.is_contiguous() or p.storage_offset() != offset
                or p.untyped_storage().data_ptr() != base):
            return None
        offset += p.numel()
    total = offset - p0.storage_offset()
    return p0.detach().as_strided((total,), (1,), p0.storage_offset())


def flat_parameters(params: Union[Tensor, Sequence[Tensor], torch.nn.Module], name: str = "params") -> Tensor:
    """The flat parameter vector theta [P] (SPEC section 1), differentiable w.r.t. every parameter.

    * a 1-D tensor is used as is (a tensor of any other shape is flattened);
    * a module means its trainable parameters, in `model.parameters()` order;
    * a sequence of tensors is concatenated in order. When the tensors already tile one storage back to
      back (contiguous, in order, same dtype: apex-style flat parameters), theta is a view of that
      storage and the backward gives each parameter a view of the flat gradient: no copy either way.
      Otherwise `torch.cat` makes the one copy a flat kernel needs (one launch on CUDA); the backward
      splits the flat gradient into per-parameter views in one op (a custom autograd function, which
      measured ~10% cheaper on the CPU than cat's own backward through per-parameter reshape nodes).
      The copy costs one read and one write of P elements, small next to the penalty's own (2K+1) P reads,
      and it keeps the kernels simple (one contiguous buffer, no pointer tables).
      Mixed parameter dtypes are promoted by torch.cat.

    Raises ValueError naming `name` for a non-tensor, a non-floating dtype, mixed devices or no elements.
    """
    if isinstance(params, Tensor):
        check_tensor(name, params)
        return params if params.dim() == 1 else params.reshape(-1)
    plist = as_param_list(params, name)
    for i, p in enumerate(plist):
        check_tensor(f"{name}[{i}]", p, nonempty=False)
    check_same_device(**{f"{name}[{i}]": p for i, p in enumerate(plist)})
    if sum(p.numel() for p in plist) == 0:
        raise ValueError(f"{name}: expected at least one parameter element, got none")
    if len(plist) == 1:
        return plist[0].reshape(-1)
    flat = _shared_flat_buffer(plist)
    needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in plist)
    if transform_active() or torch.compiler.is_compiling() or not needs_grad:
        return flat if flat is not None else torch.cat([p.reshape(-1) for p in plist])
    return _Flatten.apply(flat, *plist)


# ----------------------------------------------------------------------------------------------------
# rank-1: composites

def _rank1_fwd_composite(theta: Tensor, anchors: Tensor, directions: Tensor, coeffs: Tensor) -> Tuple[Tensor, Tensor]:
    acc = _acc_dtype(theta, anchors, directions, coeffs)
    th = theta.to(acc)
    K = anchors.shape[0]
    s = torch.empty((K,), dtype=acc, device=theta.device)
    buf = torch.empty_like(th)
    for k in range(K):  # d_k . (theta - a_k): no cancellation when theta is near a_k; one P buffer
        torch.sub(th, anchors[k].to(acc), out=buf)
        s[k] = torch.dot(directions[k].to(acc), buf)
    loss = 0.5 * (coeffs.to(acc) * s * s).sum()
    return loss, s


def _rank1_bwd_composite(grad_loss, grad_s, theta, anchors, directions, coeffs, s,
                         need_theta, need_anchors, need_directions):
    acc = _acc_dtype(theta, anchors, directions, coeffs, s)
    w = grad_loss.to(acc) * coeffs.to(acc) * s.to(acc)
    if grad_s is not None:
        w = w + grad_s.to(acc)
    d = directions.to(acc)
    gt = torch.mv(d.t(), w).to(theta.dtype) if need_theta else theta.new_empty((0,))
    ga = (-w[:, None] * d).to(anchors.dtype) if need_anchors else anchors.new_empty((0,))
    gd = ((theta.to(acc)[None, :] - anchors.to(acc)) * w[:, None]).to(directions.dtype) if need_directions \
        else directions.new_empty((0,))
    return gt, ga, gd


def _rank1_ref(theta: Tensor, anchors: Tensor, directions: Tensor, coeffs: Tensor) -> Tuple[Tensor, Tensor]:
    """(loss, s) in plain differentiable PyTorch (transforms, create_graph backward); a [K, P] temporary."""
    acc = _acc_dtype(theta, anchors, directions, coeffs)
    s = ((theta.to(acc) - anchors.to(acc)) * directions.to(acc)).sum(1)
    return 0.5 * (coeffs.to(acc) * s * s).sum(), s


# ----------------------------------------------------------------------------------------------------
# rank-1: ops

@torch.library.custom_op("cdgfast::rank1_penalty_fwd", mutates_args=())
def _rank1_fwd(theta: Tensor, anchors: Tensor, directions: Tensor, coeffs: Tensor) -> Tuple[Tensor, Tensor]:
    return _rank1_fwd_composite(theta, anchors, directions, coeffs)


_rank1_fwd.register_kernel("cuda")(triton_or_composite("penalties", "rank1_penalty_forward", _rank1_fwd_composite))


@_rank1_fwd.register_fake
def _rank1_fwd_fake(theta, anchors, directions, coeffs):
    acc = _acc_dtype(theta, anchors, directions, coeffs)
    return theta.new_empty((), dtype=acc), theta.new_empty((anchors.shape[0],), dtype=acc)


@torch.library.custom_op("cdgfast::rank1_penalty_backward", mutates_args=())
def _rank1_bwd(grad_loss: Tensor, grad_s: Optional[Tensor], theta: Tensor, anchors: Tensor, directions: Tensor,
               coeffs: Tensor, s: Tensor, need_theta: bool, need_anchors: bool,
               need_directions: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _rank1_bwd_composite(grad_loss, grad_s, theta, anchors, directions, coeffs, s,
                                need_theta, need_anchors, need_directions)


_rank1_bwd.register_kernel("cuda")(triton_or_composite("penalties", "rank1_penalty_backward", _rank1_bwd_composite))


def _projection_bwd_fake(grad_loss, grad_s, theta, anchors, directions, weights, s, need_theta, need_anchors,
                         need_directions):
    return (empty_unless(need_theta, theta), empty_unless(need_anchors, anchors),
            empty_unless(need_directions, directions))


def _register_projection_autograd(fwd, backward_op, ref) -> None:
    """Autograd of a projection penalty 0.5 * sum w * s^2, s = directions . (theta - anchors), returning
    (loss, s): the rank-1 and the low-rank ops differ only in the shapes of s and w, so they share this.
    Under create_graph the plain reference is differentiated (double backward); otherwise the backward op
    computes the theta / anchors / directions gradients and the weights' gradient is 0.5 * g * s^2."""

    def setup_context(ctx, inputs, output):
        theta, anchors, directions, weights = inputs
        save(ctx, theta, anchors, directions, weights, output[1])
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss, grad_s):
        theta, anchors, directions, weights, s = saved(ctx)
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():
            return tuple(recorded_vjp(ref, (theta, anchors, directions, weights), need, (grad_loss, grad_s)))
        if grad_loss is None:
            grad_loss = s.new_zeros(())
        gt = ga = gd = gw = None
        if need[0] or need[1] or need[2]:
            gt, ga, gd = backward_op(grad_loss, grad_s, theta, anchors, directions, weights, s,
                                     need[0], need[1], need[2])
        if need[3]:
            gw = (0.5 * grad_loss.to(s.dtype) * s * s).to(weights.dtype)
        return (gt if need[0] else None, ga if need[1] else None, gd if need[2] else None, gw)

    fwd.register_autograd(backward, setup_context=setup_context)


_rank1_bwd.register_fake(_projection_bwd_fake)
_register_projection_autograd(_rank1_fwd, torch.ops.cdgfast.rank1_penalty_backward, _rank1_ref)


# ----------------------------------------------------------------------------------------------------
# low-rank (k directions per anchor): composites

def _lowrank_fwd_composite(theta: Tensor, anchors: Tensor, directions: Tensor,
                           lambdas: Tensor) -> Tuple[Tensor, Tensor]:
    acc = _acc_dtype(theta, anchors, directions, lambdas)
    th = theta.to(acc)
    T, k = directions.shape[0], directions.shape[1]
    s = torch.empty((T, k), dtype=acc, device=theta.device)
    buf = torch.empty_like(th)
    for t in range(T):  # V_t (theta - a_t): the difference first (no cancellation near a_t), one P buffer
        torch.sub(th, anchors[t].to(acc), out=buf)
        s[t] = torch.mv(directions[t].to(acc), buf)
    loss = 0.5 * (lambdas.to(acc) * s * s).sum()
    return loss, s


def _lowrank_bwd_composite(grad_loss, grad_s, theta, anchors, directions, lambdas, s,
                           need_theta, need_anchors, need_directions):
    acc = _acc_dtype(theta, anchors, directions, lambdas, s)
    w = grad_loss.to(acc) * lambdas.to(acc) * s.to(acc)          # [T, k]
    if grad_s is not None:
        w = w + grad_s.to(acc)
    T, P = anchors.shape
    per_task = None
    if need_theta or need_anchors:
        # V_t^T w_t for every task [T, P]: the anchor gradient is its negative, theta's gradient its sum
        per_task = torch.stack([torch.mv(directions[t].to(acc).t(), w[t]) for t in range(T)])
    gt = per_task.sum(0).to(theta.dtype) if need_theta else theta.new_empty((0,))
    ga = (-per_task).to(anchors.dtype) if need_anchors else anchors.new_empty((0,))
    if need_directions:
        diff = theta.to(acc)[None, :] - anchors.to(acc)           # [T, P]
        gd = (w[:, :, None] * diff[:, None, :]).to(directions.dtype)
    else:
        gd = directions.new_empty((0,))
    return gt, ga, gd


def _lowrank_ref(theta: Tensor, anchors: Tensor, directions: Tensor, lambdas: Tensor) -> Tuple[Tensor, Tensor]:
    """(loss, s) in plain differentiable PyTorch (transforms, create_graph backward); a [T, P] temporary."""
    acc = _acc_dtype(theta, anchors, directions, lambdas)
    diff = theta.to(acc)[None, :] - anchors.to(acc)
    s = torch.einsum("tkp,tp->tk", directions.to(acc), diff)
    return 0.5 * (lambdas.to(acc) * s * s).sum(), s


# ----------------------------------------------------------------------------------------------------
# low-rank: ops

@torch.library.custom_op("cdgfast::lowrank_penalty_fwd", mutates_args=())
def _lowrank_fwd(theta: Tensor, anchors: Tensor, directions: Tensor, lambdas: Tensor) -> Tuple[Tensor, Tensor]:
    return _lowrank_fwd_composite(theta, anchors, directions, lambdas)


@_lowrank_fwd.register_fake
def _lowrank_fwd_fake(theta, anchors, directions, lambdas):
    acc = _acc_dtype(theta, anchors, directions, lambdas)
    return theta.new_empty((), dtype=acc), theta.new_empty(tuple(directions.shape[:2]), dtype=acc)


@torch.library.custom_op("cdgfast::lowrank_penalty_backward", mutates_args=())
def _lowrank_bwd(grad_loss: Tensor, grad_s: Optional[Tensor], theta: Tensor, anchors: Tensor, directions: Tensor,
                 lambdas: Tensor, s: Tensor, need_theta: bool, need_anchors: bool,
                 need_directions: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _lowrank_bwd_composite(grad_loss, grad_s, theta, anchors, directions, lambdas, s,
                                  need_theta, need_anchors, need_directions)


_lowrank_bwd.register_fake(_projection_bwd_fake)
_register_projection_autograd(_lowrank_fwd, torch.ops.cdgfast.lowrank_penalty_backward, _lowrank_ref)


# ----------------------------------------------------------------------------------------------------
# diag

def _diag_fwd_composite(theta: Tensor, anchor: Tensor, fisher: Tensor, save_grad: bool) -> Tuple[Tensor, Tensor]:
    acc = _acc_dtype(theta, anchor, fisher)
    diff = theta.to(acc) - anchor.to(acc)
    r = fisher.to(acc) * diff
    loss = 0.5 * torch.dot(r, diff)
    return loss, (r.to(saved_grad_dtype(theta.dtype)) if save_grad else theta.new_empty((0,)))


def _diag_bwd_composite(grad_loss, theta, anchor, fisher, r, need_theta, need_anchor, need_fisher):
    acc = _acc_dtype(theta, anchor, fisher)
    g = grad_loss.to(acc)
    gt, ga, gf = theta.new_empty((0,)), anchor.new_empty((0,)), fisher.new_empty((0,))
    diff = None
    if need_theta or need_anchor:
        if r is not None and r.numel() == theta.numel():
            base = r.to(acc)
        else:
            diff = theta.to(acc) - anchor.to(acc)
            base = fisher.to(acc) * diff
        scaled = g * base
        if need_theta:
            gt = scaled.to(theta.dtype)
        if need_anchor:
            ga = (-scaled).to(anchor.dtype)
    if need_fisher:
        if diff is None:
            diff = theta.to(acc) - anchor.to(acc)
        gf = (0.5 * g * diff * diff).to(fisher.dtype)
    return gt, ga, gf


def _diag_ref(theta: Tensor, anchor: Tensor, fisher: Tensor) -> Tensor:
    """The loss in plain differentiable PyTorch (transforms, create_graph backward)."""
    acc = _acc_dtype(theta, anchor, fisher)
    r = theta.to(acc) - anchor.to(acc)
    return 0.5 * (fisher.to(acc) * r * r).sum()


@torch.library.custom_op("cdgfast::diag_penalty_fwd", mutates_args=())
def _diag_fwd(theta: Tensor, anchor: Tensor, fisher: Tensor, save_grad: bool) -> Tuple[Tensor, Tensor]:
    return _diag_fwd_composite(theta, anchor, fisher, save_grad)


_diag_fwd.register_kernel("cuda")(triton_or_composite("penalties", "diag_penalty_forward", _diag_fwd_composite))


@_diag_fwd.register_fake
def _diag_fwd_fake(theta, anchor, fisher, save_grad):
    acc = _acc_dtype(theta, anchor, fisher)
    r = torch.empty_like(theta, dtype=saved_grad_dtype(theta.dtype)) if save_grad else theta.new_empty((0,))
    return theta.new_empty((), dtype=acc), r


@torch.library.custom_op("cdgfast::diag_penalty_backward", mutates_args=())
def _diag_bwd(grad_loss: Tensor, theta: Tensor, anchor: Tensor, fisher: Tensor, r: Optional[Tensor],
              need_theta: bool, need_anchor: bool, need_fisher: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _diag_bwd_composite(grad_loss, theta, anchor, fisher, r, need_theta, need_anchor, need_fisher)


_diag_bwd.register_kernel("cuda")(triton_or_composite("penalties", "diag_penalty_backward", _diag_bwd_composite))


@_diag_bwd.register_fake
def _diag_bwd_fake(grad_loss, theta, anchor, fisher, r, need_theta, need_anchor, need_fisher):
    return empty_unless(need_theta, theta), empty_unless(need_anchor, anchor), empty_unless(need_fisher, fisher)


def _diag_setup_context(ctx, inputs, output):
    theta, anchor, fisher, _ = inputs
    r = output[1]
    ctx.mark_non_differentiable(r)  # r is the saved gradient, not a value to differentiate
    save(ctx, theta, anchor, fisher, r)
    ctx.set_materialize_grads(False)


def _diag_backward(ctx, grad_loss, grad_r):
    theta, anchor, fisher, r = saved(ctx)
    need = ctx.needs_input_grad
    if grad_loss is None or not (need[0] or need[1] or need[2]):
        return None, None, None, None
    if torch.is_grad_enabled():
        return tuple(recorded_vjp(_diag_ref, (theta, anchor, fisher), need[:3], (grad_loss,))) + (None,)
    gt, ga, gf = torch.ops.cdgfast.diag_penalty_backward(grad_loss, theta, anchor, fisher,
                                                         r if r.numel() else None, need[0], need[1], need[2])
    return (gt if need[0] else None, ga if need[1] else None, gf if need[2] else None, None)


_diag_fwd.register_autograd(_diag_backward, setup_context=_diag_setup_context)


# ----------------------------------------------------------------------------------------------------
# public ops on a flat theta (scalar output), CompositeImplicitAutograd over the *_fwd ops

_lib = torch.library.Library("cdgfast", "FRAGMENT")
_lib.define("rank1_penalty(Tensor theta, Tensor anchors, Tensor directions, Tensor coeffs) -> Tensor")
_lib.define("diag_penalty(Tensor theta, Tensor anchor, Tensor fisher) -> Tensor")
_lib.define("lowrank_penalty(Tensor theta, Tensor anchors, Tensor directions, Tensor lambdas) -> Tensor")


def _rank1_penalty_impl(theta, anchors, directions, coeffs):
    return torch.ops.cdgfast.rank1_penalty_fwd(theta, anchors, directions, coeffs)[0]


def _lowrank_penalty_impl(theta, anchors, directions, lambdas):
    return torch.ops.cdgfast.lowrank_penalty_fwd(theta, anchors, directions, lambdas)[0]


def _diag_penalty_impl(theta, anchor, fisher):
    # save r = F (theta - a) only when a theta/anchor gradient can be asked for
    save = torch.is_grad_enabled() and (theta.requires_grad or anchor.requires_grad)
    return torch.ops.cdgfast.diag_penalty_fwd(theta, anchor, fisher, save)[0]


_lib.impl("rank1_penalty", _rank1_penalty_impl, "CompositeImplicitAutograd")
_lib.impl("diag_penalty", _diag_penalty_impl, "CompositeImplicitAutograd")
_lib.impl("lowrank_penalty", _lowrank_penalty_impl, "CompositeImplicitAutograd")


# ----------------------------------------------------------------------------------------------------
# public Python API

def _check_params_theta(params) -> Tensor:
    return flat_parameters(params, "params")


def rank1_penalty(params, anchors: Tensor, directions: Tensor, coeffs) -> Tensor:
    """0.5 * sum_k coeffs_k * (directions_k . (theta - anchors_k))^2  (SPEC section 2, `rank1`; the
    caller multiplies by lam).

    params: the model's trainable parameters (a module, or a sequence of tensors in
        `model.parameters()` order) or the flat theta [P]; see `flat_parameters` for how a sequence
        reaches the flat op.
    anchors [K, P], directions [K, P]: theta_k and mu_k per consolidated task (K >= 1).
    coeffs [K]: c_k (a tensor, or a sequence of numbers placed on anchors' device).
    Returns a 0-dim loss (float32, float64 if any input is float64), differentiable w.r.t. the
    parameters and also the anchors, directions and coeffs.
    Raises ValueError naming the argument for a wrong P or K, mixed devices, non-floating or empty input.
    """
    theta = _check_params_theta(params)
    P = theta.numel()
    check_tensor("anchors", anchors, ndim=2)
    if anchors.shape[1] != P:
        raise ValueError(f"anchors: expected shape (K, P) with P = {P} (the number of parameter elements), "
                         f"got {tuple(anchors.shape)}")
    K = anchors.shape[0]
    check_tensor("directions", directions, ndim=2)
    if tuple(directions.shape) != (K, P):
        raise ValueError(f"directions: expected shape (K, P) = ({K}, {P}) to match anchors, "
                         f"got {tuple(directions.shape)}")
    if not isinstance(coeffs, Tensor):
        # numbers become float32 (float64 beside float64 anchors), not the anchors' dtype: a large
        # coefficient would be inf in float16
        try:
            coeffs = torch.as_tensor(coeffs, dtype=_acc_dtype(anchors), device=anchors.device)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"coeffs: expected a tensor or a sequence of {K} numbers, got {type(coeffs).__name__}")
    check_tensor("coeffs", coeffs, ndim=1)
    if coeffs.shape[0] != K:
        raise ValueError(f"coeffs: expected shape ({K},) (K = anchors.shape[0]), got {tuple(coeffs.shape)}")
    check_same_device(params=theta, anchors=anchors, directions=directions, coeffs=coeffs)
    if transform_active():  # custom ops carry no forward-AD / batching rule: stay in plain PyTorch
        return _rank1_ref(theta, *(usable(t) for t in (anchors, directions, coeffs)))[0]
    return torch.ops.cdgfast.rank1_penalty(theta, anchors, directions, coeffs)


def lowrank_penalty(params, anchors: Tensor, directions: Tensor, lambdas) -> Tensor:
    """0.5 * sum_{t,j} lambdas_tj * (directions_tj . (theta - anchors_t))^2: a rank-k Fisher
    sum_j lambda_j v_j v_j^T around each anchor (the caller multiplies by lam).

    params: module, sequence of tensors or flat theta [P] (see `flat_parameters`).
    Either T consolidated tasks: anchors [T, P], directions [T, k, P], lambdas [T, k]; or one:
    anchors [P] (or [1, P]), directions [k, P], lambdas [k]. T, k >= 1. lambdas may be a tensor or
    (nested) numbers, which become float32 (float64 beside float64 anchors) on anchors' device.
    The directions need not be orthonormal; the formula is the one above whatever they are.
    Returns a 0-dim loss (float32, float64 if any input is float64), differentiable w.r.t. the
    parameters, anchors, directions and lambdas (each gradient in its input's shape and dtype).
    Raises ValueError naming the argument for a wrong P, T or k, mixed devices, non-floating or empty
    input.
    """
    theta = _check_params_theta(params)
    P = theta.numel()
    check_tensor("directions", directions)
    if directions.dim() not in (2, 3) or directions.shape[-1] != P:
        raise ValueError(f"directions: expected shape (T, k, P) or (k, P) with P = {P} (the number of parameter "
                         f"elements), got {tuple(directions.shape)}")
    single = directions.dim() == 2
    T, k = (1, directions.shape[0]) if single else tuple(directions.shape[:2])
    check_tensor("anchors", anchors)
    anchor_shapes = ((P,), (1, P)) if single else ((T, P),)
    if tuple(anchors.shape) not in anchor_shapes:
        expected = f"({P},) or (1, {P})" if single else f"(T, P) = ({T}, {P})"
        raise ValueError(f"anchors: expected shape {expected} to match directions {tuple(directions.shape)}, "
                         f"got {tuple(anchors.shape)}")
    if not isinstance(lambdas, Tensor):
        # numbers become float32 (float64 beside float64 anchors): a large lambda would be inf in float16
        try:
            lambdas = torch.as_tensor(lambdas, dtype=_acc_dtype(anchors), device=anchors.device)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"lambdas: expected a tensor or numbers shaped like directions.shape[:-1] = "
                             f"{tuple(directions.shape[:-1])}, got {type(lambdas).__name__}")
    check_tensor("lambdas", lambdas)
    if tuple(lambdas.shape) != tuple(directions.shape[:-1]):
        raise ValueError(f"lambdas: expected shape {tuple(directions.shape[:-1])} (directions.shape[:-1]), "
                         f"got {tuple(lambdas.shape)}")
    check_same_device(params=theta, anchors=anchors, directions=directions, lambdas=lambdas)
    # one layout for the op: [T, P], [T, k, P], [T, k] (views; gradients flow back in the caller's shapes)
    anchors, directions, lambdas = anchors.reshape(T, P), directions.reshape(T, k, P), lambdas.reshape(T, k)
    if transform_active():  # custom ops carry no forward-AD / batching rule: stay in plain PyTorch
        return _lowrank_ref(theta, *(usable(t) for t in (anchors, directions, lambdas)))[0]
    return torch.ops.cdgfast.lowrank_penalty(theta, anchors, directions, lambdas)


def diag_penalty(params, anchor: Tensor, fisher: Tensor) -> Tensor:
    """0.5 * sum_j fisher_j * (theta_j - anchor_j)^2  (SPEC section 2, `ewc` / `diag`; the caller
    multiplies by lam).

    params: module, sequence of tensors or flat theta [P] (see `flat_parameters`).
    anchor [P], fisher [P]. Returns a 0-dim loss (float32, float64 if any input is float64),
    differentiable w.r.t. the parameters, the anchor and the Fisher. The theta gradient F (theta - a) is
    written in the forward pass and only scaled in the backward.
    Raises ValueError naming the argument for a wrong P, mixed devices, non-floating or empty input.
    """
    theta = _check_params_theta(params)
    P = theta.numel()
    for name, t in (("anchor", anchor), ("fisher", fisher)):
        check_tensor(name, t, ndim=1)
        if t.shape[0] != P:
            raise ValueError(f"{name}: expected shape ({P},) (P = the number of parameter elements), "
                             f"got {tuple(t.shape)}")
    check_same_device(params=theta, anchor=anchor, fisher=fisher)
    if transform_active():  # custom ops carry no forward-AD / batching rule: stay in plain PyTorch
        return _diag_ref(theta, usable(anchor), usable(fisher))
    return torch.ops.cdgfast.diag_penalty(theta, anchor, fisher)
