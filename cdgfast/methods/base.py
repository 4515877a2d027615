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

A method class is registered with `cdgfast.methods.register("name")` and declares, next to its
`defaults` and `specs`, a `tiny` TinyRun: how the generic tests run it (DEVELOPING.md, "How to add a
method").
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch

from ..params import assign_grads_, flatten, flatten_detached, load_flat_, require_trainable, trainable_named
from ..params import flat_grads as _flat_grads
from ..diffusion import Batch, NoiseSchedule, as_schedule, make_batch
from ..parallel import LOCAL, DataParallel
from ..parallel import resolve as resolve_parallel
from ._conditions import ClassConditions, condition_predictions
from ._hparams import HP, count, merged_defaults, probability, validate_config

Data = Any  # iterable of (x, y), or a callable returning a fresh iterable


@dataclass(frozen=True)
class TinyRun:
    """How the generic tests (tests/test_methods.py) run a method in about a second on the CPU; every
    registered method declares one as its class attribute `tiny` (a test fails for one that does not).

    config: hyperparameters that make it small (a smaller buffer, pool, rank, fewer iterations).
    terms: the names of the method's own loss terms once there is something to consolidate (the second
      task), besides "task".
    frozen: the attributes that hold frozen modules (teachers) after a task; the tests check that no
      gradient reaches them.
    needs: what the model must offer, from NEEDS: "class_labels" (a class-conditional model),
      "null_class" (the unconditional class `num_classes`: label dropout, DC scores), "attention" (the
      attention projections LoRA adapts), "mid_block" (a diffusers `mid_block`), "text" (a text-conditional
      UNet2DConditionModel with `TextConditions`: the method runs only there; tests/test_methods_text.py)."""

    NEEDS = ("class_labels", "null_class", "attention", "mid_block", "text")

    config: Mapping[str, Any] = field(default_factory=dict)
    terms: FrozenSet[str] = frozenset()
    frozen: Tuple[str, ...] = ()
    needs: FrozenSet[str] = frozenset({"class_labels"})

    def __post_init__(self):
        if not isinstance(self.config, Mapping) or not all(isinstance(k, str) for k in self.config):
            raise ValueError(f"config: expected a mapping of hyperparameter names to values, got {self.config!r}")
        for what in ("terms", "frozen", "needs"):
            value = getattr(self, what)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{what}: expected a collection of names, got {value!r}")
        unknown = sorted(set(self.needs) - set(self.NEEDS))
        if unknown:
            raise ValueError(f"needs: expected names from {list(self.NEEDS)}, got {unknown}")
        object.__setattr__(self, "config", dict(self.config))  # frozen dataclass: its own fields, once
        object.__setattr__(self, "terms", frozenset(self.terms))
        object.__setattr__(self, "frozen", tuple(self.frozen))
        object.__setattr__(self, "needs", frozenset(self.needs))


class Method:
    """Base class: plain denoising loss, no consolidation (`finetune` is this class registered).

    Subclasses are registered with `@register("name")` (which sets `name`), set `defaults` (their
    hyperparameters; `create(name, **overrides)` may change any of them, an unknown key is a
    ValueError), `specs` (one `_hparams.HP` per key of `defaults`: the values it accepts; a bad value
    is a ValueError naming the key and the valid range), `tiny` (a TinyRun for the generic tests), and
    override the hooks they need. Methods whose loss is "task loss + penalty terms" implement
    `extra_terms`; methods that change the task loss itself (replay, distillation on the same
    forward) set `owns_task_loss = True` and override `step_terms` (`loss` does the opening every
    step shares, then calls it).
    """

    name: str = "base"
    defaults: Dict[str, Any] = {"seed": 0, "label_dropout": 0.0}
    specs: Dict[str, HP] = {"seed": count(0), "label_dropout": probability()}
    tiny: Optional[TinyRun] = None
    # Hyperparameters that differ on text-to-image models (SPEC 2.3: the DC-score paper's settings), merged
    # with the bases' like `defaults`; `cdgfast.methods.text_config(name)` gives them. The class-conditional
    # defaults are not changed by them.
    text_defaults: Dict[str, Any] = {}
    owns_task_loss: bool = False
    # True when `end_task` only prepares the next task (a Fisher, an anchor, a teacher, a replay pool or
    # buffer) and leaves the model as it is: after the last task `end_last_task` then does only the
    # bookkeeping (nothing would use the rest; at ImageNet32 scale a replay pool is 1.3M samples). False
    # (the safe default) for a method whose end_task changes the model (the LoRA methods merge).
    prepares_next_task: bool = False
    # Attributes saved by the generic state_dict (tensors, numbers, lists, dicts of those, and objects with
    # state_dict / load_state_dict such as modules); a class's own tuple adds to its bases'.
    _state_attrs: Tuple[str, ...] = ()

    def __init__(self, **overrides):
        merged = merged_defaults(type(self))
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
        self.parallel: DataParallel = LOCAL
        self.progress = False
        self.conditioning = ClassConditions()
        self.global_batches = False  # shard_batches(): noise drawn for the global batch, this block kept

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, config={self.config})"

    # ------------------------------------------------------------------ hooks
    def setup(self, *, num_classes: int, schedule: Optional[NoiseSchedule] = None, device=None,
              parallel: Optional[DataParallel] = None, progress: bool = False, conditions=None) -> None:
        """conditions: what a condition is (`cdgfast.methods._conditions`): None for class labels (the
        prior concept is the null class `num_classes`), or a `TextConditions` (prompts of the
        `num_classes` concepts and a prior prompt, for a UNet2DConditionModel).
        parallel: the data-parallel context (`cdgfast.parallel`; None: one process) handed to the
        estimators and the replay pool, and used by a method's own optimisation loop (`rows`,
        `average_gradients`). progress: show the bars of the end-of-task work (off: library code is
        quiet; the driver passes its --progress setting). schedule: a NoiseSchedule, a diffusers
        scheduler (DDPMScheduler, ...: `cdgfast.diffusion.as_schedule`; its prediction_type decides
        what the model is trained to predict), or None (the default NoiseSchedule)."""
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")
        if schedule is not None:
            schedule = as_schedule(schedule)
        if not isinstance(progress, bool):
            raise ValueError(f"progress: expected True or False, got {progress!r}")
        if conditions is not None and not isinstance(conditions, ClassConditions):
            raise ValueError(f"conditions: expected None or a cdgfast.methods TextConditions / ClassConditions, "
                             f"got {type(conditions).__name__}")
        conditions = (conditions or ClassConditions()).bind(num_classes)
        conditions.check_method(self)
        self.conditioning = conditions
        self.parallel = resolve_parallel(parallel)
        self.progress = progress
        self.num_classes = num_classes
        self.schedule = schedule or NoiseSchedule()
        self.device = torch.device(device) if device is not None else None

    def shard_batches(self, enabled: bool = True) -> "Method":
        """Data-parallel training whose processes each pass `loss` their block of a global batch: block
        `parallel.rank` of `parallel.world_size` equal consecutive blocks (Accelerate's
        `split_batches=True`). The method then draws label dropout and (t, eps) for the whole global
        batch, identically on every process (the generators stay in step: same seed, same draws), and
        keeps its block, so each sample gets the noise it gets in one process and the averaged gradient
        is the one-process gradient (examples/accelerate_loop.py). Methods that draw replayed samples
        per step (er, agem, gd, ccd) are refused. Off by default: then noise is drawn for the rows given
        (the driver gives every rank its own stream instead). Returns the method."""
        if not isinstance(enabled, bool):
            raise ValueError(f"enabled: expected True or False, got {enabled!r}")
        members = getattr(self, "members", None) or [self]
        drawing = [m.name for m in members if hasattr(m, "replay")]
        if enabled and drawing:
            raise ValueError(f"shard_batches: {drawing} draw replayed samples per step, which are not split by "
                             f"global batch; use a penalty method (l2, ewc, rank1, diag, ...) or the driver")
        for m in members:
            m.global_batches = enabled
        return self

    def begin_task(self, model: torch.nn.Module, task=None) -> None:
        self._require_setup()
        self.task = task
        self.task_index += 1
        classes = list(getattr(task, "classes", []) or [])
        self.current_classes = [int(c) for c in classes]
        self.steps_in_task = 0
        self.conditioning.begin_task(task)
        self.restore_pending(model)

    def trainable_parameters(self, model: torch.nn.Module) -> List[torch.nn.Parameter]:
        """What a trainer optimises after `begin_task`: the model's trainable parameters and the
        conditions' (a text model's current modifier token)."""
        own = [p for p in model.parameters() if p.requires_grad]
        return own + [p for p in self.conditioning.trainable_parameters() if all(p is not q for q in own)]

    def loss(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The named loss terms of one training step on the clean `batch` (always with "task")."""
        self.start_step(model)
        return self.step_terms(model, batch)

    def start_step(self, model: torch.nn.Module) -> None:
        """What every step starts with: the setup check, the state that waits for the model (a teacher
        after load_state_dict), the step count."""
        self._require_setup()
        self.restore_pending(model)
        self.steps_in_task += 1

    def step_terms(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The terms after `start_step`: the task loss of the batch plus `extra_terms`. Methods that own
        the task loss (`owns_task_loss`) override this."""
        nb = self.noisy_batch(batch["x"], batch.get("y"), dropout=True)
        terms = {"task": self.task_loss(model, nb)}
        terms.update(self.extra_terms(model, batch))
        return terms

    def restore_pending(self, model: torch.nn.Module) -> None:
        """Rebuild loaded state that needs the model (a frozen copy): nothing here; the mixins that keep
        such state extend it. Runs in begin_task and at the start of every step."""

    def extra_terms(self, model: torch.nn.Module, batch) -> Dict[str, torch.Tensor]:
        """Terms added to another member's task loss (penalties). The base method adds none."""
        return {}

    def _projection_terms(self, model: torch.nn.Module, penalty, weights) -> Dict[str, torch.Tensor]:
        """`lam * penalty(params, self.anchors, self.directions, weights)` once an anchor exists: the
        extra term of the projection-penalty methods (rank1 with its c_k, rankk with its eigenvalues)."""
        if getattr(self, "anchors", None) is None:
            return {}
        pen = penalty(params_of(model), self.anchors, self.directions, weights)
        return {self.name: float(self.config["lam"]) * pen}

    def before_step(self, model: torch.nn.Module) -> None:
        pass

    def after_step(self, model: torch.nn.Module) -> None:
        pass

    def end_task(self, model: torch.nn.Module, data: Data) -> None:
        self._require_setup()
        self.conditioning.end_task()  # a modifier token is fixed from here on
        for c in self.current_classes:
            if c not in self.seen_classes:
                self.seen_classes.append(c)

    def end_last_task(self, model: torch.nn.Module, data: Data) -> None:
        """The end of the run's last task: `end_task`, or, when that only prepares the next task
        (`prepares_next_task`), only the base bookkeeping (the seen classes)."""
        if self.prepares_next_task:
            Method.end_task(self, model, data)
        else:
            self.end_task(model, data)

    def post_task_phase(self, model: torch.nn.Module, data: Data) -> None:
        pass

    def restore_model_structure(self, model: torch.nn.Module) -> None:
        """Give a freshly built model the structure this method gives it while training (the LoRA methods
        add their adapter), so that the state_dict of a model it trained loads into it: how a checkpoint
        is resumed without pickling the module. Nothing to do here."""

    # --------------------------------------------------------------- state
    @classmethod
    def state_attrs(cls) -> Tuple[str, ...]:
        """Every `_state_attrs` of the class and its bases, bases first, without repeats."""
        out: List[str] = []
        for klass in reversed(cls.__mro__):
            for attr in klass.__dict__.get("_state_attrs", ()):
                if attr not in out:
                    out.append(attr)
        return tuple(out)

    def state_dict(self) -> Dict[str, Any]:
        state = {"task_index": self.task_index, "seen_classes": list(self.seen_classes),
                 "current_classes": list(self.current_classes), "steps_in_task": self.steps_in_task,
                 "generator": self.generator.get_state(), "config": dict(self.config)}
        for attr in self.state_attrs():
            value = getattr(self, attr, None)
            state[attr] = value.state_dict() if hasattr(value, "state_dict") else value
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.task_index = state["task_index"]
        self.seen_classes = list(state["seen_classes"])
        self.current_classes = list(state["current_classes"])
        self.steps_in_task = state["steps_in_task"]
        self.generator.set_state(state["generator"])
        for attr in self.state_attrs():
            if attr in state:
                self.load_state_attr(attr, state[attr])

    def save(self, directory, model: Optional[torch.nn.Module] = None) -> None:
        """Write this method's consolidated state (`state_dict()`: anchors, Fisher terms, buffers, teacher,
        LoRA deltas, generator, counters) and its hyperparameters to `directory` without pickle:
        `state.safetensors` (the tensors) + `state.json` (everything else, and which method it is;
        `cdgfast.serialization.save_state_dir`). With `model`, also its trainable parameters by name in
        `trainable.safetensors` (for a LoRA model: the adapter, the weights the state protects).
        `cdgfast.methods.load(directory)` (or `<Class>.load`) rebuilds the method."""
        from ..serialization import save_state_dir

        save_state_dir(directory, {"config": dict(self.config), "state": self.state_dict()},
                       info={"method": self.name, "num_classes": getattr(self, "num_classes", None)})
        if model is not None:
            from safetensors.torch import save_file

            names, params = trainable_named(model)
            save_file({n: p.detach().cpu().contiguous() for n, p in zip(names, params)},
                      str(Path(directory) / TRAINABLE_FILE))

    @classmethod
    def load(cls, directory, model: Optional[torch.nn.Module] = None) -> "Method":
        """The method saved by `save` in `directory` (this class's, else a ValueError; for any registered
        name or composition use `cdgfast.methods.load`). Call `setup(...)` before using it; its state
        waits for the model where it needs one (a teacher is rebuilt at the next begin_task or step).
        With `model`, the saved trainable parameters are copied into it first (`load_trainable`)."""
        from ..serialization import load_state_dir

        obj, info = load_state_dir(directory)
        if info.get("method") != cls.name:
            raise ValueError(f"directory: {directory} holds the state of method {info.get('method')!r}, not "
                             f"{cls.name!r} (use cdgfast.methods.load)")
        method = cls(**obj["config"])
        method.load_state_dict(obj["state"])
        if model is not None:
            load_trainable(model, directory)
        return method

    def load_state_attr(self, attr: str, saved: Any) -> None:
        """Restore one attribute of `state_attrs()`: into the object it holds when that has
        load_state_dict (a module), else the saved value itself. Mixins whose objects must be built
        first (a buffer) or need the model (a teacher) extend this."""
        current = getattr(self, attr, None)
        if saved is not None and hasattr(current, "load_state_dict"):
            current.load_state_dict(saved)
        else:
            setattr(self, attr, saved)

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
        if self.global_batches and self.parallel.enabled:
            return self._global_noisy_block(x, y, dropout)
        if y is not None:
            y = y.to(x.device).long()
            p = float(self.config["label_dropout"])
            if dropout and p > 0:
                drop = (torch.rand(y.shape[0], generator=self.generator) < p).to(y.device)
                y = torch.where(drop, torch.full_like(y, self.null_class), y)
        return make_batch(x, y, self.schedule, self.generator)

    def _global_noisy_block(self, x: torch.Tensor, y: Optional[torch.Tensor], dropout: bool) -> Batch:
        """noisy_batch's draws for the global batch of world_size blocks like `x` (in make_batch's order:
        dropout, t, eps), this rank's block of them (`shard_batches`)."""
        n, w, r = x.shape[0], self.parallel.world_size, self.parallel.rank
        block = slice(r * n, (r + 1) * n)
        g = self.generator
        if y is not None:
            y = y.to(x.device).long()
            p = float(self.config["label_dropout"])
            if dropout and p > 0:
                drop = (torch.rand(n * w, generator=g) < p)[block].to(y.device)
                y = torch.where(drop, torch.full_like(y, self.null_class), y)
        t = torch.randint(0, self.schedule.num_timesteps, (n * w,), generator=g, device=g.device)[block]
        eps = torch.randn((n * w, *x.shape[1:]), generator=g, dtype=x.dtype, device=g.device)[block]
        batch = {"x": x, "t": t.to(x.device), "eps": eps.to(x.device)}
        if y is not None:
            batch["y"] = y
        return batch

    def task_loss(self, model, batch: Batch, pred: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The "task" term on a noisy batch: the mean of the per-sample denoising losses. With `pred`
        (the model's prediction on `batch`, computed once because a distillation term reuses it) the
        mean squared error over every element: the same value for equal-sized samples, each reduction
        kept as it was so that results stay bit-identical."""
        if pred is None:
            return self.denoising_loss(model, batch).mean()
        return (pred - self.target(batch)).pow(2).mean()

    def denoising_loss(self, model, batch: Batch) -> torch.Tensor:
        """Per-sample l_i = mean over pixels of (eps - eps_theta(x_t, t, y))^2 (SPEC section 1); for a
        v / sample prediction schedule the same with that target (`target`)."""
        pred = self.predict(model, batch)
        return (pred - self.target(batch)).pow(2).flatten(1).mean(1)

    def target(self, batch: Batch) -> torch.Tensor:
        """What the model is trained to output on `batch`: batch["eps"] itself for epsilon prediction,
        v or x0 otherwise (`NoiseSchedule.target`)."""
        return self.schedule.target(batch["x"], batch["eps"], batch["t"])

    def predict(self, model, batch: Batch, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The model output on the noisy batch, in the schedule's prediction type (eps, v or x0)."""
        x_t = self.schedule.add_noise(batch["x"], batch["eps"], batch["t"])
        return self.conditioning.predict(model, x_t, batch["t"], batch.get("y") if y is None else y)

    def condition_predictions(self, model, batch: Batch, cond: torch.Tensor) -> torch.Tensor:
        """eps_theta(x_t, t, c) for the K conditions `cond` [B, K] of every sample (concept ids; the prior
        is `null_class`) in one batched forward, in eps space (`cdgfast.methods._conditions.condition_predictions`)."""
        return condition_predictions(model, batch, cond, self.schedule, conditions=self.conditioning)

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


TRAINABLE_FILE = "trainable.safetensors"


def load_trainable(model: torch.nn.Module, directory) -> None:
    """Copy the trainable parameters `Method.save(directory, model=...)` wrote into `model`'s parameters
    of the same names (a LoRA model needs its adapter first: `cdgfast.models.lora.add_lora`). Names or
    shapes that do not match are a ValueError."""
    from safetensors.torch import load_file

    path = Path(directory) / TRAINABLE_FILE
    if not path.is_file():
        raise ValueError(f"directory: {directory} has no {TRAINABLE_FILE} (saved without model=)")
    saved = load_file(str(path))
    params = dict(model.named_parameters())
    missing = sorted(set(saved) - set(params))
    if missing:
        raise ValueError(f"model: has no parameters {missing[:3]} that {path} holds (add the adapter first?)")
    with torch.no_grad():
        for n, t in saved.items():
            if params[n].shape != t.shape:
                raise ValueError(f"model: parameter {n} has shape {tuple(params[n].shape)}, {path} holds "
                                 f"{tuple(t.shape)}")
            params[n].copy_(t)


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
    """The model's trainable parameters (at least one): `cdgfast.params.require_trainable`."""
    return require_trainable(model)


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    """Detached copy of the flat trainable parameter vector (SPEC section 1 order)."""
    return flatten_detached(params_of(model))


def flat_grads(model: torch.nn.Module) -> Optional[torch.Tensor]:
    """The flat gradient of the trainable parameters (None when no parameter has one)."""
    params = params_of(model)
    if all(p.grad is None for p in params):
        return None
    return _flat_grads(params)


def set_flat_grads(model: torch.nn.Module, flat: torch.Tensor) -> None:
    assign_grads_(params_of(model), flat)


def trainable_names(model: torch.nn.Module) -> List[str]:
    """Names of the trainable parameters, in the flat-vector order."""
    return trainable_named(model)[0]


def load_flat_params(model: torch.nn.Module, flat: torch.Tensor, names: List[str]) -> None:
    """Copy a flat vector into the parameters `names` of `model` (works on frozen copies too)."""
    load_flat_([model.get_parameter(n) for n in names], flat)


def with_replay(x: torch.Tensor, y: torch.Tensor, rep: Optional[Tuple[torch.Tensor, torch.Tensor]]):
    """The current batch followed by the replayed samples `rep` = (xr, yr) (as x's dtype and device,
    labels long), or the current batch when there is nothing to replay (None)."""
    if rep is None:
        return x, y
    return torch.cat([x, rep[0].to(x)]), torch.cat([y.long(), rep[1].to(y.device).long()])


__all__ = ["Method", "TinyRun", "load_trainable", "with_replay", "reusable", "frozen_copy", "params_of", "flat_params",
           "flat_grads", "set_flat_grads", "load_flat_params", "trainable_names", "flatten"]
