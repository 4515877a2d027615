"""Distillation from a frozen previous model: KD and generative distillation GD (SPEC section 2).

The squared-error distillation term is `cdgfast.ops.bregman.bregman_distill` with no preconditioner
(mean over batch and pixels of (student - teacher)^2, i.e. plain KD).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..data import generate_replay_pool
from ..ops import bregman_distill
from ..sampling import ddim_sample
from ._hparams import HP, count, flag, nonneg
from ._mixins import Teacher
from ._registry import register
from .base import TinyRun, with_replay


@register("kd", order=40)
class KD(Teacher):
    """`lam * mean((eps_theta(x_t) - eps_old(x_t))^2)` on the current inputs (same x_t, t, y as the
    task loss, so one student forward serves both)."""

    defaults = {"lam": 1.0}
    specs = {"lam": nonneg()}
    owns_task_loss = True
    tiny = TinyRun(terms={"kd"}, frozen=("teacher",))

    def step_terms(self, model, batch) -> Dict[str, torch.Tensor]:
        nb = self.noisy_batch(batch["x"], batch.get("y"), dropout=True)
        pred = self.predict(model, nb)
        terms = {"task": self.task_loss(model, nb, pred)}
        if self.teacher is not None:
            with torch.no_grad():
                target = self.predict(self.teacher, nb)
            terms["kd"] = float(self.config["lam"]) * bregman_distill(pred, target)
        return terms


@register("gd", order=90)
class GD(Teacher):
    """Generative distillation: replayed `xr` from the frozen previous model (DDIM, eta = 0), the task
    loss over `concat(current, replay)` and `lam_gd * mean((eps_theta(xr_t, t, yr) - eps_old(xr_t, t, yr))^2)`
    at the replay samples' random timesteps (one student forward serves both terms).

    replay="pool": after each task a class-balanced pool of `pool_per_class` samples for every class
    seen so far is generated with `cdgfast.data.generate_replay_pool` (`pool_steps` DDIM steps, 50 by
    default; the rank-1 paper uses 5000 per class, the small default suits CPU runs).
    replay="online": `online_steps` (2) DDIM steps per training step with `cdgfast.sampling.ddim_sample`.
    `replay_batch` replayed samples per step (None: as many as the current batch).
    `replay_eta` (0: DDIM; 1: DDPM-like stochastic steps) and `replay_guidance` (1: none; s > 1:
    classifier-free guidance, which needs `label_dropout` > 0 so that the null class is trained) are the
    replay sampler's, for the pool and online replay alike (the papers: 0 and 1).

    weighting="uniform" (default): task loss over the concatenated rows (current and replayed, when
    `replay_in_task_loss`) + `lam_gd * distill`. weighting="task_fraction" (the generative-distillation
    paper, at task k with k earlier tasks): `1/(k+1) * task loss of the current rows + k/(k+1) *
    (lam_gd * distill [+ the replayed rows' task loss, when replay_in_task_loss])`. With
    `replay_in_task_loss=False` the replayed rows are trained only towards the teacher's eps (the
    distillation); generative replay (`gr`, lam_gd = 0) keeps them in the task loss, against the true noise.
    """

    defaults = {"lam_gd": 1.0, "replay": "pool", "pool_per_class": 32, "pool_steps": 50, "online_steps": 2,
                "replay_batch": None, "pool_batch_size": 256, "weighting": "uniform", "replay_in_task_loss": True,
                "replay_eta": 0.0, "replay_guidance": 1.0}
    specs = {"lam_gd": nonneg(), "replay": HP("choice", choices=("pool", "online")), "pool_per_class": count(),
             "pool_steps": count(), "online_steps": count(),
             "replay_batch": count(none=True, none_means="as many as the current batch"), "pool_batch_size": count(),
             "weighting": HP("choice", choices=("uniform", "task_fraction")), "replay_in_task_loss": flag(),
             "replay_eta": HP("float", lo=0.0, hi=1.0), "replay_guidance": nonneg()}
    owns_task_loss = True
    tiny = TinyRun(config={"pool_per_class": 3, "pool_steps": 2}, terms={"gd"}, frozen=("teacher",))
    _state_attrs = ("pool_x", "pool_y")

    def __init__(self, **overrides):
        super().__init__(**overrides)
        if self.config["replay_guidance"] != 1.0 and self.config["label_dropout"] == 0.0:
            raise ValueError(f"replay_guidance: {self.config['replay_guidance']} guides the replay towards the null "
                             f"class, which a model trained with label_dropout = 0 never learned; set label_dropout "
                             f"> 0 (0.1 is usual) or replay_guidance = 1")
        self.pool_x: Optional[torch.Tensor] = None
        self.pool_y: Optional[torch.Tensor] = None

    def end_task(self, model, data):
        super().end_task(model, data)  # seen_classes updated, teacher frozen
        if self.config["replay"] == "pool":
            device = next(model.parameters()).device
            x, y = generate_replay_pool(self.teacher, list(self.seen_classes), int(self.config["pool_per_class"]),
                                        schedule=self.schedule, num_steps=int(self.config["pool_steps"]),
                                        batch_size=int(self.config["pool_batch_size"]),
                                        seed=int(self.config["seed"]) + 1000 * (self.task_index + 1),
                                        device=device, parallel=self.parallel, progress=self.progress,
                                        eta=float(self.config["replay_eta"]),
                                        guidance=float(self.config["replay_guidance"]))
            self.pool_x, self.pool_y = x.detach().cpu(), y.detach().cpu().long()

    def replay(self, n: int, like: torch.Tensor):
        """(xr, yr) on the device of `like`, or None before the first task has ended."""
        if self.teacher is None:
            return None
        if self.config["replay"] == "pool":
            idx = torch.randint(0, self.pool_x.shape[0], (n,), generator=self.generator)
            return self.pool_x[idx].to(like), self.pool_y[idx].to(like.device)
        classes = torch.tensor(self.seen_classes, dtype=torch.long)
        yr = classes[torch.randint(0, len(classes), (n,), generator=self.generator)].to(like.device)
        xr = ddim_sample(self.teacher, yr, schedule=self.schedule, num_steps=int(self.config["online_steps"]),
                         generator=self.generator, eta=float(self.config["replay_eta"]),
                         guidance=float(self.config["replay_guidance"]))
        return xr.to(like), yr

    def step_terms(self, model, batch) -> Dict[str, torch.Tensor]:
        x, y = batch["x"], batch["y"].long()
        b = x.shape[0]
        rep = self.replay(int(self.config["replay_batch"] or b), x)
        nb = self.noisy_batch(*with_replay(x, y, rep), dropout=True)
        if rep is None:
            return {"task": self.task_loss(model, nb)}
        pred = self.predict(model, nb)
        current = {k: v[:b] for k, v in nb.items()}
        replayed = {k: v[b:] for k, v in nb.items()}
        in_task = bool(self.config["replay_in_task_loss"])
        if self.config["weighting"] == "uniform":
            w_replay = 1.0
            task = self.task_loss(model, nb, pred) if in_task else self.task_loss(model, current, pred[:b])
        else:  # task_fraction: task k (0-based) has k earlier tasks behind it
            k = self.task_index
            w_data, w_replay = 1.0 / (k + 1), k / (k + 1)
            task = w_data * self.task_loss(model, current, pred[:b])
            if in_task:
                task = task + w_replay * self.task_loss(model, replayed, pred[b:])
        terms = {"task": task}
        with torch.no_grad():
            target = self.predict(self.teacher, replayed)
        terms["gd"] = w_replay * float(self.config["lam_gd"]) * bregman_distill(pred[b:], target)
        return terms


__all__ = ["KD", "GD"]
