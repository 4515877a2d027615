"""Noise predictions for K conditions of every sample in one batched forward (SPEC 2.2, issue 12).

    dc_predictions(model, x_t[B, *S], timesteps[B], conditions, index=None) -> eps_pred[B, K, *S]

The K conditions of a sample share its (x_t, t) (the paired Monte-Carlo trial of a diffusion classifier),
so ``eps_pred[b, k] = model(x_t[b], t[b], condition k of sample b)``: the input of ``dc_errors`` /
``dc_scores`` / ``dc_cross_entropy`` (``cdgfast.ops.dc``). Conditions are either

* class labels ``[B, K]`` (integer) for a class-conditional diffusers ``UNet2DModel``
  (``num_class_embeds`` set; the project's models, ``cdgfast.models.unet``) or any module called
  ``model(x, t, class_labels=y)``; or
* text: encoder hidden states ``[M, L, D]`` of M unique prompts and ``index [B, K]`` (``torch.long``,
  values in ``[0, M)``) choosing each sample's K prompts, for a diffusers ``UNet2DConditionModel``.

The forward runs over B*K rows, sample-major (rows ``b*K .. b*K+K-1`` are sample b's), and the output is
the model's raw prediction (eps, v or x0: convert with ``NoiseSchedule.eps_from_prediction``).

**What is computed once and not K times.** Rows of one sample are identical until the condition
first enters the network; every module that runs before that point is run on the B distinct rows and
its output repeated K times (``repeat_interleave``, whose backward sums the K copies' gradients, so
gradients to x_t and to the parameters are those of K separate forwards). Hooks are registered for the
call only and removed afterwards (also after an exception).

* ``UNet2DModel`` (class labels): ``time_embedding`` (the timestep MLP; the parameter-free sinusoids
  of ``time_proj`` run per row, since a ``class_embed_type="timestep"`` model also calls it on labels) and
  ``conv_in``. The class embedding is added to the time embedding before the first ResNet block, so
  every block after ``conv_in`` depends on the label: nothing later can be shared.
* ``UNet2DConditionModel`` (text): the time embedding and ``conv_in`` as above (the text enters only
  through cross-attention, so the ResNets' time embedding is condition-independent), then every
  down block without cross-attention as a whole, and in the first cross-attention block: its first
  ResNet, its transformer's ``norm`` and ``proj_in``, and the first transformer block's ``norm1`` and
  self-attention ``attn1`` (the point where the first ``attn2`` takes the prompt). On an SD v1.x UNet
  that is the 64x64 ResNet and self-attention of the first block (about 5% of the UNet's FLOPs).
  Every cross-attention module (``attn.is_cross_attention``) gets, for the call only, a processor
  (``SharedPromptKV``) that computes ``to_k`` / ``to_v`` (and ``norm_cross``) on the M unique prompts
  once and gathers them per row with ``index``: M projections instead of B*K per cross-attention.
  Without ``encoder_attention_mask``, models with a class or addition embedding (they would make the
  time embedding depend on the condition) are refused.
* Any other class-conditional module: one forward of B*K rows (x_t repeated), nothing else shared.

Everything else runs on B*K rows. Works under ``torch.no_grad`` / ``torch.inference_mode`` and with
gradients (to x_t, the model's parameters, LoRA layers, and the encoder hidden states).

Validation (a ``ValueError`` naming the argument): x_t a floating tensor of the model's dtype with the
model's input channels; timesteps ``[B]``; class labels ``[B, K]`` integer and (eager mode, one sync)
inside the embedding table; text ``[M, L, D]`` of the model's dtype with D the cross-attention width,
``index`` ``[B, K]`` ``torch.long`` inside ``[0, M)``; every tensor on the model's device; labels only
for a model with a class embedding, text only for a ``UNet2DConditionModel``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdgfast._validation import check_same_device, check_shape, check_tensor

__all__ = ["dc_predictions", "SharedPromptKV", "shared_prefix_modules"]

_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


# --- what is shared -------------------------------------------------------------------------------

def _kind(model: nn.Module) -> str:
    from diffusers import UNet2DConditionModel, UNet2DModel

    if isinstance(model, UNet2DConditionModel):
        return "text"
    if isinstance(model, UNet2DModel):
        return "class"
    return "other"


def _unwrap(model: nn.Module) -> nn.Module:
    # a peft PeftModel wraps the diffusers model; the adapted layers live inside the base model
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def shared_prefix_modules(model: nn.Module) -> List[nn.Module]:
    """The modules `dc_predictions` runs once per sample instead of once per condition, in call order
    (module docstring); [] for a module that is neither diffusers UNet."""
    model = _unwrap(model)
    kind = _kind(model)
    if kind == "other":
        return []
    # time_proj (parameter-free sinusoids) is left out: UNet2DModel also calls it on class labels
    mods = [model.time_embedding, model.conv_in]
    if kind == "class":
        return mods
    for block in model.down_blocks:
        if not getattr(block, "has_cross_attention", False):
            mods.append(block)  # ResNets and downsampler on condition-independent rows and temb
            continue
        mods.append(block.resnets[0])  # resnets[i] runs before attentions[i]
        tr = block.attentions[0]
        mods += [m for m in (getattr(tr, "norm", None), getattr(tr, "proj_in", None)) if m is not None]
        first = tr.transformer_blocks[0]
        if not first.attn1.is_cross_attention:  # only_cross_attention makes attn1 take the prompt
            mods += [first.norm1, first.attn1]
        break
    return mods


def _first_rows(v, B: int, K: int):
    """The first of each sample's K identical rows: [B*K, ...] -> [B, ...] (a reshape and a select,
    which the Fisher layout proof of cdgfast.fisher follows; a strided slice it does not)."""
    if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == B * K:
        return v.reshape(B, K, *v.shape[1:])[:, 0]
    return v


def _repeat_rows(v, B: int, K: int):
    if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == B:
        return v.repeat_interleave(K, dim=0)
    if isinstance(v, (tuple, list)):
        return type(v)(_repeat_rows(u, B, K) for u in v)
    return v


@contextlib.contextmanager
def _share_rows(modules: List[nn.Module], B: int, K: int) -> Iterator[None]:
    """For the call: each module runs on the first of every K identical rows, its output repeated."""
    handles = []

    def pre(mod, args, kwargs):
        return tuple(_first_rows(a, B, K) for a in args), {k: _first_rows(v, B, K) for k, v in kwargs.items()}

    def post(mod, args, kwargs, out):
        return _repeat_rows(out, B, K)

    try:
        for m in modules:
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


class SharedPromptKV:
    """Attention processor for a cross-attention module: K/V of the M unique prompts once, gathered per
    query row with `index` (flat [B*K], row r attends to prompt index[r]).

    The math is diffusers' default scaled-dot-product attention (no mask), with `encoder_hidden_states`
    [M, L, D] instead of [B*K, L, D]: to_k / to_v (and norm_cross, norm_k) act per prompt row, so they
    commute with the gather and are evaluated on M rows."""

    def __init__(self, index: Tensor):
        self.index = index

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None, *args, **kwargs) -> Tensor:
        if encoder_hidden_states is None or attention_mask is not None or attn.spatial_norm is not None:
            raise ValueError("model: dc_predictions' shared-prompt attention takes encoder hidden states, no "
                             "attention mask and no spatial norm")
        residual = hidden_states
        four_d = hidden_states.dim() == 4
        if four_d:
            n, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(n, c, h * w).transpose(1, 2)
        rows = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        ctx = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        key, value = attn.to_k(ctx), attn.to_v(ctx)  # [M, L, inner]: once per prompt
        heads = attn.heads
        dh = key.shape[-1] // heads
        query = query.view(rows, -1, heads, dh).transpose(1, 2)
        key = key.view(key.shape[0], -1, heads, dh).transpose(1, 2)
        value = value.view(value.shape[0], -1, heads, dh).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # the gather copies [B*K, heads, L, dh] K/V rows (memory, no FLOPs): an arbitrary index has no
        # broadcastable layout
        key, value = key.index_select(0, self.index), value.index_select(0, self.index)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(rows, -1, heads * dh).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if four_d:
            out = out.transpose(-1, -2).reshape(n, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _cross_attentions(model: nn.Module) -> List[nn.Module]:
    from diffusers.models.attention_processor import Attention

    return [m for m in model.modules() if isinstance(m, Attention) and m.is_cross_attention]


@contextlib.contextmanager
def _prompt_processors(attns: List[nn.Module], index: Tensor) -> Iterator[None]:
    """Set SharedPromptKV on every cross-attention module for the call; the previous processors come back
    afterwards, also after an exception."""
    saved = [(a, a.processor) for a in attns]
    proc = SharedPromptKV(index)
    try:
        for a in attns:
            a.set_processor(proc)
        yield
    finally:
        for a, p in saved:
            a.set_processor(p)


# --- validation ----------------------------------------------------------------------------------

def _model_tensor(model: nn.Module) -> Optional[Tensor]:
    for p in model.parameters():
        if p.is_floating_point():
            return p
    return None


def _check_values(name: str, value: Tensor, hi: int, what: str) -> None:
    # a data-dependent check (one sync), skipped where it cannot run
    if value.device.type == "meta" or torch.compiler.is_compiling():
        return
    from cdgfast._dispatch import transform_active

    if transform_active():
        return
    if bool(((value < 0) | (value >= hi)).any()):
        raise ValueError(f"{name}: expected values in [0, {hi}) ({what}), got min {int(value.min())}, "
                         f"max {int(value.max())}")


def _check_common(model, x_t, timesteps) -> Tuple[int, Optional[Tensor]]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module (a diffusers UNet), got {type(model).__name__}")
    check_tensor("x_t", x_t, min_ndim=2)
    B = x_t.shape[0]
    check_tensor("timesteps", timesteps, floating=False)
    if timesteps.dtype == torch.bool or timesteps.is_complex():
        raise ValueError(f"timesteps: expected an integer or floating dtype, got {timesteps.dtype}")
    check_shape("timesteps", timesteps, (B,), "one timestep per row of x_t")
    ref = _model_tensor(model)
    if ref is not None:
        check_same_device(model=ref, x_t=x_t, timesteps=timesteps)
        if x_t.dtype != ref.dtype:
            raise ValueError(f"x_t: expected the model's dtype {ref.dtype}, got {x_t.dtype}")
    cfg = getattr(model, "config", None)
    in_ch = getattr(cfg, "in_channels", None)
    if isinstance(in_ch, int) and x_t.dim() >= 2 and x_t.shape[1] != in_ch:
        raise ValueError(f"x_t: expected {in_ch} channels (the model's in_channels) in dim 1, got shape "
                         f"{tuple(x_t.shape)}")
    return B, ref


def dc_predictions(model: nn.Module, x_t: Tensor, timesteps: Tensor, conditions: Tensor,
                   index: Optional[Tensor] = None) -> Tensor:
    """The model's prediction for K conditions of every sample, [B, K, *S], from one batched forward
    with each sample's (x_t, t) shared (module docstring: what is computed once per sample).

    model: a class-conditional diffusers UNet2DModel (or any module called `model(x, t, class_labels=y)`)
    with `conditions` class labels [B, K]; or a diffusers UNet2DConditionModel with `conditions` the
    encoder hidden states [M, L, D] of M unique prompts and `index` [B, K] (torch.long) choosing each
    sample's K prompts. A peft-wrapped model (PeftModel) is unwrapped. x_t: [B, *S] noisy inputs;
    timesteps: [B]. Compose with `cdgfast.ops.dc_scores(eps_pred, eps)` / `dc_errors` /
    `dc_cross_entropy` (eps-prediction models; convert v / x0 outputs first)."""
    B, ref = _check_common(model, x_t, timesteps)
    check_tensor("conditions", conditions, floating=False)
    base = _unwrap(model)
    kind = _kind(base)
    if conditions.is_floating_point():
        return _text_predictions(base, kind, x_t, timesteps, conditions, index, B, ref)
    if index is not None:
        raise ValueError("index: only with text conditions (encoder hidden states [M, L, D]); class labels "
                         "[B, K] choose the conditions themselves")
    if conditions.dtype not in _INT_DTYPES:
        raise ValueError(f"conditions: expected integer class labels [B, K] or floating encoder hidden states "
                         f"[M, L, D], got dtype {conditions.dtype}")
    if conditions.dim() != 2 or conditions.shape[0] != B:
        raise ValueError(f"conditions: expected class labels of shape ({B}, K) (B = x_t.shape[0]), got "
                         f"{tuple(conditions.shape)}")
    if ref is not None:
        check_same_device(model=ref, x_t=x_t, conditions=conditions)
    if kind == "text":
        raise ValueError("conditions: a UNet2DConditionModel takes encoder hidden states [M, L, D] and index "
                         "[B, K], not class labels")
    if kind == "class":
        emb = base.class_embedding
        if emb is None:
            raise ValueError("model: a UNet2DModel without a class embedding (num_class_embeds / class_embed_type "
                             "unset) cannot take class labels as conditions")
        if isinstance(emb, nn.Embedding):
            _check_values("conditions", conditions, emb.num_embeddings, "rows of the class embedding")
    K = conditions.shape[1]
    from cdgfast.diffusion import predict_eps

    xk = x_t.repeat_interleave(K, dim=0)
    tk = timesteps.repeat_interleave(K, dim=0)
    labels = conditions.reshape(-1).long()
    shared = shared_prefix_modules(base) if K > 1 else []
    with _share_rows(shared, B, K):
        pred = predict_eps(base, xk, tk, labels)
    return pred.view(B, K, *x_t.shape[1:])


def _text_predictions(base, kind, x_t, timesteps, ehs, index, B, ref) -> Tensor:
    if kind != "text":
        raise ValueError(f"model: encoder hidden states [M, L, D] need a diffusers UNet2DConditionModel, got "
                         f"{type(base).__name__}")
    if ehs.dim() != 3:
        raise ValueError(f"conditions: expected encoder hidden states of shape (M, L, D), got {tuple(ehs.shape)}")
    if ref is not None and ehs.dtype != ref.dtype:
        raise ValueError(f"conditions: expected the model's dtype {ref.dtype}, got {ehs.dtype}")
    if index is None:
        raise ValueError("index: required with encoder hidden states: a [B, K] torch.long tensor choosing each "
                         "sample's K prompts among the M")
    check_tensor("index", index, floating=False)
    if index.dtype != torch.long:
        raise ValueError(f"index: expected dtype torch.long, got {index.dtype}")
    if index.dim() != 2 or index.shape[0] != B:
        raise ValueError(f"index: expected shape ({B}, K) (B = x_t.shape[0]), got {tuple(index.shape)}")
    if ref is not None:
        check_same_device(model=ref, x_t=x_t, conditions=ehs, index=index)
    cfg = base.config
    for key in ("class_embed_type", "num_class_embeds", "addition_embed_type", "encoder_hid_dim_type"):
        if getattr(cfg, key, None) is not None:
            raise ValueError(f"model: a UNet2DConditionModel with {key}={getattr(cfg, key)!r} is not supported "
                             "(the condition would enter outside cross-attention)")
    attns = _cross_attentions(base)
    if not attns:
        raise ValueError("model: the UNet2DConditionModel has no cross-attention module")
    D = ehs.shape[-1]
    for a in attns:
        if a.cross_attention_dim != D:
            raise ValueError(f"conditions: expected encoder hidden states of width {a.cross_attention_dim} (the "
                             f"model's cross_attention_dim), got D = {D}")
    _check_values("index", index, ehs.shape[0], f"the M = {ehs.shape[0]} prompts of conditions")
    K = index.shape[1]
    xk = x_t.repeat_interleave(K, dim=0)
    tk = timesteps.repeat_interleave(K, dim=0)
    shared = shared_prefix_modules(base) if K > 1 else []
    with _prompt_processors(attns, index.reshape(-1)), _share_rows(shared, B, K):
        out = base(xk, tk, encoder_hidden_states=ehs)
    out = out.sample if hasattr(out, "sample") else out
    if not isinstance(out, Tensor) or out.shape != xk.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"model: expected a prediction of x_t's shape per row {tuple(xk.shape)}, got {got}")
    return out.view(B, K, *x_t.shape[1:])
