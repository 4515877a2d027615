"""cdgfast.ops.dc_predictions against the naive path: K separate forwards of the model, one per
condition, for a class-conditional UNet2DModel and a text UNet2DConditionModel (tiny, built from
configs: no downloads), in float64 and float32, with gradients to the parameters (LoRA on attn2 K/V
included) and to x_t; the attention processors and hooks are restored; bad inputs are refused."""
import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from cdgfast.ops import dc_predictions, dc_scores

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}
B, K, M, L, D = 3, 5, 4, 7, 32


def class_unet(dtype):
    torch.manual_seed(0)
    m = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                    norm_num_groups=8, num_class_embeds=6)
    return m.to(dtype)


def text_unet(dtype):
    torch.manual_seed(0)
    m = UNet2DConditionModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(16, 32),
                             layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                             cross_attention_dim=D, attention_head_dim=8)
    return m.to(dtype)


def naive_class(model, x, t, labels):
    return torch.stack([model(x, t, class_labels=labels[:, k]).sample for k in range(labels.shape[1])], 1)


def naive_text(model, x, t, ehs, index):
    return torch.stack([model(x, t, encoder_hidden_states=ehs[index[:, k]]).sample for k in range(index.shape[1])], 1)


def inputs(channels, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, channels, 8, 8, generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (B,), generator=g)
    return x, t, g


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_class_labels_equal_k_forwards_with_gradients(dtype):
    model = class_unet(dtype)
    x, t, g = inputs(1, dtype)
    labels = torch.randint(0, 6, (B, K), generator=g)
    eps = torch.randn(B, 1, 8, 8, generator=g, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast = dc_predictions(model, x1, t, labels)
    ref = naive_class(model, x2, t, labels)
    assert fast.shape == (B, K, 1, 8, 8)
    torch.testing.assert_close(fast, ref, **TOL[dtype])
    params = [p for p in model.parameters()]
    gf = torch.autograd.grad(dc_scores(fast, eps)[:, 0].sum(), [x1, *params], allow_unused=True)
    gr = torch.autograd.grad(dc_scores(ref, eps)[:, 0].sum(), [x2, *params], allow_unused=True)
    for a, b in zip(gf, gr):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_text_conditions_equal_k_forwards_with_lora_gradients(dtype):
    from peft import LoraConfig, inject_adapter_in_model

    model = text_unet(dtype)
    names = [n for n, _ in model.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    assert names
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=names, init_lora_weights=False),
                                    model)
    model.to(dtype)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all("attn2" in n for n, _ in model.named_parameters() if "lora_" in n)
    x, t, g = inputs(2, dtype)
    ehs = torch.randn(M, L, D, generator=g, dtype=dtype)
    index = torch.randint(0, M, (B, K), generator=g)
    eps = torch.randn(B, 2, 8, 8, generator=g, dtype=dtype)
    before = {n: type(a.processor) for n, a in model.named_modules() if hasattr(a, "processor")}
    e1, e2 = ehs.clone().requires_grad_(), ehs.clone().requires_grad_()
    fast = dc_predictions(model, x, t, e1, index)
    ref = naive_text(model, x, t, e2, index)
    torch.testing.assert_close(fast, ref, **TOL[dtype])
    gf = torch.autograd.grad(dc_scores(fast, eps)[:, 0].sum(), [e1, *lora])
    gr = torch.autograd.grad(dc_scores(ref, eps)[:, 0].sum(), [e2, *lora])
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, **TOL[dtype])
    after = {n: type(a.processor) for n, a in model.named_modules() if hasattr(a, "processor")}
    assert after == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_no_grad_and_inference_mode_agree_with_grad_mode():
    model = text_unet(torch.float64)
    x, t, g = inputs(2, torch.float64)
    ehs = torch.randn(M, L, D, generator=g, dtype=torch.float64)
    index = torch.randint(0, M, (B, K), generator=g)
    ref = dc_predictions(model, x, t, ehs, index).detach()
    with torch.no_grad():
        a = dc_predictions(model, x, t, ehs, index)
    with torch.inference_mode():
        b = dc_predictions(model, x, t, ehs, index)
    torch.testing.assert_close(a, ref)
    torch.testing.assert_close(b, ref)


def test_processors_and_hooks_restored_after_an_error():
    model = text_unet(torch.float64)
    x, t, g = inputs(2, torch.float64)
    before = {n: a.processor for n, a in model.named_modules() if hasattr(a, "processor")}
    ehs = torch.randn(M, L, D, dtype=torch.float64)
    index = torch.randint(0, M, (B, K), generator=g)
    # an error raised inside the model's forward (attention mask not supported by the shared processor)
    boom = RuntimeError("boom")

    def fail(mod, args):
        raise boom

    h = model.up_blocks[0].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        dc_predictions(model, x, t, ehs, index)
    h.remove()
    assert {n: a.processor for n, a in model.named_modules() if hasattr(a, "processor")} == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("case, match", [
    ("labels_shape", "conditions"), ("labels_range", "conditions"), ("labels_float_dtype_mismatch", "conditions"),
    ("index_missing", "index"), ("index_dtype", "index"), ("index_range", "index"), ("index_shape", "index"),
    ("width", "conditions"), ("timesteps_shape", "timesteps"), ("x_dtype", "x_t"), ("x_channels", "x_t"),
    ("labels_for_text_model", "conditions"), ("index_with_labels", "index"),
])
def test_refusals_name_the_argument(case, match):
    cm, tm = class_unet(torch.float32), text_unet(torch.float32)
    x1, t, g = inputs(1, torch.float32)
    x2 = torch.randn(B, 2, 8, 8)
    labels = torch.randint(0, 6, (B, K))
    ehs, index = torch.randn(M, L, D), torch.randint(0, M, (B, K))
    calls = {
        "labels_shape": lambda: dc_predictions(cm, x1, t, labels[:2]),
        "labels_range": lambda: dc_predictions(cm, x1, t, labels + 6),
        "labels_float_dtype_mismatch": lambda: dc_predictions(tm, x2, t, ehs.double(), index),
        "index_missing": lambda: dc_predictions(tm, x2, t, ehs),
        "index_dtype": lambda: dc_predictions(tm, x2, t, ehs, index.int()),
        "index_range": lambda: dc_predictions(tm, x2, t, ehs, index + M),
        "index_shape": lambda: dc_predictions(tm, x2, t, ehs, index[:, 0]),
        "width": lambda: dc_predictions(tm, x2, t, torch.randn(M, L, D + 1), index),
        "timesteps_shape": lambda: dc_predictions(cm, x1, t[:2], labels),
        "x_dtype": lambda: dc_predictions(cm, x1.double(), t, labels),
        "x_channels": lambda: dc_predictions(cm, x2, t, labels),
        "labels_for_text_model": lambda: dc_predictions(tm, x2, t, labels),
        "index_with_labels": lambda: dc_predictions(cm, x1, t, labels, index),
    }
    with pytest.raises(ValueError, match=match):
        calls[case]()
