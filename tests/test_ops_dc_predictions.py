"""cdgfast.ops.dc_predictions against K separate forwards (the naive reference), for a class-conditional
UNet2DModel and a text-conditional UNet2DConditionModel; LoRA gradients; processors restored; refusals."""
import pytest
import torch

from cdgfast.models.text import tiny_text_unet
from cdgfast.models.unet import tiny_unet
from cdgfast.ops import dc_cross_entropy, dc_errors, dc_predictions, dc_scores
from cdgfast.ops.dc_predictions import shared_prefix_modules

B, K, M, L, D = 3, 5, 4, 7, 32
TOL = {torch.float32: 2e-5, torch.float64: 1e-11}


def text_unet(dtype=torch.float32, seed=0):
    return tiny_text_unet(cross_attention_dim=D, seed=seed).to(dtype)


def class_unet(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return tiny_unet(num_classes=6).to(dtype)


def text_inputs(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, 16, 16, generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (B,), generator=g)
    ehs = torch.randn(M, L, D, generator=g, dtype=dtype)
    idx = torch.randint(0, M, (B, K), generator=g)
    return x, t, ehs, idx


def class_inputs(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1, 16, 16, generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randint(0, 7, (B, K), generator=g)
    return x, t, y


def naive_text(u, x, t, ehs, idx):
    return torch.stack([u(x, t, encoder_hidden_states=ehs[idx[:, k]]).sample for k in range(idx.shape[1])], 1)


def naive_class(m, x, t, y):
    return torch.stack([m(x, t, class_labels=y[:, k]).sample for k in range(y.shape[1])], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_labels_equal_k_forwards(dtype):
    m = class_unet(dtype)
    x, t, y = class_inputs(dtype)
    out = dc_predictions(m, x, t, y)
    assert out.shape == (B, K, 1, 16, 16) and out.dtype == dtype
    torch.testing.assert_close(out, naive_class(m, x, t, y), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_text_equal_k_forwards(dtype):
    u = text_unet(dtype)
    x, t, ehs, idx = text_inputs(dtype)
    out = dc_predictions(u, x, t, ehs, idx)
    assert out.shape == (B, K, 4, 16, 16) and out.dtype == dtype
    torch.testing.assert_close(out, naive_text(u, x, t, ehs, idx), atol=TOL[dtype], rtol=TOL[dtype])


def test_k1_and_b1():
    u = text_unet(torch.float64)
    x, t, ehs, idx = text_inputs(torch.float64)
    for xs, ts, ix in ((x[:1], t[:1], idx[:1]), (x, t, idx[:, :1])):
        torch.testing.assert_close(dc_predictions(u, xs, ts, ehs, ix), naive_text(u, xs, ts, ehs, ix))


def test_shared_work_runs_once_per_sample_and_kv_once_per_prompt():
    u = text_unet()
    x, t, ehs, idx = text_inputs(torch.float32)
    seen = {}
    mods = shared_prefix_modules(u)
    names = {id(m): n for n, m in u.named_modules()}
    assert u.conv_in in mods and u.down_blocks[0].attentions[0].transformer_blocks[0].attn1 in mods
    hooks = [m.register_forward_hook(lambda mod, a, o: seen.__setitem__(names[id(mod)], a[0].shape[0])) for m in mods]
    kv_rows = []
    to_k = u.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    hooks.append(to_k.register_forward_hook(lambda mod, a, o: kv_rows.append(a[0].shape[0])))
    try:
        dc_predictions(u, x, t, ehs, idx)
    finally:
        for h in hooks:
            h.remove()
    assert set(seen) == {names[id(m)] for m in mods} and set(seen.values()) == {B}, seen
    assert kv_rows == [M]


def test_lora_gradients_equal_naive_path():
    from peft import LoraConfig, inject_adapter_in_model

    dtype = torch.float64
    u = text_unet(dtype)
    targets = [n for n, _ in u.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    u = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False), u)
    lora = {n: p for n, p in u.named_parameters() if "lora_" in n}
    assert lora and all("attn2" in n for n in lora)
    for n, p in u.named_parameters():
        p.requires_grad_(n in lora)
    x, t, ehs, idx = text_inputs(dtype)
    eps = torch.randn(B, 4, 16, 16, dtype=dtype)
    target = torch.randint(0, K, (B,))

    def grads(fn):
        xg = x.clone().requires_grad_(True)
        eg = ehs.clone().requires_grad_(True)
        u.zero_grad(set_to_none=True)
        dc_cross_entropy(fn(xg, eg), eps, target).backward()
        return [lora[n].grad.clone() for n in sorted(lora)] + [xg.grad, eg.grad]

    fast = grads(lambda xg, eg: dc_predictions(u, xg, t, eg, idx))
    ref = grads(lambda xg, eg: naive_text(u, xg, t, eg, idx))
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_class_gradients_to_parameters_and_x_t():
    dtype = torch.float64
    m = class_unet(dtype)
    x, t, y = class_inputs(dtype)
    eps = torch.randn_like(x)

    def grads(fn):
        xg = x.clone().requires_grad_(True)
        m.zero_grad(set_to_none=True)
        dc_scores(fn(xg), eps).sum().backward()
        return [p.grad.clone() for p in m.parameters()] + [xg.grad]

    fast = grads(lambda xg: dc_predictions(m, xg, t, y))
    ref = grads(lambda xg: naive_class(m, xg, t, y))
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_composition_with_dc_ops():
    u = text_unet(torch.float64)
    x, t, ehs, idx = text_inputs(torch.float64)
    eps = torch.randn_like(x)
    pred = dc_predictions(u, x, t, ehs, idx)
    ref = naive_text(u, x, t, ehs, idx)
    err = ((ref - eps[:, None]) ** 2).flatten(2).mean(-1)
    torch.testing.assert_close(dc_errors(pred, eps), err)
    torch.testing.assert_close(dc_scores(pred, eps), torch.log_softmax(-err, -1))
    q = torch.softmax(torch.randn(B, K, dtype=torch.float64), -1)
    torch.testing.assert_close(dc_cross_entropy(pred, eps, q), -(q * torch.log_softmax(-err, -1)).sum(-1).mean())


def test_no_grad_and_inference_mode():
    u = text_unet()
    x, t, ehs, idx = text_inputs(torch.float32)
    ref = dc_predictions(u, x, t, ehs, idx)
    with torch.no_grad():
        torch.testing.assert_close(dc_predictions(u, x, t, ehs, idx), ref)
    with torch.inference_mode():
        torch.testing.assert_close(dc_predictions(u, x, t, ehs, idx), ref.detach())


def test_processors_and_hooks_restored_also_after_exception():
    u = text_unet()
    before = dict(u.attn_processors)
    x, t, ehs, idx = text_inputs(torch.float32)
    dc_predictions(u, x, t, ehs, idx)
    assert all(u.attn_processors[n] is p for n, p in before.items())

    def boom(*a):
        raise RuntimeError("boom")

    h = u.up_blocks[1].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        dc_predictions(u, x, t, ehs, idx)
    h.remove()
    assert all(u.attn_processors[n] is p for n, p in before.items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in u.modules())
    # a plain forward afterwards is the model's own
    torch.testing.assert_close(u(x, t, encoder_hidden_states=ehs[idx[:, 0]]).sample,
                               naive_text(u, x, t, ehs, idx[:, :1])[:, 0])


def test_refusals():
    u = text_unet()
    m = class_unet()
    x, t, ehs, idx = text_inputs(torch.float32)
    xc, tc, y = class_inputs(torch.float32)
    cases = [
        ("model", lambda: dc_predictions("unet", x, t, ehs, idx)),
        ("x_t", lambda: dc_predictions(u, x.long(), t, ehs, idx)),
        ("x_t", lambda: dc_predictions(u, x.double(), t, ehs, idx)),
        ("x_t", lambda: dc_predictions(u, x[:, :3], t, ehs, idx)),
        ("timesteps", lambda: dc_predictions(u, x, t[:2], ehs, idx)),
        ("timesteps", lambda: dc_predictions(u, x, t > 0, ehs, idx)),
        ("conditions", lambda: dc_predictions(u, x, t, ehs[0], idx)),
        ("conditions", lambda: dc_predictions(u, x, t, ehs.double(), idx)),
        ("conditions", lambda: dc_predictions(u, x, t, ehs[..., :16], idx)),
        ("conditions", lambda: dc_predictions(u, x, t, idx)),  # labels for a text model
        ("index", lambda: dc_predictions(u, x, t, ehs)),
        ("index", lambda: dc_predictions(u, x, t, ehs, idx.int())),
        ("index", lambda: dc_predictions(u, x, t, ehs, idx[:2])),
        ("index", lambda: dc_predictions(u, x, t, ehs, idx[:, 0])),
        ("index", lambda: dc_predictions(u, x, t, ehs, idx + M)),
        ("index", lambda: dc_predictions(u, x, t, ehs, idx - M)),
        ("model", lambda: dc_predictions(m, xc, tc, ehs, idx)),  # text for a class model
        ("index", lambda: dc_predictions(m, xc, tc, y, idx)),
        ("conditions", lambda: dc_predictions(m, xc, tc, y[0])),
        ("conditions", lambda: dc_predictions(m, xc, tc, y[:2])),
        ("conditions", lambda: dc_predictions(m, xc, tc, y + 7)),
        ("conditions", lambda: dc_predictions(m, xc, tc, y > 0)),
        ("model", lambda: dc_predictions(_no_class(), xc, tc, y)),
    ]
    cases.append(("expected all tensors on one device", lambda: dc_predictions(u, x, t, ehs.to("meta"), idx)))
    for name, fn in cases:
        with pytest.raises(ValueError, match=name):
            fn()


def _no_class():
    from diffusers import UNet2DModel
    from cdgfast.models.unet import UNET_CONFIGS

    return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, **UNET_CONFIGS["tiny"])


def test_method_condition_predictions_uses_it():
    from cdgfast.diffusion import NoiseSchedule
    from cdgfast.methods.dc import condition_predictions

    m = class_unet(torch.float64)
    x, t, y = class_inputs(torch.float64)
    sched = NoiseSchedule()
    eps = torch.randn_like(x)
    batch = {"x": x, "t": t, "eps": eps}
    x_t = sched.add_noise(x, eps, t)
    torch.testing.assert_close(condition_predictions(m, batch, y, sched), naive_class(m, x_t, t, y))
