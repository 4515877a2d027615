"""`finetune`: the plain denoising loss, no consolidation (the lower bound every method is compared with)."""
from __future__ import annotations

from .base import Method


class Finetune(Method):
    """Task loss only; keeps no state beyond the task bookkeeping."""

    name = "finetune"
