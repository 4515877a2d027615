"""Diffusion-classifier (DC) score methods (SPEC section 2.2): EWC with DC scores (`ewc_dc`) and Diffusion
Scores Consolidation (`dsc`).

DC scores `log p(c_k | x) = log_softmax_k(-err_k / tau)` come from `cdgfast.ops.dc.dc_scores` /
`dc_cross_entropy` on one batched forward over B x K conditions with a shared (t, eps) per sample.
Conditions are concept ids run through the method's `conditions` (`cdgfast.methods._conditions`): for
class-conditional models the prior concept c_0 is the null class (index `num_classes`) and both methods
train with label dropout p = 0.1 so that the null class is learned; on a text model (TextConditions) the
ids index the concepts' prompts ("a photo of a V*_n ..."), c_0 is the prior prompt (id `num_classes`)
and label dropout is off (`text_defaults`). The code below is the same for both.
"""
from __future__ import annotations

import itertools
from typing import Dict, List

import torch

from ..fisher import diag_fisher
from ..ops import bregman_distill, dc_cross_entropy, dc_errors, dc_scores
from ._conditions import condition_predictions
from ._hparams import count, nonneg, positive
from ._registry import register, register_composition
from .anchors import EWC
from .base import Method, TinyRun, flat_params, frozen_copy, load_flat_params, params_of, reusable, trainable_names


@register("ewc_dc", order=150)
class EWCDC(EWC):
    """Online EWC whose Fisher is the diagonal of mean_j grad L_ewc^j (grad L_ewc^j)^T, with the per-sample

        L_ewc^j = l_j + delta * sum_{i in C_k} (2 [i = n] - 1) * (-log p(c_i | x_j))

    (SPEC 2.2; `cdgfast.fisher.diag_fisher` on this per-sample loss). C_k = [null class, the sample's
    own (current) class, k - 2 classes of earlier tasks drawn without replacement] (fewer when fewer
    earlier classes exist); l_j is the denoising error on the sample's own class (in eps space, like the DC
    errors: `condition_predictions`). `lam` = 1e6 is the
    paper's weight for LoRA parameters; full-model runs usually need a smaller one."""

    defaults = {"lam": 1e6, "online": True, "gamma": 1.0, "k": 5, "delta": 0.5, "tau": 1.0, "label_dropout": 0.1}
    specs = {"k": count(2), "delta": nonneg(), "tau": positive()}  # k: the null class and the own class at least
    text_defaults = {"label_dropout": 0.0}
    tiny = TinyRun(config={"k": 3}, terms={"ewc_dc"}, needs={"class_labels", "null_class"})

    def previous_classes(self) -> List[int]:
        return [c for c in self.seen_classes if c not in self.current_classes]

    def conditions(self, y: torch.Tensor) -> torch.Tensor:
        """[B, K] condition labels: null, own class, then k - 2 earlier classes without replacement."""
        prev = torch.tensor(self.previous_classes(), dtype=torch.long)
        m = min(int(self.config["k"]) - 2, prev.numel())
        b = y.shape[0]
        cols = [torch.full((b,), self.null_class, dtype=torch.long), y.cpu().long()]
        if m > 0:
            order = torch.rand(b, prev.numel(), generator=self.generator).argsort(dim=1)[:, :m]
            cols.extend(prev[order].unbind(1))
        return torch.stack(cols, dim=1).to(y.device)

    def ewc_loss_fn(self, model, batch) -> torch.Tensor:
        """Per-sample L_ewc [B] (uses batch["cond"] [B, K]; column 1 is the sample's own class)."""
        cond = batch["cond"]
        pred = self.condition_predictions(model, batch, cond)
        logp = dc_scores(pred, batch["eps"], tau=float(self.config["tau"]))
        own = dc_errors(pred, batch["eps"])[:, 1]
        sign = -torch.ones(cond.shape[1], dtype=logp.dtype, device=logp.device)
        sign[1] = 1.0
        return own + float(self.config["delta"]) * (sign * (-logp)).sum(1)

    def fisher(self, model, data) -> torch.Tensor:
        base = self.fresh_batches(data, max_samples=self.config["fisher_max_samples"])

        def batches():
            for b in base():
                b["cond"] = self.conditions(b["y"])
                yield b

        # every sample's K condition rows are consecutive (repeat_interleave), so the hook path applies
        rows = 2 + min(int(self.config["k"]) - 2, len(self.previous_classes()))
        return diag_fisher(model, self.ewc_loss_fn, batches, rows_per_sample=rows, parallel=self.parallel,
                           progress=self.progress)


@register("dsc", order=160)
class DSC(Method):
    """Diffusion Scores Consolidation, run by the trainer as `post_task_phase` after each task (SPEC 2.2).

    The student (the model itself, so initialised from the task-n model) is trained for
    `iterations` steps (default `iteration_ratio` = 0.2 x the task's training iterations, counted by
    `loss`) on the task's data with its own Adam (`lr`) to minimise

        L_DSC = gamma (H(p_n, p_s) + H(p_j, p_s)) + lam (MSE(eps_n, eps_s) + MSE(eps_j, eps_s))

    with teachers: the frozen task-n model on c_n (the sample's class) and, per iteration, a previous
    task model j drawn uniformly (seeded) on c_j (a class of task j drawn per sample). DC scores over
    {null, c_n, c_j}: teachers at tau = 0.05 (`teacher_tau`), student at tau = 1 (`student_tau`);
    `cdgfast.ops.dc.dc_cross_entropy` with the teacher's probabilities as soft targets; MSE is the mean
    over pixels (`bregman_distill` without preconditioner). After the phase the consolidated model is
    stored as task n's model (flat copy of the trainable parameters: the LoRA weights for LoRA models).
    `teacher_history` lists the drawn j per iteration."""

    defaults = {"gamma": 0.1, "lam": 1.5, "teacher_tau": 0.05, "student_tau": 1.0, "iteration_ratio": 0.2,
                "iterations": None, "lr": 5e-4, "label_dropout": 0.1}
    specs = {"gamma": nonneg(), "lam": nonneg(), "teacher_tau": positive(), "student_tau": positive(),
             "iteration_ratio": positive(), "lr": positive(),
             "iterations": count(none=True, none_means="iteration_ratio x the task's steps")}
    text_defaults = {"label_dropout": 0.0}
    tiny = TinyRun(config={"iterations": 2}, needs={"class_labels", "null_class"})
    _state_attrs = ("task_models", "task_classes", "teacher_history")

    def __init__(self, **overrides):
        super().__init__(**overrides)
        self.task_models: List[torch.Tensor] = []
        self.task_classes: List[List[int]] = []
        self.teacher_history: List[int] = []
        self.last_terms: Dict[str, float] = {}

    def num_iterations(self) -> int:
        if self.config["iterations"] is not None:
            return int(self.config["iterations"])
        return max(1, int(round(float(self.config["iteration_ratio"]) * self.steps_in_task)))

    def dsc_terms(self, student, teacher_n, teacher_j, batch, c_j: torch.Tensor) -> Dict[str, torch.Tensor]:
        y = batch["y"]
        cond = torch.stack([torch.full_like(y, self.null_class), y, c_j], dim=1)  # {c_0, c_n, c_j}
        with torch.no_grad():
            eps_n = self.condition_predictions(teacher_n, batch, cond)
            eps_j = self.condition_predictions(teacher_j, batch, cond)
            p_n = dc_scores(eps_n, batch["eps"], tau=float(self.config["teacher_tau"])).exp()
            p_j = dc_scores(eps_j, batch["eps"], tau=float(self.config["teacher_tau"])).exp()
        eps_s = self.condition_predictions(student, batch, cond)
        tau_s = float(self.config["student_tau"])
        h = dc_cross_entropy(eps_s, batch["eps"], p_n, tau=tau_s) + dc_cross_entropy(eps_s, batch["eps"], p_j, tau=tau_s)
        mse = bregman_distill(eps_s[:, 1], eps_n[:, 1]) + bregman_distill(eps_s[:, 2], eps_j[:, 2])
        return {"dsc_ce": float(self.config["gamma"]) * h, "dsc_mse": float(self.config["lam"]) * mse}

    def post_task_phase(self, model, data):
        self._require_setup()
        if self.task_models:
            self._consolidate(model, data)
        self.task_models.append(flat_params(model))
        self.task_classes.append(list(self.current_classes))

    def _consolidate(self, model, data):
        from tqdm.auto import tqdm
        names = trainable_names(model)
        teacher_n = frozen_copy(model)
        teacher_j = frozen_copy(model)
        params = params_of(model)
        opt = torch.optim.Adam(params, lr=float(self.config["lr"]))
        source = reusable(data)
        stream = itertools.chain.from_iterable(source() for _ in itertools.count())
        iters = self.num_iterations()
        device = params[0].device
        empty_run = 0
        done = 0
        bar = tqdm(total=iters, desc="DSC", leave=False,
                   disable=not (self.progress and self.parallel.is_main) or iters < 50)
        while done < iters:
            x, y = next(stream)
            if x.shape[0] == 0:
                empty_run += 1
                if empty_run > 1000:
                    raise ValueError("data: expected non-empty (x, y) batches for the DSC phase")
                continue
            empty_run = 0
            x, y = x.to(device), y.to(device).long()
            j = int(torch.randint(0, len(self.task_models), (1,), generator=self.generator))
            self.teacher_history.append(j)
            load_flat_params(teacher_j, self.task_models[j], names)
            classes = torch.tensor(self.task_classes[j] or [self.null_class], dtype=torch.long)
            c_j = classes[torch.randint(0, classes.numel(), (y.shape[0],), generator=self.generator)].to(device)
            batch = self.noisy_batch(x, y)
            # Under torchrun every process draws the same global batch and noise (so the generator stays
            # in step) and keeps its own rows: the B x K DC-score forwards are sharded.
            *rows, c_j = self.parallel.rows(*batch.values(), c_j)
            batch = dict(zip(batch.keys(), rows))
            opt.zero_grad(set_to_none=True)
            if c_j.shape[0] > 0:
                terms = self.dsc_terms(model, teacher_n, teacher_j, batch, c_j)
                sum(terms.values()).backward()
                self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
            self.parallel.average_gradients(params)  # a process without rows contributes zero gradients
            opt.step()
            done += 1
            bar.update(1)
        bar.close()
        opt.zero_grad(set_to_none=True)


register_composition("dsc+ewc", "dsc", "ewc", order=200)
register_composition("dsc+ewc_dc", "dsc", "ewc_dc", order=210)


__all__ = ["EWCDC", "DSC", "condition_predictions"]
