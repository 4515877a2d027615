"""Triton kernels for the Bregman-preconditioned distillation loss (SPEC 2.1, L_IKC; a reconstruction).

Shapes (spatial dims flattened): ``student[B, N]``, ``teacher[B, N]``, optional ``h[B, N]``.

    w[b, s]  = 1 + kappa * hs[b, s] / mean_s hs[b, s],  hs = h / max_s h   (w = 1 without h, or
               for an all-zero sample; NaN where h < 0)
    loss     = sum_{b, s} w (student - teacher)^2 / (B * N)
    gstudent = 2 w (student - teacher) / (B * N)                     (d loss / d teacher = -gstudent)

Dividing by the sample's max first keeps the mean in [1 / N, 1] whatever the scale of ``h``: the
mean of ``h`` itself overflows near the dtype's max and flushes to zero for denormal ``h``.

Two stages, grid ``(B, T)`` each, ``T`` chunks of ``CHUNK`` elements per sample:

1. ``_hsum_kernel`` (only with ``h``): ``hmax[b, t]`` = max of h over chunk t and ``hsum[b, t]`` =
   sum of h / hmax[b, t] over it (one pass: per-lane sums rescaled when the lane's max grows).
2. ``_bregman_kernel``: every program combines ``hmax[b, :]`` and ``hsum[b, :]`` itself (T is small),
   forms the sample's weight scale, then writes its chunk's gradient and ``lpart[b, t] = sum w d^2``.
   The launcher adds the ``B x T`` partial losses (a tiny deterministic reduction).

Accumulation in fp32 (fp64 when the student or ``h`` is fp64); ``h`` is read in its own dtype; the
gradient is written in the student's dtype, fp32 for fp16 (it is scaled by grad_output only in the
backward). On a GPU both kernels are autotuned over warps; the tile shape comes from a heuristic
because the partial buffers' sizes depend on it. CPU tensors run under ``TRITON_INTERPRET=1``. Float
scalars reach a compiled kernel as fp32, so fp64 runs receive kappa, 1/N and 2/(B N) as hi + lo fp32
pairs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import acc_scalar, chunk_grid, next_pow2, split_f32
from ._common import use_tuned as _use_tuned

__all__ = ["bregman_distill"]


@triton.jit
def _hsum_kernel(h_ptr, hmax_ptr, hsum_ptr, N, T, CHUNK, ACC_F64: tl.constexpr, BLOCK_S: tl.constexpr):
    """hmax[b, t] = max of h over chunk t, hsum[b, t] = sum of h / hmax over it (in [0, CHUNK]):
    sums of scaled values neither overflow for huge h nor flush to zero for denormal h."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    if ACC_F64:
        acc = tl.zeros([BLOCK_S], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_S], dtype=tl.float32)
    lane_max = tl.zeros_like(acc)
    start = t * CHUNK
    offs0 = tl.arange(0, BLOCK_S)
    for s0 in range(start, start + CHUNK, BLOCK_S):
        offs = s0 + offs0
        x = tl.load(h_ptr + b * N + offs, mask=offs < N, other=0.0).to(acc.dtype)
        # per lane: acc = sum of h / lane_max, rescaled whenever the lane's max grows
        new_max = tl.maximum(lane_max, x)
        safe = tl.where(new_max > 0, new_max, 1.0)
        acc = acc * (lane_max / safe) + x / safe
        lane_max = new_max
    m = tl.max(lane_max, axis=0)
    m_safe = tl.where(m > 0, m, 1.0)
    tl.store(hmax_ptr + b * T + t, m)
    tl.store(hsum_ptr + b * T + t, tl.sum(acc * (lane_max / m_safe), axis=0))


@triton.jit
def _bregman_kernel(
    s_ptr, t_ptr, h_ptr, hmax_ptr, hsum_ptr, grad_ptr, lpart_ptr,
    N, T, CHUNK, kappa_hi, kappa_lo, inv_n_hi, inv_n_lo, gs_hi, gs_lo,
    HAS_H: tl.constexpr, ACC_F64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    if ACC_F64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    kappa = acc_scalar(kappa_hi, kappa_lo, ACC_F64)
    inv_n = acc_scalar(inv_n_hi, inv_n_lo, ACC_F64)
    grad_scale = acc_scalar(gs_hi, gs_lo, ACC_F64)
    if HAS_H:
        offs_t0 = tl.arange(0, BLOCK_T)
        mx = tl.zeros([BLOCK_T], dtype=acc_dtype)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + offs_t0
            mx = tl.maximum(mx, tl.load(hmax_ptr + b * T + offs_t, mask=offs_t < T, other=0.0))
        hmax = tl.max(mx, axis=0)
        hmax_safe = tl.where(hmax > 0, hmax, 1.0)
        hacc = tl.zeros([BLOCK_T], dtype=acc_dtype)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + offs_t0
            mask_t = offs_t < T
            cmax = tl.load(hmax_ptr + b * T + offs_t, mask=mask_t, other=0.0)
            hacc += tl.load(hsum_ptr + b * T + offs_t, mask=mask_t, other=0.0) * (cmax / hmax_safe)
        hmean = tl.sum(hacc, axis=0) * inv_n  # the mean of h / hmax: in [1 / N, 1], or 0
        # an all-zero precond gives mean 0: w = 1 there instead of 0/0
        scale = kappa / tl.where(hmean > 0, hmean, 1.0)
    acc = tl.zeros([BLOCK_S], dtype=acc_dtype)
    start = t * CHUNK
    offs0 = tl.arange(0, BLOCK_S)
    for s0 in range(start, start + CHUNK, BLOCK_S):
        offs = s0 + offs0
        mask = offs < N
        x = tl.load(s_ptr + b * N + offs, mask=mask, other=0.0).to(acc_dtype)
        y = tl.load(t_ptr + b * N + offs, mask=mask, other=0.0).to(acc_dtype)
        d = x - y
        if HAS_H:
            h = tl.load(h_ptr + b * N + offs, mask=mask, other=0.0).to(acc_dtype)
            # divide (1 / hmax overflows for a denormal hmax); a negative h poisons the loss
            w = tl.where(h < 0, float("nan"), 1.0 + scale * (h / hmax_safe))
        else:
            w = tl.full([BLOCK_S], 1.0, dtype=acc_dtype)
        wd = w * d
        acc += wd * d
        tl.store(grad_ptr + b * N + offs, (wd * grad_scale).to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(lpart_ptr + b * T + t, tl.sum(acc, axis=0))


_WARPS = [triton.Config({}, num_warps=w) for w in (2, 4, 8)]
_hsum_tuned = triton.autotune(configs=_WARPS, key=["N", "BLOCK_S"])(_hsum_kernel)
_bregman_tuned = triton.autotune(configs=_WARPS, key=["N", "BLOCK_S", "HAS_H"])(_bregman_kernel)


def _tiles(N: int, B: int, on_gpu: bool):
    block_s = max(16, min(next_pow2(N), 2048 if on_gpu else 32))  # small CPU tiles: tests cover chunks
    return (block_s, *chunk_grid(N, block_s, B, on_gpu))


def bregman_distill(
    student: torch.Tensor, teacher: torch.Tensor, precond: Optional[torch.Tensor], kappa: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: returns ``(loss (0-dim, input dtype), d loss / d student (shape of student; fp32
    for an fp16 student, since grad_output scales it only later))``. ``precond`` is read in its own
    dtype; accumulation is fp64 if the student or precond is fp64, else fp32."""
    B = student.shape[0]
    N = student[0].numel() if student.dim() > 1 else 1
    s2 = student.contiguous().reshape(B, N)
    t2 = teacher.to(student.dtype).contiguous().reshape(B, N)
    on_gpu = _use_tuned(student)
    has_h = precond is not None
    f64 = student.dtype == torch.float64 or (has_h and precond.dtype == torch.float64)
    acc_dtype = torch.float64 if f64 else torch.float32
    block_s, chunk, T = _tiles(N, B, on_gpu)
    if has_h:
        h2 = precond.contiguous().reshape(B, N)
        hmax = torch.empty((B, T), device=student.device, dtype=acc_dtype)
        hsum = torch.empty((B, T), device=student.device, dtype=acc_dtype)
        if on_gpu:
            _hsum_tuned[(B, T)](h2, hmax, hsum, N, T, chunk, ACC_F64=f64, BLOCK_S=block_s)
        else:
            _hsum_kernel[(B, T)](h2, hmax, hsum, N, T, chunk, ACC_F64=f64, BLOCK_S=block_s, num_warps=4)
    else:
        h2 = s2  # never read: HAS_H is False
        hmax = hsum = torch.empty((1,), device=student.device, dtype=acc_dtype)
    grad = torch.empty_like(s2, dtype=torch.float32 if student.dtype == torch.float16 else student.dtype)
    lpart = torch.empty((B, T), device=student.device, dtype=acc_dtype)
    args = (s2, t2, h2, hmax, hsum, grad, lpart, N, T, chunk, *split_f32(float(kappa)), *split_f32(1.0 / N),
            *split_f32(2.0 / (B * N)))
    block_t = max(1, min(next_pow2(T), 1024))
    if on_gpu:
        _bregman_tuned[(B, T)](*args, HAS_H=has_h, ACC_F64=f64, BLOCK_S=block_s, BLOCK_T=block_t)
    else:
        _bregman_kernel[(B, T)](*args, HAS_H=has_h, ACC_F64=f64, BLOCK_S=block_s, BLOCK_T=block_t, num_warps=4)
    loss = (lpart.sum() / (B * N)).to(student.dtype)
    return loss, grad.reshape(student.shape)
