"""Streaming Fisher updates on flat buffers (cdgfast.fisher.accumulator) against

  * loop      a per-parameter Python loop over per-parameter buffers (`F[n] += g[n] ** 2`, or
              `F[n].mul_(gamma).add_(new[n])`), the way EWC code is usually written;
  * foreach   torch._foreach_* over views of the flat buffer's slices;
  * flat copy `dst.copy_(src)` of the same number of elements: the memory-bandwidth yardstick.

Cases (per-parameter lists of tensors shaped like a model's parameters, or synthetic):
  * add_squared     F += g * g for a gradient given per parameter (FisherAccumulator.add_squared);
  * add_sq_grads    F += sq for per-parameter squared-gradient sums (FisherAccumulator.add_sq_grads);
  * online_update   F <- gamma F + F_new on flat buffers (cdgfast.fisher.online_update), and the
                    per-parameter loop over the same data.
Effective bandwidth = bytes read + written / time (add: read F and the source, write F: 12 bytes per
fp32 element; copy: 8 bytes per element).
"""
from __future__ import annotations

import sys
from typing import List, Tuple

import torch

try:
    from . import _common as C
except ImportError:
    import _common as C  # type: ignore

FAMILY = "fisher_update"


def shape_sets(cfg):
    """name -> list of shapes."""
    from cdgfast.models import build_unet

    sets = {}
    presets = ("tiny",) if cfg.quick else ("tiny", "small")
    for preset in presets:
        m = build_unet(preset, sample_size=16)
        sets[f"{preset} UNet params"] = [tuple(p.shape) for p in m.parameters() if p.requires_grad]
    if cfg.quick:
        sets["120 x 1k synthetic"] = [(1000,)] * 120
    else:
        sets["200 x 4k synthetic"] = [(4096,)] * 200
        sets["100 x 256k synthetic"] = [(262144,)] * 100
    return sets


def run(cfg: C.BenchConfig) -> Tuple[List[dict], List[dict]]:
    rows, targets = [], []
    acc_mod = C.optional_import("cdgfast.fisher.accumulator")
    g = torch.Generator().manual_seed(cfg.seed)
    for set_name, shapes in shape_sets(cfg).items():
        P = sum(torch.Size(s).numel() for s in shapes)
        n_t = len(shapes)
        tag = dict(model=set_name, size=f"{n_t} tensors, P={P}")
        src = [torch.randn(s, generator=g).to(cfg.device) for s in shapes]
        per_param = [torch.zeros(s, device=cfg.device) for s in shapes]
        flat = torch.zeros(P, device=cfg.device)
        flat_src = torch.randn(P, generator=g).to(cfg.device)
        views, off = [], 0
        for t in src:
            views.append(flat[off:off + t.numel()].view_as(t))
            off += t.numel()
        reps = cfg.reps if cfg.quick else 4 * cfg.reps

        # bandwidth yardstick
        dst_copy = torch.empty(P, device=cfg.device)
        t_copy = C.bench(lambda: dst_copy.copy_(flat_src), cfg, reps=reps)
        bw_copy = 8 * P / (t_copy * 1e-3) / 1e9
        rows.append(C.row(FAMILY, "flat copy", "torch copy_ (yardstick)", time_ms=t_copy,
                          note=f"{bw_copy:.2f} GB/s", **tag))

        # ---- add_squared: F += g*g over a per-parameter list ----
        case = "add_squared"
        impls = []
        if acc_mod is not None:
            acc = acc_mod.FisherAccumulator(P, device=cfg.device)
            impls.append(("cdgfast FisherAccumulator.add_squared", lambda: acc.add_squared(src, 1)))
        else:
            rows.append(C.unavailable(FAMILY, case, "cdgfast FisherAccumulator", "accumulator missing", **tag))

        def loop_sq():
            for F, t in zip(per_param, src):
                F += t ** 2

        impls += [("loop (per-parameter F[n] += g[n]**2)", loop_sq),
                  ("foreach (_foreach_addcmul_ on slices)", lambda: torch._foreach_addcmul_(views, src, src))]
        _measure(rows, targets, cfg, case, impls, P, n_t, bw_copy, reps, tag, set_name)

        # ---- add_sq_grads: F += sq ----
        case = "add_sq_grads"
        impls = []
        if acc_mod is not None:
            acc2 = acc_mod.FisherAccumulator(P, device=cfg.device)
            impls.append(("cdgfast FisherAccumulator.add_sq_grads", lambda: acc2.add_sq_grads(src, 1)))

        def loop_add():
            for F, t in zip(per_param, src):
                F += t

        impls += [("loop (per-parameter F[n] += sq[n])", loop_add),
                  ("foreach (_foreach_add_ on slices)", lambda: torch._foreach_add_(views, src))]
        _measure(rows, targets, cfg, case, impls, P, n_t, bw_copy, reps, tag, set_name)

        # ---- online update: F <- gamma F + F_new ----
        case = "online_update"
        impls = []
        if acc_mod is not None:
            online = flat.clone()
            impls.append(("cdgfast online_update (flat)", lambda: acc_mod.online_update(online, flat_src, 0.9)))
            impls.append(("cdgfast fisher_update_ (list, gamma)",
                          lambda: acc_mod.fisher_update_(flat, src, gamma=0.9)))

        def loop_online():
            for F, t in zip(per_param, src):
                F.mul_(0.9).add_(t)

        def foreach_online():
            torch._foreach_mul_(views, 0.9)
            torch._foreach_add_(views, src)

        impls += [("loop (per-parameter mul_ + add_)", loop_online), ("foreach (_foreach_mul_ + _foreach_add_)", foreach_online)]
        _measure(rows, targets, cfg, case, impls, P, n_t, bw_copy, reps, tag, set_name)
        _check_correct(rows, acc_mod, cfg, shapes, tag)
    return C.fill_ratios(rows), targets


def _measure(rows, targets, cfg, case, impls, P, n_t, bw_copy, reps, tag, set_name):
    times = {}
    for name, fn in impls:
        fn()
        t = C.bench(fn, cfg, reps=reps)
        bw = 12 * P / (t * 1e-3) / 1e9
        times[name] = (t, bw)
        rows.append(C.row(FAMILY, case, name, time_ms=t, note=f"{bw:.2f} GB/s effective ({bw / bw_copy:.2f} of copy)",
                          **tag))
    ours = [k for k in times if k.startswith("cdgfast")]
    loops = [k for k in times if k.startswith("loop")]
    if ours and loops and case in ("add_squared", "online_update"):
        t, bw = times[ours[-1] if case == "online_update" else ours[0]]
        tl_ = times[loops[0]][0]
        targets.append(C.target(f"{case} [{ours[-1] if case == 'online_update' else ours[0]}] speed-up vs per-parameter loop "
                                f"({set_name})", tl_ / t, ">= 5x", tl_ / t >= 5))
        targets.append(C.target(f"{case} effective bandwidth / flat copy ({set_name})", bw / bw_copy, ">= 0.5",
                                bw / bw_copy >= 0.5))


def _check_correct(rows, acc_mod, cfg, shapes, tag):
    """The accumulator's result against the per-parameter loop (once, float64)."""
    if acc_mod is None:
        return
    g = torch.Generator().manual_seed(1)
    src = [torch.randn(s, generator=g, dtype=torch.float64).to(cfg.device) for s in shapes]
    P = sum(t.numel() for t in src)
    acc = acc_mod.FisherAccumulator(P, device=cfg.device, dtype=torch.float64)
    acc.add_squared(src, 1)
    acc.add_squared(src, 1)
    ref = torch.cat([(2 * t * t).reshape(-1) for t in src]) / 2
    rows.append(C.row(FAMILY, "add_squared", "cdgfast (correctness check, fp64)", rel_err=C.rel_err(acc.diagonal(), ref),
                      **tag))


def test_add_squared(benchmark):
    acc_mod = C.optional_import("cdgfast.fisher.accumulator")
    if acc_mod is None:
        import pytest
        pytest.skip("cdgfast.fisher.accumulator not available")
    src = [torch.randn(4096) for _ in range(120)]
    acc = acc_mod.FisherAccumulator(4096 * 120)
    benchmark(acc.add_squared, src, 1)


def test_loop_squared(benchmark):
    src = [torch.randn(4096) for _ in range(120)]
    F = [torch.zeros(4096) for _ in range(120)]

    def loop():
        for f, t in zip(F, src):
            f += t ** 2

    benchmark(loop)


if __name__ == "__main__":
    rows, targets = run(C.BenchConfig(quick="--quick" in sys.argv))
    print(C.markdown_table(rows, C.ROW_FIELDS))
    print(C.markdown_table(targets, C.TARGET_FIELDS))
