"""LoRA on a diffusers UNet through peft, and the tensors the LoRA-based methods need.

Orientation (used everywhere in cdgfast, including SPEC's C-LoRA penalty
`lora_overlap_penalty(prev_delta[d1, d2], A[d1, r], B[r, d2])`):
    d1 = in_features, d2 = out_features of the adapted nn.Linear, and
    delta = A @ B  [d1, d2]  is the change of the layer's weight *transposed*, i.e. for row-vector inputs
    x [n, d1] the adapted layer computes base(x) + x @ delta.
In peft's terms A = lora_A.weight.T [d1, r] and B = scaling * lora_B.weight.T [r, d2] with
scaling = alpha / rank, so delta = scaling * (lora_B.weight @ lora_A.weight).T. With the default
alpha = rank (scaling 1) A and B are views of the trainable parameters; otherwise B is a differentiable
product with them. Conv2d targets use the unfolded orientation: d1 = in_channels * kh * kw.

Helpers for the LoRA methods:
    lora_seq   : train a LoRA per task, then merge_lora (fold it into the base weights, fresh LoRA).
    lora_merge : keep each task's lora_delta; the merged model is base + sum_k w_k delta_k with equal
                 weights (merge_deltas + add_deltas_to_base), LoRAs trained from the same base.
    clora      : previous deltas from lora_delta, current (A, B) from lora_layers.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._validation import check_real, check_same_device

# Every attention projection. On a UNet2DConditionModel the plain names match both the self-attention
# (attn1) and the cross-attention (attn2) of every transformer block.
DEFAULT_TARGETS: Tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
# The cross-attention K/V only (Custom Diffusion's and C-LoRA's layers, SPEC 2.3): the text projections
# W^K, W^V of attn2. A plain ("to_k", "to_v") would also adapt attn1's K/V of the image features.
CROSS_ATTENTION_KV: Tuple[str, ...] = ("attn2.to_k", "attn2.to_v")


def _lora_modules(unet: nn.Module, adapter_name: str) -> Dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    mods = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A}
    if not mods:
        raise ValueError(f"adapter_name: the model has no LoRA adapter {adapter_name!r} (call add_lora first)")
    return mods


def add_lora(unet: nn.Module, rank: int = 16, alpha: Optional[float] = None,
             target_modules: Sequence[str] = DEFAULT_TARGETS, adapter_name: str = "default",
             dropout: float = 0.0, seed: Optional[int] = None) -> nn.Module:
    """Inject LoRA (rank `rank`, scaling alpha / rank, alpha defaults to rank) into every module whose
    qualified name ends with one of `target_modules` (a suffix of whole name components: "to_k" matches
    "...attn1.to_k" and "...attn2.to_k", "attn2.to_k" only the latter; CROSS_ATTENTION_KV adapts only the
    cross-attention K/V of a UNet2DConditionModel). Base weights are frozen; only the LoRA matrices train. A is initialised like
    peft (Kaiming uniform), B = 0, so the model's output is unchanged. `seed` makes A reproducible.
    Returns the same (modified) module."""
    from peft import LoraConfig, inject_adapter_in_model

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank: expected a positive integer, got {rank!r}")
    if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ValueError(f"alpha: expected a positive number or None, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    from peft.tuners.lora import LoraLayer

    # peft re-initialises an existing adapter of that name: a second call would silently discard it
    if any(isinstance(m, LoraLayer) and adapter_name in m.lora_A for m in unet.modules()):
        raise ValueError(f"adapter_name: the model already has a LoRA adapter {adapter_name!r}; use "
                         f"reset_lora to re-initialise it, or another adapter_name")
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not targets:
        raise ValueError("target_modules: expected at least one module name")
    names = [n for n, _ in unet.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"target_modules: no module of the model is named {missing} "
                         f"(expected suffixes such as {list(DEFAULT_TARGETS)})")
    cfg = LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha), target_modules=targets,
                     lora_dropout=dropout, init_lora_weights=True)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        inject_adapter_in_model(cfg, unet, adapter_name=adapter_name)
    return unet


def _factors(m: nn.Module, adapter_name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    a = m.lora_A[adapter_name].weight  # Linear [r, d1]; Conv2d [r, c_in, kh, kw]
    b = m.lora_B[adapter_name].weight  # Linear [d2, r]; Conv2d [d2, r, 1, 1]
    s = m.scaling[adapter_name]
    A = a.reshape(a.shape[0], -1).t()
    Bt = b.reshape(b.shape[0], -1).t()
    return A, (Bt if s == 1 else Bt * s)


def lora_layers(unet: nn.Module, adapter_name: str = "default") -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """name -> (A [d1, r], B [r, d2]) with A @ B = delta [d1, d2] (module docstring orientation).
    Differentiable in the LoRA parameters (views when scaling is 1)."""
    return {n: _factors(m, adapter_name) for n, m in _lora_modules(unet, adapter_name).items()}


def lora_delta(unet: nn.Module, adapter_name: str = "default") -> Dict[str, torch.Tensor]:
    """name -> delta = A @ B [d1, d2], detached (a snapshot, e.g. C-LoRA's previous deltas)."""
    with torch.no_grad():
        return {n: (A @ B).detach().clone() for n, (A, B) in lora_layers(unet, adapter_name).items()}


def lora_parameters(unet: nn.Module, adapter_name: str = "default") -> List[nn.Parameter]:
    """The LoRA matrices of one adapter (lora_A then lora_B per layer, in module order)."""
    out = []
    for m in _lora_modules(unet, adapter_name).values():
        out += [m.lora_A[adapter_name].weight, m.lora_B[adapter_name].weight]
    return out


def _base_weight(m: nn.Module) -> torch.Tensor:
    return m.get_base_layer().weight


def add_deltas_to_base(unet: nn.Module, deltas: Dict[str, torch.Tensor], scale: float = 1.0,
                       adapter_name: str = "default") -> None:
    """base weight += scale * delta (delta in the [d1, d2] orientation; transposed/reshaped back).
    A square layer (d1 = d2) cannot tell the orientation from the shape: pass lora_delta's."""
    scale = check_real("scale", scale)
    mods = _lora_modules(unet, adapter_name)
    unknown = sorted(set(deltas) - set(mods))
    if unknown:
        raise ValueError(f"deltas: no LoRA layer named {unknown[:3]}{'...' if len(unknown) > 3 else ''}")
    with torch.no_grad():
        for n, d in deltas.items():
            if not isinstance(d, torch.Tensor):
                raise ValueError(f"deltas[{n!r}]: expected a tensor, got {type(d).__name__}")
            w = _base_weight(mods[n])
            flat = w.reshape(w.shape[0], -1)
            if tuple(d.shape) != (flat.shape[1], flat.shape[0]):
                raise ValueError(f"deltas[{n!r}]: expected shape {(flat.shape[1], flat.shape[0])}, got {tuple(d.shape)}")
            w.add_((scale * d.t()).reshape(w.shape).to(device=w.device, dtype=w.dtype))


def reset_lora(unet: nn.Module, adapter_name: str = "default", seed: Optional[int] = None) -> None:
    """Re-initialise the adapter as add_lora does (A Kaiming uniform, B = 0): its delta becomes 0."""
    mods = _lora_modules(unet, adapter_name)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng, torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        for m in mods.values():
            m.reset_lora_parameters(adapter_name, True)


def merge_lora(unet: nn.Module, adapter_name: str = "default", seed: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Fold the adapter into the base weights (output unchanged) and reset it for the next task
    (sequential LoRA). Returns the merged deltas [d1, d2]."""
    deltas = lora_delta(unet, adapter_name)
    add_deltas_to_base(unet, deltas, 1.0, adapter_name)
    reset_lora(unet, adapter_name, seed=seed)
    return deltas


def merge_deltas(deltas: Sequence[Dict[str, torch.Tensor]], weights: Optional[Sequence[float]] = None
                 ) -> Dict[str, torch.Tensor]:
    """Weighted sum of per-task delta dicts; weights default to equal, 1 / len(deltas)."""
    if not deltas:
        raise ValueError("deltas: expected at least one delta dict")
    if weights is None:
        weights = [1.0 / len(deltas)] * len(deltas)
    if len(weights) != len(deltas):
        raise ValueError(f"weights: expected {len(deltas)} weights, got {len(weights)}")
    weights = [check_real(f"weights[{i}]", w) for i, w in enumerate(weights)]
    keys = set(deltas[0])
    if any(set(d) != keys for d in deltas):
        raise ValueError("deltas: every dict must have the same layer names")
    for k in deltas[0]:
        ref = deltas[0][k]
        for i, d in enumerate(deltas):
            # deltas of different shapes would broadcast into a delta of the wrong layer's shape
            if not isinstance(d[k], torch.Tensor) or d[k].shape != getattr(ref, "shape", None):
                got = tuple(d[k].shape) if isinstance(d[k], torch.Tensor) else type(d[k]).__name__
                raise ValueError(f"deltas[{i}][{k!r}]: expected a tensor of shape "
                                 f"{tuple(getattr(ref, 'shape', ()))} like deltas[0], got {got}")
        check_same_device(**{f"deltas[{i}]": d[k] for i, d in enumerate(deltas)})
    return {k: sum(w * d[k] for w, d in zip(weights, deltas)) for k in deltas[0]}


def lora_state(unet: nn.Module, adapter_name: str = "default") -> Dict[str, torch.Tensor]:
    """Detached copies of the adapter's peft matrices: '<layer>.lora_A' [r, ...], '<layer>.lora_B'."""
    out = {}
    for n, m in _lora_modules(unet, adapter_name).items():
        out[f"{n}.lora_A"] = m.lora_A[adapter_name].weight.detach().clone()
        out[f"{n}.lora_B"] = m.lora_B[adapter_name].weight.detach().clone()
    return out


def load_lora_state(unet: nn.Module, state: Dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Copy a lora_state() dict back into the adapter (same layers and shapes required)."""
    mods = _lora_modules(unet, adapter_name)
    expected = {f"{n}.lora_{ab}" for n in mods for ab in "AB"}
    if set(state) != expected:
        diff = sorted(set(state) ^ expected)
        raise ValueError(f"state: keys do not match the adapter's layers (differing: {diff[:4]})")
    with torch.no_grad():
        for n, m in mods.items():
            for ab, mod in (("A", m.lora_A[adapter_name]), ("B", m.lora_B[adapter_name])):
                src = state[f"{n}.lora_{ab}"]
                if src.shape != mod.weight.shape:
                    raise ValueError(f"state[{n}.lora_{ab}]: expected shape {tuple(mod.weight.shape)}, "
                                     f"got {tuple(src.shape)}")
                mod.weight.copy_(src)
