"""The shared pieces every op and method stands on: the noise schedule, the per-sample loss, flat views."""
import math

import pytest
import torch

from cdgfast._params import as_param_list, flatten, split_like
from cdgfast._validation import check_same_device, check_tensor
from cdgfast.diffusion import DiffusionLoss, NoiseSchedule, make_batch, predict_eps
from cdgfast.models import build_unet


def test_schedule_matches_linear_betas():
    s = NoiseSchedule()
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1 - b
        abar.append(prod)
    assert torch.allclose(s.betas, torch.tensor(betas, dtype=torch.float64), atol=1e-15)
    assert torch.allclose(s.alphas_cumprod, torch.tensor(abar, dtype=torch.float64), rtol=1e-12)


def test_add_noise_per_sample():
    s = NoiseSchedule()
    x0, eps = torch.randn(3, 1, 5, 7, dtype=torch.float64), torch.randn(3, 1, 5, 7, dtype=torch.float64)
    t = torch.tensor([0, 499, 999])
    xt = s.add_noise(x0, eps, t)
    for i in range(3):
        a = s.alphas_cumprod[t[i]].item()
        assert torch.allclose(xt[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * eps[i], atol=1e-12)


def test_diffusion_loss_is_per_sample_mean_squared_error():
    torch.manual_seed(0)
    model = build_unet("tiny", num_classes=3, sample_size=8).double()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    batch = make_batch(x, torch.tensor([0, 1, 2, 3, 1]), NoiseSchedule(), torch.Generator().manual_seed(1))
    assert batch["eps"].dtype == torch.float64
    losses = DiffusionLoss()(model, batch)
    assert losses.shape == (5,)
    for i in range(5):  # one sample at a time: no coupling between samples
        one = {k: v[i:i + 1] for k, v in batch.items()}
        xt = NoiseSchedule().add_noise(one["x"], one["eps"], one["t"])
        pred = predict_eps(model, xt, one["t"], one["y"])
        assert torch.allclose(losses[i], ((pred - one["eps"]) ** 2).mean(), rtol=1e-10)


def test_make_batch_is_reproducible():
    x = torch.randn(4, 1, 8, 8)
    a = make_batch(x, None, NoiseSchedule(), torch.Generator().manual_seed(3))
    b = make_batch(x, None, NoiseSchedule(), torch.Generator().manual_seed(3))
    assert torch.equal(a["t"], b["t"]) and torch.equal(a["eps"], b["eps"]) and "y" not in a


def test_flatten_and_split_round_trip():
    model = build_unet("tiny", num_classes=2, sample_size=8)
    params = as_param_list(model)
    flat = flatten(params)
    assert flat.numel() == sum(p.numel() for p in model.parameters() if p.requires_grad)
    for p, v in zip(params, split_like(flat, params)):
        assert torch.equal(p, v)
    with pytest.raises(ValueError, match="flat"):
        split_like(flat[:-1], params)


def test_validation_messages_name_the_argument():
    with pytest.raises(ValueError, match="eps_pred.*floating"):
        check_tensor("eps_pred", torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="eps.*3 dimensions"):
        check_tensor("eps", torch.ones(2, 2), ndim=3)
    with pytest.raises(ValueError, match="empty"):
        check_tensor("x", torch.ones(0))
    with pytest.raises(ValueError, match="a on cpu, b on meta"):
        check_same_device(a=torch.ones(1), b=torch.ones(1, device="meta"))
    with pytest.raises(ValueError, match="params"):
        as_param_list([], "params")
    with pytest.raises(ValueError, match="preset"):
        build_unet("nope")
