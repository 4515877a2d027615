"""Triton kernels for the flat-buffer consolidation penalties (installed as `cdgfast.kernels.penalties`).

rank-1:  loss = 0.5 * sum_k c_k s_k^2,  s_k = d_k . (theta - a_k)
diag:    loss = 0.5 * sum_j f_j (theta_j - a_j)^2

Both are memory-bandwidth bound, so every kernel reads each flat buffer once:

* `_rank1_fwd_kernel`: one program per BLOCK of P; it loads its theta block once, loops over the K
  (small) anchors/directions and writes one partial dot product per (block, k). `s_k` is computed as
  d_k . (theta - a_k) elementwise (not d_k.theta - d_k.a_k): theta is usually close to the anchors and
  the difference of two large dot products would cancel. Partials are summed by
  `_rank1_finalize_kernel` (a single program), which also forms the loss: two launches, deterministic
  (no atomics).
* `_rank1_bwd_kernel`: w_k = g c_k s_k (+ grad_s_k) is formed inside each program from K scalars, then
  grad_theta = sum_k w_k d_k, and optionally grad_anchors_k = -w_k d_k, grad_directions_k = w_k (theta - a_k),
  all in one pass.
* `_diag_fwd_kernel`: loss partials and, when asked, r = f (theta - a) (the unscaled theta gradient) in the
  same pass, so the backward only scales r.
* `_diag_bwd_kernel`: grad_theta = g r (or g f (theta - a) when r was not saved), grad_anchor = -grad_theta,
  grad_fisher = 0.5 g (theta - a)^2 in one pass.

Accumulation is float32 (float64 when any input is float64). Launchers accept tensors on any device
(CPU tensors run under TRITON_INTERPRET=1 in the tests) and return the loss in the accumulation dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, block_range, tl_dtype

BLOCK = 1024
FINAL_BLOCK_NB = 128


@triton.jit
def _rank1_fwd_kernel(theta_ptr, anchors_ptr, dirs_ptr, partial_ptr, P, K, stride_a, stride_d,
                      BLOCK: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    offs, mask = block_range(pid, P, BLOCK)
    th = tl.load(theta_ptr + offs, mask=mask, other=0.0).to(ACC)
    a_ptrs = anchors_ptr + offs
    d_ptrs = dirs_ptr + offs
    out = partial_ptr + pid.to(tl.int64) * K
    for k in range(K):
        a = tl.load(a_ptrs, mask=mask, other=0.0).to(ACC)
        d = tl.load(d_ptrs, mask=mask, other=0.0).to(ACC)
        tl.store(out + k, tl.sum(d * (th - a), axis=0))
        # pointer arithmetic is 64-bit: no overflow for K*P > 2^31
        a_ptrs += stride_a
        d_ptrs += stride_d


@triton.jit
def _rank1_finalize_kernel(partial_ptr, coeffs_ptr, s_ptr, loss_ptr, NB, K,
                           BLOCK_NB: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    acc = tl.zeros([BLOCK_NB, BLOCK_K], dtype=ACC)
    for start in range(0, NB, BLOCK_NB):
        rows = start + tl.arange(0, BLOCK_NB)
        m = (rows[:, None] < NB) & kmask[None, :]
        acc += tl.load(partial_ptr + rows[:, None] * K + ks[None, :], mask=m, other=0.0).to(ACC)
    s = tl.sum(acc, axis=0)
    c = tl.load(coeffs_ptr + ks, mask=kmask, other=0.0).to(ACC)
    tl.store(s_ptr + ks, s, mask=kmask)
    tl.store(loss_ptr, 0.5 * tl.sum(c * s * s, axis=0))


@triton.jit
def _rank1_bwd_kernel(theta_ptr, anchors_ptr, dirs_ptr, g_ptr, coeffs_ptr, s_ptr, gs_ptr,
                      gtheta_ptr, ganch_ptr, gdir_ptr, P, K, stride_a, stride_d,
                      HAS_GS: tl.constexpr, NEED_THETA: tl.constexpr, NEED_A: tl.constexpr,
                      NEED_D: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs, mask = block_range(tl.program_id(0), P, BLOCK)
    g = tl.load(g_ptr).to(ACC)
    th = tl.load(theta_ptr + offs, mask=mask, other=0.0).to(ACC)
    acc = tl.zeros([BLOCK], dtype=ACC)
    a_ptrs = anchors_ptr + offs
    d_ptrs = dirs_ptr + offs
    ga_ptrs = ganch_ptr + offs
    gd_ptrs = gdir_ptr + offs
    for k in range(K):
        w = g * tl.load(coeffs_ptr + k).to(ACC) * tl.load(s_ptr + k).to(ACC)
        if HAS_GS:
            w += tl.load(gs_ptr + k).to(ACC)
        d = tl.load(d_ptrs, mask=mask, other=0.0).to(ACC)
        if NEED_THETA:
            acc += w * d
        if NEED_A:
            tl.store(ga_ptrs, -w * d, mask=mask)
        if NEED_D:
            a = tl.load(a_ptrs, mask=mask, other=0.0).to(ACC)
            tl.store(gd_ptrs, w * (th - a), mask=mask)
        a_ptrs += stride_a
        d_ptrs += stride_d
        ga_ptrs += P
        gd_ptrs += P
    if NEED_THETA:
        tl.store(gtheta_ptr + offs, acc, mask=mask)


@triton.jit
def _diag_fwd_kernel(theta_ptr, anchor_ptr, fisher_ptr, partial_ptr, r_ptr, P,
                     WRITE_R: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    offs, mask = block_range(pid, P, BLOCK)
    diff = (tl.load(theta_ptr + offs, mask=mask, other=0.0).to(ACC)
            - tl.load(anchor_ptr + offs, mask=mask, other=0.0).to(ACC))
    r = tl.load(fisher_ptr + offs, mask=mask, other=0.0).to(ACC) * diff
    tl.store(partial_ptr + pid, 0.5 * tl.sum(r * diff, axis=0))
    if WRITE_R:
        tl.store(r_ptr + offs, r, mask=mask)


@triton.jit
def _diag_bwd_kernel(theta_ptr, anchor_ptr, fisher_ptr, r_ptr, g_ptr, gtheta_ptr, ganch_ptr, gfish_ptr, P,
                     HAS_R: tl.constexpr, NEED_THETA: tl.constexpr, NEED_A: tl.constexpr,
                     NEED_F: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs, mask = block_range(tl.program_id(0), P, BLOCK)
    g = tl.load(g_ptr).to(ACC)
    need_diff: tl.constexpr = NEED_F or (not HAS_R and (NEED_THETA or NEED_A))
    if need_diff:
        diff = (tl.load(theta_ptr + offs, mask=mask, other=0.0).to(ACC)
                - tl.load(anchor_ptr + offs, mask=mask, other=0.0).to(ACC))
    if NEED_THETA or NEED_A:
        if HAS_R:
            gt = g * tl.load(r_ptr + offs, mask=mask, other=0.0).to(ACC)
        else:
            gt = g * tl.load(fisher_ptr + offs, mask=mask, other=0.0).to(ACC) * diff
        if NEED_THETA:
            tl.store(gtheta_ptr + offs, gt, mask=mask)
        if NEED_A:
            tl.store(ganch_ptr + offs, -gt, mask=mask)
    if NEED_F:
        tl.store(gfish_ptr + offs, 0.5 * g * diff * diff, mask=mask)


# ----------------------------------------------------------------------------------------------------
# launchers

def _empty0(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


def rank1_penalty_forward(theta: torch.Tensor, anchors: torch.Tensor, directions: torch.Tensor,
                          coeffs: torch.Tensor, *, block: int = BLOCK,
                          final_block: int = FINAL_BLOCK_NB) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, s): loss = 0.5 sum_k c_k s_k^2 (0-dim), s_k = d_k . (theta - a_k) ([K]), both in the
    accumulation dtype. theta [P], anchors/directions [K, P], coeffs [K]."""
    theta, anchors, directions, coeffs = (t.contiguous() for t in (theta, anchors, directions, coeffs))
    K, P = anchors.shape
    acc = acc_dtype(theta, anchors, directions, coeffs)
    nb = triton.cdiv(P, block)
    partial = torch.empty((nb, K), device=theta.device, dtype=acc)
    _rank1_fwd_kernel[(nb,)](theta, anchors, directions, partial, P, K, anchors.stride(0), directions.stride(0),
                             BLOCK=block, ACC=tl_dtype(acc))
    s = torch.empty((K,), device=theta.device, dtype=acc)
    loss = torch.empty((), device=theta.device, dtype=acc)
    _rank1_finalize_kernel[(1,)](partial, coeffs, s, loss, nb, K, BLOCK_NB=final_block,
                                 BLOCK_K=triton.next_power_of_2(K), ACC=tl_dtype(acc))
    return loss, s


def rank1_penalty_backward(grad_loss: torch.Tensor, grad_s: Optional[torch.Tensor], theta: torch.Tensor,
                           anchors: torch.Tensor, directions: torch.Tensor, coeffs: torch.Tensor, s: torch.Tensor,
                           need_theta: bool = True, need_anchors: bool = False, need_directions: bool = False,
                           *, block: int = BLOCK) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the rank-1 penalty with w_k = grad_loss c_k s_k + grad_s_k:
    (sum_k w_k d_k [P], -w_k d_k [K,P], w_k (theta - a_k) [K,P]); an output that is not asked for is an
    empty tensor of shape (0,). Each output has its input's dtype."""
    theta, anchors, directions, coeffs, s = (t.contiguous() for t in (theta, anchors, directions, coeffs, s))
    grad_loss = grad_loss.contiguous()
    K, P = anchors.shape
    acc = acc_dtype(theta, anchors, directions, coeffs, s)
    gt = torch.empty_like(theta) if need_theta else _empty0(theta)
    ga = torch.empty_like(anchors) if need_anchors else _empty0(anchors)
    gd = torch.empty_like(directions) if need_directions else _empty0(directions)
    has_gs = grad_s is not None
    gs = grad_s.contiguous() if has_gs else s
    if need_theta or need_anchors or need_directions:
        _rank1_bwd_kernel[(triton.cdiv(P, block),)](
            theta, anchors, directions, grad_loss, coeffs, s, gs,
            gt if need_theta else theta, ga if need_anchors else anchors, gd if need_directions else directions,
            P, K, anchors.stride(0), directions.stride(0),
            HAS_GS=has_gs, NEED_THETA=need_theta, NEED_A=need_anchors, NEED_D=need_directions,
            BLOCK=block, ACC=tl_dtype(acc))
    return gt, ga, gd


def diag_penalty_forward(theta: torch.Tensor, anchor: torch.Tensor, fisher: torch.Tensor,
                         save_grad: bool = True, *, block: int = BLOCK) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, r): loss = 0.5 sum f (theta - a)^2 in the accumulation dtype, r = f (theta - a) in theta's
    dtype (float32 for float16 theta: r is scaled by grad_loss only later, and float16's range would
    flush or overflow it first) when `save_grad` (the theta gradient for grad_loss = 1), else an
    empty (0,) tensor."""
    theta, anchor, fisher = (t.contiguous() for t in (theta, anchor, fisher))
    P = theta.numel()
    acc = acc_dtype(theta, anchor, fisher)
    nb = triton.cdiv(P, block)
    partial = torch.empty((nb,), device=theta.device, dtype=acc)
    r_dtype = torch.float32 if theta.dtype == torch.float16 else theta.dtype
    r = torch.empty_like(theta, dtype=r_dtype) if save_grad else _empty0(theta)
    _diag_fwd_kernel[(nb,)](theta, anchor, fisher, partial, r if save_grad else theta, P,
                            WRITE_R=save_grad, BLOCK=block, ACC=tl_dtype(acc))
    return partial.sum(), r


def diag_penalty_backward(grad_loss: torch.Tensor, theta: torch.Tensor, anchor: torch.Tensor,
                          fisher: torch.Tensor, r: Optional[torch.Tensor], need_theta: bool = True,
                          need_anchor: bool = False, need_fisher: bool = False,
                          *, block: int = BLOCK) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g f (theta - a), -g f (theta - a), 0.5 g (theta - a)^2); `r` (from the forward) replaces
    f (theta - a) when given (non-empty). Outputs not asked for are empty (0,) tensors."""
    theta, anchor, fisher = (t.contiguous() for t in (theta, anchor, fisher))
    grad_loss = grad_loss.contiguous()
    has_r = r is not None and r.numel() == theta.numel()
    r = r.contiguous() if has_r else theta
    P = theta.numel()
    acc = acc_dtype(theta, anchor, fisher)
    gt = torch.empty_like(theta) if need_theta else _empty0(theta)
    ga = torch.empty_like(anchor) if need_anchor else _empty0(anchor)
    gf = torch.empty_like(fisher) if need_fisher else _empty0(fisher)
    if need_theta or need_anchor or need_fisher:
        _diag_bwd_kernel[(triton.cdiv(P, block),)](
            theta, anchor, fisher, r, grad_loss, gt if need_theta else theta, ga if need_anchor else anchor,
            gf if need_fisher else fisher, P, HAS_R=has_r, NEED_THETA=need_theta, NEED_A=need_anchor,
            NEED_F=need_fisher, BLOCK=block, ACC=tl_dtype(acc))
    return gt, ga, gf
