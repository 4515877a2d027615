"""ScaleConfig.ema_decay (cdgfast/train/ema.py): the average against a naive float64 loop, the driver's
use of it (the model after a task's training is the average of its trajectory), validation, and --resume."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from cdgfast.train import RunConfig, RunError, run
from cdgfast.train.ema import WeightEMA, check_ema_decay, ema_decay_at
from cdgfast.train.presets import PRESETS, ScaleConfig
from cdgfast.train.protocol import check_scale_config
from train_hooks import InjectedCrash, StopAt


def naive_ema(trajectory, decay):
    """trajectory[0]: the starting weights; trajectory[n + 1]: after step n. Plain float64 loop."""
    avg = [t.double().clone() for t in trajectory[0]]
    for n, weights in enumerate(trajectory[1:]):
        d = min(decay, (1.0 + n) / (10.0 + n))
        avg = [d * a + (1.0 - d) * w.double() for a, w in zip(avg, weights)]
    return avg


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_weight_ema_matches_a_naive_loop(dtype, tol):
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(3, 5, 7, generator=g, dtype=dtype), torch.randn(1, generator=g, dtype=dtype),
              torch.randn(11, generator=g, dtype=dtype)]
    ema = WeightEMA(params, 0.97)
    trajectory = [[p.clone() for p in params]]
    decays = []
    for _ in range(300):  # past the warm-up: d_n = (1 + n) / (10 + n) reaches 0.97 at n = 290
        for p in params:
            p.add_(torch.randn(p.shape, generator=g, dtype=dtype))
        trajectory.append([p.clone() for p in params])
        decays.append(ema.update())
    assert decays[:3] == pytest.approx([0.1, 2 / 11, 3 / 12], rel=1e-15)
    assert decays[-1] == 0.97  # the cap reached
    ref = naive_ema(trajectory, 0.97)
    ema.copy_to()
    for p, r in zip(params, ref):
        assert p.dtype == dtype
        torch.testing.assert_close(p.double(), r, rtol=tol, atol=tol)
    # the state round-trips and goes on identically
    state = ema.state_dict()
    other = WeightEMA([p.clone() for p in params], 0.97)
    other.load_state_dict(state)
    assert other.num_updates == 300 and all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(params, 0.5).load_state_dict(state)
    with pytest.raises(ValueError, match="shadow"):
        WeightEMA(params[:2], 0.97).load_state_dict(state)


def test_ema_decay_validation():
    for bad in (1.0, -0.1, float("nan"), True, "0.9", 2):
        with pytest.raises(ValueError, match="ema_decay"):
            check_ema_decay(bad)
        with pytest.raises(ValueError, match="ema_decay"):
            check_scale_config(ScaleConfig(ema_decay=bad))
    assert check_ema_decay(None) is None and check_ema_decay(0) == 0.0
    check_scale_config(ScaleConfig(ema_decay=0.999))
    with pytest.raises(ValueError, match="n"):
        ema_decay_at(-1, 0.9)
    with pytest.raises(ValueError, match="params"):
        WeightEMA([], 0.9)
    assert ema_decay_at(0, 0.0) == 0.0  # decay 0: the average is the last weights


def test_driver_swaps_in_the_average_of_the_tasks_trajectory():
    """_train_task: after the last step the model holds the EMA (naive loop over the weights seen after
    every step), not the last weights."""
    from cdgfast.methods import create
    from cdgfast.models.unet import build_unet
    from cdgfast.params import trainable_parameters
    from cdgfast.train.loop import _train_task

    torch.manual_seed(0)
    model = build_unet("tiny", num_classes=4, in_channels=1, sample_size=8)
    method = create("finetune", seed=1)
    method.setup(num_classes=4)
    sc = ScaleConfig(lr=1e-2, ema_decay=0.8)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 1, 8, 8, generator=g), torch.randint(0, 4, (5,), generator=g)
    trajectory = [[p.detach().clone() for p in trainable_parameters(model)]]

    def on_step(name, k, step):
        trajectory.append([p.detach().clone() for p in trainable_parameters(model)])

    _train_task(model, method, lambda: [(x, y)], 25, sc, "finetune", 0, 1, print, False, on_step)
    assert len(trajectory) == 26
    ref = naive_ema(trajectory, 0.8)
    last = trajectory[-1]
    for p, r, w in zip(trainable_parameters(model), ref, last):
        torch.testing.assert_close(p.double(), r, rtol=1e-6, atol=1e-7)
    assert any((p - w).abs().max() > 1e-4 for p, w in zip(trainable_parameters(model), last))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("clf_cache"))


@pytest.fixture
def ema_smoke(monkeypatch):
    preset = copy.deepcopy(PRESETS["default"])
    preset.scales["smoke"].ema_decay = 0.9
    monkeypatch.setitem(PRESETS, "default", preset)
    return preset


def _cfg(out, cache_dir, **kw):
    return RunConfig(**dict(scale="smoke", steps=3, fid_samples=3, num_tasks=2, progress=False, methods=["gd"],
                            out=str(out), cache_dir=cache_dir, **kw))


def test_resume_with_ema_reproduces_the_uninterrupted_run(tmp_path, cache_dir, ema_smoke, monkeypatch):
    full = run(_cfg(tmp_path / "full", cache_dir))
    run_json = json.loads((tmp_path / "full" / "run.json").read_text())
    assert run_json["scale_config"]["ema_decay"] == 0.9
    out = tmp_path / "crashed"
    with pytest.raises(InjectedCrash):
        run(_cfg(out, cache_dir), callbacks=StopAt("gd:1:2"))  # second task, mid-way
    resumed = run(_cfg(out, cache_dir, resume=True))
    a, b = full["methods"]["gd"], resumed["methods"]["gd"]
    for ra, rb in zip(a["fid"], b["fid"]):
        assert [x if x is None else pytest.approx(x, rel=1e-6) for x in ra] == rb
    assert b["loss_means"] == [pytest.approx(d, rel=1e-6) for d in a["loss_means"]]
    # the EMA changes the result (so the comparison above can fail) ...
    ema_smoke.scales["smoke"].ema_decay = None
    plain = run(_cfg(tmp_path / "plain", cache_dir))
    assert plain["methods"]["gd"]["fid"][0][0] != pytest.approx(a["fid"][0][0], rel=1e-6)
    # ... and a run started with another decay is not continued
    with pytest.raises(RunError, match="ema_decay"):
        run(_cfg(out, cache_dir, resume=True))
