"""Argument checks shared by every op: a ValueError that names the argument and what was expected."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    name: str,
    value,
    *,
    ndim: Optional[int] = None,
    min_ndim: Optional[int] = None,
    floating: bool = True,
    nonempty: bool = True,
) -> torch.Tensor:
    """Return `value` if it is a tensor of the expected kind, else raise ValueError naming `name`."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating dtype (float16/bfloat16/float32/float64), got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimensions, got shape {tuple(value.shape)}")
    if nonempty and value.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(value.shape)}")
    return value


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device; the message names every argument and its device."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"expected all tensors on one device, got {listing}")
    return next(iter(devices.values()))


def check_shape(name: str, value: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    if tuple(value.shape) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name}: expected shape {tuple(expected)}{extra}, got {tuple(value.shape)}")


# --- numbers --------------------------------------------------------------------------------------
# A bool is not accepted as a number (True > 0 would pass as 1); NaN never passes.

def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_real(name: str, value, *, finite: bool = True) -> float:
    """A real number (int/float, not bool, not NaN; finite unless `finite=False`), as a float."""
    if not _is_real(value) or math.isnan(value) or (finite and math.isinf(value)):
        what = "a finite number" if finite else "a number"
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return float(value)


def check_positive(name: str, value, *, finite: bool = False) -> float:
    """A number > 0 (inf allowed unless `finite=True`), as a float."""
    if not _is_real(value) or not value > 0 or (finite and math.isinf(value)):
        what = "a finite positive number" if finite else "a positive number"
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value, *, finite: bool = True) -> float:
    """A number >= 0 (finite unless `finite=False`), as a float."""
    if not _is_real(value) or not value >= 0 or (finite and math.isinf(value)):
        what = "a finite number >= 0" if finite else "a number >= 0"
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return float(value)


def check_probability(name: str, value) -> float:
    """A number in [0, 1], as a float."""
    if not _is_real(value) or not 0 <= value <= 1:
        raise ValueError(f"{name}: expected a probability in [0, 1], got {value!r}")
    return float(value)


def check_callable(name: str, value, what: str = "a callable"):
    if not callable(value):
        raise ValueError(f"{name}: expected {what}, got {type(value).__name__}")
    return value


def check_generator(name: str, value) -> Optional[torch.Generator]:
    if value is not None and not isinstance(value, torch.Generator):
        raise ValueError(f"{name}: expected a torch.Generator or None, got {type(value).__name__}")
    return value


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
