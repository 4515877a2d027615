"""Pieces every op family in cdgfast/ops shares: dtypes, saving tensors for backward, higher-order
derivatives.

Higher-order derivatives (one rule for every op). A registered op's backward is fused and
first-order: it scales a gradient saved by the forward or runs a backward op that has no autograd
formula of its own. When a backward runs with grad mode on (``create_graph=True``: a gradient
penalty through the loss, ``gradgradcheck``), every op instead differentiates its plain-PyTorch
reference formula at the saved inputs (:func:`recorded_vjp`), so the gradient is itself
differentiable and every order of derivative is exact. The reference is the same function the
public op runs inside ``torch.func`` transforms.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor


def acc_dtype(*xs) -> torch.dtype:
    """float64 if any argument (a tensor, a dtype or None) is float64, else float32: the dtype that
    sums and normalisations run in."""
    for x in xs:
        dt = x.dtype if isinstance(x, Tensor) else x
        if dt == torch.float64:
            return torch.float64
    return torch.float32


def saved_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of a gradient that a forward writes for its backward to scale by grad_output later.

    float16 is stored as float32: the unscaled gradient carries factors like 2 / (B N) and the upstream
    gradient (a loss weight, GradScaler's 2^16) multiplies it only in the backward, so float16's range
    (6e-8 .. 65504) would flush it to zero or overflow before that scaling. bfloat16 has float32's range.
    """
    return torch.float32 if dtype == torch.float16 else dtype


def empty_unless(need: bool, like: Tensor) -> Tensor:
    """A gradient buffer shaped like `like`, or the empty (0,) placeholder of a gradient not asked for."""
    return torch.empty_like(like) if need else like.new_empty((0,))


def save(ctx, *tensors: Optional[Tensor]) -> None:
    """ctx.save_for_backward, except for inference tensors (made under torch.inference_mode: anchors
    computed there, a frozen teacher's output), which autograd refuses to save. They never require
    grad and cannot be modified in place outside inference mode, so they are held on ctx instead."""
    held = tuple(t if isinstance(t, Tensor) and t.is_inference() else None for t in tensors)
    ctx.cdgfast_held = held
    ctx.save_for_backward(*(None if h is not None else t for t, h in zip(tensors, held)))


def saved(ctx) -> tuple:
    return tuple(h if h is not None else t for t, h in zip(ctx.saved_tensors, ctx.cdgfast_held))


def usable(t):
    """An inference tensor cannot take part in a recorded graph (autograd cannot save it): a normal
    copy of it; any other value unchanged."""
    if isinstance(t, Tensor) and t.is_inference() and not torch.is_inference_mode_enabled():
        return t.clone()
    return t


def recorded_vjp(reference: Callable, inputs: Sequence, needs: Sequence[bool],
                 grad_outputs: Sequence[Optional[Tensor]]) -> list:
    """d/d inputs of sum_i <grad_outputs[i], reference(*inputs)[i]>, recorded by autograd
    (create_graph) so that it can be differentiated again. `needs[j]` says whether input j wants a
    gradient (ctx.needs_input_grad); the result has None where it does not, zeros where the output
    does not depend on that input. Outputs of the op beyond those `reference` returns (saved
    gradients, marked non-differentiable) are ignored."""
    xs = [usable(x) for x in inputs]
    wrt = [x for x, need in zip(xs, needs) if need]
    result = [None] * len(xs)
    if not wrt:
        return result
    with torch.enable_grad():
        outs = reference(*xs)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
    grads = [None] * len(wrt)
    if pairs:
        grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                    create_graph=True, allow_unused=True)
    it = iter(grads)
    for j, (x, need) in enumerate(zip(xs, needs)):
        if need:
            g = next(it)
            result[j] = torch.zeros_like(x) if g is None else g
    return result
