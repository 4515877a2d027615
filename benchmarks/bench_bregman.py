"""Bregman-preconditioned distillation (CCD's L_IKC, SPEC 2.1; a documented reconstruction).

1. cdgfast.ops.bregman_distill forward + backward against the eager composite
   `w = 1 + kappa * h / mean_S(h)`, `mean(w * (student - teacher)^2)`, with and without `precond`.
2. cdgfast.ops.hutchinson_metric on the tiny UNet (one VJP) against the eager
   `autograd.grad(fn(x), x, v) ** 2`, for scale.
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


FAMILY = "bregman"


def eager_bregman(student, teacher, precond=None, kappa=1.0):
    d2 = (student - teacher) ** 2
    if precond is None:
        return d2.mean()
    h = precond.detach()
    m = h.flatten(1).mean(1).clamp_min(torch.finfo(torch.float32).tiny).view(-1, *([1] * (h.dim() - 1)))
    return ((1 + kappa * h / m) * d2).mean()


def eager_hutchinson(fn, x, generator=None):
    xg = x.detach().requires_grad_(True)
    y = fn(xg)
    v = torch.randint(0, 2, y.shape, generator=generator).to(y) * 2 - 1
    (jtv,) = torch.autograd.grad(y, xg, v)
    return jtv.square()


def sizes(cfg):
    if cfg.quick:
        return [(4, (1, 8, 8))]
    return [(64, (1, 16, 16)), (64, (3, 32, 32)), (16, (4, 64, 64)), (8, (4, 128, 128))]


def run(cfg: C.BenchConfig) -> Tuple[List[dict], List[dict]]:
    rows, targets = [], []
    bd = C.optional_import("cdgfast.ops.bregman", "bregman_distill")
    hm = C.optional_import("cdgfast.ops.bregman", "hutchinson_metric")
    g = torch.Generator().manual_seed(cfg.seed)
    for B, S in sizes(cfg):
        s = torch.randn(B, *S, generator=g).to(cfg.device).requires_grad_(True)
        te = torch.randn(B, *S, generator=g).to(cfg.device)
        h = torch.rand(B, *S, generator=g).to(cfg.device)
        for with_h in (True, False):
            pc = h if with_h else None
            case = f"bregman_distill fwd+bwd ({'precond' if with_h else 'no precond'})"
            tag = dict(model="", size=f"B={B} S={S}")
            ref = float(eager_bregman(s.double(), te.double(), None if pc is None else pc.double()))
            impls = [("eager composite", eager_bregman)]
            if bd is not None:
                impls.insert(0, ("cdgfast.bregman_distill", bd))
            else:
                rows.append(C.unavailable(FAMILY, case, "cdgfast.bregman_distill", "cdgfast.ops.bregman missing", **tag))
            for name, fn in impls:
                def call(fn=fn):
                    s.grad = None
                    fn(s, te, pc, 1.0).backward()
                t = C.bench(call, cfg, reps=_reps(cfg))
                with torch.no_grad():
                    val = float(fn(s, te, pc, 1.0))
                rows.append(C.row(FAMILY, case, name, time_ms=t, rel_err=abs(val - ref) / abs(ref),
                                  peak_mb=C.peak_memory(call, cfg) / 2**20, **tag))

    # hutchinson metric through the tiny UNet
    from cdgfast.diffusion import predict_eps

    model = C.make_model("tiny", cfg)
    for p in model.parameters():
        p.requires_grad_(False)  # a frozen teacher
    B = 4 if cfg.quick else 64
    batch = C.make_batches(model, B, B, cfg)[0]
    fn = lambda x: predict_eps(model, x, batch["t"], batch["y"])  # noqa: E731
    tag = dict(model="tiny teacher", size=f"B={B} {C.model_size(model)}px")
    impls = [("eager autograd.grad", eager_hutchinson)]
    if hm is not None:
        impls.insert(0, ("cdgfast.hutchinson_metric", hm))
    for name, f in impls:
        call = lambda f=f: f(fn, batch["x"], torch.Generator().manual_seed(0))  # noqa: E731
        call()
        t = C.bench(call, cfg, reps=max(2, cfg.reps - 2))
        rows.append(C.row(FAMILY, "hutchinson_metric (one VJP)", name, time_ms=t,
                          peak_mb=C.peak_memory(call, cfg) / 2**20, **tag))
    if hm is not None:
        a = hm(fn, batch["x"], torch.Generator().manual_seed(0))
        b = eager_hutchinson(fn, batch["x"], torch.Generator().manual_seed(0))
        rows[-2]["rel_err"] = C.rel_err(a, b)
    return C.fill_ratios(rows), targets


def test_bregman_distill(benchmark):
    fn = C.optional_import("cdgfast.ops.bregman", "bregman_distill")
    if fn is None:
        import pytest
        pytest.skip("cdgfast.ops.bregman not available")
    s = torch.randn(32, 3, 32, 32, requires_grad=True)
    te, h = torch.randn(32, 3, 32, 32), torch.rand(32, 3, 32, 32)
    benchmark(lambda: fn(s, te, h, 1.0).backward())


def test_eager_bregman(benchmark):
    s = torch.randn(32, 3, 32, 32, requires_grad=True)
    te, h = torch.randn(32, 3, 32, 32), torch.rand(32, 3, 32, 32)
    benchmark(lambda: eager_bregman(s, te, h, 1.0).backward())


if __name__ == "__main__":
    rows, targets = run(C.BenchConfig(quick="--quick" in sys.argv))
    print(C.markdown_table(rows, C.ROW_FIELDS))
    print(C.markdown_table(targets, C.TARGET_FIELDS))
