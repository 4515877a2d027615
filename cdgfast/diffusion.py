"""The forward process and the per-sample denoising loss shared by training and every Fisher estimate.

`x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`; `l_i = mean over pixels of (eps_i - eps_theta(x_t,i, t_i, y_i))^2`.
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
from typing import Dict, Optional

import numbers

import torch

from ._dispatch import transform_active
from ._validation import check_generator, check_same_device, check_shape, check_tensor

Batch = Dict[str, torch.Tensor]


@dataclass
class NoiseSchedule:
    """Linear betas (SPEC: T = 1000, 1e-4 .. 0.02). Buffers are float64; `to` moves/casts per use."""

    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self):
        T = self.num_timesteps
        if not isinstance(T, numbers.Integral) or isinstance(T, bool) or T < 1:
            raise ValueError(f"num_timesteps: expected a positive integer, got {T!r}")
        self.num_timesteps = int(T)
        for name in ("beta_start", "beta_end"):
            v = getattr(self, name)
            # beta = 0 would give 1 - abar_0 = 0 (no noise; DDIM divides by it); beta >= 1 a non-positive alpha
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or not 0 < v < 1:
                raise ValueError(f"{name}: expected a number in (0, 1), got {v!r}")
        self.betas = torch.linspace(self.beta_start, self.beta_end, self.num_timesteps, dtype=torch.float64)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

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

    def gather(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] ([B] integer timesteps in [0, T)) in `like`'s dtype, reshaped to broadcast against
        `like` ([B, 1, 1, ...]); NaN for a timestep out of range where it cannot raise (module docstring)."""
        return self._lookup(values, t, like, like.dtype)

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
    are made on its device (the CPU without one) and moved to x's device."""
    x = check_tensor("x", x, min_ndim=1)
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule: expected a cdgfast.diffusion.NoiseSchedule, got {type(schedule).__name__}")
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
    """eps_theta(x_t, t, y) for a diffusers UNet2DModel (class labels) or any module with the same call.
    The prediction must have x_t's shape (a model with fewer output channels would otherwise broadcast
    against the noise in the loss)."""
    out = model(x_t, t, class_labels=y) if y is not None else model(x_t, t)
    out = out.sample if hasattr(out, "sample") else out
    if not isinstance(out, torch.Tensor) or out.shape != x_t.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model: expected an eps prediction of x_t's shape {tuple(x_t.shape)}, got {got}")
    return out


class DiffusionLoss:
    """loss_fn(model, batch) -> per-sample losses [B]; the `loss_fn` every cdgfast.fisher function takes."""

    def __init__(self, schedule: Optional[NoiseSchedule] = None):
        if schedule is not None and not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule: expected a cdgfast.diffusion.NoiseSchedule or None, got {type(schedule).__name__}")
        self.schedule = schedule or NoiseSchedule()

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Per-sample losses [B], in float32 for half-precision models (float64 for float64)."""
        if not isinstance(batch, dict) or any(k not in batch for k in ("x", "t", "eps")):
            got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"batch: expected a dict with keys 'x', 't', 'eps' (and 'y'), got {got}")
        x = check_tensor("batch['x']", batch["x"], min_ndim=2)
        if batch.get("y") is not None:
            _check_labels(batch["y"], x.shape[0], "batch['y']")
        x_t = self.schedule.add_noise(x, batch["eps"], batch["t"])
        pred = predict_eps(model, x_t, batch["t"], batch.get("y"))
        acc = torch.promote_types(torch.promote_types(pred.dtype, batch["eps"].dtype), torch.float32)
        return (pred.to(acc) - batch["eps"].to(acc)).pow(2).flatten(1).mean(1)
