"""C-LoRA overlap penalty (SPEC section 2, `clora`):

    lora_overlap_penalty(prev_delta[d1,d2], A[d1,r], B[r,d2]) = || |prev_delta| (elementwise) * (A @ B) ||_F^2
                                                             = sum_ij prev_delta_ij^2 (A B)_ij^2

prev_delta is the sum of the previous tasks' LoRA products for one adapted layer; `lam_f` (1e8 in the
paper) is applied by the caller, once per adapted layer.

torch.library op `cdgfast::lora_overlap_penalty(prev_delta, A, B) -> loss` with autograd. With M = A B and
G = 2 g prev_delta^2 M:  d/dA = G B^T,  d/dB = A^T G, and prev_delta is differentiable too:
d/dprev_delta = 2 g prev_delta M^2 (|x|^2 = x^2, so the absolute value costs nothing). Callers usually pass
a detached prev_delta and then no prev_delta gradient is formed. The backward is the registered op
`cdgfast::lora_overlap_penalty_backward`; it recomputes M (one rank-r matmul, d1 d2 r multiply-adds)
instead of saving a d1 x d2 tensor from the forward, which would cost as much memory as prev_delta.
A backward with create_graph=True differentiates the plain-PyTorch reference `_lora_ref` instead, so
double backward is exact (see `_common`). prev_delta may be an inference tensor.

Dtypes: A and B share a dtype (A @ B is formed in it); prev_delta may have another floating dtype. The
elementwise products and the sum are float32 (float64 if any input is float64) and the loss has that dtype.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from cdgfast._dispatch import transform_active
from cdgfast._validation import check_same_device, check_tensor

from ._common import acc_dtype as _acc_dtype, empty_unless, recorded_vjp, save, saved, usable

__all__ = ["lora_overlap_penalty"]


def _lora_ref(prev_delta: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """The loss in plain differentiable PyTorch (transforms, create_graph backward). |x|^2 is written
    x^2: abs has derivative 0 at 0, which would make the second derivative at prev_delta = 0 wrong."""
    acc = _acc_dtype(prev_delta, A, B)
    return (prev_delta.to(acc).square() * (A @ B).to(acc).square()).sum()


@torch.library.custom_op("cdgfast::lora_overlap_penalty", mutates_args=())
def _lora_overlap(prev_delta: Tensor, A: Tensor, B: Tensor) -> Tensor:
    acc = _acc_dtype(prev_delta, A, B)
    prod = prev_delta.to(acc) * (A @ B).to(acc)
    return torch.dot(prod.reshape(-1), prod.reshape(-1))


@_lora_overlap.register_fake
def _lora_overlap_fake(prev_delta, A, B):
    return prev_delta.new_empty((), dtype=_acc_dtype(prev_delta, A, B))


@torch.library.custom_op("cdgfast::lora_overlap_penalty_backward", mutates_args=())
def _lora_overlap_bwd(grad: Tensor, prev_delta: Tensor, A: Tensor, B: Tensor, need_delta: bool, need_A: bool,
                      need_B: bool) -> Tuple[Tensor, Tensor, Tensor]:
    acc = _acc_dtype(prev_delta, A, B)
    g = grad.to(acc)
    m = (A @ B).to(acc)
    d = prev_delta.to(acc)
    g_delta = (2 * g * d * m * m).to(prev_delta.dtype) if need_delta else prev_delta.new_empty((0,))
    g_a, g_b = A.new_empty((0,)), B.new_empty((0,))
    if need_A or need_B:
        gm = (2 * g * d * d * m).to(A.dtype)  # dL/dM, in the matmul dtype
        if need_A:
            g_a = gm @ B.t()
        if need_B:
            g_b = A.t() @ gm
    return g_delta, g_a, g_b


@_lora_overlap_bwd.register_fake
def _lora_overlap_bwd_fake(grad, prev_delta, A, B, need_delta, need_A, need_B):
    return empty_unless(need_delta, prev_delta), empty_unless(need_A, A), empty_unless(need_B, B)


def _setup_context(ctx, inputs, output):
    save(ctx, *inputs)


def _backward(ctx, grad):
    prev_delta, A, B = saved(ctx)
    need = ctx.needs_input_grad
    if not any(need):
        return None, None, None
    if torch.is_grad_enabled():
        return tuple(recorded_vjp(_lora_ref, (prev_delta, A, B), need, (grad,)))
    gd, ga, gb = torch.ops.cdgfast.lora_overlap_penalty_backward(grad, prev_delta, A, B, need[0], need[1], need[2])
    return (gd if need[0] else None, ga if need[1] else None, gb if need[2] else None)


_lora_overlap.register_autograd(_backward, setup_context=_setup_context)


def lora_overlap_penalty(prev_delta: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """|| |prev_delta| * (A @ B) ||_F^2 for one adapted layer (C-LoRA; the caller multiplies by lam_f).

    prev_delta [d1, d2]: sum of the previous tasks' A_n' @ B_n' (treated as data; differentiable if it
    requires grad). A [d1, r], B [r, d2]: the current task's LoRA factors, same dtype.
    Returns a 0-dim loss (float32, float64 if any input is float64).
    Raises ValueError naming the argument for wrong shapes, mixed devices or dtypes, non-floating or
    empty input.
    """
    check_tensor("A", A, ndim=2)
    check_tensor("B", B, ndim=2)
    check_tensor("prev_delta", prev_delta, ndim=2)
    d1, r = A.shape
    if B.shape[0] != r:
        raise ValueError(f"B: expected shape (r, d2) with r = {r} (A is [d1, r] = {tuple(A.shape)}), "
                         f"got {tuple(B.shape)}")
    if tuple(prev_delta.shape) != (d1, B.shape[1]):
        raise ValueError(f"prev_delta: expected shape (d1, d2) = ({d1}, {B.shape[1]}) to match A @ B, "
                         f"got {tuple(prev_delta.shape)}")
    if A.dtype != B.dtype:
        raise ValueError(f"B: expected the dtype of A ({A.dtype}), got {B.dtype}")
    check_same_device(prev_delta=prev_delta, A=A, B=B)
    if transform_active():  # custom ops carry no forward-AD / batching rule: stay in plain PyTorch
        return _lora_ref(usable(prev_delta), A, B)
    return torch.ops.cdgfast.lora_overlap_penalty(prev_delta, A, B)
