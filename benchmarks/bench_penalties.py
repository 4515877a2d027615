"""Consolidation penalties: cdgfast.ops.rank1_penalty / diag_penalty (forward + backward into the
parameters' .grad) against

  * cat   torch.cat of all parameters into a flat theta every step, then the eager formula;
  * loop  a per-parameter Python loop over slices of the flat anchors / directions / Fisher (how
          per-parameter EWC code is usually written);

and the added fraction of a training step: the penalty's forward + backward time over the time of a
plain training step (forward, backward, Adam step) at the benchmark batch size, plus the measured
step with the penalty added. K = 5 consolidated tasks for the rank-1 penalty (and K = 1).
"""
from __future__ import annotations

import sys
from typing import List, Tuple

import torch

try:
    from . import _common as C
except ImportError:
    import _common as C  # type: ignore

def _reps(cfg):
    """Cheap calls: more repetitions at full size; as given in the smoke run."""
    return cfg.reps if cfg.quick else 4 * cfg.reps


FAMILY = "penalties"


def rank1_cat(params, anchors, directions, coeffs):
    theta = torch.cat([p.reshape(-1) for p in params])
    s = ((theta - anchors) * directions).sum(dim=1)
    return 0.5 * (coeffs * s * s).sum()


def rank1_loop(params, anchors, directions, coeffs):
    s, off = 0, 0
    for p in params:
        n = p.numel()
        s = s + ((p.reshape(1, -1) - anchors[:, off:off + n]) * directions[:, off:off + n]).sum(dim=1)
        off += n
    return 0.5 * (coeffs * s * s).sum()


def diag_cat(params, anchor, fisher):
    theta = torch.cat([p.reshape(-1) for p in params])
    return 0.5 * (fisher * (theta - anchor) ** 2).sum()


def diag_loop(params, anchor, fisher):
    total, off = 0, 0
    for p in params:
        n = p.numel()
        total = total + (fisher[off:off + n] * (p.reshape(-1) - anchor[off:off + n]) ** 2).sum()
        off += n
    return 0.5 * total


def sizes(cfg):
    if cfg.quick:
        return [("tiny", 4)]
    return [("tiny", 64), ("small", 32)]


def run(cfg: C.BenchConfig) -> Tuple[List[dict], List[dict]]:
    rows, targets = [], []
    rank1_penalty = C.optional_import("cdgfast.ops.penalties", "rank1_penalty")
    diag_penalty = C.optional_import("cdgfast.ops.penalties", "diag_penalty")
    loss = C.loss_fn()
    for preset, B in sizes(cfg):
        model = C.make_model(preset, cfg)
        params = C.params_of(model)
        P = C.num_params(model)
        batch = C.make_batches(model, B, B, cfg)[0]
        step = C.train_step_fn(model, loss, batch)
        step()
        t_step = C.bench(step, cfg)
        g = torch.Generator().manual_seed(cfg.seed)
        with torch.no_grad():
            theta0 = torch.cat([p.detach().reshape(-1) for p in params])

        def fwd_bwd(fn, *args):
            def call():
                for p in params:
                    p.grad = None
                fn(params, *args).backward()
            return call

        for K in ((1, 5) if not cfg.quick else (5,)):
            anchors = (theta0 + 0.01 * torch.randn(K, P, generator=g).to(cfg.device)).contiguous()
            directions = torch.randn(K, P, generator=g).to(cfg.device)
            coeffs = torch.rand(K, generator=g).to(cfg.device)
            case = f"rank1_penalty K={K}"
            tag = dict(model=f"{preset} (P={P}, {len(params)} tensors)", size=f"K={K}")
            ref = float(rank1_cat([p.detach().double() for p in params], anchors.double(), directions.double(),
                                  coeffs.double()))
            impls = [("cat (torch.cat each step)", rank1_cat), ("loop (per-parameter)", rank1_loop)]
            t_pen = None
            if rank1_penalty is not None:
                impls.insert(0, ("cdgfast.rank1_penalty", rank1_penalty))
            else:
                rows.append(C.unavailable(FAMILY, case, "cdgfast.rank1_penalty", "cdgfast.ops.penalties missing", **tag))
            for name, fn in impls:
                call = fwd_bwd(fn, anchors, directions, coeffs)
                t = C.bench(call, cfg, reps=_reps(cfg))
                with torch.no_grad():
                    val = float(fn(params, anchors, directions, coeffs))
                rows.append(C.row(FAMILY, case, name, time_ms=t, rel_err=abs(val - ref) / abs(ref),
                                  peak_mb=C.peak_memory(call, cfg) / 2**20,
                                  note=f"{100 * t / t_step:.2f}% of a training step", **tag))
                if name.startswith("cdgfast"):
                    t_pen = t
            if t_pen is not None:
                opt_step = _step_with_penalty(model, loss, batch, lambda: rank1_penalty(params, anchors, directions, coeffs))
                opt_step()
                t_both = C.bench(opt_step, cfg)
                rows.append(C.row(FAMILY, case + " in a step", "train_step + cdgfast.rank1_penalty", time_ms=t_both,
                                  note=f"plain step {t_step:.1f} ms: {100 * (t_both - t_step) / t_step:+.1f}% measured "
                                       "(noisy difference)", **tag))
                if K == 5 and preset == "tiny":
                    targets.append(C.target(f"rank1_penalty K=5 fwd+bwd / training step ({preset}, B={B})",
                                            t_pen / t_step, "<= 0.05", t_pen / t_step <= 0.05,
                                            f"{t_pen:.2f} ms vs {t_step:.1f} ms"))
                if K == 5 and preset == "small":
                    targets.append(C.target(f"rank1_penalty K=5 fwd+bwd / training step ({preset}, B={B})",
                                            t_pen / t_step, "<= 0.05 (informative)", t_pen / t_step <= 0.05,
                                            f"{t_pen:.2f} ms vs {t_step:.1f} ms"))

        # diag penalty
        anchor = theta0 + 0.01 * torch.randn(P, generator=g).to(cfg.device)
        fisher = torch.rand(P, generator=g).to(cfg.device)
        case = "diag_penalty"
        tag = dict(model=f"{preset} (P={P}, {len(params)} tensors)", size="")
        ref = float(diag_cat([p.detach().double() for p in params], anchor.double(), fisher.double()))
        impls = [("cat (torch.cat each step)", diag_cat), ("loop (per-parameter)", diag_loop)]
        if diag_penalty is not None:
            impls.insert(0, ("cdgfast.diag_penalty", diag_penalty))
        else:
            rows.append(C.unavailable(FAMILY, case, "cdgfast.diag_penalty", "cdgfast.ops.penalties missing", **tag))
        for name, fn in impls:
            call = fwd_bwd(fn, anchor, fisher)
            t = C.bench(call, cfg, reps=_reps(cfg))
            with torch.no_grad():
                val = float(fn(params, anchor, fisher))
            rows.append(C.row(FAMILY, case, name, time_ms=t, rel_err=abs(val - ref) / abs(ref),
                              peak_mb=C.peak_memory(call, cfg) / 2**20,
                              note=f"{100 * t / t_step:.2f}% of a training step", **tag))
        rows.append(C.row(FAMILY, "train_step", "train_step (fwd+bwd+Adam)", model=f"{preset} (P={P})",
                          size=f"B={B} {C.model_size(model)}px", time_ms=t_step))
        del model
    return C.fill_ratios(rows), targets


def _step_with_penalty(model, loss, batch, penalty, lam: float = 1.0):
    params = C.params_of(model)
    opt = torch.optim.Adam(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        (loss(model, batch).mean() + lam * penalty()).backward()
        opt.step()

    return step


# --------------------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------------------
def _setup(K=5):
    cfg = C.BenchConfig(quick=True, progress=False)
    model = C.make_model("tiny", cfg)
    params = C.params_of(model)
    P = C.num_params(model)
    return params, torch.randn(K, P), torch.randn(K, P), torch.rand(K)


def _fwd_bwd(fn, params, *args):
    for p in params:
        p.grad = None
    fn(params, *args).backward()


def test_rank1_penalty(benchmark):
    fn = C.optional_import("cdgfast.ops.penalties", "rank1_penalty")
    if fn is None:
        import pytest
        pytest.skip("cdgfast.ops.penalties not available")
    params, a, d, c = _setup()
    benchmark(_fwd_bwd, fn, params, a, d, c)


def test_rank1_cat(benchmark):
    params, a, d, c = _setup()
    benchmark(_fwd_bwd, rank1_cat, params, a, d, c)


def test_rank1_loop(benchmark):
    params, a, d, c = _setup()
    benchmark(_fwd_bwd, rank1_loop, params, a, d, c)


def test_diag_penalty(benchmark):
    fn = C.optional_import("cdgfast.ops.penalties", "diag_penalty")
    if fn is None:
        import pytest
        pytest.skip("cdgfast.ops.penalties not available")
    params, a, _, _ = _setup(K=1)
    benchmark(_fwd_bwd, fn, params, a[0], a[0].abs())


if __name__ == "__main__":
    rows, targets = run(C.BenchConfig(quick="--quick" in sys.argv))
    print(C.markdown_table(rows, C.ROW_FIELDS))
    print(C.markdown_table(targets, C.TARGET_FIELDS))
