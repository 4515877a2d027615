"""The method registry: `@register("name")` on a Method subclass, `register_composition("a+b", "a", "b")`
for a composition, and `available()` / `create()` over both.

A built-in method is one file in cdgfast/methods/: the package imports every module there whose name does
not start with "_" (`import_method_modules`), and the decorator in that file registers it, so adding a
method needs no edit to a list anywhere. A user's own method registers the same way from its own module
(import it before `create`).

`order` places a name in `available()` (the listing of `python -m cdgfast.train --list` and the README):
names with an order come first, by order; the others follow in registration order. The built-ins use
multiples of 10 so that a new method can slot in between.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ._hparams import _merged, merged_defaults
from .base import Method, TinyRun
from .compose import Compose


@dataclass(frozen=True)
class _Entry:
    name: str
    cls: Optional[type]              # a single method
    members: Tuple[str, ...]         # a composition: the member names, in hook order
    order: Optional[float]
    index: int                       # registration count, breaks ties
    where: str                       # what defined it: "module.qualname", or the members of a composition


_ENTRIES: Dict[str, _Entry] = {}


def _check_name(name, what: str) -> str:
    if not isinstance(name, str) or not name or name != name.strip() or any(c.isspace() for c in name):
        raise ValueError(f"name: expected a non-empty method name without spaces, got {name!r}")
    if what == "method" and "+" in name:
        raise ValueError(f"name: '+' is reserved for compositions (register_composition), got {name!r}")
    return name


def _check_order(order) -> Optional[float]:
    if order is None:
        return None
    if isinstance(order, bool) or not isinstance(order, (int, float)) or order != order:
        raise ValueError(f"order: expected a number or None, got {order!r}")
    return float(order)


def _add(entry: _Entry) -> None:
    old = _ENTRIES.get(entry.name)
    if old is not None and old.where != entry.where:  # the same definition again (a module reload) replaces it
        raise ValueError(f"name: method {entry.name!r} is already registered ({old.where})")
    _ENTRIES[entry.name] = entry if old is None else dataclasses.replace(entry, index=old.index)


def register(name: str, *, order: Optional[float] = None):
    """Class decorator: register a Method subclass as `name` (sets `cls.name`). ValueError for a taken name,
    a name with '+' or spaces, a class that is not a Method, or a bad `order`."""
    name = _check_name(name, "method")
    order = _check_order(order)

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Method)) or issubclass(cls, Compose):
            raise ValueError(f"register({name!r}): expected a cdgfast.methods.Method subclass, got {cls!r}")
        _add(_Entry(name, cls, (), order, len(_ENTRIES), f"{cls.__module__}.{cls.__qualname__}"))
        cls.name = name
        return cls

    return deco


def register_composition(name: str, *members: str, order: Optional[float] = None) -> None:
    """Register `name` as the Compose of the single methods `members` (at least two, distinct), e.g.
    `register_composition("rank1+gd", "rank1", "gd")`. The members are looked up when the composition is
    built, so the line may stand in any member's file whatever the import order."""
    name = _check_name(name, "composition")
    order = _check_order(order)
    if len(members) < 2 or len(set(members)) != len(members) or not all(isinstance(m, str) for m in members):
        raise ValueError(f"members: expected at least two distinct method names, got {list(members)}")
    _add(_Entry(name, None, tuple(members), order, len(_ENTRIES), f"composition of {'+'.join(members)}"))


def available() -> List[str]:
    """Every registered name, in listing order (see the module docstring)."""
    entries = sorted(_ENTRIES.values(), key=lambda e: (e.order is None, e.order or 0.0, e.index))
    return [e.name for e in entries]


def _entry(name: str) -> _Entry:
    entry = _ENTRIES.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(f"name: unknown method {name!r}; expected one of {available()}")
    return entry


def _member_classes(entry: _Entry) -> List[type]:
    out = []
    for m in entry.members:
        member = _ENTRIES.get(m)
        if member is None or member.cls is None:
            raise ValueError(f"name: composition {entry.name!r} has member {m!r}, which is not a registered single "
                             f"method (registered: {list(single_methods())})")
        out.append(member.cls)
    return out


def single_methods() -> Dict[str, type]:
    """name -> class of every registered single method, in listing order."""
    return {n: _ENTRIES[n].cls for n in available() if _ENTRIES[n].cls is not None}


def method_class(name: str) -> type:
    """The class registered as the single method `name` (ValueError for a composition or an unknown name)."""
    entry = _entry(name)
    if entry.cls is None:
        raise ValueError(f"name: {name!r} is a composition of {list(entry.members)}, not a single method")
    return entry.cls


def members(name: str) -> List[str]:
    """The member names of a composition; [name] for a single method."""
    entry = _entry(name)
    return list(entry.members) if entry.cls is None else [name]


def create(name: str, **overrides) -> Method:
    """Build the method `name` with its defaults, changed by `overrides`.

    Single methods take their hyperparameter names (`create("ewc", lam=100.0, gamma=0.9)`); compositions
    take bare keys (applied to every member that has them) or `member.key` keys."""
    entry = _entry(name)
    if entry.cls is not None:
        return entry.cls(**overrides)
    classes = _member_classes(entry)
    routed = Compose.route_overrides(list(entry.members), [merged_defaults(c) for c in classes], overrides)
    return Compose([c(**kw) for c, kw in zip(classes, routed)], name=name)


def load(directory, model=None) -> Method:
    """The method (single or a composition) that `Method.save` wrote to `directory`, with its saved
    hyperparameters and state; with `model`, its saved trainable parameters are copied into it
    (`load_trainable`). Call `setup(...)` before using it. Reads safetensors + JSON only (no pickle)."""
    from ..serialization import load_state_dir
    from .base import load_trainable

    obj, info = load_state_dir(directory)
    name = info.get("method")
    if not isinstance(name, str):
        raise ValueError(f"directory: {directory} holds no saved cdgfast method (state.json has no 'method')")
    method = create(name, **obj["config"])
    method.load_state_dict(obj["state"])
    if model is not None:
        load_trainable(model, directory)
    return method


def tiny_run(name: str) -> Optional[TinyRun]:
    """What the generic tests need to run `name` (the class's own `tiny` declaration; None if it has none).
    A composition's is its members' put together: their configs as `member.key`, their terms, frozen
    attributes and model needs."""
    entry = _entry(name)
    if entry.cls is not None:
        return entry.cls.__dict__.get("tiny")
    runs = [c.__dict__.get("tiny") for c in _member_classes(entry)]
    if any(r is None for r in runs):
        return None
    return TinyRun(config={f"{m}.{k}": v for m, r in zip(entry.members, runs) for k, v in r.config.items()},
                   terms=frozenset().union(*(r.terms for r in runs)),
                   frozen=tuple(a for r in runs for a in r.frozen),
                   needs=frozenset().union(*(r.needs for r in runs)))


def text_config(name: str) -> Dict[str, object]:
    """The overrides that give `name` its text-to-image settings (SPEC 2.3, the DC-score paper's App. H):
    its classes' `text_defaults` (e.g. `ewc`: lam 1e6 on LoRA parameters; the LoRA methods: the
    cross-attention K/V only; the DC methods: no label dropout), as `create` takes them
    (`member.key` for a composition). The class-conditional defaults stay as they are:
    `create(name, **text_config(name), **yours)`."""
    entry = _entry(name)
    if entry.cls is not None:
        return _merged(entry.cls, "text_defaults")
    return {f"{m}.{k}": v for m, c in zip(entry.members, _member_classes(entry))
            for k, v in _merged(c, "text_defaults").items()}


def import_method_modules(package: str, path: Sequence[str]) -> List[str]:
    """Import every module of the package at `path` whose name does not start with "_" (sorted by name),
    so that their `@register` decorators run. Returns the module names."""
    names = sorted(info.name for info in pkgutil.iter_modules(list(path)) if not info.name.startswith("_"))
    for n in names:
        importlib.import_module(f"{package}.{n}")
    return names


__all__ = ["register", "register_composition", "available", "create", "single_methods", "method_class",
           "members", "tiny_run", "text_config", "import_method_modules"]
