"""Triton kernel for the streaming Fisher update on flat buffers (installed as `cdgfast.kernels.fisher_update`).

    F <- gamma * F + scale * src          (online decay, sums of gradients / squared-gradient sums)
    F <- gamma * F + scale * src * src    (squared accumulate of a per-sample gradient)

One elementwise pass, read F and src once, write F once; computed in float32 (float64 for a float64
buffer). Python floats reach a Triton kernel as float32, so gamma and scale are split into a float32
head and tail (x = hi + lo) and recombined in the kernel: a float64 buffer then sees them to ~48 bits.
`fisher_update_slices` streams a list of per-parameter tensors into consecutive slices of one flat
buffer (one launch per tensor; the hand-written single-launch version is csrc/fisher_update.cu).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _fisher_update_kernel(dst_ptr, src_ptr, n, gamma_hi, gamma_lo, scale_hi, scale_lo,
                          SQUARE: tl.constexpr, DECAY: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    src = tl.load(src_ptr + offs, mask=mask, other=0.0).to(ACC)
    dst = tl.load(dst_ptr + offs, mask=mask, other=0.0).to(ACC)
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    if SQUARE:
        src = src * src
    if DECAY:
        gamma = tl.cast(gamma_hi, ACC) + tl.cast(gamma_lo, ACC)
        out = gamma * dst + scale * src
    else:
        out = dst + scale * src
    tl.store(dst_ptr + offs, out, mask=mask)


def _split(x: float):
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


def fisher_update_(dst: torch.Tensor, src: torch.Tensor, gamma: float = 1.0, scale: float = 1.0,
                   square: bool = False, *, block: int = BLOCK) -> torch.Tensor:
    """In place: dst <- gamma*dst + scale*(src*src if square else src). dst and src: contiguous tensors
    with the same number of elements (src may have another floating dtype). Returns dst."""
    if not dst.is_contiguous():
        raise ValueError("dst: expected a contiguous tensor (it is updated in place)")
    if src.numel() != dst.numel():
        raise ValueError(f"src: expected {dst.numel()} elements to match dst, got {src.numel()}")
    src = src.contiguous()
    n = dst.numel()
    if n == 0:
        return dst
    acc = tl.float64 if dst.dtype == torch.float64 else tl.float32
    g_hi, g_lo = _split(gamma)
    s_hi, s_lo = _split(scale)
    _fisher_update_kernel[(triton.cdiv(n, block),)](dst, src, n, g_hi, g_lo, s_hi, s_lo, SQUARE=bool(square),
                                                    DECAY=float(gamma) != 1.0, BLOCK=block, ACC=acc)
    return dst


def fisher_sq_accumulate_(dst: torch.Tensor, src: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """In place: dst += scale * src * src."""
    return fisher_update_(dst, src, 1.0, scale, True)


def fisher_update_slices(dst_flat: torch.Tensor, tensors: Sequence[torch.Tensor], gamma: float = 1.0,
                         scale: float = 1.0, square: bool = False) -> torch.Tensor:
    """Stream `tensors` into consecutive slices of the 1-D buffer `dst_flat` (offsets 0, n0, n0+n1, ...):
    dst[off:off+n] <- gamma*dst[off:off+n] + scale*(t or t*t). The sizes must add up to dst_flat.numel()."""
    total = sum(t.numel() for t in tensors)
    if dst_flat.dim() != 1 or total != dst_flat.numel():
        raise ValueError(f"tensors: expected {dst_flat.numel()} elements in all to fill dst_flat, got {total}")
    off = 0
    for t in tensors:
        n = t.numel()
        if n:
            fisher_update_(dst_flat[off:off + n], t.reshape(-1), gamma, scale, square)
        off += n
    return dst_flat
