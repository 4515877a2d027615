"""Fisher estimators: cdgfast.fisher.rank1_fisher / diag_fisher against the baselines.

rank1_fisher (mu = mean_i g_i, coeff = mean_i (mu . g_i)^2 / ||mu||^4; two passes over the data):
  * official   the rank-1 paper's procedure: a backward at batch size 1 for every sample, in both passes;
  * vmap_grad  pass 1 one batched backward per batch (as cdgfast), pass 2 per-sample gradients by
               torch.func.vmap(grad) dotted with mu (the generic functorch recipe for mu . g_i).
diag_fisher (mean_i g_i * g_i):
  * vmap_grad  per-sample gradients by vmap(grad), squared and summed;
  * loop       a backward at batch size 1 per sample;
  * sq_batch   the shortcut mean over batches of (batch-mean gradient)^2, which is NOT the empirical
               Fisher: its relative error to the true diagonal is reported (rel_err).
  * train_step one plain training step at the same batch size, for the peak-memory comparison.
Accuracy: rel_err of cdgfast's mean_grad / coeff / diagonal against the per-sample loop (fp32).
Opacus / BackPACK would be further baselines; they are reported as not installed when absent.
"""
from __future__ import annotations

import sys
from typing import List, Tuple

import torch

try:
    from . import _common as C
except ImportError:  # run as a script or collected by pytest from benchmarks/
    import _common as C  # type: ignore

FAMILY = "fisher"


# --------------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------------
def official_rank1(model, loss, batches) -> Tuple[torch.Tensor, float]:
    total, n = None, 0
    for b in batches:
        for g in C.per_sample_grads_loop(model, loss, b):
            total = g.clone() if total is None else total.add_(g)
            n += 1
    mu = total / n
    sq, n2 = 0.0, 0
    for b in batches:
        for g in C.per_sample_grads_loop(model, loss, b):
            sq += float(torch.dot(mu, g)) ** 2
            n2 += 1
    return mu, sq / n2 / float(mu.square().sum()) ** 2


def _batched_mean_grad(model, loss, batches) -> torch.Tensor:
    params = C.params_of(model)
    total, n = None, 0
    for b in batches:
        grads = torch.autograd.grad(loss(model, b).sum(), params)
        flat = torch.cat([g.reshape(-1) for g in grads])
        total = flat if total is None else total.add_(flat)
        n += b["x"].shape[0]
    return total / n


def vmap_rank1(model, loss, batches, chunk_size=None) -> Tuple[torch.Tensor, float]:
    mu = _batched_mean_grad(model, loss, batches)
    sq, n = 0.0, 0
    for b in batches:
        G = C.vmap_per_sample_grads(model, loss, b, chunk_size)
        sq += float((G @ mu).square().sum())
        n += G.shape[0]
        del G
    return mu, sq / n / float(mu.square().sum()) ** 2


def vmap_diag(model, loss, batches, chunk_size=None) -> torch.Tensor:
    total, n = None, 0
    for b in batches:
        G = C.vmap_per_sample_grads(model, loss, b, chunk_size)
        s = G.square().sum(0)
        total = s if total is None else total.add_(s)
        n += G.shape[0]
        del G
    return total / n


def loop_diag(model, loss, batches) -> torch.Tensor:
    total, n = None, 0
    for b in batches:
        for g in C.per_sample_grads_loop(model, loss, b):
            total = g.square() if total is None else total.addcmul_(g, g)
            n += 1
    return total / n


def sq_batch_diag(model, loss, batches, scale_by_batch: bool = False) -> torch.Tensor:
    """mean over batches of (gradient of the batch-mean loss)^2 [times B if scale_by_batch]."""
    params = C.params_of(model)
    total, nb = None, 0
    for b in batches:
        grads = torch.autograd.grad(loss(model, b).mean(), params)
        flat = torch.cat([g.reshape(-1) for g in grads]).square()
        if scale_by_batch:
            flat *= b["x"].shape[0]
        total = flat if total is None else total.add_(flat)
        nb += 1
    return total / nb


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
def sizes(cfg: C.BenchConfig):
    """(preset, N, B) per model."""
    if cfg.quick:
        return [("tiny", 4, 2)]
    return [("tiny", 512, 64), ("small", 64, 32)]


def run(cfg: C.BenchConfig) -> Tuple[List[dict], List[dict]]:
    rows, targets = [], []
    fisher = C.optional_import("cdgfast.fisher")
    rank1_fisher = getattr(fisher, "rank1_fisher", None)
    diag_fisher = getattr(fisher, "diag_fisher", None)
    loss = C.loss_fn()
    for preset, N, B in sizes(cfg):
        model = C.make_model(preset, cfg)
        batches = C.make_batches(model, N, B, cfg)
        one = batches[:1]
        two = [C.slice_batch(batches[0], 0, 2)]  # per-sample loops peak per sample: 2 are enough
        P = C.num_params(model)
        tag = dict(model=f"{preset} (P={P})", size=f"N={N} B={B} {C.model_size(model)}px")
        heavy = dict(reps=1, warmup=0)
        # Warm every code path once at a small size so that lazy initialisation is not timed.
        step = C.train_step_fn(model, loss, batches[0])
        step()
        t_step = C.bench(step, cfg)
        mem_step = C.peak_memory(step, cfg)
        rows.append(C.row(FAMILY, "train_step", "train_step (fwd+bwd+Adam)", time_ms=t_step,
                          peak_mb=mem_step / 2**20, note="one batch of B: the unit for memory", **tag))

        # ---------------- rank-1 ----------------
        case = "rank1_fisher"
        t_off, (ref_mu, ref_c) = C.timed(lambda: official_rank1(model, loss, batches), cfg, **heavy)
        rows.append(C.row(FAMILY, case, "official (per-sample backward, 2 passes)", time_ms=t_off,
                          peak_mb=C.peak_memory(lambda: official_rank1(model, loss, two), cfg) / 2**20, **tag))
        if rank1_fisher is not None:
            fn = lambda: rank1_fisher(model, loss, batches, progress=False)  # noqa: E731
            fn_one = lambda: rank1_fisher(model, loss, one, progress=False)  # noqa: E731
            fn_one()
            t, res = C.timed(fn, cfg, reps=1 if cfg.quick else 2, warmup=0)
            e_mu, e_c = C.rel_err(res.mean_grad, ref_mu), abs(res.coeff - ref_c) / abs(ref_c)
            rows.append(C.row(FAMILY, case, "cdgfast.rank1_fisher", time_ms=t, peak_mb=C.peak_memory(fn_one, cfg) / 2**20,
                              rel_err=max(e_mu, e_c), note=f"mean_grad rel err {e_mu:.2e}, coeff rel err {e_c:.2e}", **tag))
            if preset == "tiny":
                targets.append(C.target(f"rank1_fisher speed-up vs official loop ({preset}, N={N}, B={B})",
                                        t_off / t, ">= 4x", t_off / t >= 4))
                targets.append(C.target(f"rank1_fisher mean_grad rel err ({preset})", e_mu, "<= 1e-5", e_mu <= 1e-5))
                targets.append(C.target(f"rank1_fisher coeff rel err ({preset})", e_c, "<= 1e-4", e_c <= 1e-4))
                for method in (() if cfg.quick else ("jvp", "hooks")):
                    fm = lambda: rank1_fisher(model, loss, batches, method=method, progress=False)  # noqa: E731
                    try:
                        rank1_fisher(model, loss, one, method=method, progress=False)
                        tm = C.bench(fm, cfg, **heavy)
                        rows.append(C.row(FAMILY, case, f"cdgfast.rank1_fisher(method={method!r})", time_ms=tm, **tag))
                    except Exception as e:  # a method the model does not support
                        rows.append(C.unavailable(FAMILY, case, f"cdgfast.rank1_fisher(method={method!r})",
                                                  f"{type(e).__name__}: {e}", **tag))
        else:
            rows.append(C.unavailable(FAMILY, case, "cdgfast.rank1_fisher", "cdgfast.fisher.rank1_fisher missing", **tag))
        try:
            chunk = None if preset == "tiny" else 16
            vmap_rank1(model, loss, one, chunk)
            t, (mu, c) = C.timed(lambda: vmap_rank1(model, loss, batches, chunk), cfg, **heavy)
            e_v = max(C.rel_err(mu, ref_mu), abs(c - ref_c) / abs(ref_c))
            rows.append(C.row(FAMILY, case, "vmap(grad) projections", time_ms=t, rel_err=e_v,
                              peak_mb=C.peak_memory(lambda: vmap_rank1(model, loss, one, chunk), cfg) / 2**20,
                              note="pass 1 batched backward; SDPA has no vmap batching rule (per-sample fallback)", **tag))
        except Exception as e:
            rows.append(C.unavailable(FAMILY, case, "vmap(grad) projections", f"{type(e).__name__}: {e}", **tag))

        # ---------------- diagonal ----------------
        case = "diag_fisher"
        t_loop, ref_diag = C.timed(lambda: loop_diag(model, loss, batches), cfg, **heavy)
        rows.append(C.row(FAMILY, case, "loop (per-sample backward)", time_ms=t_loop,
                          peak_mb=C.peak_memory(lambda: loop_diag(model, loss, two), cfg) / 2**20, **tag))
        t_diag = mem_diag = None
        if diag_fisher is not None:
            fn = lambda: diag_fisher(model, loss, batches, progress=False)  # noqa: E731
            fn_one = lambda: diag_fisher(model, loss, one, progress=False)  # noqa: E731
            fn_one()
            t_diag, res = C.timed(fn, cfg, reps=1 if cfg.quick else 2, warmup=0)
            mem_diag = C.peak_memory(fn_one, cfg)
            e = C.rel_err(res, ref_diag)
            rows.append(C.row(FAMILY, case, "cdgfast.diag_fisher", time_ms=t_diag, peak_mb=mem_diag / 2**20,
                              rel_err=e, **tag))
        else:
            rows.append(C.unavailable(FAMILY, case, "cdgfast.diag_fisher", "cdgfast.fisher.diag_fisher missing", **tag))
        t_vmap = None
        try:
            chunk = None if preset == "tiny" else 16
            vmap_diag(model, loss, one, chunk)
            t_vmap, res = C.timed(lambda: vmap_diag(model, loss, batches, chunk), cfg, **heavy)
            e = C.rel_err(res, ref_diag)
            rows.append(C.row(FAMILY, case, "vmap(grad) squared", time_ms=t_vmap, rel_err=e,
                              peak_mb=C.peak_memory(lambda: vmap_diag(model, loss, one, chunk), cfg) / 2**20,
                              note=f"chunk_size={chunk}", **tag))
        except Exception as e:
            rows.append(C.unavailable(FAMILY, case, "vmap(grad) squared", f"{type(e).__name__}: {e}", **tag))
        t_sq, res = C.timed(lambda: sq_batch_diag(model, loss, batches), cfg, reps=1 if cfg.quick else 3, warmup=0)
        e_sq = C.rel_err(res, ref_diag)
        e_sqB = C.rel_err(sq_batch_diag(model, loss, batches, scale_by_batch=True), ref_diag)
        rows.append(C.row(FAMILY, case, "sq_batch (squared batch gradient; wrong)", time_ms=t_sq, rel_err=e_sq,
                          peak_mb=C.peak_memory(lambda: sq_batch_diag(model, loss, one), cfg) / 2**20,
                          note=f"not the empirical Fisher; scaled by B: rel err {e_sqB:.3g}", **tag))
        for pkg in ("opacus", "backpack"):
            if not C.installed(pkg):
                rows.append(C.unavailable(FAMILY, case, pkg, "not installed (not pip-installed for this run)", **tag))
        if preset == "tiny" and t_diag is not None:
            targets.append(C.target(f"diag_fisher speed-up vs per-sample loop ({preset})", t_loop / t_diag, ">= 3x",
                                    t_loop / t_diag >= 3))
            if t_vmap is not None:
                targets.append(C.target(f"diag_fisher time / vmap(grad) time ({preset})", t_diag / t_vmap, "<= 1",
                                        t_diag <= t_vmap))
            targets.append(C.target(f"diag_fisher peak memory / training step ({preset})", mem_diag / max(mem_step, 1),
                                    "<= 1.5", mem_diag <= 1.5 * mem_step,
                                    f"{mem_diag / 2**20:.1f} MB vs {mem_step / 2**20:.1f} MB"))
        model = None  # free before the next preset (the closures above are done with them)
    return C.fill_ratios(rows), targets


# --------------------------------------------------------------------------------------------------
# pytest-benchmark (small sizes): pytest benchmarks/ --benchmark-enable
# --------------------------------------------------------------------------------------------------
def _setup_small():
    cfg = C.BenchConfig(quick=True, progress=False)
    model = C.make_model("tiny", cfg)
    return model, C.loss_fn(), C.make_batches(model, 16, 8, cfg)


def test_rank1_fisher(benchmark):
    fisher = C.optional_import("cdgfast.fisher")
    if getattr(fisher, "rank1_fisher", None) is None:
        import pytest
        pytest.skip("cdgfast.fisher.rank1_fisher not available")
    model, loss, batches = _setup_small()
    res = benchmark(lambda: fisher.rank1_fisher(model, loss, batches, progress=False))
    assert res.mean_grad.shape == (C.num_params(model),)


def test_rank1_official(benchmark):
    model, loss, batches = _setup_small()
    benchmark(lambda: official_rank1(model, loss, batches))


def test_diag_fisher(benchmark):
    fisher = C.optional_import("cdgfast.fisher")
    if getattr(fisher, "diag_fisher", None) is None:
        import pytest
        pytest.skip("cdgfast.fisher.diag_fisher not available")
    model, loss, batches = _setup_small()
    benchmark(lambda: fisher.diag_fisher(model, loss, batches, progress=False))


def test_diag_vmap(benchmark):
    model, loss, batches = _setup_small()
    benchmark(lambda: vmap_diag(model, loss, batches))


if __name__ == "__main__":
    rows, targets = run(C.BenchConfig(quick="--quick" in sys.argv))
    print(C.markdown_table(rows, C.ROW_FIELDS))
    print(C.markdown_table(targets, C.TARGET_FIELDS))
