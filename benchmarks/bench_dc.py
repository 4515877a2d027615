"""Diffusion-classifier (DC) scores (SPEC 2.2).

1. The fused op: cdgfast.ops.dc_cross_entropy forward + backward against the eager composite
   (errors = mean_S (eps_pred - eps)^2, log_softmax(-err / tau), cross-entropy), at UNet output sizes.
2. The DC-score consolidation step with k = 5 conditions (the null class, the current class and
   three previous ones; the same (t, eps) for every condition of a sample):
     * cdgfast  one batched forward over B x K (x_t computed once and repeated) + dc_cross_entropy
                + backward + Adam step;
     * K_forwards  K separate forwards of B samples, stacked, then the same loss and step;
     * plain    one plain training step (forward over B, MSE, backward, Adam) for the ratio.
"""
from __future__ import annotations

import sys
from typing import List, Tuple

import torch
import torch.nn.functional as F

try:
    from . import _common as C
except ImportError:
    import _common as C  # type: ignore

def _reps(cfg):
    """Cheap calls: more repetitions at full size; as given in the smoke run."""
    return cfg.reps if cfg.quick else 4 * cfg.reps


FAMILY = "dc"
K = 5


def eager_dc_cross_entropy(eps_pred, eps, target, tau=1.0):
    err = (eps_pred - eps.unsqueeze(1)).pow(2).flatten(2).mean(-1)
    logp = F.log_softmax(-err / tau, dim=1)
    return F.nll_loss(logp, target)


def conditions(y, num_classes, k, g):
    """[B, k]: null class, current class, k-2 other classes drawn without replacement."""
    B = y.shape[0]
    cond = torch.empty(B, k, dtype=torch.long)
    cond[:, 0] = num_classes
    cond[:, 1] = y.cpu()
    for i in range(B):
        others = torch.tensor([c for c in range(num_classes) if c != int(y[i])])
        cond[i, 2:] = others[torch.randperm(len(others), generator=g)[:k - 2]]
    return cond.to(y.device)


def sizes(cfg):
    if cfg.quick:
        return dict(op=[(4, K, (1, 8, 8))], step=[("tiny", 4)])
    return dict(op=[(64, K, (1, 16, 16)), (64, K, (3, 32, 32)), (16, K, (4, 64, 64))],
                step=[("tiny", 32)])  # the small UNet's B x K step is minutes on a shared CPU


def run(cfg: C.BenchConfig) -> Tuple[List[dict], List[dict]]:
    rows, targets = [], []
    dc_ce = C.optional_import("cdgfast.ops.dc", "dc_cross_entropy")
    g = torch.Generator().manual_seed(cfg.seed)
    # ---- the op ----
    for B, k, S in sizes(cfg)["op"]:
        pred = torch.randn(B, k, *S, generator=g).to(cfg.device).requires_grad_(True)
        eps = torch.randn(B, *S, generator=g).to(cfg.device)
        tgt = torch.randint(0, k, (B,), generator=g).to(cfg.device)
        tag = dict(model="", size=f"B={B} K={k} S={S}")
        with torch.no_grad():
            ref = float(eager_dc_cross_entropy(pred.double(), eps.double(), tgt))
        impls = [("eager composite", eager_dc_cross_entropy)]
        if dc_ce is not None:
            impls.insert(0, ("cdgfast.dc_cross_entropy", dc_ce))
        else:
            rows.append(C.unavailable(FAMILY, "dc_cross_entropy fwd+bwd", "cdgfast", "cdgfast.ops.dc missing", **tag))
        for name, fn in impls:
            def call(fn=fn):
                pred.grad = None
                fn(pred, eps, tgt).backward()
            t = C.bench(call, cfg, reps=_reps(cfg))
            with torch.no_grad():
                val = float(fn(pred, eps, tgt))
            rows.append(C.row(FAMILY, "dc_cross_entropy fwd+bwd", name, time_ms=t, rel_err=abs(val - ref) / abs(ref),
                              peak_mb=C.peak_memory(call, cfg) / 2**20, **tag))

    # ---- the consolidation step ----
    from cdgfast.diffusion import NoiseSchedule, predict_eps

    sched = NoiseSchedule()
    loss = C.loss_fn()
    for preset, B in sizes(cfg)["step"]:
        model = C.make_model(preset, cfg)
        ncls = model.config.num_class_embeds - 1
        batch = C.make_batches(model, B, B, cfg)[0]
        cond = conditions(batch["y"], ncls, K, g)
        target_idx = torch.ones(B, dtype=torch.long, device=cfg.device)  # the current class sits at index 1
        params = C.params_of(model)
        opt = torch.optim.Adam(params, lr=1e-4)
        tag = dict(model=f"{preset} (P={C.num_params(model)})", size=f"B={B} K={K} {C.model_size(model)}px")
        x_t = sched.add_noise(batch["x"], batch["eps"], batch["t"])  # noising once, shared by every condition

        def batched_step(ce):
            def step():
                opt.zero_grad(set_to_none=True)
                xk = x_t.repeat_interleave(K, dim=0)
                tk = batch["t"].repeat_interleave(K, dim=0)
                pred = predict_eps(model, xk, tk, cond.reshape(-1)).view(B, K, *x_t.shape[1:])
                ce(pred, batch["eps"], target_idx).backward()
                opt.step()
            return step

        def separate_step(ce):
            def step():
                opt.zero_grad(set_to_none=True)
                pred = torch.stack([predict_eps(model, x_t, batch["t"], cond[:, k]) for k in range(K)], dim=1)
                ce(pred, batch["eps"], target_idx).backward()
                opt.step()
            return step

        plain = C.train_step_fn(model, loss, batch)
        ce = dc_ce if dc_ce is not None else eager_dc_cross_entropy
        ce_name = "cdgfast.dc_cross_entropy" if dc_ce is not None else "eager composite (cdgfast op missing)"
        impls = [(f"cdgfast batched B x K forward + {ce_name}", batched_step(ce)),
                 ("batched B x K forward + eager composite", batched_step(eager_dc_cross_entropy)),
                 (f"K separate forwards + {ce_name}", separate_step(ce)),
                 ("plain training step", plain)]
        if cfg.quick:  # the smoke run: one of each code path
            del impls[1]
        times = {}
        for name, fn in impls:
            fn()
            t = C.bench(fn, cfg, reps=cfg.reps if cfg.quick else max(2, cfg.reps - 2))
            times[name] = t
            mem = None if cfg.quick and "separate" in name else C.peak_memory(fn, cfg) / 2**20
            rows.append(C.row(FAMILY, "DC consolidation step (K=5)", name, time_ms=t, peak_mb=mem, **tag))
        t_dc, t_plain = times[impls[0][0]], times["plain training step"]
        rows[-1]["note"] = f"DC step = {t_dc / t_plain:.2f}x this"
        if preset == "tiny" or cfg.quick:
            targets.append(C.target(f"DC-score step (K=5) / plain training step ({preset}, B={B})", t_dc / t_plain,
                                    "<= 5.5", t_dc / t_plain <= 5.5))
        else:
            targets.append(C.target(f"DC-score step (K=5) / plain training step ({preset}, B={B}; informative)",
                                    t_dc / t_plain, "<= 5.5", t_dc / t_plain <= 5.5))
        model = opt = None  # free before the next preset (the closures above are done with them)
    return C.fill_ratios(rows), targets


def test_dc_cross_entropy(benchmark):
    fn = C.optional_import("cdgfast.ops.dc", "dc_cross_entropy")
    if fn is None:
        import pytest
        pytest.skip("cdgfast.ops.dc not available")
    pred = torch.randn(32, K, 1, 16, 16, requires_grad=True)
    eps = torch.randn(32, 1, 16, 16)
    tgt = torch.randint(0, K, (32,))
    benchmark(lambda: fn(pred, eps, tgt).backward())


def test_eager_dc_cross_entropy(benchmark):
    pred = torch.randn(32, K, 1, 16, 16, requires_grad=True)
    eps = torch.randn(32, 1, 16, 16)
    tgt = torch.randint(0, K, (32,))
    benchmark(lambda: eager_dc_cross_entropy(pred, eps, tgt).backward())


if __name__ == "__main__":
    rows, targets = run(C.BenchConfig(quick="--quick" in sys.argv))
    print(C.markdown_table(rows, C.ROW_FIELDS))
    print(C.markdown_table(targets, C.TARGET_FIELDS))
