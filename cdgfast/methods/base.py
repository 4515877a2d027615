"""The Method interface every consolidation method implements, and the small pieces they share.

A training loop uses a method like this (any loop: plain diffusers, Lightning, Accelerate)::

    method.setup(num_classes=C, schedule=schedule, device=device)     # once, before task 0
    for task in tasks:
        method.begin_task(model, task)            # create the optimizer after this (LoRA methods add adapters)
        for x, y in loader:
            terms = method.loss(model, {"x": x, "y": y})   # dict of named scalars, always with "task"
            sum(terms.values()).backward()
            method.before_step(model)                       # A-GEM projects the gradient here
            opt.step(); method.after_step(model); opt.zero_grad()
        method.end_task(model, data)              # Fisher / anchors / buffers / teachers
        method.post_task_phase(model, data)       # DSC consolidation phase (no-op elsewhere)

`loss` receives the clean batch; the method draws (t, eps) itself with `make_batch` from its own
seeded generator, and applies label dropout (null class = `num_classes`) when it needs
unconditional predictions.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from .._params import flatten, flatten_detached, split_like, trainable_parameters
from ..diffusion import Batch, NoiseSchedule, make_batch, predict_eps
from ._hparams import HP, count, probability, validate_config

Data = Any  # iterable of (x, y), or a callable returning a fresh iterable


class Method:
    """Base class: plain denoising loss, no consolidation (this is `finetune`).

    Subclasses set `name`, `defaults` (their hyperparameters; `create(name, **overrides)` may change
    any of them, an unknown key is a ValueError), `specs` (one `_hparams.HP` per key of `defaults`:
    the values it accepts; a bad value is a ValueError naming the key and the valid range), and
    override the hooks they need. Methods whose loss is "task loss + penalty terms" implement
    `extra_terms`; methods that change the task loss itself (replay, distillation on the same
    forward) set `owns_task_loss = True` and override `loss`.
    """

    name: str = "base"
    defaults: Dict[str, Any] = {"seed": 0, "label_dropout": 0.0}
    specs: Dict[str, HP] = {"seed": count(0), "label_dropout": probability()}
    owns_task_loss: bool = False
    # Attributes saved by the generic state_dict (tensors, numbers, lists, dicts of those).
    _state_attrs: Tuple[str, ...] = ()

    def __init__(self, **overrides):
        merged = {}
        for klass in reversed(type(self).__mro__):
            merged.update(getattr(klass, "defaults", {}) or {})
        unknown = sorted(set(overrides) - set(merged))
        if unknown:
            raise ValueError(f"{unknown[0]!r}: unknown hyperparameter for method {self.name!r}; "
                             f"expected one of {sorted(merged)}")
        merged.update(overrides)
        self.config: Dict[str, Any] = validate_config(type(self), merged)
        self.num_classes: Optional[int] = None
        self.schedule: Optional[NoiseSchedule] = None
        self.device = None
        self.task = None
        self.task_index = -1
        self.seen_classes: List[int] = []   # classes of finished tasks (in order)
        self.current_classes: List[int] = []
        self.steps_in_task = 0
        self.generator = torch.Generator().manual_seed(int(self.config["seed"]))

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, config={self.config})"

    # ------------------------------------------------------------------ hooks
    def setup(self, *, num_classes: int, schedule: Optional[NoiseSchedule] = None, device=None) -> None:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")
        if schedule is not None and not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule: expected a cdgfast.diffusion.NoiseSchedule, got {type(schedule).__name__}")
        self.num_classes = num_classes
        self.schedule = schedule or NoiseSchedule()
        self.device = torch.device(device) if device is not None else None

    def begin_task(self, model: torch.nn.Module, task=None) -> None:
        self._require_setup()
        self.task = task
        self.task_index += 1
        classes = list(getattr(task, "classes", []) or [])
        self.current_classes = [int(c) for c in classes]
        self.steps_in_task = 0

    def loss(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        self._require_setup()
        self.steps_in_task += 1
        nb = self.noisy_batch(batch["x"], batch.get("y"), dropout=True)
        terms = {"task": self.denoising_loss(model, nb).mean()}
        terms.update(self.extra_terms(model, batch))
        return terms

    def extra_terms(self, model: torch.nn.Module, batch) -> Dict[str, torch.Tensor]:
        """Terms added to another member's task loss (penalties). The base method adds none."""
        return {}

    def before_step(self, model: torch.nn.Module) -> None:
        pass

    def after_step(self, model: torch.nn.Module) -> None:
        pass

    def end_task(self, model: torch.nn.Module, data: Data) -> None:
        self._require_setup()
        for c in self.current_classes:
            if c not in self.seen_classes:
                self.seen_classes.append(c)

    def post_task_phase(self, model: torch.nn.Module, data: Data) -> None:
        pass

    # --------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        state = {"task_index": self.task_index, "seen_classes": list(self.seen_classes),
                 "current_classes": list(self.current_classes), "steps_in_task": self.steps_in_task,
                 "generator": self.generator.get_state(), "config": dict(self.config)}
        for attr in self._state_attrs:
            value = getattr(self, attr, None)
            if isinstance(value, torch.nn.Module):
                value = value.state_dict()
            state[attr] = value
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.task_index = state["task_index"]
        self.seen_classes = list(state["seen_classes"])
        self.current_classes = list(state["current_classes"])
        self.steps_in_task = state["steps_in_task"]
        self.generator.set_state(state["generator"])
        for attr in self._state_attrs:
            if attr in state:
                current = getattr(self, attr, None)
                if isinstance(current, torch.nn.Module) and state[attr] is not None:
                    current.load_state_dict(state[attr])
                else:
                    setattr(self, attr, state[attr])

    # ------------------------------------------------------------- helpers
    def _require_setup(self):
        if self.schedule is None:
            raise ValueError(f"method {self.name!r}: call setup(num_classes=..., schedule=..., device=...) first")

    @property
    def null_class(self) -> int:
        return self.num_classes

    def noisy_batch(self, x: torch.Tensor, y: Optional[torch.Tensor], *, dropout: bool = False) -> Batch:
        """Attach fresh (t, eps) from the method's generator; with `dropout`, replace labels by the null
        class with probability `label_dropout` (so the model also learns unconditional predictions)."""
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(f"batch['x']: expected a tensor [B, C, H, W], got {getattr(x, 'shape', type(x))}")
        if y is not None:
            y = y.to(x.device).long()
            p = float(self.config["label_dropout"])
            if dropout and p > 0:
                drop = (torch.rand(y.shape[0], generator=self.generator) < p).to(y.device)
                y = torch.where(drop, torch.full_like(y, self.null_class), y)
        return make_batch(x, y, self.schedule, self.generator)

    def denoising_loss(self, model, batch: Batch) -> torch.Tensor:
        """Per-sample l_i = mean over pixels of (eps - eps_theta(x_t, t, y))^2 (SPEC section 1)."""
        pred = self.predict(model, batch)
        return (pred - batch["eps"]).pow(2).flatten(1).mean(1)

    def predict(self, model, batch: Batch, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        x_t = self.schedule.add_noise(batch["x"], batch["eps"], batch["t"])
        return predict_eps(model, x_t, batch["t"], batch.get("y") if y is None else y)

    def loss_fn(self, model, batch: Batch) -> torch.Tensor:
        """The per-sample loss handed to cdgfast.fisher (no label dropout)."""
        return self.denoising_loss(model, batch)

    def fresh_batches(self, data: Data, device=None, max_samples: Optional[int] = None) -> Callable[[], Iterator[Batch]]:
        """A callable returning a fresh iterable of batches with new (t, eps) on every call (the
        two-pass rank-1 estimate needs independent draws in each pass)."""
        source = reusable(data)

        def gen():
            seen = 0
            for x, y in source():
                if max_samples is not None and seen >= max_samples:
                    break
                if max_samples is not None:
                    x, y = x[:max_samples - seen], y[:max_samples - seen]
                seen += x.shape[0]
                dev = device if device is not None else self.device
                if dev is not None:
                    x, y = x.to(dev), y.to(dev)
                yield make_batch(x, y.long(), self.schedule, self.generator)

        return gen


def reusable(data: Data) -> Callable[[], Iterable]:
    """`data` (an iterable of (x, y), or a callable returning one) as a callable giving a fresh pass.
    A one-shot iterator is materialised once so that it can be traversed again."""
    if callable(data) and not hasattr(data, "__iter__"):
        return data
    if not hasattr(data, "__iter__"):
        raise ValueError(f"data: expected an iterable of (x, y) batches or a callable returning one, "
                         f"got {type(data).__name__}")
    if iter(data) is data:  # an iterator: can be read only once
        items = list(data)
        return lambda: items
    return lambda: data


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode with requires_grad False everywhere (a teacher)."""
    teacher = copy.deepcopy(model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
        p.grad = None
    return teacher


def params_of(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    params = trainable_parameters(model)
    if not params:
        raise ValueError("model: expected at least one trainable parameter, got none")
    return params


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    """Detached copy of the flat trainable parameter vector (SPEC section 1 order)."""
    return flatten_detached(params_of(model))


def flat_grads(model: torch.nn.Module) -> Optional[torch.Tensor]:
    params = params_of(model)
    if all(p.grad is None for p in params):
        return None
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def set_flat_grads(model: torch.nn.Module, flat: torch.Tensor) -> None:
    params = params_of(model)
    for p, g in zip(params, split_like(flat, params)):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def trainable_names(model: torch.nn.Module) -> List[str]:
    """Names of the trainable parameters, in the flat-vector order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def load_flat_params(model: torch.nn.Module, flat: torch.Tensor, names: List[str]) -> None:
    """Copy a flat vector into the parameters `names` of `model` (works on frozen copies too)."""
    params = [model.get_parameter(n) for n in names]
    with torch.no_grad():
        for p, v in zip(params, split_like(flat.to(params[0].device), params)):
            p.copy_(v)


__all__ = ["Method", "reusable", "frozen_copy", "params_of", "flat_params", "flat_grads", "set_flat_grads",
           "load_flat_params", "trainable_names", "flatten"]
