"""DDIM sampling from a class-conditional noise predictor, with diffusers' DDIMScheduler matched to a
cdgfast NoiseSchedule (same T and the same float64 betas). `schedule` may also be a diffusers scheduler
(`cdgfast.diffusion.as_schedule`); a v- or x0-prediction model's output is converted to eps
(`NoiseSchedule.eps_from_prediction`) before the update, which is written in eps.

Update (Song et al., DDIM, Eq. 12), with a_t = abar_t and a_prev = abar of the next (smaller) timestep
(1 after the last step):
    x0_hat  = clip((x_t - sqrt(1 - a_t) eps) / sqrt(a_t), -1, 1)
    sigma   = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    x_prev  = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps + sigma z
Timesteps come from diffusers' DDIMScheduler, "trailing" spacing by default (T-1, T-1-T/n, ...), so
even a 2-step sampler (the on-the-fly GD replay) starts from pure noise at t = T-1; "leading" spacing
would start at T - T/n. The update itself is written here: diffusers' `step` takes the previous
timestep to be t - T // n, which is off by one for trailing spacing when n does not divide T. When n
divides T the two agree (tests/test_sampling.py checks both against each other and against a
reference loop written in the test).

Classifier-free guidance (Ho & Salimans, 2021), `guidance` = s: eps = eps_u + s (eps_c - eps_u), eps_u the
prediction for the null class (index num_class_embeds - 1; SPEC section 1), both from one forward over
2B rows; s = 1 (the default) is the conditional prediction alone and makes no second forward. The scale
is the one diffusers and the personalization driver use (7.5 for Stable Diffusion). It needs a model
trained with label dropout (the methods' `label_dropout`), else eps_u is an untrained row's guess.

Random draws, in order, from `generator`: the initial noise x_T, then (only when eta > 0) one noise
tensor per step. Draws are made on the generator's device and moved to the model's device.

The state x_t and the update run in float32 for a half-precision model (which sees x_t in its own
dtype): x0_hat divides by sqrt(a_t), about 6e-3 at t = T-1, which would amplify the rounding of a
half-precision x_t by 150x, and 50 steps accumulate it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from diffusers import DDIMScheduler

from ._validation import check_generator, check_nonnegative, check_probability
from .diffusion import NoiseSchedule, as_schedule, predict_eps


def make_ddim_scheduler(schedule: NoiseSchedule, num_steps: int = 50, *, clip_sample: bool = True,
                        timestep_spacing: str = "trailing") -> DDIMScheduler:
    """A DDIMScheduler with the schedule's T and betas (passed explicitly, so they match bit for bit),
    epsilon prediction (ddim_sample converts other prediction types to eps itself), final alpha 1, and
    `num_steps` inference timesteps set. `schedule`: a NoiseSchedule or a diffusers scheduler."""
    schedule = as_schedule(schedule)
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or not 1 <= num_steps <= schedule.num_timesteps:
        raise ValueError(f"num_steps: expected an integer in [1, {schedule.num_timesteps}], got {num_steps!r}")
    if timestep_spacing not in ("trailing", "leading", "linspace"):
        raise ValueError(f"timestep_spacing: expected 'trailing', 'leading' or 'linspace', got {timestep_spacing!r}")
    sched = DDIMScheduler(
        num_train_timesteps=schedule.num_timesteps,
        trained_betas=schedule.betas.numpy(),
        clip_sample=clip_sample, clip_sample_range=1.0,
        set_alpha_to_one=True, steps_offset=0,
        prediction_type="epsilon", timestep_spacing=timestep_spacing,
    )
    sched.set_timesteps(num_steps)
    return sched


def _infer_shape(model: torch.nn.Module, batch: int) -> tuple:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "in_channels") or not hasattr(cfg, "sample_size"):
        raise ValueError("shape: the model has no config.in_channels / config.sample_size; pass shape=(B, C, H, W)")
    size = cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (batch, int(cfg.in_channels), int(h), int(w))


def null_class_of(model: torch.nn.Module) -> Optional[int]:
    """The null class of a class-conditional diffusers model (its last class embedding, SPEC section 1), or
    None for a model without one (classifier-free guidance then has nothing to guide against)."""
    n_embeds = getattr(getattr(model, "config", None), "num_class_embeds", None)
    return n_embeds - 1 if isinstance(n_embeds, int) and n_embeds >= 2 else None


def _model_device_dtype(model: torch.nn.Module):
    p = next(iter(model.parameters()), None)
    if p is None:
        return torch.device("cpu"), torch.float32
    return p.device, (p.dtype if p.dtype.is_floating_point else torch.float32)


def _ddim_update(x, eps, a_t: float, a_prev: float, eta: float, noise, clip: bool):
    """One DDIM step x_t -> x_prev (module docstring); `noise()` draws z when eta > 0."""
    x0 = (x - (1.0 - a_t) ** 0.5 * eps) / a_t ** 0.5
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    var = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    sigma = eta * max(var, 0.0) ** 0.5
    out = a_prev ** 0.5 * x0 + max(1.0 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
    if noise is not None:
        out = out + sigma * noise()
    return out


def ddim_sample(model: torch.nn.Module, labels: Optional[torch.Tensor], *, schedule: NoiseSchedule,
                num_steps: int = 50, eta: float = 0.0, generator: Optional[torch.Generator] = None,
                shape: Optional[Sequence[int]] = None, progress: bool = False, clip_sample: bool = True,
                timestep_spacing: str = "trailing", guidance: float = 1.0) -> torch.Tensor:
    """Generate x0 [B, C, H, W] in [-1, 1] with DDIM from `model` (eps prediction, called as
    `model(x_t, t, class_labels=labels)`; `labels=None` calls it unconditionally and needs `shape`).
    `guidance` != 1: classifier-free guidance towards `labels` against the null class (module docstring);
    it needs labels and a class-conditional diffusers model (`config.num_class_embeds`).

    Runs in eval mode under no_grad and restores the model's training flag afterwards. With eta = 0
    the result is a deterministic function of the initial noise (so of `generator`'s state).
    `schedule`: a NoiseSchedule or a diffusers scheduler; its prediction_type says what the model outputs.
    """
    schedule = as_schedule(schedule)
    if labels is not None:
        if (not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point
                or labels.dtype.is_complex or labels.dtype == torch.bool):
            raise ValueError(f"labels: expected an integer tensor [B], got {getattr(labels, 'shape', type(labels))}")
        if labels.numel() == 0:
            raise ValueError("labels: expected at least one label, got an empty tensor")
        n_embeds = getattr(getattr(model, "config", None), "num_class_embeds", None)
        if n_embeds is not None and (int(labels.min()) < 0 or int(labels.max()) >= n_embeds):
            raise ValueError(f"labels: expected values in [0, {n_embeds - 1}] (the last one is the null class), "
                             f"got [{int(labels.min())}, {int(labels.max())}]")
    # eta > 1 would make sigma^2 exceed 1 - a_prev, so the eps coefficient's square root would be negative
    eta = check_probability("eta", eta)
    check_generator("generator", generator)
    guidance = check_nonnegative("guidance", guidance)
    null_class = None
    if guidance != 1.0:
        null_class = null_class_of(model)
        if labels is None or null_class is None:
            n_embeds = getattr(getattr(model, "config", None), "num_class_embeds", None)
            raise ValueError(f"guidance: classifier-free guidance (guidance != 1, got {guidance}) needs class labels "
                             f"and a class-conditional model whose last class embedding is the null class; got "
                             f"{'no labels' if labels is None else f'a model with num_class_embeds={n_embeds!r}'}")
    if shape is None:
        if labels is None:
            raise ValueError("shape: needed when labels is None (unconditional sampling)")
        shape = _infer_shape(model, labels.shape[0])
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise ValueError(f"shape: expected (B, C, H, W), got {shape}")
    if labels is not None and shape[0] != labels.shape[0]:
        raise ValueError(f"shape: batch size {shape[0]} does not match labels ({labels.shape[0]})")
    sched = make_ddim_scheduler(schedule, num_steps, clip_sample=clip_sample, timestep_spacing=timestep_spacing)
    device, dtype = _model_device_dtype(model)
    state = torch.promote_types(dtype, torch.float32)
    gen_device = generator.device if generator is not None else device
    if labels is not None:
        labels = labels.to(device)
    # the guided forward's labels: the conditional rows, then as many null-class rows (the same every step)
    guided_labels = None if null_class is None else torch.cat([labels, torch.full_like(labels, null_class)])

    def noise():
        return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device, state)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = noise()
            steps = [int(t) for t in sched.timesteps]
            # abar at each step and at the step it moves to (1 after the last: set_alpha_to_one).
            ac = schedule.alphas_cumprod
            a = [float(ac[t]) for t in steps]
            a_prev = a[1:] + [1.0]
            if progress:
                from tqdm.auto import tqdm
                steps = tqdm(steps, desc="DDIM", leave=False)
            for i, t in enumerate(steps):
                tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
                if null_class is None:
                    out = predict_eps(model, x.to(dtype), tt, labels).to(state)
                    eps = schedule.eps_from_prediction(out, x, tt).to(state)  # `out` itself for eps prediction
                else:  # one forward over [conditional; null] rows
                    x2, tt2 = torch.cat([x, x]), torch.cat([tt, tt])
                    out = predict_eps(model, x2.to(dtype), tt2, guided_labels).to(state)
                    eps_c, eps_u = schedule.eps_from_prediction(out, x2, tt2).to(state).chunk(2)
                    eps = eps_u + guidance * (eps_c - eps_u)
                x = _ddim_update(x, eps, a[i], a_prev[i], eta, noise if eta > 0 else None, clip_sample)
    finally:
        model.train(was_training)
    return x.clamp_(-1.0, 1.0).to(dtype)
