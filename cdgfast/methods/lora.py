"""LoRA-based methods on the UNet attention projections (SPEC section 2): C-LoRA, sequential LoRA and
equal-weight LoRA merging, built on `cdgfast.models.lora` (peft adapters; delta = A @ B [d1, d2]).

All three add the adapter in `begin_task` of the first task if the model has none (rank `rank` on
`target_modules`, base weights frozen), so a trainer must build its optimizer after `begin_task`
(or call `cdgfast.models.lora.add_lora` itself beforehand; an existing adapter is reused).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..models.lora import CROSS_ATTENTION_KV
from ..ops import lora_overlap_penalty
from ._hparams import HP, count, nonneg
from ._registry import register
from .base import Method, TinyRun


def lora_module():
    """cdgfast.models.lora, imported on first use (it imports peft, which only the LoRA methods need)."""
    from ..models import lora
    return lora


class _LoRAMethod(Method):
    defaults = {"rank": 16, "target_modules": ("to_q", "to_k", "to_v", "to_out.0"), "adapter_name": "default"}
    specs = {"rank": count(), "target_modules": HP("names"), "adapter_name": HP("str")}
    # text-to-image models (SPEC 2.3): one LoRA of rank 16 on the cross-attention K/V only
    text_defaults = {"target_modules": CROSS_ATTENTION_KV}

    def _has_lora(self, model) -> bool:
        try:
            lora_module().lora_layers(model, self.config["adapter_name"])
            return True
        except ValueError:
            return False

    def _reset_seed(self) -> int:
        return int(self.config["seed"]) + 101 * (self.task_index + 1)

    def begin_task(self, model, task=None):
        super().begin_task(model, task)
        self.restore_model_structure(model)

    def restore_model_structure(self, model):
        """The adapter, added when the model has none (begin_task; on resume before the saved weights load)."""
        if not self._has_lora(model):
            lora_module().add_lora(model, rank=int(self.config["rank"]), target_modules=tuple(self.config["target_modules"]),
                                   adapter_name=self.config["adapter_name"], seed=self._reset_seed())


@register("lora_seq", order=180)
class LoRASeq(_LoRAMethod):
    """Sequential LoRA: one LoRA per task trained on top of the previous tasks' merged LoRAs; at the end
    of a task it is folded into the base weights (`merge_lora`) and re-initialised. `task_deltas` keeps
    every task's delta."""

    tiny = TinyRun(config={"rank": 2}, needs={"class_labels", "attention"})
    _state_attrs = ("task_deltas",)

    def __init__(self, **overrides):
        super().__init__(**overrides)
        self.task_deltas: List[Dict[str, torch.Tensor]] = []

    def end_task(self, model, data):
        super().end_task(model, data)
        self.task_deltas.append(lora_module().merge_lora(model, self.config["adapter_name"], seed=self._reset_seed() + 1))


@register("lora_merge", order=190)
class LoRAMerge(_LoRAMethod):
    """Equal-weight LoRA merging: every task's LoRA is trained from the same base weights; after task n
    the model is `base + (1/n) sum_k delta_k` (`merge_deltas` + `add_deltas_to_base`) with a zero adapter.
    At the next `begin_task` the merged deltas are taken out of the base again and a fresh LoRA starts."""

    tiny = TinyRun(config={"rank": 2}, needs={"class_labels", "attention"})
    _state_attrs = ("task_deltas", "applied")

    def __init__(self, **overrides):
        super().__init__(**overrides)
        self.task_deltas: List[Dict[str, torch.Tensor]] = []
        self.applied: Optional[Dict[str, torch.Tensor]] = None  # what is folded into the base now

    def begin_task(self, model, task=None):
        super().begin_task(model, task)
        lm = lora_module()
        if self.applied is not None:
            lm.add_deltas_to_base(model, self.applied, -1.0, self.config["adapter_name"])
            self.applied = None
            lm.reset_lora(model, self.config["adapter_name"], seed=self._reset_seed())

    def end_task(self, model, data):
        super().end_task(model, data)
        lm = lora_module()
        name = self.config["adapter_name"]
        self.task_deltas.append(lm.lora_delta(model, name))
        lm.reset_lora(model, name, seed=self._reset_seed() + 1)
        self.applied = lm.merge_deltas(self.task_deltas)
        lm.add_deltas_to_base(model, self.applied, 1.0, name)


@register("clora", order=170)
class CLoRA(_LoRAMethod):
    """C-LoRA: `lam_f * sum_layers || |sum_{n'<n} A_n' B_n'| * (A_n B_n) ||_F^2` with
    `cdgfast.ops.lora.lora_overlap_penalty`, `lam_f` = 1e8. After each task its LoRA is folded into the
    base weights and re-initialised (the next task's A_n B_n), and its delta is added to `prev_deltas`."""

    defaults = {"lam_f": 1e8}
    specs = {"lam_f": nonneg()}
    tiny = TinyRun(config={"rank": 2}, terms={"clora"}, needs={"class_labels", "attention"})
    _state_attrs = ("prev_deltas",)

    def __init__(self, **overrides):
        super().__init__(**overrides)
        self.prev_deltas: Optional[Dict[str, torch.Tensor]] = None

    def extra_terms(self, model, batch):
        if self.prev_deltas is None:
            return {}
        layers = lora_module().lora_layers(model, self.config["adapter_name"])
        total = 0.0
        for name, (A, B) in layers.items():
            total = total + lora_overlap_penalty(self.prev_deltas[name].to(A), A, B)
        return {self.name: float(self.config["lam_f"]) * total}

    def end_task(self, model, data):
        super().end_task(model, data)
        delta = lora_module().merge_lora(model, self.config["adapter_name"], seed=self._reset_seed() + 1)
        if self.prev_deltas is None:
            self.prev_deltas = delta
        else:
            self.prev_deltas = {k: self.prev_deltas[k] + delta[k] for k in delta}


__all__ = ["CLoRA", "LoRASeq", "LoRAMerge"]
