"""`finetune`: the plain denoising loss, no consolidation (the lower bound every method is compared with)."""
from __future__ import annotations

from ._registry import register
from .base import Method, TinyRun


@register("finetune", order=10)
class Finetune(Method):
    """Task loss only; keeps no state beyond the task bookkeeping."""

    tiny = TinyRun()


__all__ = ["Finetune"]
