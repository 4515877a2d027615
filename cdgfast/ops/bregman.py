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
scales it by ``grad_output``; a backward with ``create_graph=True`` differentiates the reference
formula instead, so double backward is exact (``_common``). ``precond`` is a detached metric: it never
receives a gradient.

Dtypes: ``student`` and ``teacher`` are promoted to a common dtype, the loss's. ``precond`` keeps its
own dtype: the weights are formed in fp32, or fp64 if any input is fp64 (never in a half dtype,
where a large ``h`` overflows and a small one flushes to zero). ``h`` is divided by its per-sample
maximum before the mean, so the weights do not depend on the scale of ``h`` (denormal or near the
dtype's maximum: the same weights as ``h`` scaled to 1).

Values: a negative or non-finite ``h`` is not checked (a device sync): it makes the loss NaN.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from cdgfast._dispatch import transform_active as _transform_active, triton_or_composite
from cdgfast._validation import (check_callable, check_generator, check_nonnegative, check_same_device,
                                 check_shape, check_tensor)

from ._common import acc_dtype as _acc, recorded_vjp, save, saved, saved_grad_dtype

__all__ = ["bregman_distill", "hutchinson_metric"]


def _weights(precond: Tensor, kappa: float, acc: torch.dtype) -> Tensor:
    """w = 1 + kappa * h / mean_S h per sample, as [B, N] in `acc`; w = 1 for an all-zero sample,
    NaN where h < 0."""
    h = precond.to(acc).reshape(precond.shape[0], -1)
    # scale by the sample's max first: the mean of h / max lies in [1 / N, 1] whatever h's scale,
    # where the mean of h itself would overflow near the dtype's max or flush to 0 for denormals
    hmax = h.amax(-1, keepdim=True)
    hs = h / torch.where(hmax > 0, hmax, 1.0)
    hmean = hs.mean(-1, keepdim=True)
    # an all-zero sample has hs = 0: w = 1 (plain KD for that sample) instead of 0 / 0
    w = 1.0 + (kappa / torch.where(hmean > 0, hmean, 1.0)) * hs
    return torch.where(h < 0, float("nan"), w)


def _bregman_ref(student: Tensor, teacher: Tensor, precond: Optional[Tensor], kappa: float) -> Tensor:
    """The loss in plain differentiable PyTorch (transforms, create_graph backward)."""
    acc = _acc(student, teacher, precond)
    B = student.shape[0]
    d = student.to(acc).reshape(B, -1) - teacher.to(acc).reshape(B, -1)
    wd = d if precond is None else _weights(precond, kappa, acc) * d
    return (wd * d).mean().to(student.dtype)


def _bregman_composite(student: Tensor, teacher: Tensor, precond: Optional[Tensor], kappa: float):
    acc = _acc(student, teacher, precond)
    B = student.shape[0]
    d = student.to(acc).reshape(B, -1) - teacher.to(acc).reshape(B, -1)
    wd = d if precond is None else _weights(precond, kappa, acc) * d
    loss = (wd * d).mean()
    grad = wd * (2.0 / d.numel())
    return loss.to(student.dtype), grad.to(saved_grad_dtype(student.dtype)).reshape(student.shape)


@torch.library.custom_op("cdgfast::bregman_distill", mutates_args=())
def _bregman_op(student: Tensor, teacher: Tensor, precond: Optional[Tensor], kappa: float) -> Tuple[Tensor, Tensor]:
    return _bregman_composite(student, teacher, precond, kappa)


_bregman_cuda = _bregman_op.register_kernel("cuda")(
    triton_or_composite("bregman", "bregman_distill", _bregman_composite))


@_bregman_op.register_fake
def _(student, teacher, precond, kappa):
    return student.new_empty(()), torch.empty_like(student, dtype=saved_grad_dtype(student.dtype))


@torch.library.custom_op("cdgfast::bregman_distill_backward", mutates_args=())
def _bregman_backward_op(grad: Tensor, grad_student: Tensor) -> Tuple[Tensor, Tensor]:
    # Elementwise scaling: ATen's kernels are bandwidth-bound already, on every device. The result
    # has the loss's dtype (grad's), also where the saved gradient is wider (saved_grad_dtype).
    gs = (grad.to(_acc(grad_student)) * grad_student).to(grad.dtype)
    return gs, -gs


@_bregman_backward_op.register_fake
def _(grad, grad_student):
    return torch.empty_like(grad_student, dtype=grad.dtype), torch.empty_like(grad_student, dtype=grad.dtype)


def _setup(ctx, inputs, output):
    student, teacher, precond, kappa = inputs
    _, grad_student = output
    ctx.mark_non_differentiable(grad_student)
    ctx.kappa = kappa
    save(ctx, student, teacher, precond, grad_student)


def _backward(ctx, grad, _unused):
    student, teacher, precond, grad_student = saved(ctx)
    if torch.is_grad_enabled():
        gs, gt = recorded_vjp(lambda a, b: _bregman_ref(a, b, precond, ctx.kappa), (student, teacher),
                              ctx.needs_input_grad[:2], (grad,))
        return gs, gt, None, None
    gs, gt = torch.ops.cdgfast.bregman_distill_backward(grad, grad_student)
    return gs, gt, None, None


_bregman_op.register_autograd(_backward, setup_context=_setup)


def bregman_distill(student: Tensor, teacher: Tensor, precond: Optional[Tensor] = None, kappa: float = 1.0) -> Tensor:
    """Bregman-preconditioned distillation loss (reconstruction of CCD's L_IKC, SPEC 2.1).

    ``loss = mean_{b, s} w[b, s] * (student[b, s] - teacher[b, s])^2`` with
    ``w = 1 + kappa * h / mean_S(h)`` per sample, ``h = precond``; ``w = 1`` when ``precond`` is None.

    Args:
        student, teacher: ``[B, *S]`` predictions of the same shape; both receive gradients (detach
            the teacher yourself when it is frozen, as usual), to any order.
        precond: optional ``[B, *S]`` non-negative metric (e.g. :func:`hutchinson_metric`) in any
            floating dtype; it is detached (treated as a constant, no gradient) and never rounded to
            the student's dtype: the weights are formed in fp32 (fp64 if any input is fp64), after
            dividing ``h`` by its per-sample max, so a tiny (even denormal) or huge ``h`` gives the
            same weights as ``h`` rescaled. A sample whose ``h`` is all zero gets weights 1 (plain
            KD). Non-negativity is not checked (that would cost a device sync): a negative or
            non-finite ``h`` makes the loss NaN.
        kappa: non-negative finite strength; ``kappa = 0`` is plain KD.
    Returns:
        0-dim tensor in the common (promoted) dtype of ``student`` and ``teacher``.
    """
    check_tensor("student", student, min_ndim=1)
    check_tensor("teacher", teacher, min_ndim=1)
    check_same_device(student=student, teacher=teacher, precond=precond)
    check_shape("teacher", teacher, student.shape, "same as student")
    kappa = check_nonnegative("kappa", kappa)
    dtype = torch.promote_types(student.dtype, teacher.dtype)
    if precond is not None:
        check_tensor("precond", precond)
        check_shape("precond", precond, student.shape, "same as student")
        precond = precond.detach()
    student, teacher = student.to(dtype), teacher.to(dtype)
    if _transform_active():
        return _bregman_ref(student, teacher, precond, kappa)
    return torch.ops.cdgfast.bregman_distill(student, teacher, precond, kappa)[0]


def _inference_tensors(fn) -> list:
    """Names of the parameters and buffers of `fn` (a module, or a bound method of one) made under
    torch.inference_mode."""
    module = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
    if not isinstance(module, torch.nn.Module):
        return []
    named = list(module.named_parameters()) + list(module.named_buffers())
    return [name for name, t in named if t.is_inference()]


def _check_output(y) -> None:
    if not isinstance(y, torch.Tensor) or not y.dtype.is_floating_point:
        raise ValueError(f"fn: expected fn(x) to return a floating tensor, got "
                         f"{getattr(y, 'dtype', type(y).__name__)}")


def _rademacher(y: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """+1 / -1 with probability 1/2, shaped like y, drawn on the generator's device."""
    dev = generator.device if generator is not None else y.device
    v = torch.randint(0, 2, y.shape, generator=generator, device=dev).to(device=y.device, dtype=y.dtype)
    return v * 2 - 1


def hutchinson_metric(fn: Callable[[Tensor], Tensor], x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """One-probe Hutchinson estimate of ``diag(J^T J)``: ``h = (J^T v)^2`` with ``J = d fn(x) / d x``.

    ``v`` has the shape of ``fn(x)`` with independent Rademacher entries (+1 / -1 with probability
    1/2), drawn from ``generator`` (on the generator's device, then moved) or the global RNG.
    ``J^T v`` costs one vector-Jacobian product (``torch.autograd.grad``), so ``E_v[h] = diag(J^T J)``
    exactly and no Jacobian is formed. Part of the CCD reconstruction (SPEC 2.1): with ``fn`` the
    frozen teacher's noise prediction as a function of ``x_t``, ``h`` is its data-space metric.

    The vector-Jacobian product runs with grad enabled and outside inference mode whatever the
    caller's mode (``torch.no_grad()``, ``torch.inference_mode()``), so a frozen teacher run there gets
    its metric, not zeros. ``x`` may be an inference tensor (it is copied). Tensors that ``fn`` uses and
    autograd must save (the teacher's parameters, say) cannot be inference tensors: that raises a
    ValueError naming ``fn`` (and the parameters, for a module), as does an ``fn`` that runs its own
    body under inference mode. Inside ``torch.func`` transforms the product is ``torch.func.vjp``
    (under ``vmap`` the probe needs ``randomness="different"`` or ``"same"``); ``h`` is a constant there
    too.

    Args:
        fn: maps ``x`` (``[B, *S]``) to a floating tensor (``[B, *S]`` for CCD; any shape works).
        x: floating input; it is detached first, so the caller's graph is untouched.
        generator: optional ``torch.Generator`` for reproducible probes.
    Returns:
        ``h``, detached, same shape as ``x``, dtype of ``x`` promoted to at least fp32 (the square
        of a half-precision ``J^T v`` overflows fp16 above 256). Zeros where ``fn(x)`` does not
        depend on ``x``.
    """
    check_callable("fn", fn, "a callable mapping x to a tensor")
    check_tensor("x", x)
    check_generator("generator", generator)
    out_dtype = torch.promote_types(x.dtype, torch.float32)
    if _transform_active():
        # autograd.grad / requires_grad_ are refused inside torch.func transforms: the same vjp as
        # a transform (vmap needs randomness="different" or "same" for the probe)
        y, vjp_fn = torch.func.vjp(fn, x.detach())
        _check_output(y)
        (jtv,) = vjp_fn(_rademacher(y, generator))
        return jtv.detach().to(out_dtype).square()
    with torch.inference_mode(False), torch.enable_grad():
        # an inference tensor cannot require grad outside inference mode: copy it
        xg = (x.clone() if x.is_inference() else x).detach().requires_grad_(True)
        try:
            y = fn(xg)
        except RuntimeError as err:
            if "Inference tensors cannot be saved for backward" not in str(err):
                raise
            names = _inference_tensors(fn)
            which = f" ({', '.join(names)})" if names else ""
            raise ValueError(
                f"fn: a tensor that fn uses{which} was created under torch.inference_mode(), so autograd "
                "cannot differentiate fn(x) w.r.t. x; create or load it outside inference_mode "
                "(torch.no_grad() is fine) or use a .clone() of it") from err
        _check_output(y)
        if y.is_inference():
            raise ValueError("fn: fn(x) returned an inference tensor (fn runs under torch.inference_mode()), "
                             "which records no graph, so the metric would be zero; call the model without "
                             "inference_mode inside fn (hutchinson_metric enables grad itself)")
        v = _rademacher(y, generator)
        if not y.requires_grad:
            return torch.zeros(x.shape, dtype=out_dtype, device=x.device)
        (jtv,) = torch.autograd.grad(y, xg, grad_outputs=v, allow_unused=True)
        if jtv is None:
            return torch.zeros(x.shape, dtype=out_dtype, device=x.device)
        return jtv.detach().to(out_dtype).square()
