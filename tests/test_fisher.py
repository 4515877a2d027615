"""cdgfast.fisher against a naive per-sample loop (torch.autograd.grad of l_i one sample at a time)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdgfast.diffusion import DiffusionLoss, make_batch
from cdgfast.fisher import (Rank1Fisher, diag_fisher, hook_coverage, per_sample_grad_dot, per_sample_sq_grad_sum,
                            rank1_fisher)
from cdgfast.models import build_unet

# relative tolerance (max abs error / max abs reference) per model dtype
RTOL = {torch.float64: 1e-8, torch.float32: 2e-4, torch.bfloat16: 5e-2}


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def slice_batch(batch, i):
    if isinstance(batch, dict):
        return {k: v[i:i + 1] for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(v[i:i + 1] for v in batch)
    return batch[i:i + 1]


def naive_grads(model, loss_fn, batch, n):
    """[n, P]: g_i by one backward per sample, each sample run alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(n):
        li = loss_fn(model, slice_batch(batch, i))
        assert li.shape == (1,)
        gs = torch.autograd.grad(li[0], params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, gs)]))
    return torch.stack(rows)


def num_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------------
# The tiny diffusers UNet (attention + GroupNorm + class Embedding)
# --------------------------------------------------------------------------------------------------
def unet_setup(dtype, B, seed=0, sample_size=8):
    torch.manual_seed(seed)
    model = build_unet("tiny", num_classes=3, sample_size=sample_size).to(dtype)
    with torch.no_grad():  # non-trivial affine parameters so every rule is exercised
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))
        model.conv_out.weight.normal_(0, 0.05)  # diffusers zero-initialises nothing here, but be sure
    loss_fn = DiffusionLoss()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, 1, sample_size, sample_size, generator=g).to(dtype)
    y = torch.randint(0, 4, (B,), generator=g)  # includes the null class 3
    batch = make_batch(x, y, loss_fn.schedule, g)
    return model, loss_fn, batch


@pytest.fixture(scope="module")
def unet64():
    model, loss_fn, batch = unet_setup(torch.float64, 5)
    G = naive_grads(model, loss_fn, batch, 5)
    return model, loss_fn, batch, G


def test_unet_fully_covered_by_hooks():
    model, _, _ = unet_setup(torch.float32, 2)
    assert all(hook_coverage(model))


@pytest.mark.parametrize("method", ["jvp", "hooks", "auto", "autograd"])
def test_grad_dot_unet_float64(unet64, method):
    model, loss_fn, batch, G = unet64
    d = torch.randn(G.shape[1], dtype=torch.float64)
    out = per_sample_grad_dot(model, loss_fn, batch, d, method=method)
    assert out.shape == (5,) and out.dtype == torch.float64
    assert rel_err(out, G @ d) < RTOL[torch.float64]


def test_grad_dot_unet_direction_as_list(unet64):
    model, loss_fn, batch, G = unet64
    d = torch.randn(G.shape[1], dtype=torch.float64)
    pieces = [t.clone() for t in torch.split(d, [p.numel() for p in model.parameters()])]
    pieces = [t.view_as(p) for t, p in zip(pieces, model.parameters())]
    out = per_sample_grad_dot(model, loss_fn, batch, pieces, method="hooks")
    assert rel_err(out, G @ d) < RTOL[torch.float64]


@pytest.mark.parametrize("method", ["hooks", "autograd"])
def test_sq_grad_sum_unet_float64(unet64, method):
    model, loss_fn, batch, G = unet64
    out = per_sample_sq_grad_sum(model, loss_fn, batch, method=method)
    assert out.shape == (G.shape[1],)
    assert rel_err(out, (G * G).sum(0)) < RTOL[torch.float64]


@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("method", ["jvp", "hooks"])
def test_unet_float32(B, method):
    model, loss_fn, batch = unet_setup(torch.float32, B, seed=3)
    G = naive_grads(model, loss_fn, batch, B)
    d = G.mean(0) + 0.1 * torch.randn(G.shape[1])
    assert rel_err(per_sample_grad_dot(model, loss_fn, batch, d, method=method), G @ d) < RTOL[torch.float32]
    if method == "hooks":
        assert rel_err(per_sample_sq_grad_sum(model, loss_fn, batch), (G * G).sum(0)) < RTOL[torch.float32]


def test_rank1_and_diag_fisher_unet():
    model, loss_fn, b1 = unet_setup(torch.float64, 5, seed=4)
    _, _, b2 = unet_setup(torch.float64, 3, seed=5)
    G = torch.cat([naive_grads(model, loss_fn, b1, 5), naive_grads(model, loss_fn, b2, 3)])
    mu = G.mean(0)
    coeff = ((G @ mu) ** 2).mean() / mu.norm() ** 4
    for batches in ([b1, b2], (b1, b2), lambda: iter([b1, b2])):
        r = rank1_fisher(model, loss_fn, batches, progress=False)
        assert isinstance(r, Rank1Fisher) and isinstance(r.coeff, float) and r.num_samples == 8
        assert rel_err(r.mean_grad, mu) < 1e-10
        assert abs(r.coeff - coeff.item()) <= 1e-9 * abs(coeff.item())
    r_jvp = rank1_fisher(model, loss_fn, [b1, b2], method="jvp", progress=False)
    assert abs(r_jvp.coeff - coeff.item()) <= 1e-9 * abs(coeff.item())
    diag = diag_fisher(model, loss_fn, [b1, b2], progress=False)
    assert rel_err(diag, (G * G).mean(0)) < 1e-10
    # one pass only: a generator is fine for the diagonal
    assert rel_err(diag_fisher(model, loss_fn, (b for b in [b1, b2]), progress=False), diag) < 1e-12


def test_rank1_callable_gets_fresh_noise_each_pass():
    """With a callable, each pass draws new t/eps: mu comes from pass 1, the projections from pass 2."""
    model, loss_fn, _ = unet_setup(torch.float64, 1, seed=6)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (4,), generator=g)
    draws = []

    def batches():
        b = make_batch(x, y, loss_fn.schedule, g)
        draws.append(b)
        return [b]

    r = rank1_fisher(model, loss_fn, batches, progress=False)
    assert len(draws) == 2 and not torch.equal(draws[0]["eps"], draws[1]["eps"])
    G1 = naive_grads(model, loss_fn, draws[0], 4)
    G2 = naive_grads(model, loss_fn, draws[1], 4)
    mu = G1.mean(0)
    assert rel_err(r.mean_grad, mu) < 1e-10
    expected = ((G2 @ mu) ** 2).mean() / mu.norm() ** 4
    assert abs(r.coeff - expected.item()) <= 1e-9 * expected.item()


# --------------------------------------------------------------------------------------------------
# Hand-built models covering each rule and the fallbacks
# --------------------------------------------------------------------------------------------------
class TokenNet(nn.Module):
    """Embedding [B, T] (repeated ids, padding_idx) -> LayerNorm -> Linear on [B, T, C] -> Linear on [B, C]."""

    def __init__(self, vocab=7, c=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, c, padding_idx=0)
        self.norm = nn.LayerNorm(c)
        self.lin = nn.Linear(c, 5)
        self.norm2 = nn.LayerNorm((3, 5), bias=False)
        self.head = nn.Linear(15, 2)
        self.cls = nn.Embedding(4, 2)  # one id per sample

    def forward(self, batch):
        h = torch.tanh(self.lin(self.norm(self.emb(batch["ids"]))))  # [B, 3, 5]
        h = self.norm2(h).flatten(1)
        return self.head(h) + self.cls(batch["c"])


def token_loss(model, batch):
    return (model(batch) - batch["target"]).pow(2).sum(1)


def token_batch(B, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 7, (B, 3), generator=g)
    ids[0, 1] = ids[0, 2]  # a repeated id inside one sample
    ids[-1, 0] = 0  # padding
    return {"x": torch.zeros(B, 1, dtype=dtype), "ids": ids, "c": torch.randint(0, 4, (B,), generator=g),
            "target": torch.randn(B, 2, generator=g).to(dtype)}


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False)
        self.c3 = nn.Conv2d(6, 6, (3, 2), padding="same", padding_mode="reflect", groups=3)
        self.c4 = nn.Conv2d(6, 3, 2, stride=(1, 2), padding=1, padding_mode="circular")
        self.gn = nn.GroupNorm(2, 6)
        self.c5 = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = self.gn(torch.relu(self.c3(torch.relu(self.c2(h)))))
        return self.c5(torch.tanh(self.c4(h)))


def conv_loss(model, batch):
    return model(batch["x"]).pow(2).flatten(1).mean(1)


def conv_batch(B, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(B, 2, 7, 9, generator=g).to(dtype)}


class Scale(nn.Module):
    """Unsupported custom layer with its own parameter."""

    def __init__(self, c):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, c))

    def forward(self, x):
        return x * self.s


class MixedNet(nn.Module):
    """A custom layer, a Linear used twice, a weight read outside its module, tied weights."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.scale = Scale(5)
        self.twice = nn.Linear(5, 5)
        self.side = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)
        self.tied = nn.Linear(3, 3, bias=False)
        self.tied_in = nn.Linear(3, 3, bias=False)
        self.tied_in.weight = self.tied.weight

    def forward(self, x):
        h = torch.tanh(self.scale(self.inp(x)))
        h = torch.tanh(self.twice(torch.tanh(self.twice(h))))
        h = h + F.linear(h, self.side.weight.t())  # weight used outside self.side's call
        h = self.side(h)
        return self.tied(torch.tanh(self.tied_in(self.out(h))))


def mixed_loss(model, batch):
    return (model(batch["x"]) - 1).pow(2).mean(1)


def mixed_batch(B, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(B, 4, generator=g).to(dtype)}


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.l = nn.Linear(3, 2)

    def forward(self, x):
        return self.l(torch.relu(self.bn(self.c(x))).mean((2, 3)))


CASES = {
    "tokens": (TokenNet, token_loss, token_batch),
    "conv": (ConvNet, conv_loss, conv_batch),
    "mixed": (MixedNet, mixed_loss, mixed_batch),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("case", sorted(CASES))
def test_small_models_against_naive(case, B, dtype):
    make, loss_fn, make_b = CASES[case]
    torch.manual_seed(1)
    model = make().to(dtype)
    batch = make_b(B, dtype)
    G = naive_grads(model, loss_fn, batch, B)
    d = torch.randn(G.shape[1], dtype=dtype)
    for method in ("auto", "hooks", "jvp", "autograd"):
        out = per_sample_grad_dot(model, loss_fn, batch, d, method=method)
        assert rel_err(out, G @ d) < RTOL[dtype], method
    for method in ("auto", "autograd"):
        sq = per_sample_sq_grad_sum(model, loss_fn, batch, method=method)
        assert rel_err(sq, (G * G).sum(0)) < RTOL[dtype], method


@pytest.mark.parametrize("case", sorted(CASES))
def test_small_models_bfloat16(case):
    """bf16 model: results come back in float32 and match a float64 copy to bf16 precision."""
    make, loss_fn, make_b = CASES[case]
    torch.manual_seed(1)
    model = make().to(torch.bfloat16)
    batch = make_b(4, torch.bfloat16)
    ref = make().double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    G = naive_grads(ref, loss_fn, {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}, 4)
    d = torch.randn(G.shape[1])
    for method in ("hooks", "jvp"):
        out = per_sample_grad_dot(model, loss_fn, batch, d, method=method)
        assert out.dtype == torch.float32 and rel_err(out, G @ d.double()) < RTOL[torch.bfloat16], method
    sq = per_sample_sq_grad_sum(model, loss_fn, batch)
    assert sq.dtype == torch.float32 and rel_err(sq, (G * G).sum(0)) < RTOL[torch.bfloat16]


def test_coverage_of_small_models():
    assert all(hook_coverage(TokenNet())) and all(hook_coverage(ConvNet()))
    cov = hook_coverage(MixedNet())
    names = [n for n, _ in MixedNet().named_parameters()]
    covered = {n for n, c in zip(names, cov) if c}
    # statically: Scale is unsupported, the tied weight is shared; reuse/outside use are found at run time
    assert "scale.s" not in covered and "tied.weight" not in covered
    assert {"inp.weight", "twice.weight", "side.weight", "out.bias"} <= covered


def test_dynamic_fallbacks_are_exact():
    """Reuse and outside use are detected during the hooked forward: without that detection the hook
    rules would return wrong numbers for `twice` and `side`."""
    torch.manual_seed(2)
    model = MixedNet().double()
    batch = mixed_batch(4, torch.float64)
    G = naive_grads(model, mixed_loss, batch, 4)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    for target in ("twice.weight", "side.weight"):
        d = torch.zeros(G.shape[1], dtype=torch.float64)
        k = names.index(target)
        off = sum(sizes[:k])
        d[off:off + sizes[k]] = torch.randn(sizes[k], dtype=torch.float64)
        assert rel_err(per_sample_grad_dot(model, mixed_loss, batch, d, method="hooks"), G @ d) < 1e-10
    assert rel_err(per_sample_sq_grad_sum(model, mixed_loss, batch, method="hooks"), (G * G).sum(0)) < 1e-10


def test_frozen_parameters_are_excluded():
    torch.manual_seed(3)
    model = ConvNet().double()
    model.c2.weight.requires_grad_(False)
    model.gn.bias.requires_grad_(False)
    batch = conv_batch(3, torch.float64)
    G = naive_grads(model, conv_loss, batch, 3)
    assert G.shape[1] == num_trainable(model)
    d = torch.randn(G.shape[1], dtype=torch.float64)
    for method in ("hooks", "jvp"):
        assert rel_err(per_sample_grad_dot(model, conv_loss, batch, d, method=method), G @ d) < 1e-10
    assert rel_err(per_sample_sq_grad_sum(model, conv_loss, batch), (G * G).sum(0)) < 1e-10


def test_batchnorm_train_mode_couples_samples():
    """Train-mode BatchNorm: g_i is the gradient of l_i as computed in the batched forward (not a
    single-sample run); every path must agree with that, and running stats must be restored."""
    torch.manual_seed(4)
    model = BNNet().double().train()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    loss_fn = lambda m, b: m(b["x"]).pow(2).sum(1)  # noqa: E731
    batch = {"x": x}
    assert not all(hook_coverage(model))
    stats = copy.deepcopy(model.bn.state_dict())
    ref_model = copy.deepcopy(model)
    losses = loss_fn(ref_model, batch)
    params = list(ref_model.parameters())
    G = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[i], params, retain_graph=True)])
                     for i in range(5)])
    d = torch.randn(G.shape[1], dtype=torch.float64)
    for method in ("auto", "hooks", "jvp"):
        assert rel_err(per_sample_grad_dot(model, loss_fn, batch, d, method=method), G @ d) < 1e-10
    assert rel_err(per_sample_sq_grad_sum(model, loss_fn, batch), (G * G).sum(0)) < 1e-10
    for k, v in model.bn.state_dict().items():
        assert torch.equal(v, stats[k]), k


# --------------------------------------------------------------------------------------------------
# The model is left unchanged
# --------------------------------------------------------------------------------------------------
def _snapshot(model):
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "forward_attrs": [("forward" in m.__dict__) for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        "processors": [getattr(m, "processor", None) for m in model.modules()],
    }


def test_model_unchanged_after_every_function():
    model, loss_fn, batch = unet_setup(torch.float32, 3, seed=7)
    model.down_blocks[0].train()  # mixed training flags must come back as they were
    model.eval()
    model.down_blocks[1].attentions[0].train()
    model.time_embedding.linear_1.bias.requires_grad_(False)
    marker = torch.full_like(model.conv_in.weight, 7.0)
    model.conv_in.weight.grad = marker
    before = _snapshot(model)
    P = num_trainable(model)
    d = torch.randn(P)
    for method in ("jvp", "hooks", "autograd"):
        per_sample_grad_dot(model, loss_fn, batch, d, method=method)
    per_sample_sq_grad_sum(model, loss_fn, batch)
    rank1_fisher(model, loss_fn, [batch], progress=False)
    diag_fisher(model, loss_fn, [batch], progress=False)
    after = _snapshot(model)
    assert all(torch.equal(a, b) for a, b in zip(before["params"], after["params"]))
    assert before["requires_grad"] == after["requires_grad"]
    assert all(a is b for a, b in zip(before["grads"], after["grads"]))
    assert model.conv_in.weight.grad is marker and torch.equal(marker, torch.full_like(marker, 7.0))
    assert before["training"] == after["training"]
    assert before["forward_attrs"] == after["forward_attrs"]
    assert before["hooks"] == after["hooks"]
    assert sum(p is not None for p in before["processors"]) == 4  # the tiny UNet's attention layers
    assert all(a is b for a, b in zip(before["processors"], after["processors"]))


def test_jvp_eager_attention_retry(unet64, monkeypatch):
    """Without the math SDPA backend the CPU fused attention has no forward-AD rule: the JVP path
    retries with diffusers' eager AttnProcessor and puts the original processors back."""
    import contextlib

    import cdgfast.fisher.jvp as jvp_mod

    model, loss_fn, batch, G = unet64
    procs = [getattr(m, "processor", None) for m in model.modules()]
    calls = []
    real = jvp_mod._eager_attention

    def spy(m):
        calls.append(1)
        return real(m)

    monkeypatch.setattr(jvp_mod, "_math_sdpa", contextlib.nullcontext)
    monkeypatch.setattr(jvp_mod, "_eager_attention", spy)
    d = torch.randn(G.shape[1], dtype=torch.float64)
    out = per_sample_grad_dot(model, loss_fn, batch, d, method="jvp")
    # diffusers' eager processor runs the softmax in float32 (upcast_softmax casts with .float()), so
    # a float64 model agrees only to float32 precision on this path
    assert rel_err(out, G @ d) < RTOL[torch.float32]
    assert all(a is b for a, b in zip(procs, [getattr(m, "processor", None) for m in model.modules()]))
    assert calls  # the retry really ran (fused CPU attention has no forward-AD rule in this torch)


def test_model_unchanged_when_loss_fn_raises():
    model, _, batch = unet_setup(torch.float32, 2, seed=8)
    before = _snapshot(model)

    def bad_loss(m, b):
        m(b["x"], b["t"], class_labels=b["y"])
        raise RuntimeError("boom")

    for method in ("jvp", "hooks"):
        with pytest.raises(RuntimeError, match="boom"):
            per_sample_grad_dot(model, bad_loss, batch, torch.zeros(num_trainable(model)), method=method)
    after = _snapshot(model)
    assert before["forward_attrs"] == after["forward_attrs"] and before["hooks"] == after["hooks"]


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_value_errors():
    torch.manual_seed(5)
    model = TokenNet()
    batch = token_batch(3, torch.float32)
    P = num_trainable(model)
    with pytest.raises(ValueError, match=rf"direction.*P={P}"):
        per_sample_grad_dot(model, token_loss, batch, torch.zeros(P + 1))
    with pytest.raises(ValueError, match="direction"):
        per_sample_grad_dot(model, token_loss, batch, [torch.zeros(1)])
    with pytest.raises(ValueError, match="direction"):
        per_sample_grad_dot(model, token_loss, batch, torch.zeros(P, dtype=torch.long))
    with pytest.raises(ValueError, match="method"):
        per_sample_grad_dot(model, token_loss, batch, torch.zeros(P), method="fast")
    with pytest.raises(ValueError, match="method"):
        per_sample_sq_grad_sum(model, token_loss, batch, method="jvp")
    for bad in (lambda m, b: token_loss(m, b).mean(),  # reduced
                lambda m, b: token_loss(m, b).unsqueeze(1),  # [B, 1]
                lambda m, b: token_loss(m, b)[:2],  # wrong count
                lambda m, b: [1.0, 2.0, 3.0]):  # not a tensor
        for method in ("hooks", "jvp"):
            with pytest.raises(ValueError, match="loss_fn"):
                per_sample_grad_dot(model, bad, batch, torch.zeros(P), method=method)
        with pytest.raises(ValueError, match="loss_fn"):
            per_sample_sq_grad_sum(model, bad, batch)
        with pytest.raises(ValueError, match="loss_fn"):
            rank1_fisher(model, bad, [batch], progress=False)
    with pytest.raises(ValueError, match="loss_fn"):
        per_sample_grad_dot(model, "not callable", batch, torch.zeros(P))
    empty = token_batch(3, torch.float32)
    empty = {k: v[:0] for k, v in empty.items()}
    with pytest.raises(ValueError, match="batch"):
        per_sample_grad_dot(model, token_loss, empty, torch.zeros(P))
    with pytest.raises(ValueError, match="batch"):
        per_sample_sq_grad_sum(model, token_loss, empty)
    with pytest.raises(ValueError, match="batches"):
        rank1_fisher(model, token_loss, [], progress=False)
    with pytest.raises(ValueError, match="batches"):
        diag_fisher(model, token_loss, [], progress=False)
    with pytest.raises(ValueError, match="batch"):
        diag_fisher(model, token_loss, [empty], progress=False)
    with pytest.raises(ValueError, match="batches.*list.*callable"):
        rank1_fisher(model, token_loss, (b for b in [batch]), progress=False)
    with pytest.raises(ValueError, match="batches.*list.*callable"):
        rank1_fisher(model, token_loss, iter([batch]), progress=False)
    with pytest.raises(ValueError, match="out"):
        per_sample_sq_grad_sum(model, token_loss, batch, out=torch.zeros(P + 1))
    frozen = TokenNet().requires_grad_(False)
    with pytest.raises(ValueError, match="model"):
        per_sample_sq_grad_sum(frozen, token_loss, batch)


def test_sq_out_accumulates_in_place():
    torch.manual_seed(6)
    model = ConvNet().double()
    b1, b2 = conv_batch(2, torch.float64, 1), conv_batch(3, torch.float64, 2)
    buf = torch.zeros(num_trainable(model), dtype=torch.float64)
    r = per_sample_sq_grad_sum(model, conv_loss, b1, out=buf)
    assert r is buf
    per_sample_sq_grad_sum(model, conv_loss, b2, out=buf)
    G = torch.cat([naive_grads(model, conv_loss, b1, 2), naive_grads(model, conv_loss, b2, 3)])
    assert rel_err(buf, (G * G).sum(0)) < 1e-10


# --------------------------------------------------------------------------------------------------
# The CUDA dispatch to the Triton projection kernels, run on the CPU under TRITON_INTERPRET=1
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_kernel_dispatch_matches(dtype, monkeypatch):
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU (set by conftest) or CUDA")
    projection = pytest.importorskip("cdgfast.kernels.projection")
    if not (hasattr(projection, "linear_grad_dot") and hasattr(projection, "linear_sq_grad_sum")):
        pytest.skip("cdgfast.kernels.projection lacks the launchers")
    import cdgfast.fisher.hooks as hooks_mod

    torch.manual_seed(9)
    model = TokenNet().to(dtype)
    batch = token_batch(3, dtype)
    G = naive_grads(model, token_loss, batch, 3)
    d = torch.randn(G.shape[1], dtype=dtype)
    seen = []
    monkeypatch.setattr(hooks_mod, "use_triton", lambda t: seen.append(1) or True)
    assert rel_err(per_sample_grad_dot(model, token_loss, batch, d, method="hooks"), G @ d) < RTOL[dtype]
    assert rel_err(per_sample_sq_grad_sum(model, token_loss, batch), (G * G).sum(0)) < RTOL[dtype]
    cmodel = ConvNet().to(dtype)
    cbatch = conv_batch(2, dtype)
    Gc = naive_grads(cmodel, conv_loss, cbatch, 2)
    assert rel_err(per_sample_sq_grad_sum(cmodel, conv_loss, cbatch), (Gc * Gc).sum(0)) < RTOL[dtype]
    assert seen  # the kernels were really dispatched to


# --------------------------------------------------------------------------------------------------
# rows_per_sample: layers that see r sample-major rows per sample (the DC-score losses' B x K forward)
class _RowsModel(nn.Module):
    """Some layers see B rows (lin0), the others B * r rows made by repeat_interleave(r)."""

    def __init__(self, r):
        super().__init__()
        self.r = r
        self.lin0 = nn.Linear(6, 5)
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2)
        self.gn = nn.GroupNorm(2, 4)
        self.emb = nn.Embedding(5, 4)
        self.ln = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x, cond):
        h0 = torch.tanh(self.lin0(x.mean((2, 3)).repeat(1, 3)))                    # [B, 5]
        c = self.gn(self.conv(x.repeat_interleave(self.r, 0)))                       # [B*r, 4, 3, 3]
        c = torch.tanh(c + self.emb(cond.reshape(-1))[:, :, None, None])
        out = self.head(self.ln(c.mean((2, 3))))                                       # [B*r, 3]
        return out.view(x.shape[0], self.r, 3), h0


def _rows_loss(model, batch):
    out, h0 = model(batch["x"], batch["cond"])
    return out.pow(2).sum((1, 2)) + (out[:, :, 0] * h0[:, :1]).sum(1) + h0.pow(2).sum(1)


@pytest.mark.parametrize("B,r", [(1, 3), (5, 3), (4, 2)])
def test_rows_per_sample_against_naive_loop(B, r):
    torch.manual_seed(B * 10 + r)
    model = _RowsModel(r).double()
    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(B, 2, 5, 5, generator=g, dtype=torch.float64),
             "cond": torch.randint(0, 5, (B, r), generator=g)}
    params = [p for p in model.parameters()]
    # naive: one forward per sample, its own gradient
    rows = []
    for i in range(B):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        rows.append(torch.cat([t.reshape(-1) for t in torch.autograd.grad(_rows_loss(model, one).sum(), params)]))
    G = torch.stack(rows)
    d = torch.randn(G.shape[1], generator=g, dtype=torch.float64)
    sq = per_sample_sq_grad_sum(model, _rows_loss, batch, rows_per_sample=r)
    dot = per_sample_grad_dot(model, _rows_loss, batch, d, method="hooks", rows_per_sample=r)
    torch.testing.assert_close(sq, G.square().sum(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dot, G @ d, rtol=1e-10, atol=1e-12)
    # a wrong promise about the row count only costs speed: the B*r-row layers fall back, still exact
    wrong = per_sample_sq_grad_sum(model, _rows_loss, batch, rows_per_sample=r + 1)
    torch.testing.assert_close(wrong, G.square().sum(0), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="rows_per_sample"):
        per_sample_sq_grad_sum(model, _rows_loss, batch, rows_per_sample=0)


def test_rows_per_sample_keeps_the_hook_path(monkeypatch):
    """With the promise, no parameter takes the per-sample autograd fallback; without it all B*r-row
    layers do (which is what made ewc_dc's Fisher ~8x slower)."""
    import cdgfast.fisher.hooks as H

    calls = []
    real = H.per_sample_grads_autograd
    monkeypatch.setattr(H, "per_sample_grads_autograd", lambda losses, ps, **kw: calls.append(len(ps)) or real(losses, ps, **kw))
    model = _RowsModel(3).double()
    batch = {"x": torch.randn(4, 2, 5, 5, dtype=torch.float64), "cond": torch.randint(0, 5, (4, 3))}
    per_sample_sq_grad_sum(model, _rows_loss, batch, rows_per_sample=3)
    assert calls == []
    per_sample_sq_grad_sum(model, _rows_loss, batch)
    assert calls == [len(list(model.parameters())) - 2]  # all but lin0's weight and bias


# --------------------------------------------------------------------------------------------------
# The hook path proves which dim holds the samples (issue 10): layers whose leading dim equals B by
# coincidence, permuted / transposed / reshaped inputs, cross-sample mixing, r-row losses
# --------------------------------------------------------------------------------------------------
def per_row_grads(model, loss_fn, batch):
    """[B, P]: g_i = d l_i / d theta in the batched forward (the definition when samples couple)."""
    params = [p for p in model.parameters() if p.requires_grad]
    losses = loss_fn(model, batch)
    rows = []
    for i in range(losses.shape[0]):
        gs = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, gs)]))
    return torch.stack(rows)


def assert_estimators_match(model, loss_fn, batch, G, dot_methods=("hooks", "auto", "jvp", "autograd"),
                            tol=1e-10, **kw):
    """Every estimator against per-sample gradients G [B, P] (float64)."""
    g = torch.Generator().manual_seed(0)
    d = torch.randn(G.shape[1], generator=g, dtype=torch.float64)
    for method in dot_methods:
        assert rel_err(per_sample_grad_dot(model, loss_fn, batch, d, method=method, **kw), G @ d) < tol, method
    for method in ("hooks", "autograd"):
        assert rel_err(per_sample_sq_grad_sum(model, loss_fn, batch, method=method, **kw), (G * G).sum(0)) < tol, method
    assert rel_err(diag_fisher(model, loss_fn, [batch], **kw), (G * G).mean(0)) < tol
    mu = G.mean(0)
    r = rank1_fisher(model, loss_fn, [batch], method="hooks")
    assert rel_err(r.mean_grad, mu) < tol
    coeff = ((G @ mu) ** 2).mean() / mu.norm() ** 4
    assert abs(r.coeff - coeff.item()) <= tol * coeff.item()


def _fallback_counter(monkeypatch):
    import cdgfast.fisher.hooks as H

    calls = []
    real = H.per_sample_grads_autograd
    monkeypatch.setattr(H, "per_sample_grads_autograd",
                        lambda losses, ps, **kw: calls.append(len(ps)) or real(losses, ps, **kw))
    return calls


def _seq_loss(model, batch):
    """Batch-first data [B, T, C] through a sequence-first model ([T, B, C] in and out)."""
    out = model(batch["x"].transpose(0, 1))
    return (torch.tanh(out) * batch["w"].transpose(0, 1)).sum((0, 2)) + out.pow(2).mean((0, 2))


@pytest.mark.parametrize("T,B", [(4, 4), (3, 4)])
def test_sequence_first_transformer_layer(T, B, monkeypatch):
    """nn.TransformerEncoderLayer(batch_first=False) on [T, B, C]: with T == B the leading dim of its
    Linear / LayerNorm inputs equals B but holds the tokens. Both cases are exact, and both keep the
    hook path for every layer the rules cover (only the attention's in_proj / out_proj fall back)."""
    torch.manual_seed(11)
    model = nn.TransformerEncoderLayer(6, 2, 10, dropout=0.0).double().eval()
    g = torch.Generator().manual_seed(T * 10 + B)
    calls = _exact_on_token_batch(model, _seq_loss, B, T, 6, g, monkeypatch)
    assert calls == [4]  # self_attn.in_proj_weight / in_proj_bias / out_proj.weight / out_proj.bias


def _exact_on_token_batch(model, loss_fn, B, T, C, g, monkeypatch):
    """Estimators equal the float64 per-sample loop on a [B, T, C] batch; returns the fallback calls
    of one more `per_sample_sq_grad_sum` (how many parameters left the hook path)."""
    batch = {"x": torch.randn(B, T, C, generator=g, dtype=torch.float64),
             "w": torch.randn(B, T, C, generator=g, dtype=torch.float64)}
    G = naive_grads(model, loss_fn, batch, B)
    assert_estimators_match(model, loss_fn, batch, G)
    calls = _fallback_counter(monkeypatch)
    per_sample_sq_grad_sum(model, loss_fn, batch)
    return calls


class Transposing(nn.Module):
    """[B, T, C] -> Linear -> [T, B, C] -> Linear on the tokens-first layout -> token-mixing Linear over
    T on [B, C, T] -> back to [B, T, C]."""

    def __init__(self, t, c):
        super().__init__()
        self.inp = nn.Linear(c, c)
        self.mid = nn.Linear(c, c)
        self.mix = nn.Linear(t, t)
        self.norm = nn.LayerNorm(c)

    def forward(self, x):
        h = torch.tanh(self.inp(x)).transpose(0, 1)               # [T, B, C]
        h = self.norm(torch.tanh(self.mid(h)))                      # sequence-first layers
        h = self.mix(h.permute(1, 2, 0))                            # [B, C, T]: mixes tokens, not samples
        return h.transpose(1, 2)                                    # [B, T, C]


def _transposing_loss(model, batch):
    return (model(batch["x"]) - batch["w"]).pow(2).sum((1, 2))


@pytest.mark.parametrize("T,B", [(3, 3), (2, 3)])
def test_transposing_module_against_naive(T, B, monkeypatch):
    torch.manual_seed(12)
    model = Transposing(T, 5).double()
    g = torch.Generator().manual_seed(T + B)
    calls = _exact_on_token_batch(model, _transposing_loss, B, T, 5, g, monkeypatch)
    assert calls == []  # every layer's sample dim is proven, transposed or not


class _TwoLinear(nn.Module):
    """Linear(3, 4), tanh, Linear(4, 2); subclasses change what happens to the batch in between."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)


class Flipped(_TwoLinear):
    """A Linear applied to the batch in reverse order (rows permuted), then the order restored."""

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.flip(0)))).flip(0)


class MixedView(nn.Module):
    """A view that interleaves two samples' features into each row, a Linear on it, and the inverse
    view: the Linear's rows (dim 0, size B = 2) are not samples."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)

    def forward(self, x):                                   # x [2, 6]
        h = self.a(torch.tanh(x).reshape(6, 2).t())         # [2, 6], each row holds both samples
        return self.b(torch.tanh(h.t().reshape(2, 6)))      # per-sample rows again


class Centered(_TwoLinear):
    """Batch-norm-like mixing without a BatchNorm module: h - mean over the batch."""

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.tanh(h - h.mean(0, keepdim=True)))


@pytest.mark.parametrize("make,per_sample", [(Flipped, True), (MixedView, False), (Centered, False)],
                         ids=["flip", "mixed_view", "centered"])
def test_permuted_reshaped_and_mixing_layouts_are_exact(make, per_sample):
    """Models whose hooked layers see B rows that are not the samples: the numbers must match the
    definition (a naive per-sample loop where samples stay separate, else per-row gradients of the
    batched forward, as for train-mode BatchNorm)."""
    torch.manual_seed(13)
    model = make().double()
    B = 2
    x = torch.randn(B, 6 if make is MixedView else 3, dtype=torch.float64)
    batch = {"x": x}
    G = naive_grads(model, _once_loss, batch, B) if per_sample else per_row_grads(model, _once_loss, batch)
    assert_estimators_match(model, _once_loss, batch, G, dot_methods=("hooks", "auto", "autograd"))


def _once_loss(model, batch):
    out = model(batch["x"])  # one call: a layer run twice would fall back anyway
    return out.pow(2).sum(1) + out.sum(1)


class KMajor(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.emb = nn.Embedding(5, 4)

    def forward(self, x, cond):                              # x [B, 3], cond [B, K]
        B, K = cond.shape
        h = self.a(x.repeat(K, 1))                           # [K*B, 4], sample-minor: row k*B + i
        return torch.tanh(h + self.emb(cond.t().reshape(-1))).view(K, B, 4)


def test_rows_per_sample_promise_is_checked():
    """rows_per_sample=K promises K consecutive rows per sample (repeat_interleave); a loss that lays
    its B*K rows out K-major (repeat) breaks the promise. The hook path must notice, not trust it."""
    torch.manual_seed(14)
    model = KMajor().double()
    g = torch.Generator().manual_seed(2)
    batch = {"x": torch.randn(3, 3, generator=g, dtype=torch.float64), "cond": torch.randint(0, 5, (3, 2), generator=g)}
    loss_fn = lambda m, b: m(b["x"], b["cond"]).pow(2).sum((0, 2))  # noqa: E731
    G = naive_grads(model, loss_fn, batch, 3)
    assert_estimators_match(model, loss_fn, batch, G, dot_methods=("hooks", "autograd"), rows_per_sample=2)


def test_inplace_activations_keep_the_hook_path(monkeypatch):
    """nn.ReLU(inplace=True) right after hooked layers rewrites their outputs in place: separable, so
    the layers keep the hook path (and stay exact)."""
    torch.manual_seed(17)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=True), nn.GroupNorm(1, 3), nn.Flatten(),
                          nn.Linear(48, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).double()
    batch = {"x": torch.randn(3, 2, 4, 4, dtype=torch.float64)}
    loss_fn = lambda m, b: m(b["x"]).pow(2).sum(1)  # noqa: E731
    G = naive_grads(model, loss_fn, batch, 3)
    assert_estimators_match(model, loss_fn, batch, G, dot_methods=("hooks", "auto"))
    calls = _fallback_counter(monkeypatch)
    per_sample_sq_grad_sum(model, loss_fn, batch)
    per_sample_grad_dot(model, loss_fn, batch, G[0], method="hooks")
    assert calls == []


def test_unet_layers_stay_on_the_hook_path(monkeypatch):
    """The layout proof covers every layer of the diffusers UNet, with the plain loss and with the
    ewc_dc loss's B x K condition rows: no parameter takes the per-sample autograd fallback."""
    from cdgfast.methods.dc import EWCDC

    model, loss_fn, batch = unet_setup(torch.float32, 3, seed=15)
    calls = _fallback_counter(monkeypatch)
    per_sample_sq_grad_sum(model, loss_fn, batch)
    per_sample_grad_dot(model, loss_fn, batch, torch.randn(num_trainable(model)), method="hooks")
    m = EWCDC(k=3)
    m.setup(num_classes=3)
    m.seen_classes, m.current_classes = [0, 1], [2]
    batch = dict(batch, y=batch["y"].clamp(max=2))
    batch["cond"] = m.conditions(batch["y"])
    per_sample_sq_grad_sum(model, m.ewc_loss_fn, batch, rows_per_sample=3)
    assert calls == []


# --------------------------------------------------------------------------------------------------
# Losses without a graph, grad-mode contexts, transforms, dtypes, devices (issue 10, item 6 and audit)
# --------------------------------------------------------------------------------------------------
def _small():
    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    batch = {"x": torch.randn(5, 3, dtype=torch.float64)}
    return model, batch


def _small_loss(m, b):
    return m(b["x"]).pow(2).sum(1)


def _under_no_grad(m, b):
    with torch.no_grad():
        return _small_loss(m, b)


def _under_inference(m, b):
    with torch.inference_mode():
        return _small_loss(m, b)


_OTHER = nn.Linear(3, 2).double()
NO_GRAPH = {
    "no_grad": _under_no_grad,
    "inference_mode": _under_inference,
    "detached": lambda m, b: _small_loss(m, b).detach(),
    "other_parameters": lambda m, b: _OTHER(b["x"]).pow(2).sum(1),
    "constant": lambda m, b: b["x"].sum(1),
}


@pytest.mark.parametrize("case", sorted(NO_GRAPH))
def test_losses_without_graph_raise(case):
    """Every function refuses losses that cannot carry gradients (they used to give zeros)."""
    model, batch = _small()
    bad = NO_GRAPH[case]
    P = num_trainable(model)
    calls = [lambda: per_sample_sq_grad_sum(model, bad, batch),
             lambda: per_sample_sq_grad_sum(model, bad, batch, method="autograd"),
             lambda: diag_fisher(model, bad, [batch]),
             lambda: rank1_fisher(model, bad, [batch]),
             lambda: rank1_fisher(model, bad, [batch], method="jvp")]
    calls += [lambda m=m: per_sample_grad_dot(model, bad, batch, torch.ones(P, dtype=torch.float64), method=m)
              for m in ("hooks", "autograd", "auto") + (() if case == "no_grad" else ("jvp",))]
    for call in calls:
        with pytest.raises(ValueError, match="loss_fn.*trainable parameters"):
            call()


def test_jvp_accepts_a_no_grad_loss():
    """Forward-mode AD differentiates under torch.no_grad(): the JVP path is right there."""
    model, batch = _small()
    G = naive_grads(model, _small_loss, batch, 5)
    d = torch.randn(G.shape[1], dtype=torch.float64)
    assert rel_err(per_sample_grad_dot(model, _under_no_grad, batch, d, method="jvp"), G @ d) < 1e-10


def test_loss_dtype_and_device_are_checked():
    model, batch = _small()
    with pytest.raises(ValueError, match="loss_fn.*floating"):
        per_sample_sq_grad_sum(model, lambda m, b: _small_loss(m, b).long(), batch)
    with pytest.raises(ValueError, match="loss_fn.*device"):
        per_sample_sq_grad_sum(model, lambda m, b: _small_loss(m, b).to("meta"), batch)
    with pytest.raises(ValueError, match="loss_fn.*device"):
        rank1_fisher(model, lambda m, b: _small_loss(m, b).to("meta"), [batch])


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_called_under_no_grad_or_inference_mode(context):
    """The functions enable autograd for their own computation (results are detached); a batch made
    under inference_mode is cloned into normal tensors."""
    model, batch = _small()
    G = naive_grads(model, _small_loss, batch, 5)
    d = torch.randn(G.shape[1], dtype=torch.float64)
    ctx = torch.no_grad if context == "no_grad" else torch.inference_mode
    with ctx():
        inner = {"x": batch["x"].clone()}  # an inference tensor under inference_mode
        dots = [per_sample_grad_dot(model, _small_loss, inner, d, method=m) for m in ("hooks", "jvp", "autograd")]
        sq = per_sample_sq_grad_sum(model, _small_loss, inner)
        diag = diag_fisher(model, _small_loss, [inner])
        r = rank1_fisher(model, _small_loss, [inner])
    for dot in dots:
        assert rel_err(dot, G @ d) < 1e-10
    assert rel_err(sq, (G * G).sum(0)) < 1e-10 and rel_err(diag, (G * G).mean(0)) < 1e-10
    assert rel_err(r.mean_grad, G.mean(0)) < 1e-10 and not r.mean_grad.is_inference()


def test_refused_inside_torch_func_transforms():
    from torch.autograd import forward_ad

    model, batch = _small()
    P = num_trainable(model)
    for method in ("hooks", "jvp"):
        with pytest.raises(ValueError, match="per_sample_grad_dot.*torch.func"):
            torch.func.vmap(lambda d: per_sample_grad_dot(model, _small_loss, batch, d, method=method))(
                torch.randn(2, P, dtype=torch.float64))
    with forward_ad.dual_level():
        with pytest.raises(ValueError, match="per_sample_sq_grad_sum.*torch.func"):
            per_sample_sq_grad_sum(model, _small_loss, batch)
        with pytest.raises(ValueError, match="diag_fisher.*torch.func"):
            diag_fisher(model, _small_loss, [batch])
        with pytest.raises(ValueError, match="rank1_fisher.*torch.func"):
            rank1_fisher(model, _small_loss, [batch])


def test_half_precision_accumulates_in_float32():
    """float16 / bfloat16 models: results in float32; a half-precision `out` buffer is refused
    (summing batches into it would round every partial sum)."""
    model, batch = _small()
    for dt in (torch.float16, torch.bfloat16):
        m = copy.deepcopy(model).to(dt)
        b = {"x": batch["x"].to(dt)}
        P = num_trainable(m)
        assert per_sample_sq_grad_sum(m, _small_loss, b).dtype == torch.float32
        assert diag_fisher(m, _small_loss, [b]).dtype == torch.float32
        assert rank1_fisher(m, _small_loss, [b]).mean_grad.dtype == torch.float32
        assert per_sample_grad_dot(m, _small_loss, b, torch.ones(P), method="jvp").dtype == torch.float32
        with pytest.raises(ValueError, match="out.*float32"):
            per_sample_sq_grad_sum(m, _small_loss, b, out=torch.zeros(P, dtype=dt))


def test_complex_parameters_refused():
    model = nn.Linear(3, 2).to(torch.complex64)
    loss_fn = lambda m, b: m(b["x"].to(torch.complex64)).abs().pow(2).sum(1)  # noqa: E731
    with pytest.raises(ValueError, match="model.*real floating"):
        per_sample_sq_grad_sum(model, loss_fn, {"x": torch.randn(2, 3)})


def test_progress_bars_off_by_default(capsys):
    model, batch = _small()
    rank1_fisher(model, _small_loss, [batch])
    diag_fisher(model, _small_loss, [batch])
    assert "Fisher" not in capsys.readouterr().err
    diag_fisher(model, _small_loss, [batch], progress=True)
    rank1_fisher(model, _small_loss, [batch], progress=True)
    err = capsys.readouterr().err
    assert "diag Fisher" in err and "rank1 Fisher" in err


def test_swapped_parameter_is_not_credited():
    """A loss that swaps a layer's weight for another tensor (torch.func.functional_call): the layer's
    output gradients say nothing about the model's own weight, whose per-sample gradients are zero."""
    model, batch = _small()
    subst = {"0.weight": model[0].weight.detach().clone().requires_grad_()}
    loss_fn = lambda m, b: torch.func.functional_call(m, subst, (b["x"],)).pow(2).sum(1)  # noqa: E731
    G = naive_grads(model, loss_fn, batch, 5)
    assert G[:, :12].abs().max() == 0  # 0.weight is not used
    assert_estimators_match(model, loss_fn, batch, G, dot_methods=("hooks", "autograd"))
