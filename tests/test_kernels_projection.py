"""cdgfast.kernels.projection: per-sample gradient contractions for Linear / Conv2d layers.

The Triton kernels run under TRITON_INTERPRET=1 on CPU tensors here (tests/conftest.py), on CUDA
where there is a GPU. The plain-PyTorch functions are the hook path's CPU contractions
(cdgfast.fisher.hooks runs them; the last tests check that it does) and are tested without Triton.
References: per-sample gradients built sample by sample in float64 (outer products over tokens), and
autograd per-sample gradients of real nn.Linear / nn.Conv2d modules.
"""
import pytest
import torch
import torch.nn as nn

from cdgfast._dispatch import triton_available
from cdgfast.kernels import projection as P

needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton not installed")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Relative tolerance (to the reference's max magnitude) per input dtype. The reference uses the very
# same (rounded) input values in float64, so only the kernel's accumulation error counts: products
# of fp16/bf16 values are exact in the fp32 accumulator.
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
SHAPES = [  # (B, T, Cin, Cout)
    (1, 1, 5, 3),
    (3, 7, 5, 3),
    (3, 1, 33, 5),
    (2, 20, 33, 17),  # several T chunks and Cin / Cout tiles under the 16-wide interpreter tiles
    (1, 7, 16, 16),
]


def naive_per_sample_grads(x, gy):
    """g_i = sum_t outer(gy[i,t], x[i,t]) in float64, one sample and one token at a time."""
    B, T, cin = x.shape
    cout = gy.shape[2]
    g = torch.zeros(B, cout, cin, dtype=torch.float64)
    for i in range(B):
        for t in range(T):
            g[i] += torch.outer(gy[i, t].double().cpu(), x[i, t].double().cpu())
    return g


def assert_close_rel(got, ref, rtol):
    got = got.double().cpu()
    ref = ref.double().cpu()
    scale = ref.abs().max().clamp_min(1e-30)
    err = (got - ref).abs().max() / scale
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(device=DEV, dtype=dtype)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_grad_dot_fp32_shapes(shape, bias):
    B, T, cin, cout = shape
    x, gy, M = rand(B, T, cin), rand(B, T, cout), rand(cout, cin)
    Mb = rand(cout) if bias else None
    got = P.linear_grad_dot(x, gy, M, Mb)
    g = naive_per_sample_grads(x, gy)
    ref = (g * M.double().cpu()).sum(dim=(1, 2))
    if bias:
        ref += gy.double().cpu().sum(dim=1) @ Mb.double().cpu()
    assert got.shape == (B,) and got.dtype == torch.float32
    assert_close_rel(got, ref, RTOL[torch.float32])
    assert_close_rel(P.linear_grad_dot_torch(x, gy, M, Mb), ref, RTOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_sq_grad_sum_fp32_shapes(shape):
    B, T, cin, cout = shape
    x, gy = rand(B, T, cin), rand(B, T, cout)
    got = P.linear_sq_grad_sum(x, gy)
    ref = (naive_per_sample_grads(x, gy) ** 2).sum(dim=0)
    assert got.shape == (cout, cin) and got.dtype == torch.float32
    assert_close_rel(got, ref, RTOL[torch.float32])
    assert_close_rel(P.linear_sq_grad_sum_torch(x, gy, max_elements=cout * cin), ref, RTOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(dtype):
    B, T, cin, cout = 3, 7, 33, 5
    x, gy = rand(B, T, cin, dtype=dtype), rand(B, T, cout, dtype=dtype)
    M, Mb = rand(cout, cin, dtype=dtype), rand(cout, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = naive_per_sample_grads(x, gy)
    dot = P.linear_grad_dot(x, gy, M, Mb)
    ref_dot = (g * M.double().cpu()).sum(dim=(1, 2)) + gy.double().cpu().sum(dim=1) @ Mb.double().cpu()
    assert dot.dtype == acc
    assert_close_rel(dot, ref_dot, RTOL[dtype])
    sq = P.linear_sq_grad_sum(x, gy)
    assert sq.dtype == acc
    assert_close_rel(sq, (g ** 2).sum(dim=0), RTOL[dtype])


@needs_triton
def test_mixed_dtypes_use_fp32_direction():
    # A half-precision layer with an fp32 direction: the direction must not be rounded to fp16.
    B, T, cin, cout = 2, 3, 17, 4
    x, gy = rand(B, T, cin, dtype=torch.float16), rand(B, T, cout, dtype=torch.float16)
    M = rand(cout, cin) * (1 + 1e-3)  # values not representable in fp16
    got = P.linear_grad_dot(x, gy, M)
    ref = (naive_per_sample_grads(x, gy) * M.double().cpu()).sum(dim=(1, 2))
    assert_close_rel(got, ref, 1e-5)


@needs_triton
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64])
def test_sq_grad_sum_accumulates_into_out(out_dtype):
    B, T, cin, cout = 3, 5, 19, 6
    x, gy = rand(B, T, cin), rand(B, T, cout)
    flat = torch.randn(7 + cout * cin + 3, dtype=out_dtype, device=DEV)
    before = flat.clone()
    view = flat[7:7 + cout * cin].view(cout, cin)  # a slice of a flat Fisher buffer
    ret = P.linear_sq_grad_sum(x, gy, out=view, scale=0.37)
    assert ret.data_ptr() == view.data_ptr()
    ref = before[7:7 + cout * cin].double().cpu().view(cout, cin) + 0.37 * (naive_per_sample_grads(x, gy) ** 2).sum(0)
    assert_close_rel(view, ref, 2e-6)  # fp32 inputs: fp32 accumulation
    # Nothing outside the slice is touched.
    assert torch.equal(flat[:7], before[:7]) and torch.equal(flat[-3:], before[-3:])
    # A second call accumulates again.
    P.linear_sq_grad_sum(x, gy, out=view, scale=0.37)
    ref2 = ref + 0.37 * (naive_per_sample_grads(x, gy) ** 2).sum(0)
    assert_close_rel(view, ref2, 2e-6)


@needs_triton
def test_scale_fp64_is_exact():
    x, gy = rand(2, 3, 5, dtype=torch.float64), rand(2, 3, 4, dtype=torch.float64)
    scale = 1.0 / 3.0  # not representable in fp32
    got = P.linear_sq_grad_sum(x, gy, scale=scale)
    assert_close_rel(got, scale * (naive_per_sample_grads(x, gy) ** 2).sum(0), 1e-12)


@needs_triton
def test_non_contiguous_inputs_and_out():
    B, T, cin, cout = 3, 6, 9, 5
    x = rand(B, cin, T).transpose(1, 2)  # [B, T, Cin] with stride(2) != 1
    gy = rand(T, B, cout).transpose(0, 1)
    M = rand(cin, cout).t()
    assert not x.is_contiguous() and not gy.is_contiguous() and not M.is_contiguous()
    g = naive_per_sample_grads(x, gy)
    assert_close_rel(P.linear_grad_dot(x, gy, M), (g * M.double().cpu()).sum((1, 2)), RTOL[torch.float32])
    out = torch.zeros(cin, cout, device=DEV).t()
    P.linear_sq_grad_sum(x, gy, out=out)
    assert_close_rel(out, (g ** 2).sum(0), RTOL[torch.float32])


def test_bias_sq_grad_sum():
    gy = rand(3, 7, 5)
    ref = torch.stack([gy[i].double().cpu().sum(0) ** 2 for i in range(3)]).sum(0)
    assert_close_rel(P.bias_sq_grad_sum(gy), ref, 1e-6)
    out = torch.ones(5, device=DEV)
    P.bias_sq_grad_sum(gy, out=out, scale=2.0)
    assert_close_rel(out, 1 + 2 * ref, 1e-6)


@needs_triton
def test_empty_batch():
    x, gy = rand(0, 3, 5), rand(0, 3, 4)
    assert P.linear_grad_dot(x, gy, rand(4, 5)).shape == (0,)
    assert torch.equal(P.linear_sq_grad_sum(x, gy).cpu(), torch.zeros(4, 5))
    out = torch.ones(4, 5, device=DEV)
    P.linear_sq_grad_sum(x, gy, out=out)
    assert torch.equal(out.cpu(), torch.ones(4, 5))


# --- real layers against autograd per-sample gradients --------------------------------------------
def per_sample_autograd(module, inputs, loss_of_output):
    """Per-sample parameter gradients by a backward at batch size 1 (the definition)."""
    grads = []
    for i in range(inputs.shape[0]):
        module.zero_grad()
        loss_of_output(module(inputs[i:i + 1]), i).backward()
        grads.append({n: p.grad.detach().double().clone() for n, p in module.named_parameters()})
    return grads


def batch_io_grads(module, inputs, loss_of_output):
    """Layer input and grad_output of the summed per-sample losses (= per-sample output grads)."""
    out = module(inputs)
    out.retain_grad()
    sum(loss_of_output(out[i:i + 1], i) for i in range(inputs.shape[0])).backward()
    return inputs.detach(), out.grad.detach()


@needs_triton
def test_linear_tokens_vs_autograd():
    torch.manual_seed(1)
    B, T, cin, cout = 3, 7, 5, 3
    lin = nn.Linear(cin, cout).double()
    x = torch.randn(B, T, cin, dtype=torch.float64)
    w = torch.randn(B, T, cout, dtype=torch.float64)
    loss = lambda y, i: (torch.tanh(y) * w[i]).sum() + (y ** 2).mean()  # noqa: E731
    per = per_sample_autograd(lin, x, loss)
    xin, gy = batch_io_grads(lin, x, loss)
    xin, gy = xin.to(DEV), gy.to(DEV)
    Mw = torch.randn(cout, cin, dtype=torch.float64)
    Mb = torch.randn(cout, dtype=torch.float64)
    ref_dot = torch.stack([(g["weight"] * Mw).sum() + (g["bias"] * Mb).sum() for g in per])
    assert_close_rel(P.linear_grad_dot(xin, gy, Mw.to(DEV), Mb.to(DEV)), ref_dot, 1e-10)
    ref_sq = sum(g["weight"] ** 2 for g in per)
    assert_close_rel(P.linear_sq_grad_sum(xin, gy), ref_sq, 1e-10)
    assert_close_rel(P.bias_sq_grad_sum(gy), sum(g["bias"] ** 2 for g in per), 1e-10)


CONVS = [
    dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1),
    dict(in_channels=2, out_channels=3, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding="same", groups=2, padding_mode="reflect"),
    dict(in_channels=3, out_channels=5, kernel_size=1, bias=False),
    # stride 1, groups 1: the CPU squares go tap by tap on the padded input (no unfold)
    dict(in_channels=3, out_channels=4, kernel_size=(3, 2), padding=(2, 1), dilation=(2, 3), padding_mode="circular"),
    dict(in_channels=2, out_channels=3, kernel_size=4, padding="same", dilation=2),
    dict(in_channels=3, out_channels=2, kernel_size=3, padding="valid"),
]


@pytest.mark.parametrize("cfg", CONVS, ids=lambda c: f"k{c['kernel_size']}g{c.get('groups', 1)}")
def test_conv2d_vs_autograd(cfg):
    torch.manual_seed(2)
    conv = nn.Conv2d(**cfg).double()
    B = 3
    x = torch.randn(B, cfg["in_channels"], 7, 9, dtype=torch.float64)
    with torch.no_grad():
        w = torch.randn_like(conv(x))
    loss = lambda y, i: (torch.sin(y) * w[i]).sum()  # noqa: E731
    per = per_sample_autograd(conv, x, loss)
    xin, gout = batch_io_grads(conv, x, loss)
    Mw = torch.randn_like(conv.weight)
    Mb = torch.randn(cfg["out_channels"], dtype=torch.float64) if conv.bias is not None else None
    ref_dot = torch.stack([(g["weight"] * Mw).sum() + ((g["bias"] * Mb).sum() if Mb is not None else 0) for g in per])
    ref_sq = sum(g["weight"] ** 2 for g in per)
    for use_kernel in (False, True) if triton_available() else (False,):
        d_in, d_out = xin.to(DEV), gout.to(DEV)
        got_dot = P.conv2d_grad_dot(d_in, d_out, conv.to(DEV), Mw.to(DEV), None if Mb is None else Mb.to(DEV),
                                    use_kernel=use_kernel)
        assert_close_rel(got_dot, ref_dot, 1e-10)
        got_sq = P.conv2d_sq_grad_sum(d_in, d_out, conv, use_kernel=use_kernel)
        assert got_sq.shape == conv.weight.shape
        assert_close_rel(got_sq, ref_sq, 1e-10)
        conv.cpu()
    if conv.bias is not None:
        gy_b = gout.flatten(2).transpose(1, 2)
        assert_close_rel(P.bias_sq_grad_sum(gy_b), sum(g["bias"] ** 2 for g in per), 1e-10)


def test_conv2d_as_linear_layout():
    # x_i^T columns are the receptive fields: the conv output equals gy-layout of x @ W^T.
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    inp = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    y = conv(inp)
    x, _ = P.conv2d_as_linear(inp, torch.zeros_like(y), conv)
    lin = x @ conv.weight.reshape(4, -1).t() + conv.bias
    assert torch.allclose(lin, y.flatten(2).transpose(1, 2), atol=1e-12)


# --- bad input -------------------------------------------------------------------------------------
@needs_triton
def test_errors_name_the_argument():
    x, gy = rand(2, 3, 5), rand(2, 3, 4)
    with pytest.raises(ValueError, match="gy"):
        P.linear_grad_dot(x, rand(2, 4, 4), rand(4, 5))
    with pytest.raises(ValueError, match="M"):
        P.linear_grad_dot(x, gy, rand(5, 4))
    with pytest.raises(ValueError, match="Mb"):
        P.linear_grad_dot(x, gy, rand(4, 5), rand(5))
    with pytest.raises(ValueError, match="x"):
        P.linear_sq_grad_sum(x[0], gy)
    with pytest.raises(ValueError, match="out"):
        P.linear_sq_grad_sum(x, gy, out=torch.zeros(5, 4, device=DEV))
    with pytest.raises(ValueError, match="scale"):
        P.linear_sq_grad_sum(x, gy, scale=torch.tensor(1.0))
    with pytest.raises(ValueError, match="x"):
        P.linear_sq_grad_sum(x.long(), gy)
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match="conv_module"):
        P.conv2d_as_linear(torch.randn(1, 3, 5, 5), torch.randn(1, 4, 3, 3), nn.Linear(3, 4))
    with pytest.raises(ValueError, match="grad_output"):
        P.conv2d_as_linear(torch.randn(1, 3, 5, 5), torch.randn(1, 4, 4, 4), conv)
    with pytest.raises(ValueError, match="group"):
        P.conv2d_as_linear(torch.randn(1, 3, 5, 5), torch.randn(1, 4, 3, 3), conv, group=1)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="x: Triton kernels need CUDA"):
        P.linear_sq_grad_sum(torch.randn(2, 3, 5), torch.randn(2, 3, 4))


# --- the plain-PyTorch contractions (the hook path's CPU copy) --------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
def test_torch_linear_contractions_vs_naive(shape, acc):
    """No Triton needed. acc: the hook path passes the model's accumulation dtype; float64
    accumulation of float32 inputs is exact to float64 rounding against the float64 reference."""
    B, T, cin, cout = shape
    x, gy, M, Mb = rand(B, T, cin), rand(B, T, cout), rand(cout, cin), rand(cout)
    g = naive_per_sample_grads(x, gy)
    tol = 1e-12 if acc == torch.float64 else RTOL[torch.float32]
    dot = P.linear_grad_dot_torch(x, gy, M, Mb, acc=acc)
    assert dot.dtype == acc
    assert_close_rel(dot, (g * M.double().cpu()).sum((1, 2)) + gy.double().cpu().sum(1) @ Mb.double().cpu(), tol)
    assert_close_rel(P.linear_grad_dot_torch(x, gy, None, Mb, acc=acc), gy.double().cpu().sum(1) @ Mb.double().cpu(),
                     tol)
    assert_close_rel(P.linear_grad_dot_torch(x, gy, M, acc=acc), (g * M.double().cpu()).sum((1, 2)), tol)
    ref_sq = (g ** 2).sum(0)
    for max_elements in (1, 1 << 24):  # one sample per chunk, and one chunk
        assert_close_rel(P.linear_sq_grad_sum_torch(x, gy, acc=acc, max_elements=max_elements), ref_sq, tol)
    out = torch.ones(cout, cin, dtype=torch.float64, device=DEV)
    assert P.linear_sq_grad_sum_torch(x, gy, out=out, scale=0.5, acc=acc) is out
    assert_close_rel(out, 1 + 0.5 * ref_sq, tol)
    ref_b = torch.stack([gy[i].double().cpu().sum(0) ** 2 for i in range(B)]).sum(0)
    assert_close_rel(P.bias_sq_grad_sum(gy, acc=acc), ref_b, tol)


def _grouped_conv_reference(conv, x, loss, r):
    """Per-sample gradients of a conv whose input rows are B samples of r consecutive rows each:
    sample i's gradient is the sum of its rows' single-row gradients (float64, one row at a time)."""
    rows = per_sample_autograd(conv, x, loss)
    out = []
    for i in range(x.shape[0] // r):
        out.append({n: sum(rows[i * r + j][n] for j in range(r)) for n in rows[0]})
    return out


@pytest.mark.parametrize("cfg", CONVS, ids=lambda c: f"k{c['kernel_size']}g{c.get('groups', 1)}")
@pytest.mark.parametrize("r", [1, 3])
def test_torch_conv_contractions_rows_per_sample(cfg, r):
    torch.manual_seed(3)
    conv = nn.Conv2d(**cfg).double()
    B = 2
    x = torch.randn(B * r, cfg["in_channels"], 6, 7, dtype=torch.float64)
    with torch.no_grad():
        w = torch.randn_like(conv(x))
    loss = lambda y, i: (torch.sin(y) * w[i]).sum()  # noqa: E731
    per = _grouped_conv_reference(conv, x, loss, r)
    xin, gout = batch_io_grads(conv, x, loss)
    Mw = torch.randn_like(conv.weight)
    Mb = torch.randn(cfg["out_channels"], dtype=torch.float64) if conv.bias is not None else None
    ref_dot = torch.stack([(g["weight"] * Mw).sum() + ((g["bias"] * Mb).sum() if Mb is not None else 0) for g in per])
    got = P.conv2d_grad_dot(xin, gout, conv, Mw, Mb, use_kernel=False, rows_per_sample=r)
    assert got.shape == (B,)
    assert_close_rel(got, ref_dot, 1e-12)
    for max_elements in (1, 1 << 24):  # one sample (r rows) per unfold chunk, and one chunk
        sq = P.conv2d_sq_grad_sum(xin, gout, conv, use_kernel=False, rows_per_sample=r, max_elements=max_elements)
        assert_close_rel(sq, sum(g["weight"] ** 2 for g in per), 1e-12)
    if conv.bias is not None:
        assert_close_rel(P.conv2d_bias_sq_grad_sum(gout, rows_per_sample=r), sum(g["bias"] ** 2 for g in per), 1e-12)
        assert_close_rel(P.conv2d_grad_dot(xin, gout, conv, None, Mb, rows_per_sample=r),
                         torch.stack([(g["bias"] * Mb).sum() for g in per]), 1e-12)
    if triton_available():  # the Triton squares on the unfolded input, same chunks
        sq = P.conv2d_sq_grad_sum(xin.to(DEV), gout.to(DEV), conv.to(DEV), use_kernel=True, rows_per_sample=r)
        assert_close_rel(sq, sum(g["weight"] ** 2 for g in per), 1e-10)
        conv.cpu()


def test_torch_contraction_errors_name_the_argument():
    conv = nn.Conv2d(2, 3, 3)
    x, gy = torch.randn(4, 2, 5, 5), torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="rows_per_sample"):
        P.conv2d_sq_grad_sum(x, gy, conv, rows_per_sample=3)
    with pytest.raises(ValueError, match="rows_per_sample"):
        P.conv2d_bias_sq_grad_sum(gy, rows_per_sample=0)
    with pytest.raises(ValueError, match="grad_output"):
        P.conv2d_grad_dot(x, torch.randn(4, 2, 3, 3), conv, torch.randn(3, 2, 3, 3))
    with pytest.raises(ValueError, match="grad_output"):
        P.conv2d_sq_grad_sum(x, torch.randn(4, 3, 4, 4), conv)
    with pytest.raises(ValueError, match="conv_module"):
        P.conv2d_sq_grad_sum(x, gy, nn.Linear(2, 3))
    with pytest.raises(ValueError, match="M"):
        P.linear_grad_dot_torch(torch.randn(2, 3, 5), torch.randn(2, 3, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="out"):
        P.linear_sq_grad_sum_torch(torch.randn(2, 3, 5), torch.randn(2, 3, 4), out=torch.zeros(5, 4))


def test_hook_path_runs_these_contractions(monkeypatch):
    """One copy: cdgfast.fisher.hooks computes Linear / Conv2d contractions with these functions."""
    from cdgfast.fisher import per_sample_grad_dot, per_sample_sq_grad_sum

    called = set()
    for name in ("linear_grad_dot_torch", "linear_sq_grad_sum_torch", "bias_sq_grad_sum", "conv2d_grad_dot",
                 "conv2d_sq_grad_sum", "conv2d_bias_sq_grad_sum"):
        real = getattr(P, name)
        monkeypatch.setattr(P, name, lambda *a, _n=name, _f=real, **k: called.add(_n) or _f(*a, **k))
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2))
    batch = {"x": torch.randn(3, 2, 4, 4)}
    loss_fn = lambda m, b: m(b["x"]).pow(2).sum(1)  # noqa: E731
    per_sample_sq_grad_sum(model, loss_fn, batch)
    per_sample_grad_dot(model, loss_fn, batch, torch.randn(sum(p.numel() for p in model.parameters())),
                        method="hooks")
    assert called == {"linear_grad_dot_torch", "linear_sq_grad_sum_torch", "bias_sq_grad_sum", "conv2d_grad_dot",
                      "conv2d_sq_grad_sum", "conv2d_bias_sq_grad_sum"}


def test_stride1_conv_squares_never_unfold(monkeypatch):
    """The CPU squares of a stride-1, groups-1 conv take the tap-by-tap path (no unfolded input) and
    agree with the unfolded form (a strided conv of the same taps, which does unfold) in float32."""
    torch.manual_seed(5)
    conv = nn.Conv2d(5, 7, (3, 3), padding=1)
    x = torch.randn(4, 5, 9, 6)
    gy = torch.randn(4, 7, 9, 6)
    ref = sum(torch.einsum("ol,kl->ok", gy[i].double().reshape(7, -1),
                           P.conv_unfold(P.conv_padded_input(x[i:i + 1].double(), conv), conv)[0]) ** 2
              for i in range(4)).reshape(conv.weight.shape)
    monkeypatch.setattr(P, "conv_unfold", lambda *a: pytest.fail("conv_unfold called on the stride-1 path"))
    for max_elements in (1, 1 << 24):
        got = P.conv2d_sq_grad_sum(x, gy, conv, use_kernel=False, max_elements=max_elements)
        assert_close_rel(got, ref, RTOL[torch.float32])
    with pytest.raises(ValueError, match="grad_output"):
        P.conv2d_sq_grad_sum(x, gy[:, :, :8], conv, use_kernel=False)


def test_conv_unfold_matches_f_unfold():
    import torch.nn.functional as F

    for cfg in CONVS:
        conv = nn.Conv2d(**cfg)
        xp = P.conv_padded_input(torch.randn(2, cfg["in_channels"], 7, 9), conv)
        G = conv.groups
        for sub in (xp, xp[:, : cfg["in_channels"] // G]):  # non-contiguous channel slices (groups)
            ref = F.unfold(sub, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
            assert torch.equal(P.conv_unfold(sub, conv), ref)


def _paths_for(conv):
    """The CPU forms of the conv squares that apply to this conv (the grouped weight gradient and the
    unfold always; the tap-by-tap form for stride 1, groups 1)."""
    paths = ["grouped", "unfold"]
    if conv.groups == 1 and tuple(conv.stride) == (1, 1):
        paths.append("shifted")
    return paths


@pytest.mark.parametrize("cfg", CONVS, ids=lambda c: f"k{c['kernel_size']}g{c.get('groups', 1)}")
@pytest.mark.parametrize("r", [1, 3])
def test_every_conv_square_path_vs_naive(cfg, r, monkeypatch):
    """Each form `_conv_sq_path` may pick gives the float64 per-sample reference (rows_per_sample r,
    chunks of one sample and one chunk), so the choice between them changes the speed only."""
    torch.manual_seed(6)
    conv = nn.Conv2d(**cfg).double()
    B = 3
    x = torch.randn(B * r, cfg["in_channels"], 6, 7, dtype=torch.float64)
    with torch.no_grad():
        w = torch.randn_like(conv(x))
    loss = lambda y, i: (torch.cos(y) * w[i]).sum()  # noqa: E731
    ref = sum(g["weight"] ** 2 for g in _grouped_conv_reference(conv, x, loss, r))
    xin, gout = batch_io_grads(conv, x, loss)
    taken = []
    real = P._conv_sq_path
    for path in _paths_for(conv):
        monkeypatch.setattr(P, "_conv_sq_path", lambda *a, _p=path: taken.append(_p) or _p)
        for max_elements in (1, 1 << 24):
            got = P.conv2d_sq_grad_sum(xin, gout, conv, use_kernel=False, rows_per_sample=r, max_elements=max_elements)
            assert_close_rel(got, ref, 1e-12)
        with pytest.raises(ValueError, match="grad_output"):  # wrong output size, whichever form
            P.conv2d_sq_grad_sum(xin, gout[:, :, :-1], conv, use_kernel=False, rows_per_sample=r)
        got32 = P.conv2d_sq_grad_sum(xin.float(), gout.float(), conv.float(), use_kernel=False, rows_per_sample=r)
        assert got32.dtype == torch.float32
        assert_close_rel(got32, ref, RTOL[torch.float32])
        conv.double()
    assert set(taken) == set(_paths_for(conv))
    monkeypatch.setattr(P, "_conv_sq_path", real)


def test_conv_square_path_choice():
    """The CPU choice: the grouped weight gradient for 3x3 convs at large outputs (32 x 32, or 16 x 16
    with few channel pairs) and for strided / grouped convs; the tap-by-tap products for 1x1 kernels,
    one output channel, small outputs; the unfold for the Triton squares."""
    def path(cin, cout, hw, k=3, **kw):
        conv = nn.Conv2d(cin, cout, k, padding=k // 2, **kw)
        x = torch.zeros(2, cin, hw, hw)
        with torch.no_grad():
            g = torch.zeros_like(conv(x))
        return P._conv_sq_path(conv, x, g, False), P._conv_sq_path(conv, x, g, True)
    assert path(16, 16, 16) == ("grouped", "unfold")
    assert path(64, 64, 32) == ("grouped", "unfold")
    assert path(64, 64, 16) == ("shifted", "unfold")
    assert path(32, 32, 8) == ("shifted", "unfold")
    assert path(16, 1, 32) == ("shifted", "unfold")
    assert path(64, 64, 32, k=1) == ("shifted", "unfold")
    assert path(64, 64, 8, stride=2) == ("grouped", "unfold")
    assert path(64, 64, 8, k=1, groups=2) == ("grouped", "unfold")
