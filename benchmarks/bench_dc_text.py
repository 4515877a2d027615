"""DC-score training step over K = 5 text conditions on a tiny text-conditional UNet (issue 12).

A UNet2DConditionModel built from a config (no download; cross_attention_dim 32) with LoRA (peft) on the
cross-attention K/V only (`attn2.to_k`, `attn2.to_v`). M unique prompts' encoder hidden states [M, L, D];
each sample takes K of them through index [B, K]; the same (t, eps) for every condition of a sample.
  * cdgfast     cdgfast.ops.dc_predictions (prefix once per sample, prompt K/V once per call) +
                dc_cross_entropy + backward + Adam step on the LoRA parameters;
  * naive B x K the K conditions as B*K rows (x_t, t and the prompts' hidden states repeated), one forward;
  * K_forwards  K separate forwards of B rows, stacked;
  * plain       one plain training step (forward over B with the sample's own prompt, MSE, backward, Adam).
The saving of each shared part is measured by switching it on alone on top of the naive B x K step:
  * prefix only   the condition-independent prefix (time MLP, conv_in, down blocks and first ResNet /
                  self-attention before the first cross-attention) once per sample, prompts repeated;
  * prompt K/V only  every cross-attention's to_k / to_v on the M unique prompts once, prefix on B*K rows.
Two prompt widths: D = 32 (the tiny model's own) and D = 768 (Stable Diffusion v1.x's CLIP width, where
the K/V projections of 77 tokens per row are a real share of the step).
"""
from __future__ import annotations

import sys
from typing import List, Tuple

import torch

try:
    from . import _common as C
except ImportError:
    import _common as C  # type: ignore

FAMILY = "dc_text"
K = 5


def text_unet(size: int, width: int = 32):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=size, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width, norm_num_groups=16, attention_head_dim=8)


def run(cfg: C.BenchConfig) -> Tuple[List[dict], List[dict]]:
    rows, targets = [], []
    for width in ((32,) if cfg.quick else (32, 768)):
        r, t = _run_width(cfg, width)
        rows += r
        targets += t
    return rows, targets


def _run_width(cfg: C.BenchConfig, D: int) -> Tuple[List[dict], List[dict]]:
    from peft import LoraConfig, inject_adapter_in_model

    from cdgfast.diffusion import NoiseSchedule
    from cdgfast.ops import dc_cross_entropy, dc_predictions
    from cdgfast.ops.dc_predictions import _cross_attentions, _prompt_processors, _share_rows, shared_prefix_modules

    B, M, L, size = (2, 3, 7, 8) if cfg.quick else (8, 6, 77, 32)
    torch.manual_seed(cfg.seed)
    unet = text_unet(size, D)
    targets_kv = [n for n, _ in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    unet = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets_kv), unet).to(cfg.device)
    for n, p in unet.named_parameters():
        p.requires_grad_("lora_" in n)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    g = torch.Generator().manual_seed(cfg.seed)
    sched = NoiseSchedule()
    x = torch.randn(B, 4, size, size, generator=g).to(cfg.device)
    eps = torch.randn(B, 4, size, size, generator=g).to(cfg.device)
    t = torch.randint(0, 1000, (B,), generator=g).to(cfg.device)
    ehs = torch.randn(M, L, D, generator=g).to(cfg.device)
    idx = torch.stack([torch.randperm(M, generator=g)[:K] if M >= K else torch.randint(0, M, (K,), generator=g)
                       for _ in range(B)]).to(cfg.device)
    own = torch.ones(B, dtype=torch.long, device=cfg.device)  # the sample's own prompt sits at index 1
    x_t = sched.add_noise(x, eps, t)

    def fast():
        return dc_predictions(unet, x_t, t, ehs, idx)

    def naive_bk():
        xk, tk = x_t.repeat_interleave(K, 0), t.repeat_interleave(K, 0)
        return unet(xk, tk, encoder_hidden_states=ehs[idx.reshape(-1)]).sample.view(B, K, *x_t.shape[1:])

    def prefix_only():
        xk, tk = x_t.repeat_interleave(K, 0), t.repeat_interleave(K, 0)
        with _share_rows(shared_prefix_modules(unet), B, K):
            out = unet(xk, tk, encoder_hidden_states=ehs[idx.reshape(-1)]).sample
        return out.view(B, K, *x_t.shape[1:])

    def kv_only():
        xk, tk = x_t.repeat_interleave(K, 0), t.repeat_interleave(K, 0)
        with _prompt_processors(_cross_attentions(unet), idx.reshape(-1)):
            out = unet(xk, tk, encoder_hidden_states=ehs).sample
        return out.view(B, K, *x_t.shape[1:])

    def k_forwards():
        return torch.stack([unet(x_t, t, encoder_hidden_states=ehs[idx[:, k]]).sample for k in range(K)], 1)

    def dc_step(pred_fn):
        def step():
            opt.zero_grad(set_to_none=True)
            dc_cross_entropy(pred_fn(), eps, own).backward()
            opt.step()
        return step

    def plain():
        opt.zero_grad(set_to_none=True)
        pred = unet(x_t, t, encoder_hidden_states=ehs[idx[:, 1]]).sample
        (pred - eps).pow(2).mean().backward()
        opt.step()

    with torch.no_grad():
        ref = k_forwards().double()
        err = float((fast().double() - ref).abs().max() / ref.abs().max())
        for part in (prefix_only, kv_only):  # the ablations compute the same thing
            torch.testing.assert_close(part().double(), ref, rtol=1e-4, atol=1e-5)
    impls = {"cdgfast dc_predictions + dc_cross_entropy": dc_step(fast),
             "naive B x K repeat + dc_cross_entropy": dc_step(naive_bk),
             "naive + shared prefix only": dc_step(prefix_only),
             "naive + shared prompt K/V only": dc_step(kv_only),
             "K separate forwards + dc_cross_entropy": dc_step(k_forwards),
             "plain training step": plain}
    times = C.bench_interleaved(impls, cfg, reps=cfg.reps if cfg.quick else max(3, cfg.reps))
    tag = dict(model=f"tiny text UNet + LoRA attn2 K/V (P={C.num_params(unet)})",
               size=f"B={B} K={K} M={M} L={L} D={D} {size}x{size}")
    op = f"DC-score step over text (K=5, D={D})"
    rows = [C.row(FAMILY, op, name, time_ms=ms,
                  rel_err=err if name.startswith("cdgfast") else None, **tag) for name, ms in times.items()]
    t_dc = times["cdgfast dc_predictions + dc_cross_entropy"]
    t_plain, t_naive = times["plain training step"], times["naive B x K repeat + dc_cross_entropy"]
    targets = [C.target(f"{op} / plain training step", t_dc / t_plain, "<= 5", t_dc / t_plain <= 5),
               C.target(f"naive B x K step / {op}", t_naive / t_dc, "informative", None),
               C.target(f"saving of the shared prefix alone, D={D} (1 - prefix-only / naive)",
                        1 - times["naive + shared prefix only"] / t_naive, "informative", None),
               C.target(f"saving of the shared prompt K/V alone, D={D} (1 - K/V-only / naive)",
                        1 - times["naive + shared prompt K/V only"] / t_naive, "informative", None)]
    return C.fill_ratios(rows), targets


if __name__ == "__main__":
    rows, targets = run(C.BenchConfig(quick="--quick" in sys.argv))
    print(C.markdown_table(rows, C.ROW_FIELDS))
    print(C.markdown_table(targets, C.TARGET_FIELDS))
