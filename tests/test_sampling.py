"""cdgfast.sampling.ddim_sample against a DDIM loop written here in float64 and against diffusers' step."""
import math

import pytest
import torch
from diffusers import DDIMScheduler

from cdgfast.diffusion import NoiseSchedule
from cdgfast.models import build_unet
from cdgfast.sampling import ddim_sample, make_ddim_scheduler

T = 1000


def randomised_tiny_unet(seed):
    """A float64 tiny UNet (3 classes, 8x8) with every parameter perturbed: the zero-initialised output
    conv would otherwise make eps trivially ~0."""
    torch.manual_seed(seed)
    m = build_unet("tiny", num_classes=3, sample_size=8).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def unet64():
    return randomised_tiny_unet(1)


def reference_ddim(model, labels, shape, num_steps, eta, seed, clip=True, guidance=None, null=None):
    """DDIM (Song et al. Eq. 12) from scratch: own betas, own trailing timesteps, own noise draws; with
    `guidance`, eps = eps(null) + guidance * (eps(labels) - eps(null)) from two separate forwards."""
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        abar.append(prod)
    ts = [int(round(T - i * T / num_steps)) - 1 for i in range(num_steps)]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float32).double()
    for i, t in enumerate(ts):
        a_t = abar[t]
        a_p = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        tt = torch.full((shape[0],), t, dtype=torch.long)
        eps = model(x, tt, class_labels=labels).sample
        if guidance is not None:
            eps_u = model(x, tt, class_labels=torch.full_like(labels, null)).sample
            eps = eps_u + guidance * (eps - eps_u)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if clip:
            x0 = x0.clamp(-1, 1)
        sigma = eta * math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)
        x = math.sqrt(a_p) * x0 + math.sqrt(max(1 - a_p - sigma ** 2, 0.0)) * eps
        if eta > 0:
            x = x + sigma * torch.randn(shape, generator=g, dtype=torch.float32).double()
    return x.clamp(-1, 1)


@pytest.mark.parametrize("num_steps", [1, 3, 4])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_matches_reference_loop(unet64, num_steps, eta):
    labels = torch.tensor([0, 2, 3])  # 3 = null class
    with torch.no_grad():
        ref = reference_ddim(unet64, labels, (3, 1, 8, 8), num_steps, eta, seed=5)
    out = ddim_sample(unet64, labels, schedule=NoiseSchedule(), num_steps=num_steps, eta=eta,
                      generator=torch.Generator().manual_seed(5))
    assert out.dtype == torch.float64 and out.shape == (3, 1, 8, 8)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("guidance", [0.0, 2.5, 7.5])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_classifier_free_guidance_matches_two_forward_reference(unet64, guidance, eta):
    """guidance = s: eps_u + s (eps_c - eps_u) against the null class (index num_class_embeds - 1), from
    one batched forward, equal to the reference's two separate forwards; s = 1 is the plain sampler."""
    labels = torch.tensor([0, 2, 1, 0, 2])
    with torch.no_grad():
        ref = reference_ddim(unet64, labels, (5, 1, 8, 8), 3, eta, seed=7, guidance=guidance, null=3)
        plain = reference_ddim(unet64, labels, (5, 1, 8, 8), 3, eta, seed=7)
    got = ddim_sample(unet64, labels, schedule=NoiseSchedule(), num_steps=3, eta=eta,
                      generator=torch.Generator().manual_seed(7), guidance=guidance)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    assert (got - plain).abs().max() > 1e-3  # guidance changes the samples, so the comparison can fail
    one = ddim_sample(unet64, labels, schedule=NoiseSchedule(), num_steps=3, eta=eta,
                      generator=torch.Generator().manual_seed(7), guidance=1.0)
    torch.testing.assert_close(one, plain, rtol=1e-9, atol=1e-9)


def test_guidance_refused_without_labels_or_null_class(unet64):
    from cdgfast.models.unet import build_unet as build

    uncond = build("tiny", sample_size=8, class_conditional=False)
    with pytest.raises(ValueError, match="guidance"):
        ddim_sample(uncond, None, schedule=NoiseSchedule(), num_steps=2, shape=(2, 1, 8, 8), guidance=3.0)
    with pytest.raises(ValueError, match="guidance"):
        ddim_sample(unet64, None, schedule=NoiseSchedule(), num_steps=2, shape=(2, 1, 8, 8), guidance=3.0)
    for bad in (-1.0, float("nan"), float("inf"), "3", True):
        with pytest.raises(ValueError, match="guidance"):
            ddim_sample(unet64, torch.tensor([0, 1]), schedule=NoiseSchedule(), num_steps=2, guidance=bad)
    # guidance 1 needs nothing: unconditional sampling works as before
    ddim_sample(uncond, None, schedule=NoiseSchedule(), num_steps=1, shape=(1, 1, 8, 8), guidance=1.0)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_matches_diffusers_step_when_steps_divide_T(unet64, eta):
    """For n | T diffusers' step uses the same previous timestep; both must agree."""
    n, labels, shape = 4, torch.tensor([1, 0]), (2, 1, 8, 8)
    sched = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          clip_sample=True, set_alpha_to_one=True, timestep_spacing="trailing")
    sched.set_timesteps(n)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g).double()
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet64(x, torch.full((2,), int(t)), class_labels=labels).sample
            vn = torch.randn(shape, generator=g).double() if eta > 0 else None
            x = sched.step(eps, t, x, eta=eta, variance_noise=vn).prev_sample
    out = ddim_sample(unet64, labels, schedule=NoiseSchedule(), num_steps=n, eta=eta,
                      generator=torch.Generator().manual_seed(3))
    # diffusers keeps abar in float32: agreement to float32 precision.
    torch.testing.assert_close(out, x.clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_eta0_deterministic_and_seed_dependent():
    m = build_unet("tiny", num_classes=4, sample_size=8)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.train()
    y = torch.tensor([0, 1, 2, 3, 4])
    kw = dict(schedule=NoiseSchedule(), num_steps=3)
    a = ddim_sample(m, y, generator=torch.Generator().manual_seed(0), **kw)
    b = ddim_sample(m, y, generator=torch.Generator().manual_seed(0), **kw)
    c = ddim_sample(m, y, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert m.training, "training flag must be restored"
    assert a.shape == (5, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    # The label conditions the output.
    d = ddim_sample(m, torch.tensor([1, 1, 1, 1, 1]), generator=torch.Generator().manual_seed(0), **kw)
    assert not torch.allclose(a[0], d[0])
    assert torch.allclose(a[1], d[1])
    # No gradients are tracked.
    assert not a.requires_grad


def test_scheduler_config_matches_schedule():
    s = NoiseSchedule()
    sched = make_ddim_scheduler(s, 2)
    assert sched.timesteps.tolist() == [999, 499]  # trailing: starts from pure noise
    torch.testing.assert_close(sched.alphas_cumprod.double(), s.alphas_cumprod, rtol=1e-6, atol=0)
    assert sched.config.prediction_type == "epsilon"
    assert make_ddim_scheduler(s, 50).timesteps[-1].item() == 19


def test_bad_inputs():
    m = build_unet("tiny", num_classes=2, sample_size=8)
    s = NoiseSchedule()
    with pytest.raises(ValueError, match="labels"):
        ddim_sample(m, torch.tensor([0.5]), schedule=s, num_steps=2)
    with pytest.raises(ValueError, match="labels"):
        ddim_sample(m, torch.tensor([3]), schedule=s, num_steps=2)  # only 0, 1 and null 2 exist
    with pytest.raises(ValueError, match="num_steps"):
        ddim_sample(m, torch.tensor([0]), schedule=s, num_steps=0)
    with pytest.raises(ValueError, match="eta"):
        ddim_sample(m, torch.tensor([0]), schedule=s, num_steps=2, eta=-1.0)
    with pytest.raises(ValueError, match="shape"):
        ddim_sample(m, torch.tensor([0, 1]), schedule=s, num_steps=2, shape=(3, 1, 8, 8))
    with pytest.raises(ValueError, match="schedule"):
        ddim_sample(m, torch.tensor([0]), schedule="linear", num_steps=2)


class _Linear(torch.nn.Module):
    """eps_theta(x_t) = w * x_t[:, :channels], in the parameter's dtype."""

    def __init__(self, w, dtype, channels=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=dtype))
        self.channels = channels

    def forward(self, x, t, class_labels=None):
        out = self.w * x
        return out if self.channels is None else out[:, :self.channels]


def test_bad_values_refused_not_propagated():
    """(6) eta = NaN / inf gave an all-NaN sample, eta > 1 a clamped (wrong) variance, eta = True ran
    as 1; a non-generator failed deep inside; a model with fewer output channels broadcast."""
    s = NoiseSchedule(20)
    m = _Linear(0.5, torch.float32)
    kw = dict(schedule=s, num_steps=2, shape=(2, 1, 3, 3))
    for eta in (float("nan"), float("inf"), 1.5, True):
        with pytest.raises(ValueError, match="eta"):
            ddim_sample(m, None, eta=eta, **kw)
    with pytest.raises(ValueError, match="generator"):
        ddim_sample(m, None, generator=5, **kw)
    with pytest.raises(ValueError, match="labels"):
        ddim_sample(build_unet("tiny", num_classes=2, sample_size=8), torch.tensor([True]), schedule=s, num_steps=2)
    with pytest.raises(ValueError, match="model.*shape"):
        ddim_sample(_Linear(0.5, torch.float32, channels=1), None, schedule=s, num_steps=2, shape=(2, 3, 3, 3))
    assert torch.isfinite(ddim_sample(m, None, eta=1.0, generator=torch.Generator().manual_seed(0), **kw)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("clip", [False, True])
def test_half_precision_model_state_in_float32(dtype, clip):
    """(4) x0_hat divides by sqrt(a_t) ~ 6e-3: a half-precision state amplified its rounding and 50
    steps accumulated it (4-5x one ulp). The state now stays in float32; the result is within one
    ulp (machine epsilon at 1) of a float64 run of the same model."""
    w = float(torch.tensor(0.9, dtype=dtype))  # the same weight in both models
    kw = dict(schedule=NoiseSchedule(), num_steps=50, shape=(3, 1, 5, 7), clip_sample=clip)
    out = ddim_sample(_Linear(w, dtype), None, generator=torch.Generator().manual_seed(0), **kw)
    ref = ddim_sample(_Linear(w, torch.float64), None, generator=torch.Generator().manual_seed(0), **kw)
    assert out.dtype == dtype
    assert (out.double() - ref).abs().max() <= torch.finfo(dtype).eps
