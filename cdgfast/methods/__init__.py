"""cdgfast.methods: every consolidation method of SPEC section 2 as a regulariser any training loop can call.

    method = cdgfast.methods.create("rank1+gd", lam=15000.0)
    method.setup(num_classes=10, schedule=schedule, device=device)
    ... method.begin_task / loss / before_step / after_step / end_task / post_task_phase ...

`available()` lists the names; `create(name, **overrides)` builds one (unknown name or hyperparameter,
or a value of the wrong type or outside the range the method declares for it in `specs`: ValueError
naming the key and the values it accepts). Compositions such as `rank1+gd` are `Compose` objects of the single methods; a
composition accepts `key=value` for every member that has the key, or `member.key=value` passed as
`**{"gd.lam_gd": 2.0}`. See `base.py` for the hook contract.

Each method is one module of this package, registered by `@register("name")` on its class (and
`register_composition(...)` for a composition); the package imports every module here whose name does
not start with "_", so a new method needs no edit to this file. The classes and the public helpers of
those modules (their `__all__`) are reachable as attributes of this package (`cdgfast.methods.EWC`).
"""
from __future__ import annotations

import importlib
from typing import Dict, List

from ._conditions import ClassConditions, TextConditions
from ._registry import (available, create, import_method_modules, load, members, method_class, register,
                        register_composition, single_methods, text_config, tiny_run)
from .base import Method, TinyRun, load_trainable
from .compose import Compose

_MODULES = import_method_modules(__name__, __path__)


def _exports() -> Dict[str, str]:
    """Public name -> the module that defines it: every registered class, and the `__all__` of each
    module that registers a method (its helpers, e.g. ccd.ukc_loss)."""
    out: Dict[str, str] = {}
    for cls in single_methods().values():
        mod_name = cls.__module__.rpartition(".")[2]
        if cls.__module__ == f"{__name__}.{mod_name}":  # a user's method registered from elsewhere stays there
            out.setdefault(cls.__name__, mod_name)
            for n in getattr(importlib.import_module(cls.__module__), "__all__", ()):
                out.setdefault(n, mod_name)
    return out


_EXPORTS = _exports()


def __getattr__(name: str):
    """The method modules' public names (`cdgfast.methods.Rank1`, `cdgfast.methods.ukc_loss`), looked up
    in the module that defines them, so this file lists none of them."""
    mod_name = _EXPORTS.get(name)
    if mod_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod_name}"), name)


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = ["available", "create", "load", "load_trainable", "register", "register_composition", "single_methods",
           "method_class", "members", "tiny_run", "text_config", "Method", "TinyRun", "Compose", "ClassConditions",
           "TextConditions"] + sorted(_EXPORTS)
