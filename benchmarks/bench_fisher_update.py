"""Streaming Fisher updates on flat buffers (cdgfast.fisher.accumulator), on two kinds of input:

  * per-parameter tensors: arbitrary tensors shaped like a model's parameters (each its own allocation),
    streamed into slices of the flat Fisher buffer: torch._foreach_* over cached views of the slices;
  * a flattened model (cdgfast.params.flatten_parameters_): the per-parameter gradients are views that
    tile one flat gradient buffer; the accumulator detects that (no copy) and does ONE flat op over P
    elements. Given as the list [p.grad ...] (detected) and as the flat buffer itself (fp.grad).

Baselines:
  * loop      a per-parameter Python loop over per-parameter buffers (`F[n] += g[n] ** 2`, or
              `F[n].mul_(gamma).add_(new[n])`), the way EWC code is usually written;
  * foreach   torch._foreach_* over prebuilt views of the flat buffer's slices (no validation);
  * flat copy `dst.copy_(src)` of the same number of elements: the memory-bandwidth yardstick.

Cases:
  * add_squared     F += g * g for a gradient (FisherAccumulator.add_squared);
  * add_sq_grads    F += sq for squared-gradient sums (FisherAccumulator.add_sq_grads);
  * online_update   F <- gamma F + F_new (cdgfast.fisher.online_update on flat buffers, fisher_update_ with
                    gamma on lists), and the per-parameter loop over the same data.
Effective bandwidth = bytes read + written / time (add: read F and the source, write F: 12 bytes per
fp32 element; copy: 8 bytes per element). Targets (issue 6): >= 5x the per-parameter loop and >= 0.5 of
the flat copy's bandwidth, reported separately for each kind of input.
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
OURS_LIST = "cdgfast per-parameter tensors (cached foreach)"
OURS_TILED = "cdgfast flattened model, [p.grad ...] (flat path)"
OURS_FLAT = "cdgfast flattened model, fp.grad (flat buffer)"


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


def _flattened(shapes, src, device):
    """A module with parameters of `shapes`, flattened; its gradients set to the values of `src`."""
    from cdgfast.params import flatten_parameters_

    mod = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(s, device=device)) for s in shapes])
    fp = flatten_parameters_(mod)
    fp.sync_grads()  # no backward ran: attach the gradient views
    with torch.no_grad():
        for gv, t in zip(fp.grads(), src):
            gv.copy_(t)
    return fp


def run(cfg: C.BenchConfig) -> Tuple[List[dict], List[dict]]:
    rows, targets = [], []
    acc_mod = C.optional_import("cdgfast.fisher.accumulator")
    params_mod = C.optional_import("cdgfast.params")
    flat_ok = acc_mod is not None and params_mod is not None and hasattr(params_mod, "flatten_parameters_")
    g = torch.Generator().manual_seed(cfg.seed)
    for set_name, shapes in C.progress(list(shape_sets(cfg).items()), cfg, "fisher_update shape sets"):
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
        # small buffers: many repetitions, the medians of 50 us calls are noisy on a shared machine
        reps = cfg.reps if cfg.quick else (200 if P < (1 << 21) else 4 * cfg.reps)
        fp = _flattened(shapes, src, cfg.device) if flat_ok else None

        # bandwidth yardstick
        dst_copy = torch.empty(P, device=cfg.device)
        t_copy = C.bench(lambda: dst_copy.copy_(flat_src), cfg, reps=reps)
        bw_copy = 8 * P / (t_copy * 1e-3) / 1e9
        rows.append(C.row(FAMILY, "flat copy", "torch copy_ (yardstick)", time_ms=t_copy,
                          note=f"{bw_copy:.2f} GB/s", **tag))

        # ---- add_squared: F += g*g, and add_sq_grads: F += sq ----
        for case, square, loop_name, foreach_name in (
                ("add_squared", True, "loop (per-parameter F[n] += g[n]**2)",
                 "foreach (_foreach_addcmul_ on prebuilt slices)"),
                ("add_sq_grads", False, "loop (per-parameter F[n] += sq[n])",
                 "foreach (_foreach_add_ on prebuilt slices)")):
            impls = _accumulate_impls(acc_mod, fp, case, P, src, cfg.device)
            if acc_mod is None:
                rows.append(C.unavailable(FAMILY, case, "cdgfast FisherAccumulator", "accumulator missing", **tag))
            impls += [(loop_name, _loop_accumulate(per_param, src, square)),
                      (foreach_name, _foreach_accumulate(views, src, square))]
            _measure(rows, targets, cfg, case, impls, P, bw_copy, reps, tag, set_name)

        # ---- online update: F <- gamma F + F_new ----
        case = "online_update"
        impls = []
        if acc_mod is not None:
            online = flat.clone()
            impls.append((OURS_LIST + ", fisher_update_(gamma)",
                          lambda: acc_mod.fisher_update_(online, src, gamma=0.9)))
            if fp is not None:
                online_t = flat.clone()
                impls.append((OURS_TILED + ", fisher_update_(gamma)",
                              lambda: acc_mod.fisher_update_(online_t, [p.grad for p in fp.params], gamma=0.9)))
            online_f = flat.clone()
            impls.append(("cdgfast online_update (flat [P] tensors)",
                          lambda: acc_mod.online_update(online_f, flat_src, 0.9)))

        def loop_online():
            for F, t in zip(per_param, src):
                F.mul_(0.9).add_(t)

        def foreach_online():
            torch._foreach_mul_(views, 0.9)
            torch._foreach_add_(views, src)

        impls += [("loop (per-parameter mul_ + add_)", loop_online),
                  ("foreach (_foreach_mul_ + _foreach_add_ on prebuilt slices)", foreach_online)]
        _measure(rows, targets, cfg, case, impls, P, bw_copy, reps, tag, set_name)
        _check_correct(rows, acc_mod, fp is not None, cfg, shapes, tag)
        fp = None  # free before the next size (the closures above are done with them)
    return C.fill_ratios(rows), targets


def _accumulate_impls(acc_mod, fp, method, P, src, device):
    """Our implementations of FisherAccumulator.<method> (add_squared or add_sq_grads): per-parameter
    tensors, and with a flattened model `fp` its [p.grad ...] list and its flat gradient."""
    impls = []
    if acc_mod is None:
        return impls
    add = getattr(acc_mod.FisherAccumulator(P, device=device), method)
    impls.append((OURS_LIST, lambda: add(src, 1)))
    if fp is not None:
        add_t = getattr(acc_mod.FisherAccumulator(P, device=device), method)
        impls.append((OURS_TILED, lambda: add_t([p.grad for p in fp.params], 1)))
        impls.append((OURS_FLAT, lambda: add_t(fp.grad, 1)))
    return impls


def _loop_accumulate(per_param, src, square):
    """The usual EWC code: F[n] += g[n]**2 (or F[n] += sq[n]), one parameter at a time (the choice made
    outside the timed loop)."""
    if square:
        def loop():
            for F, t in zip(per_param, src):
                F += t ** 2
    else:
        def loop():
            for F, t in zip(per_param, src):
                F += t
    return loop


def _foreach_accumulate(views, src, square):
    if square:
        return lambda: torch._foreach_addcmul_(views, src, src)
    return lambda: torch._foreach_add_(views, src)


def _measure(rows, targets, cfg, case, impls, P, bw_copy, reps, tag, set_name):
    times = {}
    for name, fn in impls:
        fn()
        t = C.bench(fn, cfg, reps=reps)
        bw = 12 * P / (t * 1e-3) / 1e9
        times[name] = (t, bw)
        rows.append(C.row(FAMILY, case, name, time_ms=t, note=f"{bw:.2f} GB/s effective ({bw / bw_copy:.2f} of copy)",
                          **tag))
    loops = [k for k in times if k.startswith("loop")]
    if not loops or case not in ("add_squared", "online_update"):
        return
    t_loop = times[loops[0]][0]
    for ours in (k for k in times if k.startswith("cdgfast")):
        if ours.startswith("cdgfast online_update") or ours.startswith(OURS_FLAT):
            continue  # flat [P] inputs: reported as rows; the targets are about per-parameter inputs
        t, bw = times[ours]
        targets.append(C.target(f"{case} [{ours}] speed-up vs per-parameter loop ({set_name})", t_loop / t,
                                ">= 5x", t_loop / t >= 5))
        targets.append(C.target(f"{case} [{ours}] effective bandwidth / flat copy ({set_name})", bw / bw_copy,
                                ">= 0.5", bw / bw_copy >= 0.5))


def _check_correct(rows, acc_mod, flat_ok, cfg, shapes, tag):
    """The accumulator's results against per-parameter loops (once, float64): both input kinds, with gamma."""
    if acc_mod is None:
        return
    g = torch.Generator().manual_seed(1)
    src = [torch.randn(s, generator=g, dtype=torch.float64).to(cfg.device) for s in shapes]
    P = sum(t.numel() for t in src)
    ref = torch.cat([(t * t).reshape(-1) for t in src])
    acc = acc_mod.FisherAccumulator(P, device=cfg.device, dtype=torch.float64)
    acc.add_squared(src, 1)
    acc.add_squared(src, 1)
    rows.append(C.row(FAMILY, "add_squared", OURS_LIST + " (correctness check, fp64)",
                      rel_err=C.rel_err(acc.diagonal(), ref), **tag))
    if flat_ok:
        from cdgfast.params import flatten_parameters_

        mod = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(s, dtype=torch.float64, device=cfg.device))
                                      for s in shapes])
        fp = flatten_parameters_(mod)
        fp.sync_grads()  # no backward ran: attach the gradient views
        with torch.no_grad():
            for gv, t in zip(fp.grads(), src):
                gv.copy_(t)
        F0 = torch.rand(P, generator=g, dtype=torch.float64).to(cfg.device)
        F = acc_mod.fisher_update_(F0.clone(), [p.grad for p in fp.params], gamma=0.9, scale=0.5, square=True)
        rows.append(C.row(FAMILY, "online_update", OURS_TILED + " (correctness check, fp64, gamma 0.9, squared)",
                          rel_err=C.rel_err(F, 0.9 * F0 + 0.5 * ref), **tag))


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
