"""When to run a Triton kernel instead of the plain-PyTorch path.

The CUDA implementation of every op calls the Triton launcher in `cdgfast.kernels`; if Triton is
missing (or CDGFAST_DISABLE_TRITON=1) it falls back to the PyTorch composite, which is always
correct. On the CPU, Triton kernels run only when a test asks for them explicitly under
TRITON_INTERPRET=1 (see tests/conftest.py): they are far slower than ATen there.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Callable

import torch


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    if os.environ.get("CDGFAST_DISABLE_TRITON", "0") == "1":
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install on an unsupported platform
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(tensor) -> bool:
    """True where the Triton path should run for a tensor on this device."""
    if not triton_available():
        return False
    if tensor.is_cuda:
        return True
    return False


def _first_tensor(args):
    return next(a for a in args if isinstance(a, torch.Tensor))


def triton_or_composite(module: str, name: str, composite: Callable) -> Callable:
    """The CUDA implementation of a registered op: the Triton launcher `cdgfast.kernels.<module>.<name>`
    (imported on first use, so that importing cdgfast never imports triton) when `use_triton` holds for
    the first tensor argument, else `composite`. The launcher and the composite take the op's arguments.
    """
    def impl(*args):
        if use_triton(_first_tensor(args)):
            return getattr(importlib.import_module(f"cdgfast.kernels.{module}"), name)(*args)
        return composite(*args)

    impl.__name__ = f"{name}_cuda"
    impl.__qualname__ = impl.__name__
    return impl


def transform_active() -> bool:
    """True inside a torch.func transform or a forward-AD dual level, where a custom op without a
    forward-mode / batching rule would be wrong or slow: the callers then use plain PyTorch."""
    if torch._C._functorch.maybe_current_level() is not None:
        return True
    from torch.autograd import forward_ad

    return forward_ad._current_level >= 0
