"""Diffusion-classifier (DC) scores (SPEC section 2.2) as fused, differentiable ops.

Given the noise predictions of one sample under K conditions that share the same ``(t, eps)``
(a paired Monte-Carlo trial), the DC error of condition k is ``err_k = mean_S (eps - eps_pred_k)^2``
and the DC score is ``log p(c_k | x) = log_softmax_k(-err_k / tau)``.

Public functions (validate, then call the registered ops ``torch.ops.cdgfast.*``):

    dc_errors(eps_pred[B, K, *S], eps[B, *S]) -> [B, K]
    dc_scores(eps_pred, eps, tau=1.0) -> [B, K]
    dc_cross_entropy(eps_pred, eps, target, tau=1.0, reduction="mean")

Registered ops (CPU composite = plain PyTorch; CUDA = the Triton kernels in
``cdgfast.kernels.dc`` when ``cdgfast._dispatch.use_triton`` says so, else the composite):

    cdgfast::dc_errors(eps_pred, eps) -> err[B, K]
    cdgfast::dc_errors_backward(grad, eps_pred, eps) -> (grad_eps_pred, grad_eps)
    cdgfast::dc_scores(eps_pred, eps, tau) -> logp[B, K]
    cdgfast::dc_scores_backward(grad, eps_pred, eps, logp, tau) -> (grad_eps_pred, grad_eps)
    cdgfast::dc_cross_entropy(eps_pred, eps, q[B, K], tau) -> (loss[B], dloss/deps_pred, dloss/deps, logp)
    cdgfast::dc_cross_entropy_backward(grad_loss[B], dloss/deps_pred, dloss/deps, logp)
        -> (grad_eps_pred, grad_eps, grad_q)

``cdgfast::dc_cross_entropy`` is fused: one pass computes the per-condition errors, the log-softmax,
the per-sample cross-entropy and the per-sample gradient w.r.t. ``eps_pred`` and ``eps``; backward
only scales the saved gradients by ``grad_output``. Its extra outputs are marked non-differentiable.

Higher-order derivatives: the backward ops are first order; a backward that runs with
``create_graph=True`` differentiates the plain-PyTorch reference formula instead (``_common``), so
double backward (a gradient penalty through the loss, ``gradgradcheck``) is exact for every op here.
The ops save their inputs for that (references, no copies).

Function transforms: the registered ops carry reverse-mode formulas only. Inside ``torch.func``
transforms (``vmap``, ``grad``, ``jvp``, ...) or a ``torch.autograd.forward_ad`` dual level the
public functions therefore run the same math as plain differentiable PyTorch instead (correct
forward-mode AD and batching; no fused kernel there).

Dtypes: ``eps_pred`` and ``eps`` are promoted to a common floating dtype; reductions accumulate in
fp32 (fp64 for fp64 inputs) and results are returned in the common dtype. A floating target is
used in fp32 (fp64), never rounded to a half dtype (weights above 65504 would be inf). The fused
forward's saved gradients are fp32 for fp16 inputs (``_common.saved_grad_dtype``).

Values that need the data to check: a class index outside ``[0, K)`` raises a ValueError in eager
mode (one device sync); where that check cannot run (inside ``torch.compile``, ``torch.func``
transforms, on meta tensors) the sample's loss is NaN instead of a silently finite value. A negative
probability weight is not checked (a sync the float-target path does not otherwise need): it makes
that sample's loss NaN everywhere.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from cdgfast._dispatch import transform_active as _transform_active, triton_or_composite
from cdgfast._validation import check_choice, check_positive, check_same_device, check_shape, check_tensor

from ._common import acc_dtype as _acc, recorded_vjp, save, saved, saved_grad_dtype

__all__ = ["dc_errors", "dc_scores", "dc_cross_entropy"]

REDUCTIONS = ("mean", "sum", "none")


# --- plain-PyTorch composites (the reference implementation of every op) ------------------------

def _diff(eps_pred: Tensor, eps: Tensor) -> Tensor:
    """(eps_pred - eps) in the accumulation dtype, flattened to [B, K, N]."""
    B, K = eps_pred.shape[0], eps_pred.shape[1]
    acc = _acc(eps_pred)
    return eps_pred.to(acc).reshape(B, K, -1) - eps.to(acc).reshape(B, 1, -1)


def _num_spatial(eps: Tensor) -> int:
    return eps[0].numel() if eps.dim() > 1 else 1


def _apply_coef_composite(eps_pred: Tensor, eps: Tensor, coef: Tensor) -> Tuple[Tensor, Tensor]:
    """gpred = coef[b, k] * (eps_pred - eps), geps = -sum_k gpred (both in the input dtype)."""
    d = _diff(eps_pred, eps)
    g = coef.to(d.dtype).unsqueeze(-1) * d
    return g.to(eps_pred.dtype).reshape(eps_pred.shape), (-g.sum(1)).to(eps.dtype).reshape(eps.shape)


_apply_coef = triton_or_composite("dc", "dc_apply_coef", _apply_coef_composite)


def _errors_composite(eps_pred: Tensor, eps: Tensor) -> Tensor:
    return _diff(eps_pred, eps).square().mean(-1)


# The reference formulas: differentiable plain PyTorch, the ops' default implementations, what the
# public functions run inside torch.func transforms, and what a create_graph backward differentiates.

def _errors_ref(eps_pred: Tensor, eps: Tensor) -> Tensor:
    return _errors_composite(eps_pred, eps).to(eps_pred.dtype)


def _scores_ref(eps_pred: Tensor, eps: Tensor, tau: float) -> Tensor:
    return torch.log_softmax(-_errors_composite(eps_pred, eps) / tau, dim=-1).to(eps_pred.dtype)


def _ce_ref(eps_pred: Tensor, eps: Tensor, q: Tensor, tau: float) -> Tensor:
    logp = torch.log_softmax(-_errors_composite(eps_pred, eps) / tau, dim=-1)
    return (-(q.to(logp.dtype) * logp).sum(-1)).to(eps_pred.dtype)


def _scores_coef(grad: Tensor, logp: Tensor, tau: float, n: int) -> Tensor:
    """d/d err of sum(grad * log_softmax(-err / tau)), times 2 / N (the d err / d eps_pred factor)."""
    acc = _acc(logp)
    g = grad.to(acc)
    p = logp.to(acc).exp()
    return -(g - p * g.sum(-1, keepdim=True)) * (2.0 / (tau * n))


def _ce_composite(eps_pred: Tensor, eps: Tensor, q: Tensor, tau: float):
    d = _diff(eps_pred, eps)
    n = d.shape[-1]
    err = torch.linalg.vector_norm(d, dim=-1).square() / n  # no [B, K, N] temporary for d^2
    logp = torch.log_softmax(-err / tau, dim=-1)
    q = q.to(d.dtype)
    loss = -(q * logp).sum(-1)
    coef = (q - logp.exp() * q.sum(-1, keepdim=True)) * (2.0 / (tau * n))
    # _diff returns a fresh tensor (the result of a subtraction): scale it in place
    gpred = d.mul_(coef.unsqueeze(-1))
    geps = -gpred.sum(1)
    dt, gdt = eps_pred.dtype, saved_grad_dtype(eps_pred.dtype)
    return loss.to(dt), gpred.to(gdt).reshape(eps_pred.shape), geps.to(gdt).reshape(eps.shape), logp.to(dt)


# --- dc_errors ----------------------------------------------------------------------------------

@torch.library.custom_op("cdgfast::dc_errors", mutates_args=())
def _dc_errors_op(eps_pred: Tensor, eps: Tensor) -> Tensor:
    return _errors_ref(eps_pred, eps)


_dc_errors_cuda = _dc_errors_op.register_kernel("cuda")(triton_or_composite("dc", "dc_errors", _errors_ref))


@_dc_errors_op.register_fake
def _(eps_pred, eps):
    return eps_pred.new_empty(eps_pred.shape[:2])


@torch.library.custom_op("cdgfast::dc_errors_backward", mutates_args=())
def _dc_errors_backward_op(grad: Tensor, eps_pred: Tensor, eps: Tensor) -> Tuple[Tensor, Tensor]:
    coef = grad.to(_acc(eps_pred)) * (2.0 / _num_spatial(eps))
    return _apply_coef(eps_pred, eps, coef)


@_dc_errors_backward_op.register_fake
def _(grad, eps_pred, eps):
    return torch.empty_like(eps_pred), torch.empty_like(eps)


def _errors_setup(ctx, inputs, output):
    save(ctx, *inputs)


def _errors_backward(ctx, grad):
    eps_pred, eps = saved(ctx)
    if torch.is_grad_enabled():
        return tuple(recorded_vjp(_errors_ref, (eps_pred, eps), ctx.needs_input_grad, (grad,)))
    gp, ge = torch.ops.cdgfast.dc_errors_backward(grad, eps_pred, eps)
    return gp, ge


_dc_errors_op.register_autograd(_errors_backward, setup_context=_errors_setup)


# --- dc_scores ----------------------------------------------------------------------------------

@torch.library.custom_op("cdgfast::dc_scores", mutates_args=())
def _dc_scores_op(eps_pred: Tensor, eps: Tensor, tau: float) -> Tensor:
    return _scores_ref(eps_pred, eps, tau)


_dc_scores_cuda = _dc_scores_op.register_kernel("cuda")(triton_or_composite("dc", "dc_scores", _scores_ref))


@_dc_scores_op.register_fake
def _(eps_pred, eps, tau):
    return eps_pred.new_empty(eps_pred.shape[:2])


@torch.library.custom_op("cdgfast::dc_scores_backward", mutates_args=())
def _dc_scores_backward_op(
    grad: Tensor, eps_pred: Tensor, eps: Tensor, logp: Tensor, tau: float
) -> Tuple[Tensor, Tensor]:
    return _apply_coef(eps_pred, eps, _scores_coef(grad, logp, tau, _num_spatial(eps)))


@_dc_scores_backward_op.register_fake
def _(grad, eps_pred, eps, logp, tau):
    return torch.empty_like(eps_pred), torch.empty_like(eps)


def _scores_setup(ctx, inputs, output):
    eps_pred, eps, tau = inputs
    ctx.tau = tau
    save(ctx, eps_pred, eps, output)


def _scores_backward(ctx, grad):
    eps_pred, eps, logp = saved(ctx)
    if torch.is_grad_enabled():
        gp, ge = recorded_vjp(lambda a, b: _scores_ref(a, b, ctx.tau), (eps_pred, eps), ctx.needs_input_grad[:2],
                              (grad,))
        return gp, ge, None
    gp, ge = torch.ops.cdgfast.dc_scores_backward(grad, eps_pred, eps, logp, ctx.tau)
    return gp, ge, None


_dc_scores_op.register_autograd(_scores_backward, setup_context=_scores_setup)


# --- dc_cross_entropy (fused forward + gradient) ------------------------------------------------

@torch.library.custom_op("cdgfast::dc_cross_entropy", mutates_args=())
def _dc_ce_op(eps_pred: Tensor, eps: Tensor, q: Tensor, tau: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _ce_composite(eps_pred, eps, q, tau)


_dc_ce_cuda = _dc_ce_op.register_kernel("cuda")(triton_or_composite("dc", "dc_cross_entropy", _ce_composite))


@_dc_ce_op.register_fake
def _(eps_pred, eps, q, tau):
    B, K = eps_pred.shape[:2]
    gdt = saved_grad_dtype(eps_pred.dtype)
    return (eps_pred.new_empty(B), torch.empty_like(eps_pred, dtype=gdt), torch.empty_like(eps, dtype=gdt),
            eps_pred.new_empty(B, K))


@torch.library.custom_op("cdgfast::dc_cross_entropy_backward", mutates_args=())
def _dc_ce_backward_op(
    grad_loss: Tensor, grad_pred: Tensor, grad_eps: Tensor, logp: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    # An elementwise broadcast multiply: ATen's kernels are already bandwidth-bound on CUDA,
    # so this op has one implementation for every device. The gradients have the dtype of the
    # op's outputs (logp), also where the saved ones are wider (saved_grad_dtype).
    acc = _acc(grad_pred)
    g = grad_loss.to(acc)
    gshape = (-1,) + (1,) * (grad_pred.dim() - 1)
    gp = (g.reshape(gshape) * grad_pred.to(acc)).to(logp.dtype)
    ge = (g.reshape((-1,) + (1,) * (grad_eps.dim() - 1)) * grad_eps.to(acc)).to(logp.dtype)
    gq = (-g.unsqueeze(-1) * logp.to(acc)).to(logp.dtype)
    return gp, ge, gq


@_dc_ce_backward_op.register_fake
def _(grad_loss, grad_pred, grad_eps, logp):
    return (torch.empty_like(grad_pred, dtype=logp.dtype), torch.empty_like(grad_eps, dtype=logp.dtype),
            torch.empty_like(logp))


def _ce_setup(ctx, inputs, output):
    eps_pred, eps, q, tau = inputs
    _, gpred, geps, logp = output
    ctx.mark_non_differentiable(gpred, geps, logp)
    ctx.tau = tau
    save(ctx, eps_pred, eps, q, gpred, geps, logp)


def _ce_backward(ctx, grad_loss, _g1, _g2, _g3):
    eps_pred, eps, q, gpred, geps, logp = saved(ctx)
    if torch.is_grad_enabled():
        gp, ge, gq = recorded_vjp(lambda a, b, c: _ce_ref(a, b, c, ctx.tau), (eps_pred, eps, q),
                                  ctx.needs_input_grad[:3], (grad_loss,))
        return gp, ge, gq, None
    gp, ge, gq = torch.ops.cdgfast.dc_cross_entropy_backward(grad_loss, gpred, geps, logp)
    return gp, ge, (gq.to(q.dtype) if ctx.needs_input_grad[2] else None), None


_dc_ce_op.register_autograd(_ce_backward, setup_context=_ce_setup)


# --- public functions ---------------------------------------------------------------------------

def _check_pair(eps_pred, eps) -> Tuple[Tensor, Tensor]:
    check_tensor("eps_pred", eps_pred, min_ndim=2)
    check_tensor("eps", eps, min_ndim=1)
    check_same_device(eps_pred=eps_pred, eps=eps)
    expected = (eps_pred.shape[0],) + tuple(eps_pred.shape[2:])
    check_shape("eps", eps, expected, "eps_pred is [B, K, *S], eps must be [B, *S]")
    dtype = torch.promote_types(eps_pred.dtype, eps.dtype)
    return eps_pred.to(dtype), eps.to(dtype)


def dc_errors(eps_pred: Tensor, eps: Tensor) -> Tensor:
    """Per-condition DC error ``err[b, k] = mean_S (eps_pred[b, k] - eps[b])^2``.

    Args:
        eps_pred: ``[B, K, *S]`` noise predictions of each sample under K conditions.
        eps: ``[B, *S]`` the noise shared by all conditions of a sample.
    Returns:
        ``[B, K]`` in the common (promoted) dtype of the inputs; differentiable w.r.t. both inputs
        (to any order).
    """
    eps_pred, eps = _check_pair(eps_pred, eps)
    if _transform_active():
        return _errors_ref(eps_pred, eps)
    return torch.ops.cdgfast.dc_errors(eps_pred, eps)


def dc_scores(eps_pred: Tensor, eps: Tensor, tau: float = 1.0) -> Tensor:
    """DC scores ``log p(c_k | x) = log_softmax_k(-err_k / tau)``, shape ``[B, K]``.

    ``tau`` must be a positive number. Differentiable w.r.t. ``eps_pred`` and ``eps`` (to any order).
    """
    eps_pred, eps = _check_pair(eps_pred, eps)
    tau = check_positive("tau", tau)
    if _transform_active():
        return _scores_ref(eps_pred, eps, tau)
    return torch.ops.cdgfast.dc_scores(eps_pred, eps, tau)


def _target_probs(target, eps_pred: Tensor) -> Tensor:
    """q [B, K] in the accumulation dtype; NaN rows for what is invalid and could not be refused."""
    B, K = eps_pred.shape[:2]
    acc = _acc(eps_pred)
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target: expected a torch.Tensor, got {type(target).__name__}")
    check_same_device(eps_pred=eps_pred, target=target)
    if target.dtype.is_floating_point:
        check_shape("target", target, (B, K), "class probabilities over the K conditions of eps_pred")
        q = target.to(acc)
        # a negative weight poisons its sample (checking it would cost a device sync)
        return torch.where(q < 0, float("nan"), q)
    if target.dtype == torch.bool or target.dtype.is_complex:
        raise ValueError("target: expected an integer class index [B] or floating probabilities [B, K], "
                         f"got {target.dtype}")
    check_shape("target", target, (B,), "integer class index per sample")
    target = target.long()
    # a value check costs a device sync; skipped on meta tensors, while torch.compile traces and
    # inside torch.func transforms (no data-dependent control flow there): the NaN below stands in
    check_values = target.device.type != "meta" and not torch.compiler.is_compiling() and not _transform_active()
    if check_values and bool(((target < 0) | (target >= K)).any()):
        raise ValueError(f"target: class indices must lie in [0, {K}) (K = eps_pred.shape[1]), got "
                         f"min {int(target.min())}, max {int(target.max())}")
    # one-hot by comparison: no sync and no data-dependent shape (F.one_hot checks max(target));
    # an index outside [0, K) matches no column, which would give loss 0: its row is NaN instead
    onehot = (target.unsqueeze(-1) == torch.arange(K, device=target.device)).to(acc)
    bad = ((target < 0) | (target >= K)).unsqueeze(-1)
    return torch.where(bad, float("nan"), onehot)


def dc_cross_entropy(
    eps_pred: Tensor, eps: Tensor, target: Tensor, tau: float = 1.0, reduction: str = "mean"
) -> Tensor:
    """Cross-entropy of the DC scores against a target: ``loss_b = -sum_k q[b, k] log p(c_k | x_b)``.

    Args:
        eps_pred: ``[B, K, *S]``; eps: ``[B, *S]`` (see :func:`dc_errors`).
        target: ``LongTensor[B]`` (class index in ``[0, K)``; ``q`` is its one-hot) or a floating
            ``[B, K]`` tensor of probabilities ``q`` (any non-negative weights; rows are not
            renormalised). A floating target that requires grad receives ``d loss / d q = -log p``.
            An index outside ``[0, K)`` raises a ValueError, except inside ``torch.compile`` /
            ``torch.func`` transforms, where that sample's loss is NaN; a negative weight makes its
            sample's loss NaN (not checked: that would cost a device sync).
        tau: positive temperature.
        reduction: ``"mean"`` (over B), ``"sum"`` or ``"none"`` (``[B]``).

    The forward pass computes the gradient w.r.t. ``eps_pred`` and ``eps`` in the same fused pass
    and backward scales it by ``grad_output``; with ``create_graph=True`` the backward is the
    differentiable reference formula, so higher derivatives are exact too.
    """
    eps_pred, eps = _check_pair(eps_pred, eps)
    tau = check_positive("tau", tau)
    check_choice("reduction", reduction, REDUCTIONS)
    q = _target_probs(target, eps_pred)
    if _transform_active():
        loss = _ce_ref(eps_pred, eps, q, tau)
    else:
        loss = torch.ops.cdgfast.dc_cross_entropy(eps_pred, eps, q, tau)[0]
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
