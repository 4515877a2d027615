"""A model's trainable parameters and their flat vector, in one place (SPEC section 1: the flat parameter
vector is the concatenation of `p.flatten()` for `p in model.parameters() if p.requires_grad`, in order).

Listing: `trainable_parameters` (may be empty), `require_trainable` (at least one, real floating),
`trainable_named` (names and tensors), `as_param_list` (a module / flat tensor / sequence).
Flat vectors: `flatten` (differentiable), `flatten_detached`, `flat_grads` (.grad or given gradients, a
missing one counted as zero), `split_like` (views), `assign_grads_` and `load_flat_` (write back), and the
zero-copy flat buffers `FlatParameters` / `flatten_parameters_`.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

ParamsLike = Union[torch.Tensor, Sequence[torch.Tensor], torch.nn.Module]


def trainable_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The parameters with requires_grad, in model.parameters() order (possibly none)."""
    return [p for p in model.parameters() if p.requires_grad]


def trainable_named(model: torch.nn.Module) -> Tuple[List[str], List[torch.nn.Parameter]]:
    """Names and tensors of the trainable parameters in `model.parameters()` order (the SPEC flat order);
    at least one, all real floating (g * g of a complex gradient is not its squared magnitude)."""
    # a module, or a view that forwards to one (the driver's DataParallelView under torchrun)
    if not isinstance(model, torch.nn.Module) and not callable(getattr(model, "named_parameters", None)):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    names, params = [], []
    for n, p in model.named_parameters():  # same order and de-duplication as model.parameters()
        if p.requires_grad:
            names.append(n)
            params.append(p)
    if not params:
        raise ValueError("model: expected at least one trainable parameter (requires_grad=True), got none")
    for n, p in zip(names, params):
        if not p.is_floating_point():
            raise ValueError(f"model: expected real floating trainable parameters, got {n} of dtype {p.dtype}")
    return names, params


def require_trainable(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    """`trainable_named(model)`'s tensors: at least one, real floating, else a ValueError naming `model`."""
    return trainable_named(model)[1]


def as_param_list(params: ParamsLike, name: str = "params") -> List[torch.Tensor]:
    """A module, a flat tensor or a sequence of tensors -> a list of tensors."""
    if isinstance(params, torch.nn.Module):
        out = trainable_parameters(params)
    elif isinstance(params, torch.Tensor):
        out = [params]
    else:
        try:
            out = list(params)
        except TypeError:
            raise ValueError(f"{name}: expected a module, a flat tensor or a sequence of tensors, got {type(params).__name__}")
    if not out:
        raise ValueError(f"{name}: expected at least one trainable parameter, got none")
    for i, p in enumerate(out):
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"{name}[{i}]: expected a torch.Tensor, got {type(p).__name__}")
    return out


def num_params(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


def flatten(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate into one flat tensor (differentiable; one copy)."""
    params = list(params)
    if len(params) == 1:
        return params[0].reshape(-1)
    return torch.cat([p.reshape(-1) for p in params])


def flatten_detached(params: Sequence[torch.Tensor], dtype=None) -> torch.Tensor:
    with torch.no_grad():
        flat = flatten([p.detach() for p in params])
        return flat.to(dtype) if dtype is not None else flat.clone()


def flat_grads(params: Sequence[torch.Tensor], grads: Optional[Sequence[Optional[torch.Tensor]]] = None,
               ) -> torch.Tensor:
    """One flat vector of `grads` (default: each parameter's `.grad`), a missing gradient counted as zeros
    shaped like its parameter."""
    params = list(params)
    grads = [p.grad for p in params] if grads is None else list(grads)
    if len(grads) != len(params):
        raise ValueError(f"grads: expected one entry per parameter ({len(params)}), got {len(grads)}")
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def assign_grads_(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Write a flat gradient vector into the `.grad` of `params` (allocated where missing)."""
    for p, g in zip(params, split_like(flat, params)):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def load_flat_(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy a flat vector into `params` in place (no autograd; works on frozen copies too)."""
    params = list(params)
    with torch.no_grad():
        for p, v in zip(params, split_like(flat.to(params[0].device), params)):
            p.copy_(v)


def split_like(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Views of `flat` shaped like each parameter (no copy)."""
    expected = num_params(params)
    if flat.dim() != 1 or flat.numel() != expected:
        raise ValueError(f"flat: expected a 1-D tensor of {expected} elements to match the parameters, "
                         f"got shape {tuple(flat.shape)}")
    out, offset = [], 0
    for p in params:
        n = p.numel()
        out.append(flat[offset:offset + n].view_as(p))
        offset += n
    return out


# ----------------------------------------------------------------------------------------------------
# Flat parameter and gradient buffers (apex / mammoth style): SPEC section 4, "penalties and Fisher updates
# work on flat buffers". After `flatten_parameters_`, `model.parameters()` are views of one contiguous
# buffer in the SPEC order, so the flat vector theta is a zero-copy view (cdgfast.ops.penalties detects it),
# and so are the gradients: one op reads or updates all of them.

class FlatParameters:
    """The flat buffers behind a model's trainable parameters, made by `flatten_parameters_`.

    .params         the trainable parameters, in `model.parameters()` order (each a view of `.data`)
    .data           [P] the flat parameter buffer (theta in the SPEC order; writing it writes the parameters)
    .grad           [P] the flat gradient buffer; every gradient that exists (`p.grad` not None) is a view of
                    it, and the slice of a parameter whose gradient is None holds zeros or stale values
    .numel          P
    .grads()        the per-parameter gradient views, in order
    .zero_grad()    zeroes `.grad` in one op (a None `p.grad` stays None, as with zero_grad(set_to_none=False))
    .sync_grads()   re-points every `p.grad` to its view of `.grad`: a None gradient (after
                    `optimizer.zero_grad()`, whose default sets it to None) becomes zeros, a replaced one is
                    copied in. A hook does this for each parameter after each backward, so only parameters
                    that took no part in a backward since a set-to-None need it (e.g. before reading
                    `.grad` as a whole).
    .is_flat()      True while every parameter and every existing gradient is still its view (`model.to(...)`,
                    `p.data = ...`, `load_state_dict(..., assign=True)` break it; the flat paths then fall
                    back to per-parameter ones, which stay correct)
    .remove()       removes the gradient hooks (the parameters stay views of `.data`)
    """

    def __init__(self, params: List[torch.nn.Parameter], data: torch.Tensor, grad: torch.Tensor):
        self.params = params
        self.data = data
        self.grad = grad
        self.numel = data.numel()
        self._grad_views = split_like(grad, params)
        self._data_views = split_like(data, params)
        self._hooks = []

    def grads(self) -> List[torch.Tensor]:
        return list(self._grad_views)

    @torch.no_grad()
    def _repoint(self, p: torch.nn.Parameter, view: torch.Tensor) -> None:
        g = p.grad
        if g is None:
            view.zero_()
        elif g.data_ptr() == view.data_ptr() and g.shape == view.shape and g.stride() == view.stride():
            return
        elif g.requires_grad:  # a gradient kept in a graph (create_graph=True): leave it to the user
            return
        else:
            view.copy_(g)
        p.grad = view

    def sync_grads(self) -> None:
        for p, v in zip(self.params, self._grad_views):
            self._repoint(p, v)

    def zero_grad(self) -> None:
        with torch.no_grad():
            self.grad.zero_()
        for p, v in zip(self.params, self._grad_views):
            if p.grad is not None and p.grad.data_ptr() != v.data_ptr():
                p.grad = v

    def is_flat(self) -> bool:
        for p, d, g in zip(self.params, self._data_views, self._grad_views):
            if p.data_ptr() != d.data_ptr() or p.shape != d.shape or not p.is_contiguous():
                return False
            if p.grad is not None and (p.grad.data_ptr() != g.data_ptr() or p.grad.shape != g.shape):
                return False
        return True

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __repr__(self) -> str:
        return (f"FlatParameters(numel={self.numel}, tensors={len(self.params)}, dtype={self.data.dtype}, "
                f"device={self.data.device})")


def flatten_parameters_(model: Union[torch.nn.Module, Sequence[torch.nn.Parameter]]) -> FlatParameters:
    """In place: re-point every trainable parameter of `model` (a module, or a sequence of parameters) and
    its `.grad` to views of one contiguous flat parameter buffer and one flat gradient buffer, in
    `model.parameters()` order (the SPEC flat vector). Values and existing gradients are kept; a missing
    gradient stays None (optimizers skip such parameters, as before) until the first backward that reaches
    it. Returns the `FlatParameters` that owns the buffers.

    Afterwards the model trains as before (forward, backward, any optimizer, state_dict save and load):
    backward accumulates into the flat gradient buffer in place, and a post-accumulate-grad hook per
    parameter copies a gradient back into its view when it was replaced (after `zero_grad()` set it to None).
    `cdgfast.ops.penalties` reads theta, and `cdgfast.fisher.FisherAccumulator` reads the gradients, as one
    flat view (no copy). Buffers (e.g. BatchNorm statistics) and frozen parameters are left alone.

    Raises ValueError naming `model` when it has no trainable parameters or they differ in dtype or device.
    """
    params = as_param_list(model, "model")
    seen, unique = set(), []
    for p in params:  # a shared (tied) parameter is one parameter
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    params = unique
    for i, p in enumerate(params):
        if not isinstance(p, torch.nn.Parameter):
            raise ValueError(f"model[{i}]: expected a torch.nn.Parameter (its .data is re-pointed), "
                             f"got {type(p).__name__}")
        if not p.is_floating_point():
            raise ValueError(f"model[{i}]: expected a floating dtype, got {p.dtype}")
        if p.dtype != params[0].dtype or p.device != params[0].device:
            raise ValueError(f"model: expected trainable parameters of one dtype and device, got "
                             f"{params[0].dtype} on {params[0].device} and {p.dtype} on {p.device}")
    P = num_params(params)
    p0 = params[0]
    data = torch.empty(P, dtype=p0.dtype, device=p0.device)
    grad = torch.zeros(P, dtype=p0.dtype, device=p0.device)
    with torch.no_grad():
        off = 0
        for p in params:
            n = p.numel()
            data[off:off + n].copy_(p.detach().reshape(-1))
            if p.grad is not None:
                grad[off:off + n].copy_(p.grad.detach().reshape(-1))
            off += n
    flat = FlatParameters(params, data, grad)
    for p, d, g in zip(params, flat._data_views, flat._grad_views):
        had_grad = p.grad is not None
        p.data = d  # the Parameter object stays (optimizers, hooks, state_dict keys); its storage moves
        p.grad = g if had_grad else None
        flat._hooks.append(p.register_post_accumulate_grad_hook(
            lambda param, view=g, flat=flat: flat._repoint(param, view)))
    return flat
