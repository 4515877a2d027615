"""Continual Consistency Diffusion (CCD): `alpha L_IKC + beta L_UKC + gamma L_LKC` with the task loss over
`concat(current, buffer)` (SPEC section 2.1).

RECONSTRUCTION: the CCD paper's text lost Eq. 5-12; the three losses below are the documented
reconstruction of SPEC section 2.1, not the paper's verbatim formulas.

- L_IKC (inter-task knowledge consistency): Bregman-preconditioned distillation of the conditional noise
  prediction, `cdgfast.ops.bregman.bregman_distill(student, teacher, precond=h, kappa)` with
  `h = cdgfast.ops.bregman.hutchinson_metric(eps_teacher(., t, y), x_t)` (one-probe Hutchinson estimate
  of diag(J^T J) of the teacher w.r.t. x_t), over current and buffer samples.
- L_UKC (unconditional knowledge consistency): reverse means with the null class,
  `m(x_t) = (x_t - beta_t / sqrt(1 - abar_t) eps(x_t, t, null)) / sqrt(alpha_t)`,
  `L_UKC = mean_i w(t_i) mean_pixels (m_teacher - m_student)^2`, `w(t) = 4 abar_t (1 - abar_t)`; equal to an
  eps-MSE with per-t weight `w(t) beta_t^2 / (alpha_t (1 - abar_t))` (tests check it).
- L_LKC (label knowledge consistency): a linear label regressor on mean-pooled `model.mid_block` features
  of the null-class forward (the null class keeps the label out of the features), trained with
  cross-entropy on the true labels by its own Adam optimizer inside `loss` (on detached features, so it
  does not move the UNet); `L_LKC = KL(softmax(r_old(h_old)/T) || softmax(r(h)/T))` (batch mean, no T^2
  factor), gradients reach the UNet through h (the regressor weights are detached in this term).

Prediction types (`schedule.prediction_type`): the task loss and L_IKC compare model outputs in the
model's own parameterisation (eps, v or x0; the teacher predicts the same kind); L_UKC's reverse means are
formulas in eps, so the null-class outputs are converted to eps first (`NoiseSchedule.eps_from_prediction`).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..diffusion import NoiseSchedule, as_schedule, predict_eps
from ..ops import bregman_distill, hutchinson_metric
from ._hparams import nonneg, positive
from ._mixins import Buffered, Teacher
from ._registry import register
from .base import Method, TinyRun, frozen_copy, with_replay


def reverse_mean(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """DDPM reverse mean m(x_t) = (x_t - beta_t / sqrt(1 - abar_t) * eps) / sqrt(alpha_t) (`eps`: an eps
    prediction; `schedule`: a NoiseSchedule or a diffusers scheduler)."""
    schedule = as_schedule(schedule)
    beta = schedule.gather(schedule.betas, t, x_t)
    alpha = schedule.gather(schedule.alphas, t, x_t)
    abar = schedule.gather(schedule.alphas_cumprod, t, x_t)
    return (x_t - beta / (1 - abar).sqrt() * eps) / alpha.sqrt()


def ukc_loss(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps_teacher: torch.Tensor,
             eps_student: torch.Tensor) -> torch.Tensor:
    """L_UKC (reconstruction, SPEC 2.1): mean over samples of w(t) * mean over pixels of
    (m_teacher - m_student)^2 with w(t) = 4 abar_t (1 - abar_t). The predictions are eps predictions."""
    schedule = as_schedule(schedule)
    abar = schedule.alphas_cumprod.to(x_t.device)[t].to(x_t.dtype)
    w = 4 * abar * (1 - abar)
    diff = reverse_mean(schedule, x_t, t, eps_teacher) - reverse_mean(schedule, x_t, t, eps_student)
    return (w * diff.pow(2).flatten(1).mean(1)).mean()


class _MidFeatures:
    """Forward hook on `model.mid_block` capturing its output, mean-pooled over space."""

    def __init__(self, model):
        block = getattr(model, "mid_block", None)
        if block is None:
            raise ValueError("model: CCD's label regressor needs a `mid_block` (a diffusers UNet2DModel)")
        self.out = None
        self.handle = block.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        self.out = out.flatten(2).mean(2) if out.dim() > 2 else out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@register("ccd", order=140)
class CCD(Teacher, Buffered, Method):
    """The task loss over current + class-balanced buffer samples (`Buffered`, a ClassBalancedBuffer by
    default: `buffer_policy`),
    and, from the second task on, L_IKC / L_UKC / L_LKC against the frozen previous model (`Teacher`) and
    its label regressor (`teacher_regressor`)."""

    defaults = {"alpha": 1.0, "beta": 1.0, "gamma": 1.0, "kappa": 1.0, "temperature": 2.0,
                "regressor_lr": 1e-3, "label_dropout": 0.1, "buffer_policy": "class_balanced"}
    specs = {"alpha": nonneg(), "beta": nonneg(), "gamma": nonneg(), "kappa": nonneg(), "temperature": positive(),
             "regressor_lr": positive()}
    owns_task_loss = True
    tiny = TinyRun(config={"buffer_size": 16}, terms={"ikc", "ukc", "lkc"}, frozen=("teacher", "teacher_regressor"),
                   needs={"class_labels", "null_class", "mid_block"})
    _state_attrs = ("regressor", "teacher_regressor", "regressor_opt")

    def __init__(self, **overrides):
        super().__init__(**overrides)
        self.regressor: Optional[torch.nn.Linear] = None
        self.teacher_regressor: Optional[torch.nn.Linear] = None
        self.regressor_opt = None
        self.last_regressor_ce: Optional[float] = None
        self._pending_regressors = None

    # -- pieces
    def _null_forward(self, model, x_t, t):
        """(eps(x_t, t, null) as an eps prediction, pooled mid-block features) in one forward."""
        null = torch.full((x_t.shape[0],), self.null_class, dtype=torch.long, device=x_t.device)
        with _MidFeatures(model) as hook:
            eps = self.schedule.eps_from_prediction(predict_eps(model, x_t, t, null), x_t, t)
        return eps, hook.out

    def _ensure_regressor(self, feat_dim: int, like: torch.Tensor):
        if self.regressor is None:
            gen = torch.Generator().manual_seed(int(self.config["seed"]) + 7)
            reg = torch.nn.Linear(feat_dim, self.num_classes)
            with torch.no_grad():  # seeded init, independent of the global RNG
                bound = 1.0 / feat_dim ** 0.5
                reg.weight.copy_(torch.rand(reg.weight.shape, generator=gen) * 2 * bound - bound)
                reg.bias.zero_()
            self.regressor = reg.to(like.device)
        if self.regressor_opt is None:
            self.regressor_opt = torch.optim.Adam(self.regressor.parameters(), lr=float(self.config["regressor_lr"]))

    def _train_regressor(self, feat: torch.Tensor, y: torch.Tensor):
        feat = feat.detach().float()
        self._ensure_regressor(feat.shape[1], feat)
        self.regressor_opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            ce = F.cross_entropy(self.regressor(feat), y)
            ce.backward()
        self.parallel.average_gradients(list(self.regressor.parameters()))  # one regressor for all processes
        self.regressor_opt.step()
        self.regressor_opt.zero_grad(set_to_none=True)
        self.last_regressor_ce = float(ce.detach())

    @staticmethod
    def _linear(saved, frozen: bool) -> torch.nn.Linear:
        w = saved["weight"]
        lin = torch.nn.Linear(w.shape[1], w.shape[0]).to(w.device)
        lin.load_state_dict(saved)
        return lin.requires_grad_(False) if frozen else lin

    # -- state: the regressors are rebuilt with the teacher, at the next begin_task or step
    def load_state_attr(self, attr, saved):
        if attr not in ("regressor", "teacher_regressor", "regressor_opt"):
            return super().load_state_attr(attr, saved)
        if self._pending_regressors is None:
            self._pending_regressors = {}
        self._pending_regressors[attr] = saved
        self.regressor = self.teacher_regressor = self.regressor_opt = None

    def restore_pending(self, model):
        super().restore_pending(model)
        st, self._pending_regressors = self._pending_regressors, None
        if st is None:
            return
        if st.get("regressor") is not None:
            self.regressor = self._linear(st["regressor"], frozen=False)
        if st.get("teacher_regressor") is not None:
            self.teacher_regressor = self._linear(st["teacher_regressor"], frozen=True)
        if st.get("regressor") is not None and st.get("regressor_opt") is not None:
            self.regressor_opt = torch.optim.Adam(self.regressor.parameters(), lr=float(self.config["regressor_lr"]))
            self.regressor_opt.load_state_dict(st["regressor_opt"])

    # -- hooks
    def step_terms(self, model, batch) -> Dict[str, torch.Tensor]:
        x, y = batch["x"], batch["y"].long().to(batch["x"].device)
        x, y = with_replay(x, y, self.replay(x.shape[0], x))
        nb = self.noisy_batch(x, y, dropout=True)
        x_t = self.schedule.add_noise(nb["x"], nb["eps"], nb["t"])
        t, y_in = nb["t"], nb["y"]
        pred = predict_eps(model, x_t, t, y_in)
        terms = {"task": self.task_loss(model, nb, pred)}

        if self.teacher is None:
            with torch.no_grad():
                _, feat = self._null_forward(model, x_t, t)
            self._train_regressor(feat, y)
            return terms

        teacher = self.teacher
        with torch.no_grad():
            target = predict_eps(teacher, x_t, t, y_in)
            eps_t_null, feat_t = self._null_forward(teacher, x_t, t)
        gen = self.generator if x_t.device.type == "cpu" else None
        h = hutchinson_metric(lambda z: predict_eps(teacher, z, t, y_in), x_t.detach(), generator=gen)
        terms["ikc"] = float(self.config["alpha"]) * bregman_distill(pred, target, precond=h,
                                                                     kappa=float(self.config["kappa"]))
        eps_s_null, feat_s = self._null_forward(model, x_t, t)
        terms["ukc"] = float(self.config["beta"]) * ukc_loss(self.schedule, x_t, t, eps_t_null, eps_s_null)

        temp = float(self.config["temperature"])
        w, b = self.regressor.weight.detach().clone(), self.regressor.bias.detach().clone()
        log_ps = F.log_softmax(F.linear(feat_s.float(), w, b) / temp, dim=1)
        log_pt = F.log_softmax(self.teacher_regressor(feat_t.float()) / temp, dim=1)
        terms["lkc"] = float(self.config["gamma"]) * F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
        self._train_regressor(feat_s, y)  # after L_LKC, so the term uses the regressor before this update
        return terms

    def end_task(self, model, data):
        super().end_task(model, data)  # buffer filled, teacher frozen
        if self.regressor is not None:
            self.teacher_regressor = frozen_copy(self.regressor)


__all__ = ["CCD", "reverse_mean", "ukc_loss"]
