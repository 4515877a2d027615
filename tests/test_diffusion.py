"""The shared pieces every op and method stands on: the noise schedule, the per-sample loss, flat views."""
import math

import pytest
import torch

from cdgfast._validation import check_same_device, check_tensor
from cdgfast.params import as_param_list
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


# ------------------------------------------------------------------ issue 10 classes, diffusion.py
class _Scaled(torch.nn.Module):
    """eps_theta(x_t) = scale * x_t[:, :channels]: a model whose output we control exactly."""

    def __init__(self, scale=1.0, channels=None, dtype=torch.float32):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(float(scale), dtype=dtype))
        self.channels = channels

    def forward(self, x, t, class_labels=None):
        out = self.w * x
        return out if self.channels is None else out[:, :self.channels]


def test_shape_coincidences_refused():
    """(1) a t, eps or y of one row, or a model with fewer output channels, would broadcast."""
    s = NoiseSchedule(10)
    x = torch.randn(3, 2, 4, 5)
    b = make_batch(x, torch.tensor([0, 1, 2]), s, torch.Generator().manual_seed(0))
    loss = DiffusionLoss(s)
    model = _Scaled(0.5)
    for key, bad, what in (("t", b["t"][:1], "t.*shape"), ("t", b["t"][0], "t.*shape"),
                           ("eps", b["eps"][:1], "eps.*shape"), ("eps", b["eps"][..., :1], "eps.*shape"),
                           ("y", b["y"][:1], "y.*one label per sample")):
        with pytest.raises(ValueError, match=what):
            loss(model, {**b, key: bad})
    with pytest.raises(ValueError, match="model.*shape"):
        loss(_Scaled(0.5, channels=1), b)
    with pytest.raises(ValueError, match="y.*one label"):
        make_batch(x, torch.tensor([1]), s)
    with pytest.raises(ValueError, match="t.*shape"):
        make_batch(x, None, s, t=torch.tensor([1]))
    with pytest.raises(ValueError, match="batch"):
        loss(model, {"x": x, "t": b["t"]})
    # the right shapes still give the per-sample mean squared error of the reference formula
    ab = s.alphas_cumprod[b["t"]].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x.double() + (1 - ab).sqrt() * b["eps"].double()
    ref = (0.5 * x_t - b["eps"].double()).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss(model, b).double(), ref, rtol=1e-5, atol=1e-6)


def test_timesteps_checked_eagerly_and_poisoned_under_transforms():
    """(5) an out-of-range t raises in eager mode; where the check cannot run (torch.func, torch.compile)
    it makes that sample NaN. (6) a negative t used to wrap around silently to t = T - 1."""
    s = NoiseSchedule(10)
    x, eps = torch.randn(3, 1, 2, 3), torch.randn(3, 1, 2, 3)
    for bad in ([-1, 0, 1], [0, 10, 1], [0.0, 1.0, 2.0], [True, False, True]):
        with pytest.raises(ValueError, match="t: expected"):
            s.add_noise(x, eps, torch.tensor(bad))
    with pytest.raises(ValueError, match="t: expected timesteps in \\[0, 10\\)"):
        make_batch(x, None, s, t=torch.tensor([0, 1, -2]))
    t = torch.tensor([3, -1, 10])
    good = s.add_noise(x, eps, torch.tensor([3, 3, 3]))[0]

    def f(z):
        return s.add_noise(z, eps, t)

    out, tangent = torch.func.jvp(f, (x,), (torch.ones_like(x),))
    compiled = torch.compile(f, backend="eager", fullgraph=True)(x)
    torch._dynamo.reset()
    for o in (out, tangent, compiled):
        assert torch.isnan(o[1]).all() and torch.isnan(o[2]).all()
    torch.testing.assert_close(out[0], good)
    torch.testing.assert_close(compiled[0], good)
    with pytest.raises(ValueError, match="num_timesteps"):
        NoiseSchedule(10.0)
    for start, end in ((0.0, 0.02), (1e-4, 1.0), (float("nan"), 0.02)):
        with pytest.raises(ValueError, match="beta_"):
            NoiseSchedule(10, start, end)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_noise_and_loss(dtype):
    """(4) 1 - abar_0 = 1e-4 is below bf16's resolution around 1, so the t = 0 noise vanished; a
    half-precision squared error overflows. Both now run in float32 and match float64."""
    s = NoiseSchedule()
    x = torch.full((2, 1, 3, 3), 0.5, dtype=dtype)
    eps = torch.ones_like(x)
    t = torch.tensor([0, 1])
    ref = s.add_noise(x.double(), eps.double(), t)
    out = s.add_noise(x, eps, t)
    assert out.dtype == dtype
    assert (out.double() - ref).abs().max() <= torch.finfo(dtype).eps  # one ulp around 0.5
    # eps_theta = 600 x_t: squared errors near 9e4 exceed fp16's 65504
    model = _Scaled(600.0, dtype=dtype)
    batch = {"x": x, "t": t, "eps": eps}
    loss = DiffusionLoss(s)(model, batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    ref_loss = DiffusionLoss(s)(_Scaled(600.0, dtype=torch.float64), {"x": x.double(), "t": t, "eps": eps.double()})
    # the model's own half-precision output carries 600 * 0.5 * eps(dtype) error per pixel
    assert ((loss.double() - ref_loss).abs() / ref_loss).max() < 4 * torch.finfo(dtype).eps
