"""Per-sample projections `direction . g_i` by forward-mode AD (SPEC section 4).

`d/de l_i(theta + e * direction)` at e = 0 equals `direction . grad_theta l_i` for every sample at
once: one `torch.func.jvp` over `torch.func.functional_call` costs about 2-3 forwards and stores no
activations for a backward. Exact for any model whose ops have forward-AD rules, including models
that couple samples (train-mode BatchNorm): l_i is differentiated as computed in the batched forward.

Two things in diffusers UNets have no forward-AD support and are patched for the duration of the call
and restored exactly afterwards:
* fused attention (`F.scaled_dot_product_attention`): the math SDPA backend is selected
  (`torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`); if an attention op still has no forward-AD
  rule, diffusers models get the eager `AttnProcessor` and their original processors back afterwards;
* `GroupNorm` on non-contiguous inputs (diffusers' attention transposes before its group norm): the
  GroupNorm modules' `forward` is wrapped to pass `input.contiguous()`.

Embedding rows at `padding_idx` get a zero tangent: reverse mode defines their gradient as zero, and
the forward-mode result must be the same `direction . g_i`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Sequence

import torch
from torch.func import functional_call, jvp

from ._common import call_loss, check_jvp_tangent, usable_batch


class _LossCall(torch.nn.Module):
    """`loss_fn(model, batch)` as a module so `functional_call` can swap the model's parameters."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch):
        losses = call_loss(self._loss_fn, self.model, batch)
        check_jvp_tangent(losses)
        return losses


def _contiguous_forward(fwd):
    def forward(input, *args, **kwargs):
        return fwd(input.contiguous(), *args, **kwargs)
    forward._cdgfast_contiguous = True
    return forward


@contextlib.contextmanager
def _groupnorm_contiguous(model: torch.nn.Module) -> Iterator[None]:
    patched = []
    try:
        for mod in model.modules():
            if isinstance(mod, torch.nn.GroupNorm):
                had = "forward" in mod.__dict__
                prev = mod.__dict__.get("forward")
                mod.forward = _contiguous_forward(prev if had else mod.forward)
                patched.append((mod, had, prev))
        yield
    finally:
        for mod, had, prev in reversed(patched):
            if had:
                mod.forward = prev
            else:
                del mod.__dict__["forward"]


def _attention_modules(model: torch.nn.Module):
    return [m for m in model.modules() if hasattr(m, "processor") and callable(getattr(m, "set_processor", None))]


@contextlib.contextmanager
def _eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """diffusers attention modules: swap every processor for the eager AttnProcessor, then put the
    original processor objects back."""
    from diffusers.models.attention_processor import AttnProcessor

    saved = [(m, m.processor) for m in _attention_modules(model)]
    try:
        for m, _ in saved:
            m.set_processor(AttnProcessor())
        yield
    finally:
        for m, proc in saved:
            m.set_processor(proc)


def _math_sdpa():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _zero_padding_rows(model, params, pieces) -> List[torch.Tensor]:
    """Reverse mode defines the gradient of an Embedding's `padding_idx` row as zero, forward mode
    differentiates through it: zero the tangent there so both paths give the same `g_i`."""
    index = {id(p): k for k, p in enumerate(params)}
    pieces = list(pieces)
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and mod.padding_idx is not None:
            k = index.get(id(mod.weight))
            if k is not None:
                pieces[k] = pieces[k].clone()
                pieces[k][mod.padding_idx] = 0
    return pieces


def _run_jvp(model, loss_fn, batch, names, params, pieces):
    pieces = _zero_padding_rows(model, params, pieces)
    wrapper = _LossCall(model, loss_fn)
    primals = {"model." + n: p.detach() for n, p in zip(names, params)}
    tangents = {"model." + n: d.detach().to(p.dtype) for n, p, d in zip(names, params, pieces)}

    buffers = {"model." + n: b for n, b in model.named_buffers()}

    def f(pr):
        # Buffers are cloned inside the transform: a train-mode BatchNorm may update its running
        # stats in place, which forward AD forbids on captured tensors (the real buffers stay as they are).
        return functional_call(wrapper, {**pr, **{k: b.clone() for k, b in buffers.items()}}, (batch,))

    with torch.no_grad(), _groupnorm_contiguous(model), _math_sdpa():
        _, tangent_out = jvp(f, (primals,), (tangents,))
    return tangent_out


def jvp_grad_dot(model: torch.nn.Module, loss_fn, batch, names: Sequence[str], params: Sequence[torch.Tensor],
                 pieces: Sequence[torch.Tensor], acc_dtype: torch.dtype) -> torch.Tensor:
    """[B]: `direction . g_i` by forward-mode AD; `pieces[k]` is the direction for `params[k]` (named
    `names[k]` in `model.named_parameters()`). The caller restores training flags and buffers."""
    batch = usable_batch(batch)
    try:
        out = _run_jvp(model, loss_fn, batch, names, params, pieces)
    except NotImplementedError:
        # An attention op without a forward-AD rule even under the math SDPA backend: retry with
        # diffusers' eager attention processor where the model has one; anything else re-raises.
        if not _attention_modules(model):
            raise
        with _eager_attention(model):
            out = _run_jvp(model, loss_fn, batch, names, params, pieces)
    except RuntimeError as e:
        if "nference tensor" in str(e):  # functorch cannot wrap tensors a loss_fn made under inference_mode
            raise ValueError("loss_fn: expected per-sample losses [B] that depend on the model's trainable "
                             "parameters, got a computation under torch.inference_mode()") from e
        raise
    return out.detach().to(acc_dtype)


__all__: List[str] = ["jvp_grad_dot"]
