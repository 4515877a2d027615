"""Rank-k Fisher estimators against an explicit float64 Fisher F = (1/n) sum_i g_i g_i^T built here from
per-sample gradients (one autograd call per sample) and its exact eigendecomposition."""
import warnings

import pytest
import torch

from cdgfast.fisher import lowrank_fisher_gram, lowrank_fisher_power
from naive import per_sample_gradient_rows

D = torch.float64


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(D)


def loss_fn(model, batch):
    return (model(batch["x"]) - batch["y"]).pow(2).sum(1)


def make_batches(sizes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(b, 3, generator=g, dtype=D), "y": torch.randn(b, 2, generator=g, dtype=D)}
            for b in sizes]


def explicit_fisher(model, batches):
    G = per_sample_gradient_rows(model, loss_fn, batches, [p for p in model.parameters() if p.requires_grad])
    F = G.T @ G / G.shape[0]
    evals, evecs = torch.linalg.eigh(F)
    return F, evals.flip(0), evecs.flip(1).T  # descending, eigenvectors as rows


def assert_same_subspace(V, ref_rows, tol):
    """|cos| = 1 between matching eigenvectors (signs are arbitrary)."""
    cos = (V.double() * ref_rows).sum(1).abs()
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=tol)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_power_iteration_on_fixed_batches_converges_to_the_exact_eigenpairs(k):
    model = mlp()
    batches = make_batches([7, 5, 1, 9])  # odd batch sizes, a one-sample batch
    F, evals, evecs = explicit_fisher(model, batches)
    # the rate is (lambda_{k+1} / lambda_k)^iters: make sure the test would see a wrong answer
    ratio = float(evals[k] / evals[k - 1])
    iters = 400
    assert ratio ** iters < 1e-12, ratio
    est = lowrank_fisher_power(model, loss_fn, batches, k, iters=iters)
    assert est.directions.shape == (k, F.shape[0]) and est.eigenvalues.shape == (k,)
    assert est.directions.dtype == D and est.num_samples == 22
    torch.testing.assert_close(est.eigenvalues, evals[:k], rtol=1e-8, atol=0)
    assert_same_subspace(est.directions, evecs[:k], 1e-8)
    # orthonormal rows; the Rayleigh quotients are the eigenvalues
    torch.testing.assert_close(est.directions @ est.directions.T, torch.eye(k, dtype=D), atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.einsum("kp,pq,kq->k", est.directions, F, est.directions), evals[:k],
                               rtol=1e-8, atol=0)


def test_power_iteration_few_steps_is_not_exact_and_is_reproducible():
    model = mlp()
    batches = make_batches([6, 6])
    _, evals, evecs = explicit_fisher(model, batches)
    a = lowrank_fisher_power(model, loss_fn, batches, 2, iters=1, generator=torch.Generator().manual_seed(3))
    b = lowrank_fisher_power(model, loss_fn, batches, 2, iters=1, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.directions, b.directions, rtol=0, atol=0)
    # one step from a random start is not yet the top eigenvector (so the convergence test means something)
    assert float((a.directions[1] * evecs[1]).sum().abs()) < 1 - 1e-4
    assert float(a.eigenvalues[0]) <= float(evals[0]) * (1 + 1e-12)  # Ritz values never exceed lambda_1


def test_power_iteration_with_fresh_noise_per_pass_uses_every_pass():
    """A callable `batches` is called once per pass: iters + 1 times (fresh t / eps each time)."""
    model = mlp()
    calls = []

    def fresh():
        calls.append(1)
        return make_batches([4, 3], seed=len(calls))

    est = lowrank_fisher_power(model, loss_fn, fresh, 2, iters=3)
    assert len(calls) == 4 and est.num_samples == 7
    assert torch.isfinite(est.directions).all() and (est.eigenvalues >= 0).all()


@pytest.mark.parametrize("n,k", [(2, 1), (13, 4), (30, 5)])
def test_gram_estimator_is_exact(n, k):
    model = mlp(2)
    (batch,) = make_batches([n], seed=4)
    F, evals, evecs = explicit_fisher(model, [batch])
    est = lowrank_fisher_gram(model, loss_fn, batch, k, micro_batch=4, chunk_params=7)  # several groups / chunks
    kk = min(k, n)
    torch.testing.assert_close(est.eigenvalues[:kk], evals[:kk], rtol=1e-10, atol=0)
    assert_same_subspace(est.directions[:kk], evecs[:kk], 1e-9)
    assert est.num_samples == n


def test_gram_estimator_beyond_the_rank_gives_zero_directions_and_warns():
    model = mlp(2)
    (batch,) = make_batches([3], seed=5)
    F, evals, evecs = explicit_fisher(model, [batch])
    with pytest.warns(RuntimeWarning, match="span only 3"):
        est = lowrank_fisher_gram(model, loss_fn, batch, 5)
    torch.testing.assert_close(est.eigenvalues[:3], evals[:3], rtol=1e-10, atol=0)
    assert (est.eigenvalues[3:] == 0).all() and (est.directions[3:] == 0).all()
    # the rank-k Fisher reproduces F exactly when k >= rank
    Fk = (est.directions.T * est.eigenvalues) @ est.directions
    torch.testing.assert_close(Fk, F, rtol=0, atol=1e-10 * float(F.abs().max()))


def test_gram_estimator_restores_the_training_mode():
    model = mlp()
    model.train()
    (batch,) = make_batches([4])
    lowrank_fisher_gram(model, loss_fn, batch, 2)
    assert model.training and all(m.training for m in model.modules())


def test_bad_arguments_name_the_argument():
    model = mlp()
    batches = make_batches([4])
    P = sum(p.numel() for p in model.parameters())
    for k in (0, P + 1, 2.0, True):
        with pytest.raises(ValueError, match="^k: expected"):
            lowrank_fisher_power(model, loss_fn, batches, k)
        with pytest.raises(ValueError, match="^k: expected"):
            lowrank_fisher_gram(model, loss_fn, batches[0], k)
    with pytest.raises(ValueError, match="^iters: expected"):
        lowrank_fisher_power(model, loss_fn, batches, 2, iters=0)
    with pytest.raises(ValueError, match="^method: expected"):
        lowrank_fisher_power(model, loss_fn, batches, 2, method="exact")
    with pytest.raises(ValueError, match="^generator: expected"):
        lowrank_fisher_power(model, loss_fn, batches, 2, generator=0)
    with pytest.raises(ValueError, match="^batches: got a one-shot"):
        lowrank_fisher_power(model, loss_fn, iter(batches), 2)
    with pytest.raises(ValueError, match="^loss_fn: expected"):
        lowrank_fisher_gram(model, None, batches[0], 2)
    with pytest.raises(ValueError, match="^batch: expected at least 2"):
        lowrank_fisher_gram(model, loss_fn, make_batches([1])[0], 1)
    with pytest.raises(ValueError, match="^micro_batch: expected"):
        lowrank_fisher_gram(model, loss_fn, batches[0], 1, micro_batch=0)


def test_runs_under_no_grad_and_inside_transforms_refuses():
    model = mlp()
    batches = make_batches([5])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        a = lowrank_fisher_power(model, loss_fn, batches, 2, iters=2)
    b = lowrank_fisher_power(model, loss_fn, batches, 2, iters=2)
    torch.testing.assert_close(a.directions, b.directions, rtol=0, atol=0)
    with pytest.raises(ValueError, match="torch.func"):
        torch.func.vmap(lambda x: lowrank_fisher_gram(model, loss_fn, batches[0], 1).eigenvalues.sum() * x)(
            torch.ones(2, dtype=D))
