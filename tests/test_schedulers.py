"""diffusers schedulers wherever cdgfast takes a noise schedule, and the three prediction types (issue 15).

Equivalence: a DDPMScheduler / DDIMScheduler with the default linear betas gives exactly the numbers of
NoiseSchedule() in the per-sample loss, every method's terms, DDIM sampling and the replay pool. The v /
sample prediction formulas are checked against naive float64 loops written here.
"""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from cdgfast.data import generate_replay_pool
from cdgfast.diffusion import DiffusionLoss, NoiseSchedule, as_schedule, make_batch
from cdgfast.methods.ccd import reverse_mean
from cdgfast.methods.dc import condition_predictions
from cdgfast.models import build_unet
from cdgfast.ops import dc_errors, dc_scores
from cdgfast.sampling import ddim_sample
from test_methods import NUM_CLASSES, run_two_tasks, tiny


def _batch(n=5, seed=0, shape=(1, 8, 8), T=1000):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g) * 2 - 1
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return make_batch(x, y, NoiseSchedule(T), torch.Generator().manual_seed(seed + 1))


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_default_scheduler_is_the_default_schedule(cls):
    s = as_schedule(cls(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear"))
    ref = NoiseSchedule()
    assert s == ref and s.prediction_type == "epsilon"
    assert torch.equal(s.alphas_cumprod, ref.alphas_cumprod) and s.alphas_cumprod.dtype == torch.float64
    # diffusers' own float32 numbers agree to float32 precision
    theirs = cls(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    torch.testing.assert_close(theirs.alphas_cumprod.double(), ref.alphas_cumprod, rtol=1e-5, atol=1e-7)
    b = _batch()
    torch.testing.assert_close(theirs.add_noise(b["x"], b["eps"], b["t"]), ref.add_noise(b["x"], b["eps"], b["t"]),
                               rtol=1e-5, atol=1e-5)


def test_other_beta_schedules_and_trained_betas():
    sd = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    s = as_schedule(sd)
    assert s.prediction_type == "v_prediction" and s.beta_schedule == "scaled_linear"
    naive = torch.tensor([(0.00085 ** 0.5 + i * (0.012 ** 0.5 - 0.00085 ** 0.5) / 999) ** 2 for i in range(1000)],
                         dtype=torch.float64)
    torch.testing.assert_close(s.betas, naive, rtol=1e-12, atol=0)
    torch.testing.assert_close(s.alphas_cumprod, sd.alphas_cumprod.double(), rtol=1e-5, atol=1e-7)
    cos = as_schedule(DDIMScheduler(beta_schedule="squaredcos_cap_v2"))  # diffusers' own betas, in float64
    assert torch.equal(cos.betas, DDIMScheduler(beta_schedule="squaredcos_cap_v2").betas.double())
    betas = torch.linspace(1e-3, 0.05, 50, dtype=torch.float64)
    tb = as_schedule(DDPMScheduler(num_train_timesteps=50, trained_betas=betas.numpy()))
    assert torch.equal(tb.betas, betas) and tb.num_timesteps == 50
    # the same NoiseSchedule directly
    assert NoiseSchedule(50, trained_betas=betas) == tb


@pytest.mark.parametrize("bad, match", [
    (object(), "schedule: expected a cdgfast.diffusion.NoiseSchedule or a diffusers scheduler"),
    (DDPMScheduler(prediction_type="flow"), "prediction_type 'flow' is not supported"),
])
def test_as_schedule_refuses(bad, match):
    with pytest.raises(ValueError, match=match):
        as_schedule(bad)
    with pytest.raises(ValueError, match="schedule"):
        DiffusionLoss(bad)


def test_noise_schedule_refuses_bad_new_fields():
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule(prediction_type="v")
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule(beta_schedule="cosine")
    with pytest.raises(ValueError, match="trained_betas: expected num_timesteps = 10"):
        NoiseSchedule(10, trained_betas=[0.1] * 9)
    with pytest.raises(ValueError, match="trained_betas: expected every beta in"):
        NoiseSchedule(2, trained_betas=[0.1, 1.0])


def test_diffusion_loss_identical_with_a_scheduler():
    torch.manual_seed(0)
    model = build_unet("tiny", num_classes=NUM_CLASSES, sample_size=8)
    b = _batch()
    ref = DiffusionLoss(NoiseSchedule())(model, b)
    got = DiffusionLoss(DDPMScheduler())(model, b)
    assert torch.equal(ref, got)


def _naive_target(kind, x0, eps, t, abar):
    out = torch.empty_like(x0, dtype=torch.float64)
    for i in range(x0.shape[0]):
        a = float(abar[int(t[i])])
        if kind == "epsilon":
            out[i] = eps[i].double()
        elif kind == "v_prediction":
            out[i] = a ** 0.5 * eps[i].double() - (1 - a) ** 0.5 * x0[i].double()
        else:
            out[i] = x0[i].double()
    return out


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_per_sample_loss_and_conversion_against_naive_formulas(kind):
    torch.manual_seed(1)
    model = build_unet("tiny", num_classes=NUM_CLASSES, sample_size=8).double()
    s = NoiseSchedule(prediction_type=kind)
    b = {k: (v.double() if v.is_floating_point() else v) for k, v in _batch(6).items()}
    b["t"][0], b["t"][1] = 0, 999  # the ends of the schedule
    loss = DiffusionLoss(DDPMScheduler(prediction_type=kind))(model, b)
    x_t = s.add_noise(b["x"], b["eps"], b["t"])
    with torch.no_grad():
        out = model(x_t, b["t"], class_labels=b["y"]).sample
    target = _naive_target(kind, b["x"], b["eps"], b["t"], s.alphas_cumprod)
    naive = torch.stack([((out[i] - target[i]) ** 2).mean() for i in range(6)])
    torch.testing.assert_close(loss.detach(), naive, rtol=1e-12, atol=1e-14)
    # eps_from_prediction inverts the target: the true target gives back the true eps
    torch.testing.assert_close(s.eps_from_prediction(target, x_t, b["t"]), b["eps"], rtol=1e-9, atol=1e-9)
    # and for a model output: naive per-sample conversion
    conv = s.eps_from_prediction(out, x_t, b["t"])
    for i in range(6):
        a = float(s.alphas_cumprod[int(b["t"][i])])
        if kind == "epsilon":
            want = out[i]
        elif kind == "v_prediction":
            want = a ** 0.5 * out[i] + (1 - a) ** 0.5 * x_t[i]
        else:
            want = (x_t[i] - a ** 0.5 * out[i]) / (1 - a) ** 0.5
        torch.testing.assert_close(conv[i], want, rtol=1e-12, atol=1e-12)
    # diffusers' own velocity agrees with the v target (float32 betas there)
    if kind == "v_prediction":
        v = DDPMScheduler().get_velocity(b["x"].float(), b["eps"].float(), b["t"])
        torch.testing.assert_close(v.double(), target, rtol=1e-4, atol=1e-5)


def test_dc_errors_of_a_v_model_are_eps_errors():
    """DC scores of a v-prediction model: outputs converted to eps, errors ||eps - eps_hat_k||^2, which
    equal abar_t ||v - v_hat_k||^2 (naive per-sample, per-condition loop)."""
    torch.manual_seed(2)
    model = build_unet("tiny", num_classes=NUM_CLASSES, sample_size=8).double()
    sv = NoiseSchedule(prediction_type="v_prediction")
    b = {k: (v.double() if v.is_floating_point() else v) for k, v in _batch(3).items()}
    cond = torch.tensor([[NUM_CLASSES, 0, 1], [NUM_CLASSES, 2, 3], [NUM_CLASSES, 1, 0]])
    with torch.no_grad():
        eps_hat = condition_predictions(model, b, cond, DDPMScheduler(prediction_type="v_prediction"))
        err = dc_errors(eps_hat, b["eps"])
        x_t = sv.add_noise(b["x"], b["eps"], b["t"])
        v = _naive_target("v_prediction", b["x"], b["eps"], b["t"], sv.alphas_cumprod)
        for i in range(3):
            a = float(sv.alphas_cumprod[int(b["t"][i])])
            for k in range(3):
                v_hat = model(x_t[i:i + 1], b["t"][i:i + 1], class_labels=cond[i, k:k + 1]).sample[0]
                e_hat = a ** 0.5 * v_hat + (1 - a) ** 0.5 * x_t[i]
                naive = ((b["eps"][i] - e_hat) ** 2).mean()
                torch.testing.assert_close(err[i, k], naive, rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(err[i, k], a * ((v[i] - v_hat) ** 2).mean(), rtol=1e-8, atol=1e-12)
        # an eps schedule gives the raw outputs (the same numbers as before the change)
        raw = condition_predictions(model, b, cond, NoiseSchedule())
        assert torch.isfinite(dc_scores(raw, b["eps"])).all()


def test_reverse_mean_of_a_v_model_uses_its_eps():
    torch.manual_seed(3)
    sv = NoiseSchedule(prediction_type="v_prediction")
    b = _batch(4)
    x_t = sv.add_noise(b["x"], b["eps"], b["t"])
    v = sv.target(b["x"], b["eps"], b["t"])
    eps = sv.eps_from_prediction(v, x_t, b["t"])
    torch.testing.assert_close(reverse_mean(DDPMScheduler(prediction_type="v_prediction"), x_t, b["t"], eps),
                               reverse_mean(NoiseSchedule(), x_t, b["t"], b["eps"]), rtol=1e-5, atol=1e-5)


class _Oracle(torch.nn.Module):
    """Predicts a fixed function of x_t in the requested parameterisation, so the three prediction types
    describe the same eps predictor: eps_hat(x_t, t) = 0.3 x_t."""

    def __init__(self, schedule):
        super().__init__()
        self.s = schedule
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t, class_labels=None):
        eps = 0.3 * x_t + self.w
        a, s, _ = self.s._coefficients(t, x_t, x_t.dtype)
        if self.s.prediction_type == "v_prediction":
            return (eps - s * x_t) / a
        if self.s.prediction_type == "sample":
            return (x_t - s * eps) / a
        return eps


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_ddim_sampling_converts_to_eps(kind):
    ref = ddim_sample(_Oracle(NoiseSchedule()), None, schedule=NoiseSchedule(), num_steps=5,
                      generator=torch.Generator().manual_seed(0), shape=(2, 1, 4, 4))
    sched = DDIMScheduler(prediction_type=kind)
    got = ddim_sample(_Oracle(as_schedule(sched)), None, schedule=sched, num_steps=5,
                      generator=torch.Generator().manual_seed(0), shape=(2, 1, 4, 4))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_sampling_and_replay_pool_identical_with_a_scheduler():
    torch.manual_seed(4)
    model = build_unet("tiny", num_classes=NUM_CLASSES, sample_size=8)
    y = torch.tensor([0, 1, 2])
    a = ddim_sample(model, y, schedule=NoiseSchedule(), num_steps=3, generator=torch.Generator().manual_seed(0))
    b = ddim_sample(model, y, schedule=DDIMScheduler(), num_steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    pa = generate_replay_pool(model, [0, 1], 2, schedule=NoiseSchedule(), num_steps=2, seed=3)
    pb = generate_replay_pool(model, [0, 1], 2, schedule=DDPMScheduler(), num_steps=2, seed=3)
    assert torch.equal(pa[0], pb[0]) and torch.equal(pa[1], pb[1])


def _run(name, schedule):
    return run_two_tasks(name, schedule=schedule)


@pytest.mark.parametrize("name", ["finetune", "kd", "gd", "rank1", "ccd", "ewc_dc", "dsc"])
def test_methods_identical_with_a_ddpm_scheduler(name):
    _, _, ref = _run(name, NoiseSchedule())
    _, _, got = _run(name, DDPMScheduler())
    assert [(k, sorted(t)) for k, t in ref] == [(k, sorted(t)) for k, t in got]
    for (_, a), (_, b) in zip(ref, got):
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


@pytest.mark.parametrize("name", ["kd", "gd", "ccd", "ewc_dc", "dsc", "rank1"])
def test_methods_run_with_v_prediction(name):
    model, method, hist = _run(name, DDPMScheduler(prediction_type="v_prediction"))
    assert method.schedule.prediction_type == "v_prediction"
    last = hist[-1][1]
    assert tiny(name).terms <= set(last)
    assert all(torch.isfinite(v) for v in last.values())
