"""The forward process and the per-sample denoising loss shared by training and every Fisher estimate.

`x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`; `l_i = mean over pixels of (target_i - f_theta(x_t,i, t_i, y_i))^2`
where the model output f_theta and its target follow the schedule's `prediction_type` (diffusers' names):
    "epsilon"       target eps                                   (the default; SPEC section 1)
    "v_prediction"  target v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0   (Salimans & Ho; Stable Diffusion 2.x)
    "sample"        target x_0
`NoiseSchedule.eps_from_prediction` turns any of them into an eps prediction (v: eps = sqrt(abar) v +
sqrt(1 - abar) x_t; sample: eps = (x_t - sqrt(abar) x0_hat) / sqrt(1 - abar)); DDIM sampling, DC scores
and CCD's reverse means use that, so they are the same formulas for every prediction type.

Every function that takes a schedule also takes a diffusers scheduler (DDPMScheduler, DDIMScheduler, ...:
anything with `alphas_cumprod` and `config.prediction_type`); `as_schedule` is the one place that turns
it into a NoiseSchedule, rebuilding its betas in float64 from its config (linear / scaled_linear /
trained_betas; diffusers' own float32 betas otherwise), so a DDPMScheduler with the default linear
betas gives exactly the numbers of `NoiseSchedule()`.

A batch is a dict {"x": x_0, "y": labels, "t": timesteps, "eps": noise}: it carries its own t and eps,
so a per-sample loss is a deterministic function of (theta, batch).

Timesteps are integers in [0, T), one per sample ([B]). One outside that range raises a ValueError in
eager mode; inside torch.compile or a torch.func transform (where the check cannot run) its schedule
values are NaN, so the sample's noisy input and loss are NaN instead of silently using another t
(a negative index would otherwise wrap around). The forward process and the squared error run in
float32 (float64 for float64 inputs): 1 - abar_t is about 1e-4 at t = 0, below the resolution of
bfloat16 around 1, and a half-precision squared error overflows or loses its small terms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import numbers

import torch

from ._dispatch import transform_active
from ._validation import check_generator, check_same_device, check_shape, check_tensor

Batch = Dict[str, torch.Tensor]


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear")


@dataclass
class NoiseSchedule:
    """Linear betas by default (SPEC: T = 1000, 1e-4 .. 0.02). Buffers are float64; `to` moves/casts per use.

    prediction_type: what the model predicts (module docstring): "epsilon", "v_prediction" or "sample".
    beta_schedule: "linear" (betas linspace(beta_start, beta_end)) or "scaled_linear" (Stable Diffusion:
      linspace(sqrt(beta_start), sqrt(beta_end))^2), both as diffusers defines them but in float64.
    trained_betas: explicit betas (T numbers in (0, 1)); then num_timesteps must equal their number and
      beta_start / beta_end / beta_schedule are not used."""

    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    beta_schedule: str = "linear"
    trained_betas: Optional[Sequence[float]] = None

    def __post_init__(self):
        T = self.num_timesteps
        if not isinstance(T, numbers.Integral) or isinstance(T, bool) or T < 1:
            raise ValueError(f"num_timesteps: expected a positive integer, got {T!r}")
        self.num_timesteps = int(T)
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: expected one of {list(PREDICTION_TYPES)}, got {self.prediction_type!r}")
        if self.trained_betas is not None:
            betas = torch.as_tensor(self.trained_betas, dtype=torch.float64).flatten().cpu()
            if betas.numel() != self.num_timesteps:
                raise ValueError(f"trained_betas: expected num_timesteps = {self.num_timesteps} values, "
                                 f"got {betas.numel()}")
            if not bool(((betas > 0) & (betas < 1)).all()):
                raise ValueError("trained_betas: expected every beta in (0, 1)")
            self.trained_betas = tuple(float(b) for b in betas)  # a plain value: the dataclass compares and prints it
        else:
            if self.beta_schedule not in BETA_SCHEDULES:
                raise ValueError(f"beta_schedule: expected one of {list(BETA_SCHEDULES)} (or pass trained_betas), "
                                 f"got {self.beta_schedule!r}")
            for name in ("beta_start", "beta_end"):
                v = getattr(self, name)
                # beta = 0 would give 1 - abar_0 = 0 (no noise; DDIM divides by it); beta >= 1 a non-positive alpha
                if not isinstance(v, numbers.Real) or isinstance(v, bool) or not 0 < v < 1:
                    raise ValueError(f"{name}: expected a number in (0, 1), got {v!r}")
            if self.beta_schedule == "linear":
                betas = torch.linspace(self.beta_start, self.beta_end, self.num_timesteps, dtype=torch.float64)
            else:
                betas = torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, self.num_timesteps,
                                       dtype=torch.float64) ** 2
        self.betas = betas
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor, dtype: torch.dtype):
        """(sqrt(abar_t), sqrt(1 - abar_t)) [B, 1, ...] shaped for `like`, in `dtype` promoted to float32
        or wider, and that dtype."""
        acc = torch.promote_types(dtype, torch.float32)
        abar = self._lookup(self.alphas_cumprod, t, like, acc)
        return abar.sqrt(), (1 - abar).sqrt(), acc

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model is trained to output for (x0, eps, t): `eps` itself (the same tensor) for
        "epsilon", v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 for "v_prediction", `x0` for "sample".
        v is computed in float32 or wider and returned in that dtype."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0
        check_shape("eps", eps, x0.shape, "like x0")
        a, s, acc = self._coefficients(t, x0, torch.promote_types(x0.dtype, eps.dtype))
        return a * eps.to(acc) - s * x0.to(acc)

    def eps_from_prediction(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The eps prediction equivalent to the model output `pred` at (x_t, t): `pred` itself (the same
        tensor) for "epsilon"; sqrt(abar_t) v + sqrt(1 - abar_t) x_t for "v_prediction";
        (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t) for "sample". Converted values are in float32 or
        wider (the division by sqrt(1 - abar_t) ~ 1e-2 near t = 0 would amplify half-precision rounding)."""
        if self.prediction_type == "epsilon":
            return pred
        check_shape("pred", pred, x_t.shape, "like x_t")
        a, s, acc = self._coefficients(t, pred, torch.promote_types(pred.dtype, x_t.dtype))
        if self.prediction_type == "v_prediction":
            return a * pred.to(acc) + s * x_t.to(acc)
        return (x_t.to(acc) - a * pred.to(acc)) / s

    def check_timesteps(self, t, batch_size: int, name: str = "t") -> torch.Tensor:
        """`t` as integer timesteps [batch_size] (module docstring: range checked in eager mode only)."""
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected an integer tensor [{batch_size}] of timesteps, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name}: expected integer timesteps in [0, {self.num_timesteps}), got dtype {t.dtype}")
        # a single t would broadcast over the batch and give every sample the same noise level
        check_shape(name, t, (batch_size,), "one timestep per sample")
        if t.numel() and t.device.type != "meta" and not torch.compiler.is_compiling() and not transform_active():
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= self.num_timesteps:
                raise ValueError(f"{name}: expected timesteps in [0, {self.num_timesteps}), got min {lo}, max {hi}")
        return t

    def _lookup(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t = self.check_timesteps(t, like.shape[0]).to(like.device)
        bad = (t < 0) | (t >= self.num_timesteps)
        out = values.to(like.device)[t.clamp(0, self.num_timesteps - 1)].to(dtype)
        out = torch.where(bad, float("nan"), out)  # only reached where the eager range check cannot run
        return out.view(-1, *([1] * (like.dim() - 1)))

    def gather(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor,
               dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """values[t] ([B] integer timesteps in [0, T)) in `dtype` (default: `like`'s), reshaped to broadcast
        against `like` ([B, 1, 1, ...]); NaN for a timestep out of range where it cannot raise (module
        docstring). Pass `dtype=torch.float32` for half-precision `like` before forming 1 - abar: near t = 0
        it is ~1e-4, which bf16 rounds to 0."""
        return self._lookup(values, t, like, like.dtype if dtype is None else dtype)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, computed in float32 or wider and returned in the
        dtype of x0 and eps."""
        x0 = check_tensor("x0", x0, min_ndim=1)
        eps = check_tensor("eps", eps, min_ndim=1)
        check_shape("eps", eps, x0.shape, "like x0")
        check_same_device(x0=x0, eps=eps)
        out_dtype = torch.promote_types(x0.dtype, eps.dtype)
        acc = torch.promote_types(out_dtype, torch.float32)
        abar = self._lookup(self.alphas_cumprod, t, x0, acc)
        return (abar.sqrt() * x0.to(acc) + (1 - abar).sqrt() * eps.to(acc)).to(out_dtype)

    def sample_timesteps(self, n: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)


def as_schedule(schedule: Any, name: str = "schedule") -> NoiseSchedule:
    """`schedule` as a NoiseSchedule: a NoiseSchedule is returned as it is; a diffusers scheduler (anything
    with `alphas_cumprod` and `config.prediction_type`, e.g. DDPMScheduler, DDIMScheduler) becomes the
    NoiseSchedule of the same forward process and prediction type (module docstring). Its betas are
    rebuilt in float64 from `config` (trained_betas, or a "linear" / "scaled_linear" beta_schedule);
    for other schedules (squaredcos_cap_v2, rescale_betas_zero_snr) the scheduler's own betas are taken.
    The result's alphas_cumprod is checked against the scheduler's (float32) ones. Anything else is a
    ValueError naming `name`."""
    if isinstance(schedule, NoiseSchedule):
        return schedule
    cfg = getattr(schedule, "config", None)
    if getattr(schedule, "alphas_cumprod", None) is None or not hasattr(cfg, "prediction_type"):
        raise ValueError(f"{name}: expected a cdgfast.diffusion.NoiseSchedule or a diffusers scheduler (with "
                         f"alphas_cumprod and config.prediction_type), got {type(schedule).__name__}")
    T = int(getattr(cfg, "num_train_timesteps", len(schedule.alphas_cumprod)))
    pt = cfg.prediction_type
    if pt not in PREDICTION_TYPES:
        raise ValueError(f"{name}: prediction_type {pt!r} is not supported (expected one of {list(PREDICTION_TYPES)})")
    trained = getattr(cfg, "trained_betas", None)
    kind = getattr(cfg, "beta_schedule", None)
    if getattr(cfg, "rescale_betas_zero_snr", False) or (trained is None and kind not in BETA_SCHEDULES):
        trained = torch.as_tensor(schedule.betas).double().tolist()  # only diffusers' float32 betas exist
    if trained is not None:
        out = NoiseSchedule(T, prediction_type=pt, trained_betas=trained)
    else:
        out = NoiseSchedule(T, float(cfg.beta_start), float(cfg.beta_end), prediction_type=pt, beta_schedule=kind)
    theirs = torch.as_tensor(schedule.alphas_cumprod).double().cpu()
    if theirs.shape != out.alphas_cumprod.shape or not torch.allclose(theirs, out.alphas_cumprod, rtol=1e-4, atol=1e-6):
        raise ValueError(f"{name}: the scheduler's alphas_cumprod do not match its config (betas of "
                         f"{type(schedule).__name__} changed after construction?)")
    return out


def _check_labels(y, batch_size: int, name: str = "y") -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor of labels [{batch_size}, ...], got {type(y).__name__}")
    # one label would broadcast over the batch (a diffusers class embedding adds [1, C] to [B, C])
    if y.dim() < 1 or y.shape[0] != batch_size:
        raise ValueError(f"{name}: expected one label per sample ([{batch_size}, ...]), got shape {tuple(y.shape)}")
    return y


def make_batch(x: torch.Tensor, y: Optional[torch.Tensor], schedule: NoiseSchedule,
               generator: Optional[torch.Generator] = None, t: Optional[torch.Tensor] = None) -> Batch:
    """Attach fresh (t, eps) to clean samples x [B, ...]. `generator` makes it reproducible; the draws
    are made on its device (the CPU without one) and moved to x's device. `schedule`: a NoiseSchedule
    or a diffusers scheduler (`as_schedule`)."""
    x = check_tensor("x", x, min_ndim=1)
    schedule = as_schedule(schedule)
    check_generator("generator", generator)
    n = x.shape[0]
    if y is not None:
        _check_labels(y, n)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if t is None:
        t = torch.randint(0, schedule.num_timesteps, (n,), generator=generator, device=gen_device).to(x.device)
    else:
        schedule.check_timesteps(t, n)
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=gen_device).to(x.device)
    batch = {"x": x, "t": t, "eps": eps}
    if y is not None:
        batch["y"] = y
    return batch


def predict_eps(model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The model output f_theta(x_t, t, y) for a diffusers UNet2DModel (class labels) or any module with the
    same call: eps_theta for an epsilon model; for v / sample prediction the raw output, which
    `NoiseSchedule.eps_from_prediction` converts. The prediction must have x_t's shape (a model with
    fewer output channels would otherwise broadcast against the noise in the loss)."""
    out = model(x_t, t, class_labels=y) if y is not None else model(x_t, t)
    out = out.sample if hasattr(out, "sample") else out
    if not isinstance(out, torch.Tensor) or out.shape != x_t.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model: expected an eps prediction of x_t's shape {tuple(x_t.shape)}, got {got}")
    return out


class DiffusionLoss:
    """loss_fn(model, batch) -> per-sample losses [B]; the `loss_fn` every cdgfast.fisher function takes."""

    def __init__(self, schedule: Optional[NoiseSchedule] = None):
        """schedule: a NoiseSchedule, a diffusers scheduler (`as_schedule`), or None (the default one)."""
        self.schedule = NoiseSchedule() if schedule is None else as_schedule(schedule)

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Per-sample losses [B] against the prediction type's target (module docstring), in float32 for
        half-precision models (float64 for float64)."""
        if not isinstance(batch, dict) or any(k not in batch for k in ("x", "t", "eps")):
            got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"batch: expected a dict with keys 'x', 't', 'eps' (and 'y'), got {got}")
        x = check_tensor("batch['x']", batch["x"], min_ndim=2)
        if batch.get("y") is not None:
            _check_labels(batch["y"], x.shape[0], "batch['y']")
        x_t = self.schedule.add_noise(x, batch["eps"], batch["t"])
        pred = predict_eps(model, x_t, batch["t"], batch.get("y"))
        target = self.schedule.target(x, batch["eps"], batch["t"])
        acc = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
        return (pred.to(acc) - target.to(acc)).pow(2).flatten(1).mean(1)
