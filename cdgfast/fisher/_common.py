"""Shared pieces of cdgfast.fisher: argument checks, the flat parameter layout, the per-sample loss
call and its checks, the autograd context of a public call, the model-state guard and the universal
per-sample-autograd fallback."""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from typing import Iterator, List, Sequence, Tuple

import torch

from cdgfast._dispatch import transform_active
from cdgfast.params import split_like

# Per-sample gradients of at most this many elements exist at once in the autograd fallback.
_FALLBACK_MAX_ELEMENTS = 1 << 24


def result_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    """Accumulation dtype: the widest parameter dtype, at least float32 (fp16/bf16 models accumulate in fp32)."""
    dt = torch.float32
    for p in params:
        if p.is_floating_point():
            dt = torch.promote_types(dt, p.dtype)
    return dt


def param_device(params: Sequence[torch.Tensor]) -> torch.device:
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"model: expected all trainable parameters on one device, got {sorted(map(str, devices))}")
    return params[0].device


def check_loss_fn(loss_fn) -> None:
    if not callable(loss_fn):
        raise ValueError(f"loss_fn: expected a callable loss_fn(model, batch) -> per-sample losses [B], "
                         f"got {type(loss_fn).__name__}")


def _leading_tensor(batch):
    """The tensor whose first dimension counts the samples: batch["x"], batch[0] or the batch itself."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        v = batch.get("x")
        return v if isinstance(v, torch.Tensor) else None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    return None


def check_batch(batch) -> None:
    if batch is None:
        raise ValueError("batch: expected a batch (e.g. a dict with 'x', 't', 'eps', 'y'), got None")
    lead = _leading_tensor(batch)
    if lead is not None and (lead.dim() == 0 or lead.shape[0] == 0):
        raise ValueError(f"batch: expected at least one sample, got a batch whose samples tensor has shape "
                         f"{tuple(lead.shape)}")


def call_loss(loss_fn, model, batch) -> torch.Tensor:
    """Per-sample losses [B] from `loss_fn(model, batch)`, validated."""
    losses = loss_fn(model, batch)
    if not isinstance(losses, torch.Tensor):
        raise ValueError(f"loss_fn: expected it to return a tensor of per-sample losses [B], got {type(losses).__name__}")
    if losses.dim() != 1:
        raise ValueError(f"loss_fn: expected per-sample losses of shape [B] (one loss per sample, not reduced), "
                         f"got shape {tuple(losses.shape)}")
    if not losses.is_floating_point():
        raise ValueError(f"loss_fn: expected floating per-sample losses, got dtype {losses.dtype}")
    if losses.shape[0] == 0:
        raise ValueError("batch: expected at least one sample, loss_fn returned no losses")
    lead = _leading_tensor(batch)
    if lead is not None and lead.dim() >= 1 and lead.shape[0] != losses.shape[0]:
        raise ValueError(f"loss_fn: returned {losses.shape[0]} losses but the batch holds {lead.shape[0]} samples; "
                         f"expected one loss per sample")
    return losses


def _no_graph_error(detail: str) -> ValueError:
    return ValueError(f"loss_fn: expected per-sample losses [B] that depend on the model's trainable parameters "
                      f"through autograd, got {detail} (computed under torch.no_grad() or torch.inference_mode(), "
                      f"detached, or from other parameters?)")


def check_loss_graph(losses: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
    """The losses of a reverse-mode path must reach at least one trainable parameter through their
    graph, and live on the parameters' device; without that every gradient would silently be zero."""
    if losses.is_inference():
        raise _no_graph_error("an inference tensor")
    if not losses.requires_grad or losses.grad_fn is None:
        raise _no_graph_error("a tensor without an autograd graph")
    dev = params[0].device
    if losses.device != dev:
        raise ValueError(f"loss_fn: expected the losses on the model's device {dev}, got {losses.device}")
    if not _reaches(losses.grad_fn, params):
        raise _no_graph_error("losses whose graph reaches none of them")


def _reaches(root, params: Sequence[torch.Tensor]) -> bool:
    """Depth-first search of the autograd graph for an AccumulateGrad node of one of `params`."""
    targets = {id(p) for p in params}
    seen = set()
    keep = []  # holding the node wrappers keeps their ids unique during the walk
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        keep.append(node)
        var = getattr(node, "variable", None)
        if var is not None and id(var) in targets:
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


def check_jvp_tangent(losses: torch.Tensor) -> None:
    """Inside torch.func.jvp: losses without a tangent do not depend on the parameters (forward mode)."""
    from torch.autograd import forward_ad

    if forward_ad.unpack_dual(losses).tangent is None:
        raise _no_graph_error("losses without a forward-mode tangent")


def usable_batch(batch):
    """The batch with tensors made under torch.inference_mode() cloned into normal tensors (same values):
    autograd cannot save inference tensors. Other batches are returned as they are."""
    found: list = []
    tensors_in(batch, found)
    if not any(t.is_inference() for t in found):
        return batch
    return _clone_inference(batch)


def tensors_in(obj, out: list, depth: int = 0) -> None:
    """Every tensor in `obj` (nested lists, tuples and mappings, a few levels deep)."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for o in obj:
            tensors_in(o, out, depth + 1)
    elif depth < 4 and isinstance(obj, Mapping):
        for o in obj.values():
            tensors_in(o, out, depth + 1)


def _clone_inference(obj, depth: int = 0):
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.is_inference() else obj
    if depth < 4 and isinstance(obj, Mapping):
        return {k: _clone_inference(v, depth + 1) for k, v in obj.items()}
    if depth < 4 and isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_clone_inference(v, depth + 1) for v in obj))
    if depth < 4 and isinstance(obj, (list, tuple)):
        return type(obj)(_clone_inference(v, depth + 1) for v in obj)
    return obj


def autograd_call(name: str):
    """Decorator for the public functions: they differentiate the model, so they refuse to run inside a
    torch.func transform or a forward-AD level (where torch.autograd.grad would see wrapped tensors) and
    run with autograd on, also when called under torch.no_grad() or torch.inference_mode() (their
    results are detached; no graph escapes)."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if transform_active():
                raise ValueError(f"{name}: expected to be called outside torch.func transforms (vmap, grad, jvp, "
                                 f"...) and forward-AD dual levels; it differentiates the model itself")
            with torch.inference_mode(False), torch.enable_grad():
                return fn(*args, **kwargs)
        return wrapper
    return deco


def direction_pieces(direction, params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """`direction` (flat [P] or a list shaped like the trainable parameters) -> per-parameter views."""
    P = sum(p.numel() for p in params)
    if isinstance(direction, torch.Tensor):
        if direction.dim() != 1 or direction.numel() != P:
            raise ValueError(f"direction: expected a flat tensor of P={P} elements (the model's trainable "
                             f"parameters), got shape {tuple(direction.shape)}")
        pieces = split_like(direction, params)
    elif isinstance(direction, (list, tuple)):
        if len(direction) != len(params):
            raise ValueError(f"direction: expected a flat tensor of P={P} elements or a list of {len(params)} "
                             f"tensors shaped like the trainable parameters, got a list of {len(direction)}")
        pieces = list(direction)
        for i, (d, p) in enumerate(zip(pieces, params)):
            if not isinstance(d, torch.Tensor) or tuple(d.shape) != tuple(p.shape):
                got = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
                raise ValueError(f"direction[{i}]: expected a tensor of shape {tuple(p.shape)} (P={P} in all), got {got}")
    else:
        raise ValueError(f"direction: expected a flat tensor of P={P} elements or a list of tensors, "
                         f"got {type(direction).__name__}")
    for d, p in zip(pieces, params):
        if not d.is_floating_point():
            raise ValueError(f"direction: expected a floating dtype, got {d.dtype}")
        if d.device != p.device:
            raise ValueError(f"direction: expected it on the parameters' device {p.device}, got {d.device}")
    return pieces


@contextlib.contextmanager
def preserved_state(model: torch.nn.Module) -> Iterator[None]:
    """Restore what a Fisher computation could change: training flags, requires_grad, `.grad`
    references and buffer values (a train-mode BatchNorm would otherwise update its running stats)."""
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [(p, p.requires_grad, p.grad) for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        for m, t in modes:
            m.training = t
        for p, rg, g in flags:
            if p.requires_grad != rg:
                p.requires_grad_(rg)
            if p.grad is not g:
                p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape:
                    b.copy_(saved)


def _dense(g: torch.Tensor) -> torch.Tensor:
    return g.to_dense() if g.is_sparse else g


def per_sample_grads_autograd(losses: torch.Tensor, params: Sequence[torch.Tensor],
                              max_elements: int = _FALLBACK_MAX_ELEMENTS) -> Iterator[Tuple[int, List[torch.Tensor]]]:
    """Yield (start, grads) with grads[k] = [c, *params[k].shape]: rows of the per-sample Jacobian
    d l_i / d params for samples start..start+c-1, taken from the batched graph of `losses`
    (the graph must be retained by the caller's forward; it is kept until the last chunk).

    Chunks of one-hot cotangents go through one vmapped backward (`is_grads_batched`); where an op has
    no batching rule, one backward per sample. Exact for any model, including ones that couple samples
    (train-mode BatchNorm): g_i is the gradient of l_i as computed in the batched forward."""
    B = losses.shape[0]
    P = max(1, sum(p.numel() for p in params))
    step = max(1, min(B, max_elements // P))
    eye = None
    batched_ok = True
    for start in range(0, B, step):
        c = min(step, B - start)
        last = start + c >= B
        grads = None
        if batched_ok and c > 1:
            if eye is None:
                eye = torch.eye(B, dtype=losses.dtype, device=losses.device)
            try:
                grads = torch.autograd.grad(losses, list(params), grad_outputs=eye[start:start + c],
                                            is_grads_batched=True, retain_graph=True, allow_unused=True)
            except (RuntimeError, NotImplementedError):
                batched_ok = False
                grads = None
        if grads is None:
            rows = []
            for i in range(start, start + c):
                rows.append(torch.autograd.grad(losses[i], list(params), retain_graph=True, allow_unused=True))
            grads = [None if rows[0][k] is None else torch.stack([_dense(r[k]) for r in rows])
                     for k in range(len(params))]
        out = []
        for p, g in zip(params, grads):
            out.append(torch.zeros((c, *p.shape), dtype=p.dtype, device=p.device) if g is None else _dense(g))
        yield start, out
        del grads, out
        if last:
            break
