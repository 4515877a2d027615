"""The Gram matrix K = G G^T [n, n] of per-sample gradients, never forming G [n, P] whole (rank-1 paper,
section 3.2 and appendix D): the one implementation behind `cdgfast.analysis.fisher_geometry` (the
Fisher-geometry measurements) and the exact top-k Fisher of `cdgfast.fisher.lowrank_fisher_gram`.

For one group of at most `chunk_params` entries of the flat parameter vector, the per-sample gradients
G_grp [n, P_grp] are computed micro-batch by micro-batch (torch.func.vmap of torch.func.grad over a
functional call of `loss_fn` with only that group's tensors as differentiable arguments) into one
[n, P_grp] buffer, then K += G_grp G_grp^T (float64), d_grp = column sums of G_grp^2 and mu_grp = column
means of G_grp. Because the flat-vector coordinates split into disjoint groups, g_i . g_j = sum over
groups of g_i,grp . g_j,grp, so K is exact. Memory: O(n^2 + P + n * chunk_params + micro_batch * largest
tensor); no [P, P] and no [n, P] tensor exists (unless chunk_params >= P). The price is one
forward/backward over the n samples per group.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from cdgfast.params import trainable_parameters

# Default bound on the per-group buffer [n, chunk_params] (elements): 2**27 floats = 512 MiB in float32.
DEFAULT_MAX_BUFFER_ELEMENTS = 2 ** 27
# Column width used when casting a group's gradients to float64 for the Gram update.
_CAST_COLUMNS = 4096


class PerSampleGram(NamedTuple):
    """What `per_sample_gram` accumulates (float64): g_i = gradient of loss_fn on sample i alone."""

    gram: torch.Tensor                  # K [n, n], K_ij = g_i . g_j
    diag_sum: torch.Tensor              # d = sum_i g_i * g_i [P]
    mean_grad: Optional[torch.Tensor]   # mu = (1/n) sum_i g_i [P], None unless return_mean_grad
    num_samples: int
    num_params: int


def param_groups(numels: List[int], chunk_params: int) -> List[List[Tuple[int, int, int]]]:
    """Split the flat parameter vector (tensors of sizes `numels`, in order) into consecutive windows of
    at most `chunk_params` entries. A window is a list of pieces (tensor index, start, stop) in that
    tensor's own flat coordinates; a large tensor can span several windows."""
    groups: List[List[Tuple[int, int, int]]] = []
    current: List[Tuple[int, int, int]] = []
    room = chunk_params
    for idx, numel in enumerate(numels):
        start = 0
        while start < numel:
            take = min(room, numel - start)
            current.append((idx, start, start + take))
            start += take
            room -= take
            if room == 0:
                groups.append(current)
                current, room = [], chunk_params
    if current:
        groups.append(current)
    return groups


class _LossModule(torch.nn.Module):
    """Holds the model as a submodule so that torch.func.functional_call can swap its parameters while
    `loss_fn(model, batch)` runs unchanged."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch):
        return self._loss_fn(self.model, batch)


def _split_batch(batch) -> Tuple[Dict[str, torch.Tensor], Dict[str, object], int]:
    if not isinstance(batch, dict) or not batch:
        raise ValueError(f"batch: expected a non-empty dict of tensors, got {type(batch).__name__}")
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() >= 1}
    if not tensors:
        raise ValueError("batch: expected at least one tensor with a leading batch dimension")
    sizes = {k: v.shape[0] for k, v in tensors.items()}
    n = next(iter(sizes.values()))
    if any(s != n for s in sizes.values()):
        raise ValueError(f"batch: expected every tensor to share the leading dimension n, got {sizes}")
    constants = {k: v for k, v in batch.items() if k not in tensors}
    return tensors, constants, n


def _attention_math_backend():
    """vmap has a batching rule for the math SDPA path but not for the fused CPU/CUDA kernels."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([SDPBackend.MATH])
    except Exception:  # pragma: no cover - older torch
        import contextlib
        return contextlib.nullcontext()


def per_sample_gram(model: torch.nn.Module, loss_fn: Callable, batch: Dict[str, torch.Tensor], *,
                    chunk_params: Optional[int] = None, micro_batch: int = 64, return_mean_grad: bool = True,
                    progress: bool = False, desc: str = "per-sample Gram") -> PerSampleGram:
    """K = G G^T, d = sum_i g_i * g_i and mu = mean_i g_i of the per-sample gradients of `model` on `batch`.

    model: module whose trainable parameters (requires_grad, in `model.parameters()` order) define g_i.
    loss_fn(model, batch) -> per-sample losses [B]; it is called on one-sample batches under
        torch.func.vmap, so it must treat samples independently.
    batch: dict whose tensors share the leading dimension n >= 2 (non-tensor values are passed as is).
    chunk_params: most flat-parameter entries per group; None -> min(P, 2**27 // n), so the group
        buffer [n, chunk_params] stays under 2**27 elements.
    micro_batch: samples per vmapped forward/backward.
    The model is put in eval mode during the measurement (per-sample gradients need sample-independent
    layers) and restored. Raises ValueError naming the argument for a bad batch, model or size.
    """
    tensors, constants, n = _split_batch(batch)
    if n < 2:
        raise ValueError(f"batch: expected at least 2 samples (n >= 2), got n = {n}")
    params = trainable_parameters(model)
    if not params:
        raise ValueError("model: expected at least one trainable parameter, got none")
    P = sum(p.numel() for p in params)
    if chunk_params is None:
        chunk_params = max(1, min(P, DEFAULT_MAX_BUFFER_ELEMENTS // n))
    if not isinstance(chunk_params, int) or isinstance(chunk_params, bool) or chunk_params < 1:
        raise ValueError(f"chunk_params: expected a positive integer, got {chunk_params!r}")
    if not isinstance(micro_batch, int) or isinstance(micro_batch, bool) or micro_batch < 1:
        raise ValueError(f"micro_batch: expected a positive integer, got {micro_batch!r}")

    from torch.func import functional_call, grad, vmap
    from tqdm.auto import tqdm

    device = params[0].device
    wrapper = _LossModule(model, loss_fn)
    # Names under the wrapper of the trainable parameters, matched by identity (shared weights once).
    by_id = {id(p): name for name, p in wrapper.named_parameters()}
    names = [by_id[id(p)] for p in params]
    numels = [p.numel() for p in params]
    offsets = [0]
    for k in numels:
        offsets.append(offsets[-1] + k)

    def per_sample_loss(diff_params, sample):
        one = {k: v.unsqueeze(0) for k, v in sample.items()}
        one.update(constants)
        out = functional_call(wrapper, diff_params, (one,))
        return out.reshape(())

    per_sample_grad = vmap(grad(per_sample_loss), in_dims=(None, 0))

    groups = param_groups(numels, chunk_params)
    K = torch.zeros(n, n, dtype=torch.float64, device=device)
    d = torch.zeros(P, dtype=torch.float64, device=device)
    mu = torch.zeros(P, dtype=torch.float64, device=device) if return_mean_grad else None
    starts = list(range(0, n, micro_batch))

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            check = loss_fn(model, {**{k: v[:1] for k, v in tensors.items()}, **constants})
        if not isinstance(check, torch.Tensor) or check.numel() != 1:
            raise ValueError("loss_fn: expected per-sample losses of shape [B] (got shape "
                             f"{tuple(check.shape) if isinstance(check, torch.Tensor) else type(check).__name__}"
                             " for a one-sample batch)")
        bar = tqdm(total=len(groups) * len(starts), desc=desc, disable=not progress, leave=False)
        # Gradients w.r.t. the group's tensors only; the outer no_grad keeps the frozen rest off the tape
        # (torch.func.grad ignores an enclosing no_grad for its own arguments).
        with torch.no_grad(), _attention_math_backend(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            for group in groups:
                width = sum(stop - start for _, start, stop in group)
                idxs = sorted({i for i, _, _ in group})
                G = torch.empty(n, width, dtype=params[0].dtype, device=device)
                for a in starts:
                    b = min(a + micro_batch, n)
                    sub = {k: v[a:b] for k, v in tensors.items()}
                    diff = {names[i]: params[i].detach() for i in idxs}
                    grads = per_sample_grad(diff, sub)
                    col = 0
                    for i, start, stop in group:
                        piece = grads[names[i]].reshape(b - a, -1)[:, start:stop]
                        G[a:b, col:col + stop - start] = piece
                        col += stop - start
                    del grads
                    bar.update(1)
                # Flat-vector position of this group's columns, piece by piece.
                flat_cols = torch.cat([torch.arange(offsets[i] + start, offsets[i] + stop, device=device)
                                       for i, start, stop in group])
                for c in range(0, width, _CAST_COLUMNS):
                    Gc = G[:, c:c + _CAST_COLUMNS].to(torch.float64)
                    K.addmm_(Gc, Gc.T)                        # K += G_grp G_grp^T
                    cols = flat_cols[c:c + _CAST_COLUMNS]
                    d[cols] = Gc.pow(2).sum(0)                # d_grp = sum_i g_i,grp^2
                    if mu is not None:
                        mu[cols] = Gc.sum(0) / n              # mu_grp
                    del Gc
                del G
        bar.close()
    finally:
        model.train(was_training)

    return PerSampleGram(gram=K, diag_sum=d, mean_grad=mu, num_samples=n, num_params=P)


__all__ = ["PerSampleGram", "per_sample_gram", "param_groups", "DEFAULT_MAX_BUFFER_ELEMENTS"]
