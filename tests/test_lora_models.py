"""cdgfast.models.lora: orientation of (A, B) and delta, merging, reset, state round trip."""
import copy

import pytest
import torch

from cdgfast.models import build_unet
from cdgfast.models.lora import (DEFAULT_TARGETS, add_deltas_to_base, add_lora, load_lora_state, lora_delta,
                                 lora_layers, lora_parameters, lora_state, merge_deltas, merge_lora, reset_lora)


def randomise_lora(unet, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 1, 8, 8, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500, 999]), class_labels=torch.tensor([0, 1, 3])).sample


@pytest.fixture()
def lora_unet():
    torch.manual_seed(0)
    return add_lora(build_unet("tiny", num_classes=3, sample_size=8), rank=3, alpha=6.0)


def test_targets_and_frozen_base(lora_unet):
    layers = lora_layers(lora_unet)
    assert layers and all(n.endswith(DEFAULT_TARGETS) for n in layers)
    assert len(layers) == 4 * 4  # 4 attention blocks x (q, k, v, out)
    trainable = [n for n, p in lora_unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(lora_parameters(lora_unet)) == len(trainable)
    # B starts at zero: the adapted model equals the base model.
    assert all(torch.count_nonzero(d) == 0 for d in lora_delta(lora_unet).values())


def test_delta_is_change_of_layer_output(lora_unet):
    """x @ (A @ B) must equal layer(x) - base_layer(x) for every adapted layer (scaling 2 here)."""
    randomise_lora(lora_unet, 1)
    g = torch.Generator().manual_seed(2)
    mods = dict(lora_unet.named_modules())
    for name, (A, B) in lora_layers(lora_unet).items():
        layer = mods[name]
        base = layer.get_base_layer()
        d1, d2 = base.in_features, base.out_features
        assert A.shape == (d1, 3) and B.shape == (3, d2)
        x = torch.randn(5, d1, generator=g)
        with torch.no_grad():
            change = layer(x) - base(x)
        # Independent reference from the raw peft matrices: scaling * x A_w^T B_w^T, computed in float64.
        a_w = layer.lora_A["default"].weight.double()
        b_w = layer.lora_B["default"].weight.double()
        ref = 2.0 * x.double() @ a_w.t() @ b_w.t()
        torch.testing.assert_close(change.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close((x @ lora_delta(lora_unet)[name]).double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(A @ B, lora_delta(lora_unet)[name])


def test_factors_are_differentiable_views():
    torch.manual_seed(0)
    unet = add_lora(build_unet("tiny", num_classes=2, sample_size=8), rank=2)  # alpha = rank: scaling 1
    randomise_lora(unet, 3)
    name, (A, B) = next(iter(lora_layers(unet).items()))
    layer = dict(unet.named_modules())[name]
    assert A.data_ptr() == layer.lora_A["default"].weight.data_ptr()
    assert B.data_ptr() == layer.lora_B["default"].weight.data_ptr()
    (A @ B).pow(2).sum().backward()
    assert layer.lora_A["default"].weight.grad is not None and layer.lora_B["default"].weight.grad is not None


def test_merge_keeps_output_and_resets(lora_unet):
    randomise_lora(lora_unet, 4)
    before = unet_out(lora_unet)
    deltas = merge_lora(lora_unet, seed=0)
    after = unet_out(lora_unet)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert all(torch.count_nonzero(d) == 0 for d in lora_delta(lora_unet).values())
    assert any(torch.count_nonzero(d) > 0 for d in deltas.values())
    # A is re-drawn (non-zero) so the next task's LoRA can learn.
    assert all(torch.count_nonzero(A) > 0 for A, _ in lora_layers(lora_unet).values())


def test_equal_weight_merge_of_task_loras(lora_unet):
    """base + mean_k delta_k applied through add_deltas_to_base equals a LoRA holding that mean delta."""
    base_state = copy.deepcopy(lora_unet.state_dict())
    task_deltas = []
    for k in range(3):
        randomise_lora(lora_unet, 10 + k)
        task_deltas.append(lora_delta(lora_unet))
    merged = merge_deltas(task_deltas)
    for n in merged:
        torch.testing.assert_close(merged[n], sum(d[n] for d in task_deltas) / 3)
    reset_lora(lora_unet)
    add_deltas_to_base(lora_unet, merged)
    out_merged = unet_out(lora_unet)
    # Reference: the same model with the base weights restored and the merged delta added by hand.
    lora_unet.load_state_dict(base_state)
    mods = dict(lora_unet.named_modules())
    with torch.no_grad():
        for n, d in merged.items():
            mods[n].get_base_layer().weight += d.t()
    reset_lora(lora_unet)
    torch.testing.assert_close(out_merged, unet_out(lora_unet))
    w = merge_deltas(task_deltas, weights=[1.0, 0.0, 0.0])
    torch.testing.assert_close(next(iter(w.values())), next(iter(task_deltas[0].values())))
    with pytest.raises(ValueError, match="weights"):
        merge_deltas(task_deltas, weights=[1.0])
    with pytest.raises(ValueError, match="deltas"):
        add_deltas_to_base(lora_unet, {"nope": torch.zeros(1, 1)})


def test_state_roundtrip(lora_unet):
    randomise_lora(lora_unet, 5)
    state = lora_state(lora_unet)
    out = unet_out(lora_unet)
    randomise_lora(lora_unet, 6)
    assert not torch.allclose(unet_out(lora_unet), out)
    load_lora_state(lora_unet, state)
    torch.testing.assert_close(unet_out(lora_unet), out)
    bad = dict(state)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="state"):
        load_lora_state(lora_unet, bad)


def test_cross_attention_kv_on_condition_model():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=12,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
    add_lora(unet, rank=4, target_modules=("to_k", "to_v"))
    randomise_lora(unet, 7)
    layers = lora_layers(unet)
    cross = {n: ab for n, ab in layers.items() if ".attn2." in n}
    assert cross and all(A.shape[0] == 12 for A, _ in cross.values())  # K/V read the text embedding
    mods = dict(unet.named_modules())
    name, (A, B) = next(iter(cross.items()))
    x = torch.randn(4, 12)
    with torch.no_grad():
        change = mods[name](x) - mods[name].get_base_layer()(x)
    torch.testing.assert_close(change, x @ (A @ B), rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    unet = build_unet("tiny", num_classes=2, sample_size=8)
    with pytest.raises(ValueError, match="rank"):
        add_lora(unet, rank=0)
    with pytest.raises(ValueError, match="target_modules"):
        add_lora(unet, target_modules=("to_nothing",))
    with pytest.raises(ValueError, match="adapter_name"):
        lora_layers(unet)


def test_conv_target_unfolded_orientation():
    """Conv2d targets: delta [c_in*kh*kw, c_out]; the output change is a conv with delta^T reshaped."""
    torch.manual_seed(0)
    unet = add_lora(build_unet("tiny", num_classes=2, sample_size=8), rank=2, alpha=3.0,
                    target_modules=("down_blocks.0.resnets.0.conv1",))
    randomise_lora(unet, 8)
    (name, (A, B)), = lora_layers(unet).items()
    conv = dict(unet.named_modules())[name]
    base = conv.get_base_layer()
    assert A.shape == (base.in_channels * 9, 2) and B.shape == (2, base.out_channels)
    x = torch.randn(2, base.in_channels, 7, 5)
    with torch.no_grad():
        change = conv(x) - base(x)
        w = (A @ B).t().reshape(base.weight.shape)
        ref = torch.nn.functional.conv2d(x, w, stride=base.stride, padding=base.padding)
    torch.testing.assert_close(change, ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ issue 10 classes, LoRA and presets
def test_add_lora_twice_refused(lora_unet):
    """(6) peft re-initialises an adapter of the same name: a second add_lora silently discarded the
    trained LoRA (the delta changed, no error)."""
    randomise_lora(lora_unet, 3)
    before = lora_delta(lora_unet)
    with pytest.raises(ValueError, match="adapter_name.*already"):
        add_lora(lora_unet, rank=3, alpha=6.0, seed=1)
    after = lora_delta(lora_unet)
    assert all(torch.equal(before[k], after[k]) for k in before)
    for dropout in (-0.1, 1.0, True):
        with pytest.raises(ValueError, match="dropout"):
            add_lora(build_unet("tiny", num_classes=2, sample_size=8), dropout=dropout)


def test_merge_deltas_shapes_and_weights(lora_unet):
    """(1) deltas of different shapes broadcast into a delta of the wrong shape; NaN weights ran."""
    randomise_lora(lora_unet, 4)
    d = lora_delta(lora_unet)
    k = next(iter(d))
    with pytest.raises(ValueError, match="deltas\\[1\\].*shape"):
        merge_deltas([d, {n: v[:1] for n, v in d.items()}])
    with pytest.raises(ValueError, match="deltas\\[0\\]"):
        merge_deltas([{k: 1.0}, {k: 2.0}])
    with pytest.raises(ValueError, match="weights\\[0\\]"):
        merge_deltas([d, d], [float("nan"), 1.0])
    with pytest.raises(ValueError, match="scale"):
        add_deltas_to_base(lora_unet, d, scale=float("nan"))
    with pytest.raises(ValueError, match="deltas\\["):
        add_deltas_to_base(lora_unet, {k: 1.0})
    merged = merge_deltas([d, {n: 3 * v for n, v in d.items()}], [0.25, 0.5])
    torch.testing.assert_close(merged[k], 1.75 * d[k])


def test_build_unet_sizes_checked():
    """A sample_size the down/up path cannot halve and double back failed only in the first forward."""
    for kw, what in ((dict(sample_size=15), "sample_size.*multiple of 2"),
                     (dict(preset="small", sample_size=6), "sample_size.*multiple of 4"),
                     (dict(num_classes=2.5), "num_classes"), (dict(num_classes=True), "num_classes"),
                     (dict(in_channels=0), "in_channels")):
        with pytest.raises(ValueError, match=what):
            build_unet(**kw)
