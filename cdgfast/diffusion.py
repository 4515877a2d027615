"""The forward process and the per-sample denoising loss shared by training and every Fisher estimate.

`x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`; `l_i = mean over pixels of (eps_i - eps_theta(x_t,i, t_i, y_i))^2`.
A batch is a dict {"x": x_0, "y": labels, "t": timesteps, "eps": noise}: it carries its own t and eps,
so a per-sample loss is a deterministic function of (theta, batch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

Batch = Dict[str, torch.Tensor]


@dataclass
class NoiseSchedule:
    """Linear betas (SPEC: T = 1000, 1e-4 .. 0.02). Buffers are float64; `to` moves/casts per use."""

    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self):
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps: expected a positive integer, got {self.num_timesteps}")
        self.betas = torch.linspace(self.beta_start, self.beta_end, self.num_timesteps, dtype=torch.float64)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def gather(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] reshaped to broadcast against `like` ([B, 1, 1, ...])."""
        out = values.to(like.device)[t.to(like.device)].to(like.dtype)
        return out.view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.gather(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps

    def sample_timesteps(self, n: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)


def make_batch(x: torch.Tensor, y: Optional[torch.Tensor], schedule: NoiseSchedule,
               generator: Optional[torch.Generator] = None, t: Optional[torch.Tensor] = None) -> Batch:
    """Attach fresh (t, eps) to clean samples. `generator` makes it reproducible (CPU generator)."""
    n = x.shape[0]
    if t is None:
        t = torch.randint(0, schedule.num_timesteps, (n,), generator=generator).to(x.device)
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    batch = {"x": x, "t": t, "eps": eps}
    if y is not None:
        batch["y"] = y
    return batch


def predict_eps(model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
    """eps_theta(x_t, t, y) for a diffusers UNet2DModel (class labels) or any module with the same call."""
    out = model(x_t, t, class_labels=y) if y is not None else model(x_t, t)
    return out.sample if hasattr(out, "sample") else out


class DiffusionLoss:
    """loss_fn(model, batch) -> per-sample losses [B]; the `loss_fn` every cdgfast.fisher function takes."""

    def __init__(self, schedule: Optional[NoiseSchedule] = None):
        self.schedule = schedule or NoiseSchedule()

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        x_t = self.schedule.add_noise(batch["x"], batch["eps"], batch["t"])
        pred = predict_eps(model, x_t, batch["t"], batch.get("y"))
        return (pred - batch["eps"]).pow(2).flatten(1).mean(1)
