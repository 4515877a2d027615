"""The kernels of the streaming Fisher update (installed as `cdgfast.kernels.fisher_update`):

    F <- gamma * F + scale * src          (online decay, sums of gradients / squared-gradient sums)
    F <- gamma * F + scale * src * src    (squared accumulate of a per-sample gradient)

* Triton, one flat source: `fisher_update_` is one elementwise pass (read F and src once, write F once),
  computed in float32 (float64 for a float64 buffer). Python floats reach a Triton kernel as float32, so
  gamma and scale are split into a float32 head and tail (x = hi + lo) and recombined in the kernel: a
  float64 buffer then sees them to ~48 bits. `fisher_update_slices` streams a list of per-parameter
  tensors into consecutive slices of one flat buffer, one launch per tensor.
* CUDA C++, many sources: `cuda_fisher_update_` launches csrc/fisher_update.cu (through the runtime
  loader `cdgfast._cuda`) once per source dtype, every tensor of that dtype in the one launch.

These are launchers (no fallback, no argument checks beyond what a launch needs):
`cdgfast.fisher.accumulator._fisher_update` picks one of them, or a plain-PyTorch path, for each call.
The module imports without Triton (then only the CUDA launcher is there) and imports `cdgfast._cuda`
only inside a CUDA launch.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from ._common import acc_dtype, split_f32, tl, tl_dtype, triton

__all__ = ["fisher_update_", "fisher_sq_accumulate_", "fisher_update_slices", "cuda_fisher_update_",
           "CUDA_SOURCE", "CUDA_KERNELS", "CUDA_CHUNK", "CUDA_THREADS"]

BLOCK = 2048

CUDA_SOURCE = "fisher_update.cu"
CUDA_CHUNK = 4096   # FU_CHUNK in csrc/fisher_update.cu
CUDA_THREADS = 256  # FU_THREADS in csrc/fisher_update.cu
# (buffer dtype, source dtype) -> kernel name in csrc/fisher_update.cu
CUDA_KERNELS = {
    (torch.float32, torch.float32): "fisher_update_f32_f32",
    (torch.float32, torch.float16): "fisher_update_f32_f16",
    (torch.float32, torch.bfloat16): "fisher_update_f32_bf16",
    (torch.float64, torch.float64): "fisher_update_f64_f64",
}

if triton is not None:
    from ._common import block_range

    @triton.jit
    def _fisher_update_kernel(dst_ptr, src_ptr, n, gamma_hi, gamma_lo, scale_hi, scale_lo,
                              SQUARE: tl.constexpr, DECAY: tl.constexpr, BLOCK: tl.constexpr,
                              ACC: tl.constexpr):
        offs, mask = block_range(tl.program_id(0), n, BLOCK)
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
    acc = tl_dtype(acc_dtype(dst))
    g_hi, g_lo = split_f32(gamma)
    s_hi, s_lo = split_f32(scale)
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


# ----------------------------------------------------------------------------------------------------
# csrc/fisher_update.cu

def cuda_groups(tensors: Sequence[torch.Tensor]) -> Dict[torch.dtype, List[Tuple[torch.Tensor, int]]]:
    """dtype -> [(contiguous tensor, offset)] for the non-empty tensors, offsets over all of them in order."""
    groups: dict = {}
    off = 0
    for t in tensors:
        n = t.numel()
        if n:
            groups.setdefault(t.dtype, []).append((t.contiguous(), off))
        off += n
    return groups


def cuda_table(items: Sequence[Tuple[torch.Tensor, int]]) -> List[int]:
    """The int64 table of csrc/fisher_update.cu for (tensor, offset in the flat buffer) pairs of non-empty
    tensors: addresses, sizes, offsets, then the chunk prefix (T + 1 entries; the last = grid size)."""
    chunks = [0]
    for t, _ in items:
        chunks.append(chunks[-1] + (t.numel() + CUDA_CHUNK - 1) // CUDA_CHUNK)
    return [t.data_ptr() for t, _ in items] + [t.numel() for t, _ in items] + [o for _, o in items] + chunks


@torch.no_grad()
def cuda_fisher_update_(dst_flat: torch.Tensor, tensors: Sequence[torch.Tensor], gamma: float, scale: float,
                        square: bool) -> torch.Tensor:
    """In place, for consecutive slices of the 1-D CUDA buffer `dst_flat` (offsets 0, n0, n0+n1, ...):
    dst[off:off+n] <- gamma*dst[off:off+n] + scale*(t or t*t), one launch of csrc/fisher_update.cu per
    source dtype. Every (dst_flat.dtype, t.dtype) pair must be in CUDA_KERNELS and the sizes must add up
    to dst_flat.numel() (the caller checks). Returns dst_flat."""
    from cdgfast import _cuda  # the runtime compiler: only on this CUDA path

    for dtype, items in cuda_groups(tensors).items():
        T = len(items)
        table = cuda_table(items)
        table_dev = torch.tensor(table, dtype=torch.int64).to(dst_flat.device)
        # slices are disjoint, so each group applies gamma to its own slices exactly once
        kernel = _cuda.get_kernel(CUDA_SOURCE, CUDA_KERNELS[(dst_flat.dtype, dtype)], dst_flat.device)
        # same stream as the allocations: the caching allocator keeps `items`/`table_dev` memory valid
        kernel((table[-1], 1, 1), (CUDA_THREADS, 1, 1),
               [dst_flat, table_dev, T, float(gamma), float(scale), int(bool(square))])
    return dst_flat
