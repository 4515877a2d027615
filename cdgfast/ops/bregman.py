"""Bregman-preconditioned distillation (CCD's L_IKC, SPEC section 2.1) and its Hutchinson metric.

RECONSTRUCTION: the CCD paper's text lost Eq. 5-12. The formulas here are the documented
reconstruction of SPEC section 2.1, not the paper's exact equations:

* the Bregman divergence of ``phi(u) = 1/2 u^T H u`` between student and frozen teacher predictions
  is ``D(s, te) = 1/2 (s - te)^T H (s - te)`` with ``H = diag(w)``;
* ``w = 1 + kappa * h / mean_S(h)`` per sample, ``h = (J^T v)^2``, ``J = d eps_teacher / d x_t``,
  ``v`` Rademacher: a one-probe Hutchinson estimate of ``diag(J^T J)`` (:func:`hutchinson_metric`);
* the loss is ``mean_{B, S} w (s - te)^2`` (twice the mean divergence, the KD normalisation), so
  ``kappa = 0`` or ``precond=None`` is plain KD.

Registered ops (CPU composite = plain PyTorch; CUDA = ``cdgfast.kernels.bregman`` via Triton when
``use_triton``):

    cdgfast::bregman_distill(student, teacher, precond?, kappa) -> (loss, d loss / d student)
    cdgfast::bregman_distill_backward(grad, d loss / d student) -> (grad_student, grad_teacher)

Inside ``torch.func`` transforms or a forward-AD dual level, :func:`bregman_distill` runs the same
math in plain differentiable PyTorch (the registered op has a reverse-mode formula only).

The forward computes the gradient in the same pass (the teacher's is its negative) and backward
scales it by ``grad_output``. ``precond`` is a detached metric: it never receives a gradient.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from cdgfast._validation import check_same_device, check_shape, check_tensor
from cdgfast._dispatch import transform_active as _transform_active, use_triton

__all__ = ["bregman_distill", "hutchinson_metric"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weights(precond: Tensor, kappa: float, acc: torch.dtype) -> Tensor:
    """w = 1 + kappa * h / max(mean_S h, tiny) per sample, as [B, N] in `acc`."""
    h = precond.to(acc).reshape(precond.shape[0], -1)
    # a sample whose precond is all zero has mean 0; the clamp (fp32 tiny, as in the kernel) gives
    # 0 / tiny = 0 there, i.e. w = 1 (plain KD for that sample) instead of nan
    hmean = h.mean(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return 1.0 + kappa * h / hmean


def _bregman_composite(student: Tensor, teacher: Tensor, precond: Optional[Tensor], kappa: float):
    acc = _acc_dtype(student.dtype)
    B = student.shape[0]
    d = student.to(acc).reshape(B, -1) - teacher.to(acc).reshape(B, -1)
    wd = d if precond is None else _weights(precond, kappa, acc) * d
    loss = (wd * d).mean()
    grad = wd * (2.0 / d.numel())
    return loss.to(student.dtype), grad.to(student.dtype).reshape(student.shape)


@torch.library.custom_op("cdgfast::bregman_distill", mutates_args=())
def _bregman_op(student: Tensor, teacher: Tensor, precond: Optional[Tensor], kappa: float) -> Tuple[Tensor, Tensor]:
    return _bregman_composite(student, teacher, precond, kappa)


@_bregman_op.register_kernel("cuda")
def _bregman_cuda(student: Tensor, teacher: Tensor, precond: Optional[Tensor], kappa: float) -> Tuple[Tensor, Tensor]:
    if use_triton(student):
        from cdgfast.kernels import bregman as _k

        return _k.bregman_distill(student, teacher, precond, kappa)
    return _bregman_composite(student, teacher, precond, kappa)


@_bregman_op.register_fake
def _(student, teacher, precond, kappa):
    return student.new_empty(()), torch.empty_like(student)


@torch.library.custom_op("cdgfast::bregman_distill_backward", mutates_args=())
def _bregman_backward_op(grad: Tensor, grad_student: Tensor) -> Tuple[Tensor, Tensor]:
    # Elementwise scaling: ATen's kernels are bandwidth-bound already, on every device.
    gs = (grad.to(_acc_dtype(grad_student.dtype)) * grad_student).to(grad_student.dtype)
    return gs, -gs


@_bregman_backward_op.register_fake
def _(grad, grad_student):
    return torch.empty_like(grad_student), torch.empty_like(grad_student)


def _setup(ctx, inputs, output):
    _, grad_student = output
    ctx.mark_non_differentiable(grad_student)
    ctx.save_for_backward(grad_student)


def _backward(ctx, grad, _unused):
    (grad_student,) = ctx.saved_tensors
    gs, gt = torch.ops.cdgfast.bregman_distill_backward(grad, grad_student)
    return gs, gt, None, None


_bregman_op.register_autograd(_backward, setup_context=_setup)


def bregman_distill(student: Tensor, teacher: Tensor, precond: Optional[Tensor] = None, kappa: float = 1.0) -> Tensor:
    """Bregman-preconditioned distillation loss (reconstruction of CCD's L_IKC, SPEC 2.1).

    ``loss = mean_{b, s} w[b, s] * (student[b, s] - teacher[b, s])^2`` with
    ``w = 1 + kappa * h / mean_S(h)`` per sample, ``h = precond``; ``w = 1`` when ``precond`` is None.

    Args:
        student, teacher: ``[B, *S]`` predictions of the same shape; both receive gradients (detach
            the teacher yourself when it is frozen, as usual).
        precond: optional ``[B, *S]`` non-negative metric (e.g. :func:`hutchinson_metric`); it is
            detached (treated as a constant, no gradient). Non-negativity is not checked (that would
            cost a device sync). A sample whose ``h`` is all zero has ``mean_S(h)`` clamped to the
            fp32 ``tiny``, so its weights are 1 (plain KD) rather than nan.
        kappa: non-negative finite strength; ``kappa = 0`` is plain KD.
    Returns:
        0-dim tensor in the common (promoted) dtype of the inputs.
    """
    check_tensor("student", student, min_ndim=1)
    check_tensor("teacher", teacher, min_ndim=1)
    check_same_device(student=student, teacher=teacher, precond=precond)
    check_shape("teacher", teacher, student.shape, "same as student")
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not math.isfinite(kappa) or kappa < 0:
        raise ValueError(f"kappa: expected a finite number >= 0, got {kappa!r}")
    dtype = torch.promote_types(student.dtype, teacher.dtype)
    if precond is not None:
        check_tensor("precond", precond)
        check_shape("precond", precond, student.shape, "same as student")
        precond = precond.detach().to(dtype)
    student, teacher = student.to(dtype), teacher.to(dtype)
    if _transform_active():
        acc = _acc_dtype(dtype)
        d = student.to(acc) - teacher.to(acc)
        w = 1.0 if precond is None else _weights(precond, float(kappa), acc).reshape(d.shape)
        return (w * d * d).mean().to(dtype)
    return torch.ops.cdgfast.bregman_distill(student, teacher, precond, float(kappa))[0]


def hutchinson_metric(fn: Callable[[Tensor], Tensor], x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """One-probe Hutchinson estimate of ``diag(J^T J)``: ``h = (J^T v)^2`` with ``J = d fn(x) / d x``.

    ``v`` has the shape of ``fn(x)`` with independent Rademacher entries (+1 / -1 with probability
    1/2), drawn from ``generator`` (on the generator's device, then moved) or the global RNG.
    ``J^T v`` costs one vector-Jacobian product (``torch.autograd.grad``), so ``E_v[h] = diag(J^T J)``
    exactly and no Jacobian is formed. Part of the CCD reconstruction (SPEC 2.1): with ``fn`` the
    frozen teacher's noise prediction as a function of ``x_t``, ``h`` is its data-space metric.

    Args:
        fn: maps ``x`` (``[B, *S]``) to a floating tensor (``[B, *S]`` for CCD; any shape works).
        x: floating input; it is detached first, so the caller's graph is untouched.
        generator: optional ``torch.Generator`` for reproducible probes.
    Returns:
        ``h``, detached, same shape and dtype as ``x``. Zeros where ``fn(x)`` does not depend on ``x``.
    """
    if not callable(fn):
        raise ValueError(f"fn: expected a callable mapping x to a tensor, got {type(fn).__name__}")
    check_tensor("x", x)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        y = fn(xg)
        if not isinstance(y, torch.Tensor) or not y.dtype.is_floating_point:
            raise ValueError(f"fn: expected fn(x) to return a floating tensor, got "
                             f"{getattr(y, 'dtype', type(y).__name__)}")
        dev = generator.device if generator is not None else y.device
        v = torch.randint(0, 2, y.shape, generator=generator, device=dev).to(device=y.device, dtype=y.dtype)
        v = v * 2 - 1
        if not y.requires_grad:
            return torch.zeros_like(x)
        (jtv,) = torch.autograd.grad(y, xg, grad_outputs=v, allow_unused=True)
    if jtv is None:
        return torch.zeros_like(x)
    return jtv.detach().square().to(x.dtype)
