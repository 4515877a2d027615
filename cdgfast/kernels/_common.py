"""Helpers shared by the kernel modules of `cdgfast.kernels` (one copy each, imported by every kernel file).

Host side (plain Python, importable without Triton):

* `triton`, `tl`: the Triton modules, or None where Triton is missing or CDGFAST_DISABLE_TRITON=1;
* `use_tuned(x)`: the GPU launch path (autotuned kernels, GPU tile heuristics) rather than the small fixed
  configuration of the interpreter;
* `split_f32(x)`: a Python float as an fp32 pair hi + lo, because float kernel arguments reach a compiled
  kernel as fp32;
* `acc_dtype(*tensors)`, `tl_dtype(dtype)`: the accumulation dtype (fp64 if any input is fp64, else fp32)
  and the Triton dtype of a torch dtype;
* `next_pow2(n)`, `chunk_grid(n, block, rows, on_gpu)`: tile widths and the split of a long row into
  chunks so that a launch has enough programs.

Device side (`@triton.jit`, inlined into the kernels that call them; only where Triton is): `block_range`
(the offsets and mask of one program's block of a 1-D stream) and `acc_scalar` (an fp32 pair recombined in
the accumulation dtype).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from cdgfast._dispatch import triton_available, triton_interpreted

if triton_available():
    import triton
    import triton.language as tl
else:  # only the host helpers exist; the Triton launchers are never reached (see cdgfast._dispatch)
    triton = None
    tl = None

__all__ = ["triton", "tl", "use_tuned", "split_f32", "acc_dtype", "tl_dtype", "next_pow2", "chunk_grid"]

# Programs a launch aims for: enough to fill a GPU; a few in the interpreter, so that the CPU tests still
# cover several chunks per row.
_TARGET_PROGRAMS_GPU = 1024
_TARGET_PROGRAMS_INTERPRETED = 4


def use_tuned(x: torch.Tensor) -> bool:
    """GPU launch path (autotuned kernels, GPU tile heuristic); tests may patch a module's `_use_tuned`
    to exercise that path in the interpreter."""
    return x.is_cuda and not triton_interpreted()


def split_f32(x: float) -> Tuple[float, float]:
    """x as two fp32 numbers hi + lo (about 48 significant bits): float kernel arguments are fp32."""
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


def acc_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32 (the accumulation and loss dtype)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


_TL_DTYPES = {} if tl is None else {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                                    torch.float32: tl.float32, torch.float64: tl.float64}


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a floating torch dtype."""
    return _TL_DTYPES[dtype]


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def chunk_grid(n: int, block: int, rows: int, on_gpu: bool) -> Tuple[int, int]:
    """(chunk, count): each of `rows` rows of `n` elements is cut into `count` chunks of `chunk` elements
    (a whole number of `block`-wide tiles), one program per chunk and row, so that rows * count is about
    the target number of programs (never more chunks than tiles, at least one)."""
    tiles = _cdiv(n, block)
    target = _TARGET_PROGRAMS_GPU if on_gpu else _TARGET_PROGRAMS_INTERPRETED
    t = max(1, min(tiles, _cdiv(target, rows)))
    chunk = _cdiv(tiles, t) * block
    return chunk, _cdiv(n, chunk)


if tl is not None:
    __all__ += ["block_range", "acc_scalar"]

    @triton.jit
    def block_range(pid, n, BLOCK: tl.constexpr):
        """(offsets, mask) of block `pid` of a stream of n elements; 64-bit offsets, so n may pass 2^31."""
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        return offs, offs < n

    @triton.jit
    def acc_scalar(hi, lo, ACC_F64: tl.constexpr):
        """A float argument passed as the fp32 pair (hi, lo) of `split_f32`: hi + lo in fp64 for an fp64
        kernel, hi itself (exactly the fp32 value) otherwise."""
        if ACC_F64:
            x = tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
        else:
            x = hi
        return x
