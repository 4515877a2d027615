"""Flat views of a model's trainable parameters (SPEC section 1: the flat parameter vector is the
concatenation of `p.flatten()` for `p in model.parameters() if p.requires_grad`, in order)."""
from __future__ import annotations

from typing import Iterable, List, Sequence, Union

import torch

ParamsLike = Union[torch.Tensor, Sequence[torch.Tensor], torch.nn.Module]


def trainable_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


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
