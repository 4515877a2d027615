"""Triton kernels for the Bregman-preconditioned distillation loss (SPEC 2.1, L_IKC; a reconstruction).

Shapes (spatial dims flattened): ``student[B, N]``, ``teacher[B, N]``, optional ``h[B, N]``.

    w[b, s]  = 1 + kappa * h[b, s] / max(mean_s h[b, s], tiny)      (w = 1 without h)
    loss     = sum_{b, s} w (student - teacher)^2 / (B * N)
    gstudent = 2 w (student - teacher) / (B * N)                     (d loss / d teacher = -gstudent)

Two stages, grid ``(B, T)`` each, ``T`` chunks of ``CHUNK`` elements per sample:

1. ``_hsum_kernel`` (only with ``h``): ``hpart[b, t] = sum of h over chunk t``.
2. ``_bregman_kernel``: every program sums ``hpart[b, :]`` itself (T is small), forms the sample's
   weight scale, then writes its chunk's gradient and ``lpart[b, t] = sum w d^2``. The launcher adds
   the ``B x T`` partial losses (a tiny deterministic reduction).

Accumulation in fp32 (fp64 for fp64 inputs); the gradient is written in the input dtype. On a GPU
both kernels are autotuned over warps; the tile shape comes from a heuristic because the partial
buffers' sizes depend on it. CPU tensors run under ``TRITON_INTERPRET=1``. Float scalars reach a
compiled kernel as fp32, so fp64 runs receive kappa, 1/N and 2/(B N) as hi + lo fp32 pairs; ``tiny``
is the fp32 one for every dtype (as in the composite).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import acc_dtype as _acc_dtype
from ._common import acc_scalar, chunk_grid, next_pow2, split_f32
from ._common import use_tuned as _use_tuned

__all__ = ["bregman_distill"]


@triton.jit
def _hsum_kernel(h_ptr, hpart_ptr, N, T, CHUNK, ACC_F64: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    if ACC_F64:
        acc = tl.zeros([BLOCK_S], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_S], dtype=tl.float32)
    start = t * CHUNK
    offs0 = tl.arange(0, BLOCK_S)
    for s0 in range(start, start + CHUNK, BLOCK_S):
        offs = s0 + offs0
        acc += tl.load(h_ptr + b * N + offs, mask=offs < N, other=0.0).to(acc.dtype)
    tl.store(hpart_ptr + b * T + t, tl.sum(acc, axis=0))


@triton.jit
def _bregman_kernel(
    s_ptr, t_ptr, h_ptr, hpart_ptr, grad_ptr, lpart_ptr,
    N, T, CHUNK, kappa_hi, kappa_lo, inv_n_hi, inv_n_lo, gs_hi, gs_lo, tiny,
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
        hacc = tl.zeros([BLOCK_T], dtype=acc_dtype)
        offs_t0 = tl.arange(0, BLOCK_T)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + offs_t0
            hacc += tl.load(hpart_ptr + b * T + offs_t, mask=offs_t < T, other=0.0)
        hmean = tl.sum(hacc, axis=0) * inv_n
        # an all-zero precond gives mean 0: clamping keeps w = 1 there instead of 0/0
        scale = kappa / tl.maximum(hmean, tiny)
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
            w = 1.0 + scale * h
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
    """Fused forward: returns ``(loss (0-dim, input dtype), d loss / d student (shape of student))``."""
    B = student.shape[0]
    N = student[0].numel() if student.dim() > 1 else 1
    s2 = student.contiguous().reshape(B, N)
    t2 = teacher.to(student.dtype).contiguous().reshape(B, N)
    on_gpu = _use_tuned(student)
    f64 = student.dtype == torch.float64
    acc_dtype = _acc_dtype(student)
    block_s, chunk, T = _tiles(N, B, on_gpu)
    has_h = precond is not None
    if has_h:
        h2 = precond.to(student.dtype).contiguous().reshape(B, N)
        hpart = torch.empty((B, T), device=student.device, dtype=acc_dtype)
        if on_gpu:
            _hsum_tuned[(B, T)](h2, hpart, N, T, chunk, ACC_F64=f64, BLOCK_S=block_s)
        else:
            _hsum_kernel[(B, T)](h2, hpart, N, T, chunk, ACC_F64=f64, BLOCK_S=block_s, num_warps=4)
    else:
        h2 = s2  # never read: HAS_H is False
        hpart = torch.empty((1,), device=student.device, dtype=acc_dtype)
    grad = torch.empty_like(s2)
    lpart = torch.empty((B, T), device=student.device, dtype=acc_dtype)
    args = (s2, t2, h2, hpart, grad, lpart, N, T, chunk, *split_f32(float(kappa)), *split_f32(1.0 / N),
            *split_f32(2.0 / (B * N)), torch.finfo(torch.float32).tiny)
    block_t = max(1, min(next_pow2(T), 1024))
    if on_gpu:
        _bregman_tuned[(B, T)](*args, HAS_H=has_h, ACC_F64=f64, BLOCK_S=block_s, BLOCK_T=block_t)
    else:
        _bregman_kernel[(B, T)](*args, HAS_H=has_h, ACC_F64=f64, BLOCK_S=block_s, BLOCK_T=block_t, num_warps=4)
    loss = (lpart.sum() / (B * N)).to(student.dtype)
    return loss, grad.reshape(student.shape)
