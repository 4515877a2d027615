"""Lazy runtime loader for the hand-written CUDA sources in `csrc/` (installed as data in `cdgfast.csrc`).

No build step: a source is compiled on first use with NVRTC and cached per (source, kernel, device).
Backends, in order of preference:

* ``"cupy"``  -- CuPy's `RawModule` (NVRTC), when `cupy` is installed (`pip install cdgfast[cuda]`); torch
  tensors are passed as raw device addresses and the launch goes to torch's current stream;
* ``"torch"`` -- torch's own NVRTC wrapper `torch.cuda._compile_kernel` (CUDA builds of torch >= 2.8 ship
  libnvrtc), so nothing beyond torch is needed;
* none: `available()` is False, `unavailable_reason()` says why, and `multi_tensor_fisher_update` uses
  `torch._foreach_*` ops (also multi-tensor launches on CUDA), which give the same numbers.

Set CDGFAST_DISABLE_CUDA_KERNELS=1 to force the fallback. Importing this module touches neither CUDA nor
CuPy; nothing in `cdgfast` imports it on CPU-only code paths. Before a compiled kernel is first trusted
on a device it is checked once against the torch fallback on a small problem; a mismatch disables it
with a warning.
"""
from __future__ import annotations

import functools
import importlib.resources
import os
import threading
import warnings
from typing import List, Optional, Sequence

import torch

__all__ = ["source", "sources", "backend", "available", "unavailable_reason", "get_kernel",
           "multi_tensor_fisher_update", "FISHER_CHUNK", "FISHER_THREADS"]

SOURCES_PACKAGE = "cdgfast.csrc"
FISHER_CHUNK = 4096   # FU_CHUNK in csrc/fisher_update.cu
FISHER_THREADS = 256  # FU_THREADS in csrc/fisher_update.cu
_FISHER_KERNELS = {
    (torch.float32, torch.float32): "fisher_update_f32_f32",
    (torch.float32, torch.float16): "fisher_update_f32_f16",
    (torch.float32, torch.bfloat16): "fisher_update_f32_bf16",
    (torch.float64, torch.float64): "fisher_update_f64_f64",
}
_lock = threading.Lock()


def sources() -> List[str]:
    """Names of the CUDA sources shipped in `cdgfast.csrc`."""
    root = importlib.resources.files(SOURCES_PACKAGE)
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".cu"))


@functools.lru_cache(maxsize=None)
def source(name: str) -> str:
    """The text of `cdgfast.csrc/<name>` (found through importlib.resources, so it works installed)."""
    path = importlib.resources.files(SOURCES_PACKAGE).joinpath(name)
    if not path.is_file():
        raise ValueError(f"name: expected one of {sources()}, got {name!r}")
    return path.read_text()


@functools.lru_cache(maxsize=None)
def _probe() -> tuple:
    """(backend or None, reason)."""
    if os.environ.get("CDGFAST_DISABLE_CUDA_KERNELS", "0") == "1":
        return None, "disabled by CDGFAST_DISABLE_CUDA_KERNELS=1"
    if not torch.cuda.is_available():
        return None, "no CUDA device (torch.cuda.is_available() is False)"
    try:
        import cupy  # noqa: F401
        return "cupy", "CuPy RawModule"
    except Exception:
        pass
    if hasattr(torch.cuda, "_compile_kernel"):
        return "torch", "torch.cuda._compile_kernel (NVRTC)"
    return None, ("no runtime CUDA compiler: install CuPy (pip install 'cdgfast[cuda]', i.e. cupy-cuda12x) "
                  "or a torch >= 2.8 CUDA build")


def backend() -> Optional[str]:
    """"cupy", "torch" or None (see the module docstring)."""
    return _probe()[0]


def available() -> bool:
    return backend() is not None


def unavailable_reason() -> str:
    b, reason = _probe()
    return "" if b is not None else reason


class _Kernel:
    """A compiled kernel: call(grid, block, args); args are CUDA tensors (passed as their address), Python
    ints (C int) and Python floats (C double), launched on torch's current stream."""

    def __init__(self, backend_name: str, fn, device: torch.device):
        self.backend = backend_name
        self.fn = fn
        self.device = device

    def __call__(self, grid, block, args: Sequence) -> None:
        if self.backend == "torch":
            with torch.cuda.device(self.device):
                self.fn(grid=tuple(grid), block=tuple(block), args=list(args))
            return
        import cupy
        import numpy as np

        conv = []
        for a in args:
            if isinstance(a, torch.Tensor):
                conv.append(np.uint64(a.data_ptr()))  # a pointer parameter is passed by value: its address
            elif isinstance(a, bool) or isinstance(a, int):
                conv.append(np.int32(a))
            elif isinstance(a, float):
                conv.append(np.float64(a))
            else:
                raise TypeError(f"unsupported kernel argument type {type(a).__name__}")
        stream = torch.cuda.current_stream(self.device)
        with cupy.cuda.Device(self.device.index), cupy.cuda.ExternalStream(stream.cuda_stream):
            self.fn(tuple(grid), tuple(block), tuple(conv))


_kernels: dict = {}


def get_kernel(source_name: str, kernel_name: str, device=None) -> _Kernel:
    """Compile (once) and return `kernel_name` from `cdgfast.csrc/<source_name>` for `device`.
    Raises RuntimeError with the reason when no backend is available."""
    b, reason = _probe()
    if b is None:
        raise RuntimeError(f"cdgfast CUDA kernels unavailable: {reason}")
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (source_name, kernel_name, device.index)
    with _lock:
        if key not in _kernels:
            code = source(source_name)
            if b == "cupy":
                import cupy
                with cupy.cuda.Device(device.index):
                    module = cupy.RawModule(code=code, options=("--std=c++14",))
                    fn = module.get_function(kernel_name)
            else:
                with torch.cuda.device(device):
                    fn = torch.cuda._compile_kernel(code, kernel_name)
            _kernels[key] = _Kernel(b, fn, device)
        return _kernels[key]


# ----------------------------------------------------------------------------------------------------
# multi-tensor streaming Fisher update

def _torch_fisher_update(dst_flat: torch.Tensor, tensors: Sequence[torch.Tensor], gamma: float, scale: float,
                         square: bool) -> None:
    from cdgfast.fisher.accumulator import foreach_fisher_update
    foreach_fisher_update(dst_flat, tensors, gamma, scale, square)


def fisher_table(items: Sequence[tuple]) -> List[int]:
    """The int64 table of csrc/fisher_update.cu for (tensor, offset in the flat buffer) pairs of non-empty
    tensors: addresses, sizes, offsets, then the chunk prefix (T + 1 entries; the last = grid size)."""
    chunks = [0]
    for t, _ in items:
        chunks.append(chunks[-1] + (t.numel() + FISHER_CHUNK - 1) // FISHER_CHUNK)
    return [t.data_ptr() for t, _ in items] + [t.numel() for t, _ in items] + [o for _, o in items] + chunks


def _fisher_groups(tensors: Sequence[torch.Tensor]) -> dict:
    """dtype -> [(contiguous tensor, offset)] for the non-empty tensors, offsets over all of them in order."""
    groups: dict = {}
    off = 0
    for t in tensors:
        n = t.numel()
        if n:
            groups.setdefault(t.dtype, []).append((t.contiguous(), off))
        off += n
    return groups


@torch.no_grad()
def _launch_fisher_update(dst_flat: torch.Tensor, tensors: Sequence[torch.Tensor], gamma: float, scale: float,
                          square: bool) -> None:
    """One launch per source dtype of csrc/fisher_update.cu."""
    for dtype, items in _fisher_groups(tensors).items():
        name = _FISHER_KERNELS[(dst_flat.dtype, dtype)]
        T = len(items)
        table = fisher_table(items)
        table_dev = torch.tensor(table, dtype=torch.int64).to(dst_flat.device)
        # slices are disjoint, so each group applies gamma to its own slices exactly once
        kernel = get_kernel("fisher_update.cu", name, dst_flat.device)
        # same stream as the allocations: the caching allocator keeps `items`/`table_dev` memory valid
        kernel((table[-1], 1, 1), (FISHER_THREADS, 1, 1),
               [dst_flat, table_dev, T, float(gamma), float(scale), int(bool(square))])


_verified: dict = {}


def _kernel_trusted(device: torch.device) -> bool:
    """Check the compiled kernel once per device against the torch path (float32 and float16 sources)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx in _verified:
        return _verified[idx]
    ok = False
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        srcs = [torch.randn(n, generator=gen).to(device) for n in (1, 4095, 4097, 9000)]
        srcs.append(torch.randn(37, generator=gen).to(device=device, dtype=torch.float16))
        total = sum(s.numel() for s in srcs)
        base = torch.randn(total, generator=gen).to(device)
        for square in (False, True):
            a, b = base.clone(), base.clone()
            _launch_fisher_update(a, srcs, 0.5, 1.5, square)
            _torch_fisher_update(b, srcs, 0.5, 1.5, square)
            if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
                raise RuntimeError("mismatch against torch._foreach_* on a test problem")
        ok = True
    except Exception as e:  # compile or launch failure: fall back, say why once
        warnings.warn(f"cdgfast: csrc/fisher_update.cu disabled on {device}, using torch._foreach_*: {e}")
    _verified[idx] = ok
    return ok


def multi_tensor_fisher_update(dst_flat: torch.Tensor, tensors: Sequence[torch.Tensor], gamma: float = 1.0,
                               scale: float = 1.0, square: bool = False) -> torch.Tensor:
    """In place, for consecutive slices of the 1-D buffer `dst_flat` (offsets 0, n0, n0+n1, ...):
    dst[off:off+n] <- gamma * dst[off:off+n] + scale * (t or t*t).

    On CUDA with a runtime compiler (see `backend()`), one launch of csrc/fisher_update.cu per source dtype
    (float32 buffer: float32/float16/bfloat16 sources; float64 buffer: float64 sources); elsewhere
    torch._foreach_* ops. Returns dst_flat. Raises ValueError naming the argument on bad input.
    """
    if not isinstance(dst_flat, torch.Tensor) or dst_flat.dim() != 1 or not dst_flat.is_contiguous():
        raise ValueError("dst_flat: expected a contiguous 1-D tensor")
    if not dst_flat.is_floating_point():
        raise ValueError(f"dst_flat: expected a floating dtype, got {dst_flat.dtype}")
    tensors = list(tensors)
    total = 0
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensors[{i}]: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"tensors[{i}]: expected a floating dtype, got {t.dtype}")
        if t.device != dst_flat.device:
            raise ValueError(f"tensors[{i}]: expected device {dst_flat.device} (dst_flat's), got {t.device}")
        total += t.numel()
    if total != dst_flat.numel():
        raise ValueError(f"tensors: expected {dst_flat.numel()} elements in all to fill dst_flat, got {total}")
    gamma, scale = float(gamma), float(scale)
    use_kernel = (dst_flat.is_cuda and available()
                  and all((dst_flat.dtype, t.dtype) in _FISHER_KERNELS for t in tensors)
                  and _kernel_trusted(dst_flat.device))
    if use_kernel:
        _launch_fisher_update(dst_flat, tensors, gamma, scale, square)
    else:
        _torch_fisher_update(dst_flat, tensors, gamma, scale, square)
    return dst_flat
