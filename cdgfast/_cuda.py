"""Lazy runtime loader for the hand-written CUDA sources in `csrc/` (installed as data in `cdgfast.csrc`).

Generic: it finds a source, compiles one of its `extern "C"` kernels and launches it; which kernel runs for
which op, and the fallback, are the op's business (the Fisher update: `cdgfast.kernels.fisher_update`,
chosen in `cdgfast.fisher.accumulator`).

No build step: a source is compiled on first use with NVRTC and cached per (source, kernel, device).
Backends, in order of preference:

* ``"cupy"``  -- CuPy's `RawModule` (NVRTC), when `cupy` is installed (`pip install cdgfast[cuda]`); torch
  tensors are passed as raw device addresses and the launch goes to torch's current stream;
* ``"torch"`` -- torch's own NVRTC wrapper `torch.cuda._compile_kernel` (CUDA builds of torch >= 2.8 ship
  libnvrtc), so nothing beyond torch is needed;
* none: `available()` is False and `unavailable_reason()` says why; callers take their plain-PyTorch path.

Set CDGFAST_DISABLE_CUDA_KERNELS=1 to force the fallback. Importing this module touches neither CUDA nor
CuPy; nothing in `cdgfast` imports it on CPU-only code paths. `trusted(source, device, check)` runs a
caller's check of a compiled source once per device (typically against the torch fallback on a small
problem); a failure disables that source there with a warning.
"""
from __future__ import annotations

import functools
import importlib.resources
import os
import threading
import warnings
from typing import Callable, List, Optional, Sequence

import torch

__all__ = ["source", "sources", "backend", "available", "unavailable_reason", "get_kernel", "trusted"]

SOURCES_PACKAGE = "cdgfast.csrc"
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


_trusted: dict = {}


def trusted(source_name: str, device, check: Callable[[torch.device], None], fallback: str) -> bool:
    """Whether kernels of `cdgfast.csrc/<source_name>` may run on `device`: `check(device)` (which compiles,
    launches and compares with the caller's fallback, raising on any failure) runs once per (source,
    device); a failure warns once, naming `fallback`, and the answer stays False for that device."""
    device = torch.device(device)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    key = (source_name, idx)
    if key not in _trusted:
        ok = False
        try:
            check(torch.device("cuda", idx))
            ok = True
        except Exception as e:  # compile or launch failure, or a mismatch: fall back, say why once
            warnings.warn(f"cdgfast: csrc/{source_name} disabled on {device}, using {fallback}: {e}")
        _trusted[key] = ok
    return _trusted[key]
