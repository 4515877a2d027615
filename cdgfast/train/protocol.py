"""The resolved protocol of a run: the one place that turns a preset's ScaleConfig into what the run
uses, so that `--print-config` and the run read the same values.

The driver builds its model with `model_config`, its optimiser and learning-rate schedule with
`make_optimizer`, clips with `clip_gradients`, and its evaluator reads `evaluation_config`; `describe`
puts those same pieces (and every method's resolved hyperparameters) into the JSON that
`python -m cdgfast.train ... --print-config` prints. Nothing here reads data or builds a network.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from .presets import Preset, ScaleConfig

OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")
DDIM_SPACINGS = ("trailing", "leading", "linspace")
FID_PROTOCOLS = ("per_task", "seen_classes")
CLASS_ORDERS = ("sorted", "seeded")

# What every data set of the registry is, for a configuration printed without loading it: (classes,
# channels, native size). The loaders' real shapes win in a run (cdgfast.train.loop._load_inputs).
DATASET_SHAPES: Dict[str, tuple] = {
    "digits": (10, 1, 16), "mnist": (10, 1, 32), "fashion-mnist": (10, 1, 32), "cifar10": (10, 3, 32),
    "cifar100": (100, 3, 32), "flowers102": (102, 3, 32), "cub200": (200, 3, 32), "imagenet32": (1000, 3, 32),
    "imagefolder": (None, 3, 32),
}


def check_scale_config(sc: ScaleConfig) -> None:
    """ValueError naming the first field of `sc` the training loop or the evaluator could not honour."""
    def choice(name, value, options):
        if value not in options:
            raise ValueError(f"{name}: expected one of {list(options)}, got {value!r}")

    choice("optimizer", sc.optimizer, OPTIMIZERS)
    choice("lr_schedule", sc.lr_schedule, LR_SCHEDULES)
    choice("ddim_spacing", sc.ddim_spacing, DDIM_SPACINGS)
    choice("fid_protocol", sc.fid_protocol, FID_PROTOCOLS)
    choice("class_order", sc.class_order, CLASS_ORDERS)
    for name in ("lr", "weight_decay", "dropout"):
        v = getattr(sc, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
    if not 0 <= sc.dropout < 1:
        raise ValueError(f"dropout: expected a number in [0, 1), got {sc.dropout!r}")
    if not isinstance(sc.warmup_steps, int) or isinstance(sc.warmup_steps, bool) or sc.warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected an integer >= 0, got {sc.warmup_steps!r}")
    if sc.grad_clip is not None and (isinstance(sc.grad_clip, bool) or not isinstance(sc.grad_clip, (int, float))
                                     or not math.isfinite(sc.grad_clip) or sc.grad_clip <= 0):
        raise ValueError(f"grad_clip: expected a finite number > 0 or None, got {sc.grad_clip!r}")
    from .ema import check_ema_decay
    check_ema_decay(sc.ema_decay)
    if isinstance(sc.ddim_eta, bool) or not isinstance(sc.ddim_eta, (int, float)) or not 0 <= sc.ddim_eta <= 1:
        raise ValueError(f"ddim_eta: expected a number in [0, 1], got {sc.ddim_eta!r}")
    if isinstance(sc.guidance, bool) or not isinstance(sc.guidance, (int, float)) or not math.isfinite(sc.guidance) \
            or sc.guidance < 0:
        raise ValueError(f"guidance: expected a finite number >= 0 (1: no guidance), got {sc.guidance!r}")
    if sc.label_dropout is not None and (isinstance(sc.label_dropout, bool) or not isinstance(sc.label_dropout, (int, float))
                                         or not 0 <= sc.label_dropout < 1):
        raise ValueError(f"label_dropout: expected None or a probability in [0, 1), got {sc.label_dropout!r}")
    if sc.guidance != 1 and not sc.class_conditional:
        raise ValueError(f"guidance: classifier-free guidance ({sc.guidance}) needs a class-conditional model")
    if not isinstance(sc.class_conditional, bool):
        raise ValueError(f"class_conditional: expected True or False, got {sc.class_conditional!r}")
    if sc.channels not in (None, 1, 3):
        raise ValueError(f"channels: expected None (the data set's own), 1 or 3, got {sc.channels!r}")
    for name in ("fid_samples_per_task", "fid_samples_total"):
        v = getattr(sc, name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 2):
            raise ValueError(f"{name}: expected an integer >= 2 or None, got {v!r}")
    for m, b in sc.method_batch_size.items():
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise ValueError(f"method_batch_size: expected a positive integer for {m!r}, got {b!r}")
    if sc.fid_protocol == "seen_classes" and sc.fid_samples_total is None:
        raise ValueError("fid_samples_total: the seen_classes FID protocol needs a sample count")
    if sc.fid_protocol == "per_task" and not sc.class_conditional:
        raise ValueError("fid_protocol: an unconditional model cannot be sampled per task; use 'seen_classes'")


# ----------------------------------------------------------------------------------------- the model
def model_config(sc: ScaleConfig, *, num_classes: int, channels: int, image_size: int) -> dict:
    """The diffusers UNet2DModel configuration of the run (cdgfast.models.unet_config)."""
    from cdgfast.models import unet_config

    return unet_config(sc.unet, num_classes=num_classes, in_channels=channels, sample_size=image_size,
                       dropout=sc.dropout, class_conditional=sc.class_conditional)


def build_model(sc: ScaleConfig, *, num_classes: int, channels: int, image_size: int):
    from cdgfast.models.unet import build_unet

    return build_unet(sc.unet, num_classes=num_classes, in_channels=channels, sample_size=image_size,
                      dropout=sc.dropout, class_conditional=sc.class_conditional)


# -------------------------------------------------------------------------------------- the training
def lr_factor(step: int, total_steps: int, sc: ScaleConfig) -> float:
    """The multiplier of `sc.lr` at optimiser step `step` (0-based) of a task of `total_steps` steps:
    linear warm-up `step / warmup_steps` for the first `warmup_steps` steps, then 1 ("constant") or the
    half cosine `0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))` ("cosine"; diffusers'
    get_cosine_schedule_with_warmup, which CLoG uses)."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an integer >= 0, got {step!r}")
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps: expected a positive integer, got {total_steps!r}")
    w = sc.warmup_steps
    if step < w:
        return step / w
    if sc.lr_schedule == "constant":
        return 1.0
    progress = (step - w) / max(1, total_steps - w)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(params: List[torch.nn.Parameter], sc: ScaleConfig, total_steps: int):
    """(optimizer, scheduler or None) of one task: a fresh one every task, as the papers' code does.
    The scheduler is None for a constant lr without warm-up (today's loop, bit for bit)."""
    check_scale_config(sc)
    cls = torch.optim.AdamW if sc.optimizer == "adamw" else torch.optim.Adam
    kw = {"weight_decay": float(sc.weight_decay)} if (sc.weight_decay or sc.optimizer == "adamw") else {}
    opt = cls(params, lr=float(sc.lr), **kw)
    if sc.lr_schedule == "constant" and sc.warmup_steps == 0:
        return opt, None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(int(s), int(total_steps), sc))
    return opt, sched


def clip_gradients(params, sc: ScaleConfig) -> None:
    """Clip the global gradient norm to `sc.grad_clip` (nothing when None)."""
    if sc.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, float(sc.grad_clip))


def training_config(sc: ScaleConfig, methods: List[str]) -> dict:
    return {"optimizer": sc.optimizer, "lr": sc.lr, "weight_decay": sc.weight_decay,
            "lr_schedule": {"name": sc.lr_schedule, "warmup_steps": sc.warmup_steps,
                            "scope": "restarts every task (a fresh optimiser per task)"},
            "grad_clip": sc.grad_clip, "batch_size": sc.batch_size,
            "batch_size_per_method": {m: sc.batch_size_for(m) for m in methods},
            "epochs_per_task": sc.epochs_per_task, "steps_per_task": sc.steps_per_task,
            "first_task_steps": sc.first_task_steps, "max_train_per_class": sc.max_train_per_class,
            "dropout": sc.dropout,
            "ema": (None if sc.ema_decay is None else
                    {"decay": sc.ema_decay, "warmup": "min(decay, (1 + n) / (10 + n)) at update n",
                     "scope": "restarts every task; its weights replace the model's at the end of the task's "
                              "training (end_task, teacher, replay pool, evaluation and checkpoint use them)"})}


# ------------------------------------------------------------------------------------ the evaluation
def fid_samples_per_task(sc: ScaleConfig, classes_per_task: int) -> Optional[int]:
    """Class-balanced samples per task of the per_task protocol (None for seen_classes)."""
    if sc.fid_protocol != "per_task":
        return None
    return sc.fid_samples_per_task if sc.fid_samples_per_task is not None else sc.fid_samples_per_class * classes_per_task


def fid_labels(sc: ScaleConfig, task_classes: List[List[int]]) -> torch.Tensor:
    """The labels sampled for the per_task FID after the tasks `task_classes` (one list of classes per task
    seen): for every task its own `fid_samples_per_task` labels, class-balanced (counts differ by at most
    one), grouped by task and class. With the per-class count (fid_samples_per_task None) this is every
    class `fid_samples_per_class` times, in task order, as the evaluator always sampled."""
    from cdgfast.metrics import class_balanced_labels

    if sc.fid_protocol != "per_task":
        raise ValueError(f"fid_protocol: labels are sampled only by the per_task protocol, got {sc.fid_protocol!r}")
    if not task_classes:
        raise ValueError("task_classes: expected at least one task")
    return torch.cat([class_balanced_labels(c, fid_samples_per_task(sc, len(c))) for c in task_classes])


def evaluation_config(sc: ScaleConfig, *, classes_per_task: int) -> dict:
    """The evaluation protocol; "fid_backbone" is filled in by the caller from --fid / --inception
    (cdgfast.metrics.fid.resolve_fid_backbone), which needs the machine's files."""
    return {"fid_backbone": None,
            "fid_protocol": sc.fid_protocol,
            "fid_samples_per_task": fid_samples_per_task(sc, classes_per_task),
            "fid_samples_total": sc.fid_samples_total if sc.fid_protocol == "seen_classes" else None,
            "fid_real_per_class": sc.fid_real_per_class,
            "fid_reference": ("held-out images of each task's classes" if sc.fid_protocol == "per_task"
                              else "held-out images of every class seen so far"),
            "kld_samples": ("the per-task FID samples (class-balanced, conditional)" if sc.fid_protocol == "per_task"
                            else "the unconditional FID samples"),
            "sampler": "ddim", "sampler_steps": sc.ddim_steps, "ddim_spacing": sc.ddim_spacing, "ddim_eta": sc.ddim_eta,
            "guidance": sc.guidance,
            "classifier_epochs": sc.classifier_epochs, "class_conditional": sc.class_conditional}


def describe(*, preset: Preset, scale: str, sc: ScaleConfig, methods: List[str], dataset: str,
             method_configs: Dict[str, dict], num_tasks: int, classes_per_task: int) -> dict:
    """The `--print-config` JSON: preset, scale, data, model, training, evaluation, methods."""
    check_scale_config(sc)
    num_classes, native_channels, native_size = DATASET_SHAPES.get(dataset, (None, 3, 32))
    channels = sc.channels or native_channels
    size = sc.image_size or native_size
    model = {"unet": sc.unet, "class_conditional": sc.class_conditional}
    if num_classes is not None:
        model["diffusers_config"] = model_config(sc, num_classes=num_classes, channels=channels, image_size=size)
    return {
        "preset": preset.name, "scale": scale,
        "data": {"dataset": dataset, "image_size": size, "channels": channels, "num_classes": num_classes,
                 "num_tasks": num_tasks, "classes_per_task": classes_per_task, "class_order": sc.class_order},
        "model": model,
        "training": training_config(sc, methods),
        "evaluation": evaluation_config(sc, classes_per_task=classes_per_task),
        "methods": {m: method_configs[m] for m in methods},
        "paper": {"source": preset.paper_source, "metric": preset.paper_metric},
    }


__all__ = ["OPTIMIZERS", "LR_SCHEDULES", "DDIM_SPACINGS", "FID_PROTOCOLS", "CLASS_ORDERS", "check_scale_config",
           "model_config", "build_model", "lr_factor", "make_optimizer", "clip_gradients", "training_config",
           "fid_samples_per_task", "fid_labels", "evaluation_config", "describe"]
