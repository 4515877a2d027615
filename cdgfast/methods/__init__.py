"""cdgfast.methods: every consolidation method of SPEC section 2 as a regulariser any training loop can call.

    method = cdgfast.methods.create("rank1+gd", lam=15000.0)
    method.setup(num_classes=10, schedule=schedule, device=device)
    ... method.begin_task / loss / before_step / after_step / end_task / post_task_phase ...

`available()` lists the names; `create(name, **overrides)` builds one (unknown name or hyperparameter,
or a value of the wrong type or outside the range the method declares for it in `specs`: ValueError
naming the key and the values it accepts). Compositions such as `rank1+gd` are `Compose` objects of the single methods; a
composition accepts `key=value` for every member that has the key, or `member.key=value` passed as
`**{"gd.lam_gd": 2.0}`. See `base.py` for the hook contract.
"""
from __future__ import annotations

from typing import Callable, Dict, List

from .anchors import EWC, L2, MAS, SI, Diag
from .base import Method
from .ccd import CCD, reverse_mean, ukc_loss
from .compose import Compose
from .dc import DSC, EWCDC, condition_predictions
from .distill import GD, KD
from .finetune import Finetune
from .lora import CLoRA, LoRAMerge, LoRASeq
from .rank1 import Rank1
from .replay import AGEM, ER

_SINGLE: Dict[str, type] = {cls.name: cls for cls in (
    Finetune, ER, AGEM, KD, L2, EWC, SI, MAS, GD, Rank1, Diag, CCD, EWCDC, DSC, CLoRA, LoRASeq, LoRAMerge)}
_COMPOSED: Dict[str, List[str]] = {"rank1+gd": ["rank1", "gd"], "diag+gd": ["diag", "gd"]}

_ORDER = ["finetune", "er", "agem", "kd", "l2", "ewc", "si", "mas", "gd", "rank1", "diag", "rank1+gd", "diag+gd",
          "ccd", "ewc_dc", "dsc", "clora", "lora_seq", "lora_merge"]


def available() -> List[str]:
    """Names accepted by `create`."""
    return list(_ORDER)


def _defaults(cls: type) -> dict:
    merged = {}
    for klass in reversed(cls.__mro__):
        merged.update(getattr(klass, "defaults", {}) or {})
    return merged


def create(name: str, **overrides) -> Method:
    """Build the method `name` with its SPEC defaults, changed by `overrides`.

    Single methods take their hyperparameter names (`create("ewc", lam=100.0, gamma=0.9)`); compositions
    take bare keys (applied to every member that has them) or `member.key` keys."""
    if name in _SINGLE:
        return _SINGLE[name](**overrides)
    if name in _COMPOSED:
        names = _COMPOSED[name]
        classes = [_SINGLE[n] for n in names]
        routed = Compose.route_overrides(names, [_defaults(c) for c in classes], overrides)
        return Compose([c(**kw) for c, kw in zip(classes, routed)], name=name)
    raise ValueError(f"name: unknown method {name!r}; expected one of {available()}")


__all__ = ["available", "create", "Method", "Compose", "Finetune", "ER", "AGEM", "KD", "L2", "EWC", "Diag", "SI",
           "MAS", "GD", "Rank1", "CCD", "EWCDC", "DSC", "CLoRA", "LoRASeq", "LoRAMerge", "ukc_loss",
           "reverse_mean", "condition_predictions"]
