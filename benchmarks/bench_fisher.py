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
  * opacus     Opacus `GradSampleModule` (per-sample gradients of every layer, B x P), squared and summed;
  * backpack   BackPACK's `SumGradSquared` extension on the layers it supports (Conv2d, Linear,
               Embedding; not GroupNorm / LayerNorm, whose parameters it leaves out: reported);
  * anchor     one batched forward + backward over the same samples (the floor the hook contractions
               add to): diag_fisher / anchor is reported, and rank1_fisher against two of them.
The contenders of the diagonal (cdgfast, vmap(grad), Opacus, BackPACK, anchor) are timed round-robin
in one run (`_common.bench_interleaved`). Opacus / BackPACK come with `pip install -e .[bench]`
(installed with --no-deps so that torch is never replaced); absent, their rows say so.
Accuracy: rel_err of cdgfast's mean_grad / coeff / diagonal against the per-sample loop (fp32).
"""
from __future__ import annotations

import copy
import sys
import warnings
from typing import Callable, List, Tuple

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


def anchor_pass(model, loss, batches) -> None:
    """One batched forward + backward (gradients of the summed losses) per batch: the anchor."""
    params = C.params_of(model)
    for b in batches:
        torch.autograd.grad(loss(model, b).sum(), params)


def opacus_diag(model, loss, batches) -> torch.Tensor:
    """sum of Opacus' grad_sample**2 over the samples / N. The GradSampleModule is made and closed in
    the call (its hooks would otherwise run in every other contender's forward)."""
    from opacus import GradSampleModule

    params = C.params_of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Using a non-full backward hook" and friends
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
        try:
            total, n = None, 0
            for b in batches:
                loss(gsm, b).sum().backward()
                s = torch.cat([p.grad_sample.square().sum(0).reshape(-1) for p in params])
                total = s if total is None else total.add_(s)
                n += b["x"].shape[0]
                for p in params:
                    p.grad_sample = None
                    p.grad = None
        finally:
            gsm._close()
    return total / n


def backpack_setup(model) -> torch.nn.Module:
    """A copy of the model with BackPACK's hooks on every leaf module that holds parameters (extending
    the whole UNet with use_converter=True fails in torch.fx tracing); a copy, because the hooks keep
    every layer's input and output alive in the other contenders' forwards too."""
    from backpack import extend

    m = copy.deepcopy(model)
    for mod in m.modules():
        if not list(mod.children()) and list(mod.parameters(recurse=False)):
            extend(mod)
    return m


def backpack_diag(model, loss, batches) -> Tuple[torch.Tensor, List[bool]]:
    """(sum of BackPACK's sum_grad_squared over the batches / N, zeros where it gives none; covered)."""
    from backpack import backpack
    from backpack.extensions import SumGradSquared

    params = C.params_of(model)
    total, n, covered = None, 0, None
    for b in batches:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with backpack(SumGradSquared()):
                loss(model, b).sum().backward()
        got = [getattr(p, "sum_grad_squared", None) for p in params]
        covered = [g is not None for g in got]
        s = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(got, params)])
        total = s if total is None else total.add_(s)
        n += b["x"].shape[0]
        for p in params:
            p.grad = None
            if hasattr(p, "sum_grad_squared"):
                del p.sum_grad_squared
    return total / n, covered


def _worst_layers(est: torch.Tensor, ref: torch.Tensor, model, k: int = 3) -> str:
    from cdgfast.params import split_like, trainable_named

    names, params = trainable_named(model)
    errs = sorted(((C.rel_err(a, r), n) for n, a, r in zip(names, split_like(est, params), split_like(ref, params))),
                  reverse=True)[:k]
    return ", ".join(f"{n} {e:.2g}" for e, n in errs if e > 1e-4)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
def sizes(cfg: C.BenchConfig):
    """(preset, N, B) per model."""
    if cfg.quick:
        return [("tiny", 4, 2)]
    return [("tiny", 256, 64), ("small", 64, 32)]


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
            res = fn()
            r1 = C.bench_interleaved({"rank1": fn, "anchor": lambda: [anchor_pass(model, loss, batches) for _ in "12"]},
                                     cfg, reps=1 if cfg.quick else 3, warmup=0)
            t = r1["rank1"]
            e_mu, e_c = C.rel_err(res.mean_grad, ref_mu), abs(res.coeff - ref_c) / abs(ref_c)
            rows.append(C.row(FAMILY, case, "anchor: 2 x batched fwd+bwd", time_ms=r1["anchor"],
                              note="the floor of the two passes", **tag))
            targets.append(C.target(f"rank1_fisher time / anchor (2 x batched fwd+bwd) ({preset})", t / r1["anchor"],
                                    "(reported)", None))
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
        chunk = None if preset == "tiny" else 16
        # (label, full run, one batch for the memory, note); timed round-robin below
        contenders: List[Tuple[str, Callable, Callable, str]] = []
        if diag_fisher is not None:
            contenders.append(("cdgfast.diag_fisher", lambda: diag_fisher(model, loss, batches, progress=False),
                               lambda: diag_fisher(model, loss, one, progress=False), "per-layer contractions, O(P)"))
        else:
            rows.append(C.unavailable(FAMILY, case, "cdgfast.diag_fisher", "cdgfast.fisher.diag_fisher missing", **tag))
        contenders.append(("vmap(grad) squared", lambda: vmap_diag(model, loss, batches, chunk),
                           lambda: vmap_diag(model, loss, one, chunk), f"B x P per-sample gradients, chunk_size={chunk}"))
        if C.installed("opacus"):
            contenders.append(("opacus GradSampleModule", lambda: opacus_diag(model, loss, batches),
                               lambda: opacus_diag(model, loss, one), "grad_sample**2 summed, B x P"))
        else:
            rows.append(C.unavailable(FAMILY, case, "opacus GradSampleModule", "not installed (pip install -e .[bench])", **tag))
        bp_model = None
        if C.installed("backpack"):
            try:
                bp_model = backpack_setup(model)
                contenders.append(("backpack SumGradSquared", lambda: backpack_diag(bp_model, loss, batches),
                                   lambda: backpack_diag(bp_model, loss, one), ""))
            except Exception as e:
                rows.append(C.unavailable(FAMILY, case, "backpack SumGradSquared", f"{type(e).__name__}: {e}", **tag))
        else:
            rows.append(C.unavailable(FAMILY, case, "backpack SumGradSquared", "not installed (pip install -e .[bench])", **tag))
        contenders.append(("anchor: batched fwd+bwd", lambda: anchor_pass(model, loss, batches),
                           lambda: anchor_pass(model, loss, one), "the floor: one forward + backward per batch"))
        results, usable = {}, []
        for label, fn, fn_one, note in contenders:  # a peer that fails on this model gets a row saying how
            try:
                fn_one()
                results[label] = fn()
                usable.append((label, fn, fn_one, note))
            except Exception as e:
                rows.append(C.unavailable(FAMILY, case, label, f"{type(e).__name__}: {str(e)[:200]}", **tag))
        times = C.bench_interleaved({lab: fn for lab, fn, _, _ in usable}, cfg,
                                    reps=1 if cfg.quick else 3, warmup=0)
        mems = {}
        for label, fn, fn_one, note in usable:
            mems[label] = C.peak_memory(fn_one, cfg)
            res = results[label]
            e = None
            if label.startswith("backpack"):
                res, covered = res
                from cdgfast.params import split_like

                parts = split_like(res, C.params_of(bp_model))
                refs = split_like(ref_diag, C.params_of(model))
                e = C.rel_err(torch.cat([a.reshape(-1) for a, c in zip(parts, covered) if c]),
                              torch.cat([r.reshape(-1) for r, c in zip(refs, covered) if c]))
                n_cov = sum(p.numel() for p, c in zip(C.params_of(model), covered) if c)
                note = (f"covers {n_cov} of {P} parameters (rel_err on those); no rule for GroupNorm / LayerNorm "
                        f"(their {P - n_cov} parameters left out); use_converter=True fails (torch.fx)")
            elif res is not None:
                e = C.rel_err(res, ref_diag)
                if label.startswith("opacus") and e > 1e-4:
                    note += f"; worst layers: {_worst_layers(res, ref_diag, model)}"
            rows.append(C.row(FAMILY, case, label, time_ms=times[label], peak_mb=mems[label] / 2**20,
                              rel_err=e, note=note, **tag))
        bp_model = None
        t_sq, res = C.timed(lambda: sq_batch_diag(model, loss, batches), cfg, reps=1 if cfg.quick else 3, warmup=0)
        e_sq = C.rel_err(res, ref_diag)
        e_sqB = C.rel_err(sq_batch_diag(model, loss, batches, scale_by_batch=True), ref_diag)
        rows.append(C.row(FAMILY, case, "sq_batch (squared batch gradient; wrong)", time_ms=t_sq, rel_err=e_sq,
                          peak_mb=C.peak_memory(lambda: sq_batch_diag(model, loss, one), cfg) / 2**20,
                          note=f"not the empirical Fisher; scaled by B: rel err {e_sqB:.3g}", **tag))
        t_diag = times.get("cdgfast.diag_fisher")
        if t_diag is not None:
            mem_diag = mems["cdgfast.diag_fisher"]
            if preset == "tiny":
                targets.append(C.target(f"diag_fisher speed-up vs per-sample loop ({preset})", t_loop / t_diag,
                                        ">= 3x", t_loop / t_diag >= 3))
            t_vmap = times.get("vmap(grad) squared")
            if t_vmap is not None and preset == "tiny":
                targets.append(C.target(f"diag_fisher time / vmap(grad) time ({preset})", t_diag / t_vmap, "<= 1",
                                        t_diag <= t_vmap))
            peers = {k: v for k, v in times.items() if k.startswith(("vmap", "opacus"))}
            if peers:
                best = min(peers, key=peers.get)
                targets.append(C.target(f"diag_fisher speed-up vs the faster of Opacus and vmap(grad) ({preset}, N={N}, B={B})",
                                        peers[best] / t_diag, ">= 1.25x", peers[best] / t_diag >= 1.25,
                                        f"faster peer: {best}"))
            t_anchor = times.get("anchor: batched fwd+bwd")
            if t_anchor is not None:
                targets.append(C.target(f"diag_fisher time / anchor (batched fwd+bwd) ({preset})", t_diag / t_anchor,
                                        "(reported)", None))
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
