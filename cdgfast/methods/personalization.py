"""The text-to-image rows of the DC-score paper's Table 1 that have no class-conditional counterpart
(SPEC 2.3): Textual Inversion, Custom Diffusion (with the constrained merge of Kumari et al. 2023) and
Custom Diffusion trained sequentially with EWC. They run only with `TextConditions`
(`Method.setup(conditions=...)`), which trains each task's modifier token V*_n; the other rows
(`lora_seq`, `lora_merge`, `clora`, `ewc`, `ewc_dc`, `dsc`, `dsc+ewc`, `dsc+ewc_dc`) are the existing
methods with `cdgfast.methods.text_config(name)`.

* `textual_inversion`: the UNet is frozen; only the task's token row trains.
* `custom_diffusion`: the cross-attention K/V weights (`attn2.to_k`, `attn2.to_v`) and the token train,
  each task from the pretrained weights W0; after task n the model holds the constrained merge of the n
  tasks' weights (`constrained_merge`, Kumari et al. 2023, Eq. 4 there):
      W = argmin_W ||(W - W0) C_reg^T||_F^2   s.t.  W C^T = V,
  per layer, C the text features of every concept's target words (the prompt's rows from the modifier
  token to the end-of-text token), V the task-k weights on concept k's rows (W_k C_k^T), C_reg the rows of
  the prior prompt. Closed form: with M = C_reg^T C_reg + ridge I,
      W = W0 + (V - W0 C^T) (C M^-1 C^T)^+ C M^-1.
  The ridge (ours, `merge_ridge`, relative to tr(M)/d) keeps M invertible when the regularization rows
  do not span the feature space (one prior prompt: L' < d rows); Kumari et al. use ~200 captions.
* `cd_ewc`: the K/V weights and the token train sequentially (no reset, no merge) with EWC on the K/V
  weights (`lam` 1e6, the paper's EWC weight).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from .._validation import check_tensor
from ..models.lora import CROSS_ATTENTION_KV
from ._hparams import nonneg
from ._registry import register
from .anchors import EWC
from .base import Method, TinyRun


def constrained_merge(w0: torch.Tensor, c_reg: torch.Tensor, c: torch.Tensor, v: torch.Tensor,
                      ridge: float = 0.0) -> torch.Tensor:
    """argmin_W ||(W - w0) c_reg^T||^2 + ridge ||W - w0||^2 subject to W c^T = v (least squares in the
    constraint when it is infeasible): w0 [o, i], c_reg [R, i], c [S, i], v [o, S] -> W [o, i] in w0's
    dtype, computed in float64. `ridge` >= 0 is absolute here (CustomDiffusion scales it); with ridge 0,
    c_reg must have rank i."""
    w0 = check_tensor("w0", w0, ndim=2)
    c_reg = check_tensor("c_reg", c_reg, ndim=2)
    c = check_tensor("c", c, ndim=2)
    v = check_tensor("v", v, ndim=2)
    o, i = w0.shape
    if c_reg.shape[1] != i:
        raise ValueError(f"c_reg: expected [R, {i}] (w0's input width), got {tuple(c_reg.shape)}")
    if c.shape[1] != i:
        raise ValueError(f"c: expected [S, {i}] (w0's input width), got {tuple(c.shape)}")
    if tuple(v.shape) != (o, c.shape[0]):
        raise ValueError(f"v: expected [{o}, {c.shape[0]}] (w0's outputs x c's rows), got {tuple(v.shape)}")
    if not isinstance(ridge, (int, float)) or isinstance(ridge, bool) or not ridge >= 0:
        raise ValueError(f"ridge: expected a number >= 0, got {ridge!r}")
    f = torch.float64
    W0, Cr, C, V = (t.detach().to(f) for t in (w0, c_reg, c, v))
    m = Cr.t() @ Cr + float(ridge) * torch.eye(i, dtype=f, device=W0.device)
    m_inv_ct = torch.linalg.solve(m, C.t())                      # M^-1 C^T [i, S]
    gram = C @ m_inv_ct                                           # C M^-1 C^T [S, S]
    lam = (V - W0 @ C.t()) @ torch.linalg.pinv(gram, hermitian=True)
    return (W0 + lam @ m_inv_ct.t()).to(w0.dtype)


def cross_attention_kv(model: nn.Module) -> Dict[str, nn.Linear]:
    """name -> the cross-attention K/V projections (`attn2.to_k`, `attn2.to_v`) of a UNet2DConditionModel."""
    mods = {n: m for n, m in model.named_modules() if any(n == t or n.endswith("." + t) for t in CROSS_ATTENTION_KV)}
    if not mods or not all(isinstance(m, nn.Linear) for m in mods.values()):
        raise ValueError("model: expected a UNet2DConditionModel whose attn2.to_k / attn2.to_v are plain nn.Linear "
                         "layers (no LoRA adapter on them)")
    return mods


class _TextOnly(Method):
    """A method that exists only on text-to-image models: refuses class conditions at begin_task."""

    def begin_task(self, model, task=None):
        if getattr(self.conditioning, "kind", None) != "text":
            raise ValueError(f"conditions: method {self.name!r} needs TextConditions (a text-to-image model); "
                             f"pass setup(..., conditions=TextConditions(...))")
        super().begin_task(model, task)


@register("textual_inversion", order=220)
class TextualInversion(_TextOnly):
    """Textual Inversion (Gal et al. 2023): the UNet is frozen at every begin_task; only the task's
    modifier token (the conditions' trainable row) learns."""

    tiny = TinyRun(needs={"text"})

    def begin_task(self, model, task=None):
        super().begin_task(model, task)
        model.requires_grad_(False)


class _CrossAttentionKVTraining(_TextOnly):
    """begin_task: only the cross-attention K/V weights of the UNet train (and the conditions' token)."""

    def begin_task(self, model, task=None):
        super().begin_task(model, task)
        model.requires_grad_(False)
        for m in cross_attention_kv(model).values():
            m.weight.requires_grad_(True)


@register("custom_diffusion", order=230)
class CustomDiffusion(_CrossAttentionKVTraining):
    """Custom Diffusion per task from the pretrained K/V weights, then the constrained merge of every
    task's weights (module docstring). `base_kv`: the pretrained K/V weights; `task_kv`: each task's
    trained weights; `task_classes`: each task's concepts."""

    defaults = {"merge_ridge": 1e-3}
    specs = {"merge_ridge": nonneg()}
    tiny = TinyRun(needs={"text"})
    _state_attrs = ("base_kv", "task_kv", "task_classes")

    def __init__(self, **overrides):
        super().__init__(**overrides)
        self.base_kv: Optional[Dict[str, torch.Tensor]] = None
        self.task_kv: List[Dict[str, torch.Tensor]] = []
        self.task_classes: List[List[int]] = []

    def begin_task(self, model, task=None):
        super().begin_task(model, task)
        mods = cross_attention_kv(model)
        with torch.no_grad():
            if self.base_kv is None:
                self.base_kv = {n: m.weight.detach().clone() for n, m in mods.items()}
            else:  # each concept is finetuned from the pretrained weights
                for n, m in mods.items():
                    m.weight.copy_(self.base_kv[n])

    def end_task(self, model, data):
        super().end_task(model, data)
        mods = cross_attention_kv(model)
        self.task_kv.append({n: m.weight.detach().clone() for n, m in mods.items()})
        self.task_classes.append(list(self.current_classes))
        merged = self.merged_weights()
        with torch.no_grad():
            for n, m in mods.items():
                m.weight.copy_(merged[n])

    def merged_weights(self) -> Dict[str, torch.Tensor]:
        """Every K/V layer's constrained merge of the tasks so far (one task: its own weights)."""
        if len(self.task_kv) == 1:
            return {n: w.clone() for n, w in self.task_kv[0].items()}
        cond = self.conditioning
        c_reg = cond.prompt_states([cond.prior])[0][:cond.prompt_length(cond.prior)]
        rows = [[cond.target_rows(c) for c in classes] for classes in self.task_classes]
        c_all = torch.cat([r for task in rows for r in task])
        d = c_reg.shape[1]
        out = {}
        for n, w0 in self.base_kv.items():
            v = torch.cat([self.task_kv[k][n].to(torch.float64) @ r.to(torch.float64).t()
                           for k, task in enumerate(rows) for r in task], dim=1)
            m_trace = float((c_reg.to(torch.float64) ** 2).sum())
            ridge = float(self.config["merge_ridge"]) * m_trace / d
            out[n] = constrained_merge(w0, c_reg.to(w0), c_all.to(w0), v.to(w0), ridge=ridge)
        return out


@register("cd_ewc", order=240)
class CDEWC(_CrossAttentionKVTraining, EWC):
    """Custom Diffusion trained sequentially (the K/V weights carry over from task to task, no merge) with
    online EWC on the K/V weights, `lam` = 1e6 (the paper's EWC weight)."""

    defaults = {"lam": 1e6}
    tiny = TinyRun(terms={"cd_ewc"}, needs={"text"})


__all__ = ["TextualInversion", "CustomDiffusion", "CDEWC", "constrained_merge", "cross_attention_kv"]
