"""rank1_penalty / diag_penalty against naive references written here in plain PyTorch (loops over k and
over parameters), float64 gradcheck, opcheck, the Triton launchers under the interpreter, bad input."""
import pytest
import torch
from torch.library import opcheck

from cdgfast.ops.penalties import diag_penalty, flat_parameters, rank1_penalty

# loss and gradient tolerances (relative, atol scaled by the reference's magnitude) per input dtype:
# sums are float32 for half inputs, so the loss is tight; gradients are rounded to the input dtype.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (1e-4, 2e-3),
    torch.bfloat16: (1e-4, 1.6e-2),
}


def close(got, ref, rtol):
    got, ref = torch.as_tensor(got).detach(), torch.as_tensor(ref).detach().double()
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=rtol * max(float(ref.abs().max()), 1e-30))


def shapes_params(shapes, dtype=torch.float64, requires_grad=True):
    return [torch.randn(s, dtype=dtype).requires_grad_(requires_grad) for s in shapes]


def naive_rank1(params, anchors, directions, coeffs):
    """0.5 sum_k c_k (sum over parameters of d_k . (p - a_k))^2, one parameter slice at a time."""
    loss = 0.0
    for k in range(anchors.shape[0]):
        s, off = 0.0, 0
        for p in params:
            n = p.numel()
            s = s + (directions[k, off:off + n] * (p.reshape(-1) - anchors[k, off:off + n])).sum()
            off += n
        loss = loss + 0.5 * coeffs[k] * s * s
    return loss


def naive_diag(params, anchor, fisher):
    loss, off = 0.0, 0
    for p in params:
        n = p.numel()
        for j in range(n):  # elementwise on purpose: an independent reference
            d = p.reshape(-1)[j] - anchor[off + j]
            loss = loss + 0.5 * fisher[off + j] * d * d
        off += n
    return loss


SHAPES = [(3, 2), (1,), (5,), (2, 1, 3)]  # P = 18: odd sizes, a size-1 parameter


@pytest.mark.parametrize("K", [1, 5])
def test_rank1_matches_naive_values_and_all_gradients(K):
    params = shapes_params(SHAPES)
    P = sum(p.numel() for p in params)
    anchors = torch.randn(K, P, dtype=torch.float64, requires_grad=True)
    directions = torch.randn(K, P, dtype=torch.float64, requires_grad=True)
    coeffs = torch.rand(K, dtype=torch.float64, requires_grad=True)
    inputs = params + [anchors, directions, coeffs]
    got = rank1_penalty(params, anchors, directions, coeffs)
    ref = naive_rank1(params, anchors, directions, coeffs)
    assert got.shape == () and got.dtype == torch.float64
    close(got, ref, 1e-12)
    g_got = torch.autograd.grad(got, inputs)
    g_ref = torch.autograd.grad(ref, inputs)
    for a, b in zip(g_got, g_ref):
        close(a, b, 1e-12)


@pytest.mark.parametrize("P", [1, 7, 1000])
def test_rank1_flat_odd_sizes(P):
    theta = torch.randn(P, dtype=torch.float64, requires_grad=True)
    anchors, directions = torch.randn(3, P, dtype=torch.float64), torch.randn(3, P, dtype=torch.float64)
    coeffs = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    got = rank1_penalty(theta, anchors, directions, coeffs)
    ref = naive_rank1([theta], anchors, directions, coeffs)
    close(got, ref, 1e-12)
    close(torch.autograd.grad(got, theta)[0], torch.autograd.grad(ref, theta)[0], 1e-12)


def test_rank1_is_zero_at_the_anchor_and_exact_for_one_direction():
    theta = torch.randn(11, dtype=torch.float64)
    d = torch.randn(1, 11, dtype=torch.float64)
    assert rank1_penalty(theta, theta[None].clone(), d, torch.ones(1, dtype=torch.float64)).item() == 0.0
    # theta - a = 2 d: s = 2 ||d||^2, loss = 0.5 * 3 * s^2
    a = (theta - 2 * d[0])[None]
    expected = 0.5 * 3.0 * (2 * (d[0] @ d[0])) ** 2
    close(rank1_penalty(theta, a, d, [3.0]), expected, 1e-12)


def test_module_list_and_flat_give_the_same_value_and_gradients():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.GroupNorm(1, 3), torch.nn.Linear(5, 1)).double()
    model[1].weight.requires_grad_(False)  # only trainable parameters count
    params = [p for p in model.parameters() if p.requires_grad]
    P = sum(p.numel() for p in params)
    anchors, directions = torch.randn(5, P, dtype=torch.float64), torch.randn(5, P, dtype=torch.float64)
    coeffs = torch.rand(5, dtype=torch.float64)
    anchor, fisher = torch.randn(P, dtype=torch.float64), torch.rand(P, dtype=torch.float64)
    for fn, args in ((rank1_penalty, (anchors, directions, coeffs)), (diag_penalty, (anchor, fisher))):
        from_module = fn(model, *args)
        g_module = torch.autograd.grad(from_module, params)
        from_list = fn(params, *args)
        g_list = torch.autograd.grad(from_list, params)
        theta = torch.cat([p.detach().reshape(-1) for p in params]).requires_grad_(True)
        from_flat = fn(theta, *args)
        g_flat = torch.autograd.grad(from_flat, theta)[0]
        close(from_list, from_flat, 1e-13)
        close(from_module, from_flat, 1e-13)
        off = 0
        for p, gm, gl in zip(params, g_module, g_list):
            n = p.numel()
            close(gl, g_flat[off:off + n].view_as(p), 1e-13)
            close(gm, gl, 1e-13)
            off += n


def test_parameters_tiling_one_buffer_are_not_copied(monkeypatch):
    buf = torch.randn(3 + 10 + 1, dtype=torch.float64)
    params = [torch.nn.Parameter(buf[0:3]), torch.nn.Parameter(buf[3:13].view(2, 5)), torch.nn.Parameter(buf[13:14])]
    theta = flat_parameters(params)
    assert theta.data_ptr() == buf.data_ptr() and theta.shape == (14,)
    copies = [p.detach().clone() for p in params]
    real_cat = torch.cat

    def no_cat(*a, **k):
        raise AssertionError("torch.cat called for parameters that tile one buffer")

    anchors, directions = torch.randn(2, 14, dtype=torch.float64), torch.randn(2, 14, dtype=torch.float64)
    coeffs = torch.rand(2, dtype=torch.float64)
    monkeypatch.setattr(torch, "cat", no_cat)
    loss = rank1_penalty(params, anchors, directions, coeffs)
    grads = torch.autograd.grad(loss, params)
    monkeypatch.setattr(torch, "cat", real_cat)
    ref_params = [c.requires_grad_(True) for c in copies]
    ref = naive_rank1(ref_params, anchors, directions, coeffs)
    close(loss, ref, 1e-12)
    for g, r in zip(grads, torch.autograd.grad(ref, ref_params)):
        close(g, r, 1e-12)
    # non-contiguous order falls back to a copy with the same result
    swapped = [params[1], params[0], params[2]]
    assert flat_parameters(swapped).data_ptr() != buf.data_ptr()


@pytest.mark.parametrize("dtype", list(TOL))
def test_dtype_tolerance_table(dtype):
    loss_tol, grad_tol = TOL[dtype]
    P, K = 257, 5
    theta = torch.randn(P).to(dtype).requires_grad_(True)
    anchors = (theta.detach().float() + 0.3 * torch.randn(K, P)).to(dtype)
    directions = torch.randn(K, P).to(dtype)
    coeffs = torch.rand(K).to(dtype)
    anchor, fisher = anchors[0].clone(), torch.rand(P).to(dtype)
    t64 = theta.detach().double().requires_grad_(True)
    # rank-1
    got = rank1_penalty(theta, anchors, directions, coeffs)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = naive_rank1([t64], anchors.double(), directions.double(), coeffs.double())
    close(got, ref, loss_tol)
    g = torch.autograd.grad(got, theta)[0]
    assert g.dtype == dtype
    close(g, torch.autograd.grad(ref, t64)[0], grad_tol)
    # diag
    got = diag_penalty(theta, anchor, fisher)
    ref = 0.5 * (fisher.double() * (t64 - anchor.double()) ** 2).sum()
    close(got, ref, loss_tol)
    close(torch.autograd.grad(got, theta)[0], torch.autograd.grad(ref, t64)[0], grad_tol)


def test_mixed_dtypes_bf16_params_fp32_state():
    theta = torch.randn(33).bfloat16().requires_grad_(True)
    anchor, fisher = torch.randn(33), torch.rand(33)
    loss = diag_penalty([theta], anchor, fisher)
    assert loss.dtype == torch.float32
    ref = 0.5 * (fisher.double() * (theta.detach().double() - anchor.double()) ** 2).sum()
    close(loss, ref, 1e-5)
    assert torch.autograd.grad(loss, theta)[0].dtype == torch.bfloat16
    # a parameter list of mixed dtypes: promoted for the sum, each gradient in its parameter's dtype
    p32 = torch.randn(4, requires_grad=True)
    loss = diag_penalty([p32, theta], torch.zeros(37), torch.ones(37))
    g32, g16 = torch.autograd.grad(loss, [p32, theta])
    assert (g32.dtype, g16.dtype) == (torch.float32, torch.bfloat16)
    close(g32, p32.detach(), 1e-6)
    close(g16, theta.detach().float(), 1e-6)


@pytest.mark.parametrize("P", [1, 7, 20])
def test_diag_matches_naive(P):
    params = [torch.randn(P, dtype=torch.float64, requires_grad=True), torch.randn(2, 2, dtype=torch.float64,
                                                                                  requires_grad=True)]
    anchor = torch.randn(P + 4, dtype=torch.float64, requires_grad=True)
    fisher = torch.rand(P + 4, dtype=torch.float64, requires_grad=True)
    inputs = params + [anchor, fisher]
    got = diag_penalty(params, anchor, fisher)
    ref = naive_diag(params, anchor, fisher)
    close(got, ref, 1e-12)
    for a, b in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(ref, inputs)):
        close(a, b, 1e-12)


def test_gradient_only_for_what_requires_it_and_no_grad_mode():
    theta = torch.randn(9, dtype=torch.float64, requires_grad=True)
    anchor, fisher = torch.randn(9, dtype=torch.float64), torch.rand(9, dtype=torch.float64)
    loss = diag_penalty(theta, anchor, fisher)
    (g,) = torch.autograd.grad(loss * 3.0, theta)  # the upstream gradient scales the saved r
    close(g, 3.0 * fisher * (theta.detach() - anchor), 1e-13)
    with torch.no_grad():
        nl = diag_penalty(theta, anchor, fisher)  # r is not written: same loss
    assert not nl.requires_grad
    close(nl, loss.detach(), 1e-14)
    # anchor-only gradient (theta constant) goes through the recompute path (no saved r)
    a = anchor.clone().requires_grad_(True)
    la = diag_penalty(theta.detach(), a, fisher)
    close(torch.autograd.grad(la, a)[0], -fisher * (theta.detach() - anchor), 1e-13)


# second derivatives: a create_graph backward differentiates the reference formula (ops/_common.py)
@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck])
def test_gradcheck_float64(check):
    torch.manual_seed(3)
    K, P = 2, 6
    th = torch.randn(P, dtype=torch.float64, requires_grad=True)
    A = torch.randn(K, P, dtype=torch.float64, requires_grad=True)
    D = torch.randn(K, P, dtype=torch.float64, requires_grad=True)
    c = torch.rand(K, dtype=torch.float64, requires_grad=True)
    assert check(torch.ops.cdgfast.rank1_penalty_fwd, (th, A, D, c))  # loss and s
    assert check(rank1_penalty, (th, A, D, c))
    a = torch.randn(P, dtype=torch.float64, requires_grad=True)
    f = torch.rand(P, dtype=torch.float64, requires_grad=True)
    assert check(torch.ops.cdgfast.diag_penalty, (th, a, f))
    p1 = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    p2 = torch.randn(2, dtype=torch.float64, requires_grad=True)
    # a parameter list goes through flat_parameters' own autograd function
    assert check(lambda x, y, d: rank1_penalty([x, y], A.detach(), d, c.detach()), (p1, p2, D))
    assert check(lambda x, y: diag_penalty([x, y], a.detach(), f.detach()), (p1, p2))


def test_opcheck():
    K, P = 3, 11
    th = torch.randn(P, requires_grad=True)
    A, D, c = torch.randn(K, P), torch.randn(K, P, requires_grad=True), torch.rand(K)
    a, f = torch.randn(P), torch.rand(P)
    opcheck(torch.ops.cdgfast.rank1_penalty_fwd.default, (th, A, D, c))
    opcheck(torch.ops.cdgfast.rank1_penalty.default, (th, A, D, c))
    opcheck(torch.ops.cdgfast.diag_penalty_fwd.default, (th, a, f, True))
    opcheck(torch.ops.cdgfast.diag_penalty.default, (th, a, f))
    s = torch.randn(K)
    fast = ("test_schema", "test_faketensor")  # the backward ops have no autograd of their own
    opcheck(torch.ops.cdgfast.rank1_penalty_backward.default,
            (torch.tensor(1.5), s, th.detach(), A, D.detach(), c, s, True, True, False), test_utils=fast)
    opcheck(torch.ops.cdgfast.diag_penalty_backward.default,
            (torch.tensor(1.5), th.detach(), a, f, None, True, False, True), test_utils=fast)


def test_meta_tensors_propagate_shapes():
    th, A, D, c = (torch.empty(s, device="meta") for s in ((10,), (4, 10), (4, 10), (4,)))
    out = rank1_penalty(th, A, D, c)
    assert out.device.type == "meta" and out.shape == ()
    assert diag_penalty(th, A[0], A[1]).shape == ()


# ---------------------------------------------------------------------------------------------------- Triton

@pytest.mark.parametrize("P,K,block", [(1, 1, 64), (37, 5, 4), (1031, 3, 256), (1031, 1, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_rank1_matches_composite(P, K, block, dtype):
    from cdgfast.kernels.penalties import rank1_penalty_backward, rank1_penalty_forward
    from cdgfast.ops.penalties import _rank1_bwd_composite, _rank1_fwd_composite

    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    th, A, D = torch.randn(P, dtype=dtype), torch.randn(K, P, dtype=dtype), torch.randn(K, P, dtype=dtype)
    c = torch.rand(K, dtype=dtype)
    # final_block=4: the finalize kernel sums the 10 partials of (P=37, block=4) in 3 rounds
    loss, s = rank1_penalty_forward(th, A, D, c, block=block, final_block=4)
    ref_loss, ref_s = _rank1_fwd_composite(th, A, D, c)
    close(loss, ref_loss, rtol)
    close(s, ref_s, rtol)
    g, gs = torch.tensor(0.7, dtype=loss.dtype), torch.randn(K, dtype=loss.dtype)
    for grad_s in (None, gs):
        got = rank1_penalty_backward(g, grad_s, th, A, D, c, s, True, True, True, block=block)
        ref = _rank1_bwd_composite(g, grad_s, th, A, D, c, s, True, True, True)
        for a, b in zip(got, ref):
            close(a, b, rtol)
    gt, ga, gd = rank1_penalty_backward(g, None, th, A, D, c, s, True, False, False, block=block)
    assert ga.shape == (0,) and gd.shape == (0,) and gt.shape == (P,)


@pytest.mark.parametrize("P,block", [(1, 64), (37, 16), (1031, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_triton_diag_matches_composite(P, block, dtype):
    from cdgfast.kernels.penalties import diag_penalty_backward, diag_penalty_forward
    from cdgfast.ops.penalties import _diag_bwd_composite, _diag_fwd_composite

    rtol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    th, a, f = torch.randn(P, dtype=dtype), torch.randn(P, dtype=torch.float32), torch.rand(P, dtype=dtype)
    loss, r = diag_penalty_forward(th, a, f, True, block=block)
    ref_loss, ref_r = _diag_fwd_composite(th, a, f, True)
    close(loss, ref_loss, min(rtol, 1e-5))
    close(r, ref_r, rtol)
    assert diag_penalty_forward(th, a, f, False, block=block)[1].shape == (0,)
    g = torch.tensor(1.3, dtype=loss.dtype)
    for saved in (r, None):
        got = diag_penalty_backward(g, th, a, f, saved, True, True, True, block=block)
        ref = _diag_bwd_composite(g, th, a, f, saved, True, True, True)
        for x, y in zip(got, ref):
            assert x.dtype == y.dtype
            close(x, y, rtol)


def test_triton_mixed_dtypes_rank1():
    from cdgfast.kernels.penalties import rank1_penalty_forward
    from cdgfast.ops.penalties import _rank1_fwd_composite

    th = torch.randn(101).half()
    A, D, c = torch.randn(2, 101), torch.randn(2, 101).bfloat16(), torch.rand(2)
    loss, s = rank1_penalty_forward(th, A, D, c, block=32)
    ref_loss, ref_s = _rank1_fwd_composite(th, A, D, c)
    assert loss.dtype == torch.float32
    close(loss, ref_loss, 1e-5)
    close(s, ref_s, 1e-5)


# ---------------------------------------------------------------------------------------------------- bad input

def _valid(P=6, K=2):
    return torch.randn(P), torch.randn(K, P), torch.randn(K, P), torch.rand(K)


def test_rank1_bad_input_names_the_argument():
    th, A, D, c = _valid()
    with pytest.raises(ValueError, match=r"anchors.*P = 6"):
        rank1_penalty(th, torch.randn(2, 5), D, c)
    with pytest.raises(ValueError, match=r"anchors.*P = 9"):  # P from a parameter list
        rank1_penalty([torch.randn(3), torch.randn(2, 3)], A, D, c)
    with pytest.raises(ValueError, match=r"directions.*\(2, 6\)"):
        rank1_penalty(th, A, torch.randn(3, 6), c)
    with pytest.raises(ValueError, match=r"coeffs.*\(2,\)"):
        rank1_penalty(th, A, D, torch.rand(3))
    with pytest.raises(ValueError, match="anchors.*2 dimensions"):
        rank1_penalty(th, A[0], D, c)
    with pytest.raises(ValueError, match="anchors on meta"):
        rank1_penalty(th, A.to("meta"), D, c)
    with pytest.raises(ValueError, match=r"params\[1\] on meta"):
        rank1_penalty([torch.randn(3), torch.randn(3, device="meta")], A, D, c)
    with pytest.raises(ValueError, match="params.*floating"):
        rank1_penalty(torch.arange(6), A, D, c)
    with pytest.raises(ValueError, match=r"params\[0\].*floating"):
        rank1_penalty([torch.arange(6)], A, D, c)
    with pytest.raises(ValueError, match="directions.*floating"):
        rank1_penalty(th, A, D.long(), c)
    with pytest.raises(ValueError, match="anchors.*empty"):
        rank1_penalty(th, torch.randn(0, 6), torch.randn(0, 6), torch.rand(0))
    with pytest.raises(ValueError, match="params"):
        rank1_penalty([], A, D, c)
    with pytest.raises(ValueError, match="params.*empty"):
        rank1_penalty(torch.randn(0), A, D, c)
    with pytest.raises(ValueError, match="coeffs"):
        rank1_penalty(th, A, D, "abc")


def test_diag_bad_input_names_the_argument():
    th = torch.randn(6)
    with pytest.raises(ValueError, match=r"anchor.*\(6,\)"):
        diag_penalty(th, torch.randn(5), torch.rand(6))
    with pytest.raises(ValueError, match=r"fisher.*1 dimensions"):
        diag_penalty(th, torch.randn(6), torch.rand(2, 3))
    with pytest.raises(ValueError, match="fisher on meta"):
        diag_penalty(th, torch.randn(6), torch.rand(6, device="meta"))
    with pytest.raises(ValueError, match="fisher.*floating"):
        diag_penalty(th, torch.randn(6), torch.ones(6, dtype=torch.int32))
    with pytest.raises(ValueError, match="anchor.*Tensor"):
        diag_penalty(th, [0.0] * 6, torch.rand(6))


# ---------------------------------------------------------------------------------------------------- gradient penalty

def test_gradient_penalty_through_the_penalty_matches_naive():
    params = shapes_params(SHAPES)
    P = sum(p.numel() for p in params)
    anchors, directions = torch.randn(3, P, dtype=torch.float64), torch.randn(3, P, dtype=torch.float64)
    coeffs = torch.rand(3, dtype=torch.float64)
    anchor, fisher = torch.randn(P, dtype=torch.float64), torch.rand(P, dtype=torch.float64)
    for ours, ref in ((lambda ps: rank1_penalty(ps, anchors, directions, coeffs),
                       lambda ps: naive_rank1(ps, anchors, directions, coeffs)),
                      (lambda ps: diag_penalty(ps, anchor, fisher), lambda ps: naive_diag(ps, anchor, fisher))):
        def penalty(f):
            return sum(g.square().sum() for g in torch.autograd.grad(f(params), params, create_graph=True))

        for g, e in zip(torch.autograd.grad(penalty(ours), params), torch.autograd.grad(penalty(ref), params)):
            close(g, e, 1e-12)


# ---------------------------------------------------------------------------------------------------- dtypes

def test_coefficients_as_numbers_are_not_rounded_to_half_anchors():
    """coeffs of 1e6 (rank-1 EWC coefficients are sums over samples) are inf in float16."""
    theta = torch.randn(9).half().requires_grad_(True)
    anchors = (theta.detach().float() + 1e-2 * torch.randn(2, 9)).half()
    directions = torch.randn(2, 9).half()
    loss = rank1_penalty(theta, anchors, directions, [1e6, 3e5])
    ref = naive_rank1([theta.detach().double()], anchors.double(), directions.double(),
                      torch.tensor([1e6, 3e5], dtype=torch.float64))
    assert torch.isfinite(loss)
    close(loss, ref, 1e-5)


def test_fp16_saved_diag_gradient_survives_a_large_grad_output():
    """r = F (theta - a) with a Fisher of 1e-8 is below float16's range; lam = 2e7 brings it back."""
    theta = torch.randn(33).half().requires_grad_(True)
    anchor = (theta.detach().float() + 0.05 * torch.randn(33)).half()
    fisher = torch.rand(33) * 1e-8 + 1e-9  # float32 state beside float16 parameters
    g = torch.tensor(2e7)
    (gt,) = torch.autograd.grad(diag_penalty(theta, anchor, fisher), theta, g)
    expected = 2e7 * fisher.double() * (theta.detach().double() - anchor.double())
    assert gt.dtype == torch.float16 and float(expected.abs().max()) > 1e-3
    close(gt, expected, 2e-3)


# ---------------------------------------------------------------------------------------------------- modes

def assert_first_and_second_derivatives_match(ours, ref, params, rtol):
    """The gradient of ours(params) and of the naive ref(params), and the gradient of its squared norm
    (a double backward), agree to rtol."""
    got = torch.autograd.grad(ours(params), params, create_graph=True)
    exp = torch.autograd.grad(ref(params), params, create_graph=True)
    for x, y in zip(got, exp):
        close(x, y, rtol)
    g2 = torch.autograd.grad(sum(x.square().sum() for x in got), params)
    e2 = torch.autograd.grad(sum(y.square().sum() for y in exp), params)
    for x, y in zip(g2, e2):
        close(x, y, rtol)


def test_inference_tensors_as_anchors_and_fisher():
    """Consolidation state computed under torch.inference_mode at the end of a task, then used while
    training the next task (first and second derivatives)."""
    params = shapes_params(SHAPES)
    P = sum(p.numel() for p in params)
    A, D = torch.randn(2, P, dtype=torch.float64), torch.randn(2, P, dtype=torch.float64)
    c = torch.rand(2, dtype=torch.float64)
    a, f = torch.randn(P, dtype=torch.float64), torch.rand(P, dtype=torch.float64)
    with torch.inference_mode():
        Ai, Di, ci, ai, fi = (x.clone() for x in (A, D, c, a, f))
        close(rank1_penalty(params, Ai, Di, ci), naive_rank1(params, A, D, c), 1e-12)  # no graph in there
    for ours, ref in ((lambda ps: rank1_penalty(ps, Ai, Di, ci), lambda ps: naive_rank1(ps, A, D, c)),
                      (lambda ps: rank1_penalty(ps, Ai, Di, [0.3, 0.7]),
                       lambda ps: naive_rank1(ps, A, D, torch.tensor([0.3, 0.7], dtype=torch.float64))),
                      (lambda ps: diag_penalty(ps, ai, fi), lambda ps: naive_diag(ps, a, f))):
        assert_first_and_second_derivatives_match(ours, ref, params, 1e-12)
    # under torch.func transforms too (the plain-PyTorch path)
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    g = torch.func.grad(lambda th: rank1_penalty(th, Ai, Di, ci) + diag_penalty(th, ai, fi))(theta)
    t64 = theta.clone().requires_grad_(True)
    close(g, torch.autograd.grad(naive_rank1([t64], A, D, c) + naive_diag([t64], a, f), t64)[0], 1e-12)
