"""The `rankk` method (rank-1 paper, Table 5): its state against per-sample gradients computed one sample
at a time here (the gram estimator exactly, through an SVD of the explicit gradient matrix), the penalty
against the formula, the composition with GD and its hyperparameters."""
import math

import pytest
import torch

import cdgfast.methods as M
from cdgfast.data import Task
from cdgfast.diffusion import NoiseSchedule
from cdgfast.params import trainable_parameters
from test_methods_refs import NC, data_for, flat, naive_per_sample_grads, replay_batches, unet


def _run(method, model, tasks=2, n=6):
    method.setup(num_classes=NC, schedule=NoiseSchedule())
    seen = []
    for t in range(tasks):
        classes = [2 * t, 2 * t + 1]
        method.begin_task(model, Task(t, classes, torch.arange(n)))
        with torch.no_grad():
            for p in trainable_parameters(model):
                p.add_(1e-3 * torch.randn_like(p))
        data = data_for(classes, n=n, seed=30 + t)
        seen.append((method.generator.get_state(), data, flat(model).double()))
        method.end_task(model, data)
    return seen


@pytest.mark.parametrize("k", [1, 3])
def test_gram_estimator_state_is_the_exact_top_k_of_the_task_fisher(k):
    model = unet(3).eval()  # the Gram estimator measures in eval mode; the reference below uses the same
    m = M.create("rankk", k=k, estimator="gram", gram_samples=6, lam=3.0)
    seen = _run(m, model)
    P = flat(model).numel()
    assert m.anchors.shape == (2, P) and m.directions.shape == (2, k, P) and m.eigenvalues.shape == (2, k)
    for t, (state, data, theta) in enumerate(seen):
        batches, _ = replay_batches(state, data)   # the t / eps the method drew for its Gram batch
        G = naive_per_sample_grads(model_at(theta, model), batches).double()
        _, S, Vh = torch.linalg.svd(G, full_matrices=False)
        ref_evals = S[:k] ** 2 / G.shape[0]           # F = G^T G / n
        torch.testing.assert_close(m.eigenvalues[t].double(), ref_evals, rtol=2e-3, atol=0)
        cos = (m.directions[t].double() * Vh[:k]).sum(1).abs()
        assert torch.all(cos > 1 - 1e-3), cos
        torch.testing.assert_close(m.anchors[t].double(), theta)


def model_at(theta, like):
    """A copy of `like` with the flat trainable parameters `theta` (the state at that task's end)."""
    import copy

    model = copy.deepcopy(like)
    off = 0
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.copy_(theta[off:off + p.numel()].view_as(p).to(p.dtype))
            off += p.numel()
    return model


def test_power_estimator_state_and_penalty_match_the_formula():
    model = unet(4)
    lam = 5.0
    m = M.create("rankk", k=2, power_iters=3, lam=lam)
    _run(m, model)
    P = flat(model).numel()
    assert m.directions.shape == (2, 2, P) and m.eigenvalues.dtype == torch.float32
    for t in range(2):  # orthonormal directions, non-negative descending eigenvalues
        V = m.directions[t].double()
        torch.testing.assert_close(V @ V.T, torch.eye(2, dtype=torch.float64), atol=1e-5, rtol=0)
        assert m.eigenvalues[t, 0] >= m.eigenvalues[t, 1] >= 0
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(1e-2 * torch.randn_like(p))
    term = float(m.extra_terms(model, None)["rankk"].detach())
    theta = flat(model).double()
    expected = 0.0
    for t in range(2):  # lam/2 sum_t sum_j lambda_tj (v_tj . (theta - theta_t))^2
        for j in range(2):
            proj = float((m.directions[t, j].double() * (theta - m.anchors[t].double())).sum())
            expected += lam / 2 * float(m.eigenvalues[t, j]) * proj ** 2
    assert math.isclose(term, expected, rel_tol=1e-4), (term, expected)


def test_power_estimate_is_reproducible_from_the_seed():
    a, b = M.create("rankk", power_iters=2, seed=7), M.create("rankk", power_iters=2, seed=7)
    _run(a, unet(5), tasks=1)
    _run(b, unet(5), tasks=1)
    torch.testing.assert_close(a.directions, b.directions, rtol=0, atol=0)


def test_composition_with_gd_routes_hyperparameters():
    m = M.create("rankk+gd", k=4, estimator="gram", pool_per_class=3)
    rk = next(x for x in m.members if x.name == "rankk")
    assert rk.config["k"] == 4 and rk.config["estimator"] == "gram"
    assert m.config["rankk.k"] == 4 and m.config["gd.pool_per_class"] == 3


@pytest.mark.parametrize("overrides,key", [({"k": 0}, "k"), ({"k": 6}, "k"), ({"k": 2.0}, "k"),
                                           ({"estimator": "exact"}, "estimator"), ({"power_iters": 0}, "power_iters"),
                                           ({"gram_samples": 1}, "gram_samples")])
def test_bad_hyperparameters_are_refused_before_work(overrides, key):
    with pytest.raises(ValueError, match=rf"^{key}: expected"):
        M.create("rankk", **overrides)
    with pytest.raises(ValueError, match=rf"^{key}: expected"):
        M.create("rankk+gd", **overrides)
