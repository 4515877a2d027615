"""DC-score ops (cdgfast/ops/dc.py) against independent naive references (loops, float64)."""
import pytest
import torch

from cdgfast.ops.dc import dc_cross_entropy, dc_errors, dc_scores

# atol, rtol per input dtype: the reference sees the same (rounded) inputs in float64, so the
# error is fp32 accumulation plus the rounding of the result to the input dtype.
TOL = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 2e-2),
}
DTYPES = list(TOL)
# (B, K, S): size-1 dims, odd sizes, no spatial dims at all
SHAPES = [(1, 1, (7,)), (2, 5, (3, 9, 9)), (3, 5, (1, 7, 5)), (1, 3, ()), (4, 2, (5,))]


# --- naive references: python loops over b and k, float64 ---------------------------------------

def naive_errors(pred, eps):
    B, K = pred.shape[:2]
    rows = []
    for b in range(B):
        row = []
        for k in range(K):
            d = (pred[b, k].double() - eps[b].double()).reshape(-1)
            row.append((d * d).sum() / d.numel())
        rows.append(torch.stack(row))
    return torch.stack(rows)


def naive_scores(pred, eps, tau):
    err = naive_errors(pred, eps)
    out = []
    for b in range(err.shape[0]):
        z = [-e / tau for e in err[b]]
        m = max(float(v.detach()) for v in z)
        lse = m + torch.log(sum(torch.exp(v - m) for v in z))
        out.append(torch.stack([v - lse for v in z]))
    return torch.stack(out)


def naive_ce(pred, eps, target, tau, reduction="mean"):
    logp = naive_scores(pred, eps, tau)
    B, K = logp.shape
    losses = []
    for b in range(B):
        if target.dtype.is_floating_point:
            losses.append(-sum(target[b, k].double() * logp[b, k] for k in range(K)))
        else:
            losses.append(-logp[b, int(target[b])])
    losses = torch.stack(losses)
    return {"mean": losses.mean(), "sum": losses.sum(), "none": losses}[reduction]


def _inputs(B, K, S, dtype=torch.float64, requires_grad=False):
    pred = torch.randn(B, K, *S, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
    eps = torch.randn(B, *S, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
    return pred, eps


def _close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


# --- forward values ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,K,S", SHAPES)
def test_errors_scores_match_naive(B, K, S, dtype):
    pred, eps = _inputs(B, K, S, dtype)
    err = dc_errors(pred, eps)
    assert err.shape == (B, K) and err.dtype == dtype
    _close(err, naive_errors(pred, eps), dtype)
    for tau in (1.0, 0.37):
        s = dc_scores(pred, eps, tau=tau)
        assert s.shape == (B, K) and s.dtype == dtype
        _close(s, naive_scores(pred, eps, tau), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,K,S", SHAPES)
def test_cross_entropy_matches_naive(B, K, S, dtype):
    pred, eps = _inputs(B, K, S, dtype)
    idx = torch.randint(0, K, (B,))
    probs = torch.softmax(torch.randn(B, K, dtype=torch.float64), -1)
    for target in (idx, probs):
        for reduction in ("mean", "sum", "none"):
            out = dc_cross_entropy(pred, eps, target, tau=0.5, reduction=reduction)
            ref = naive_ce(pred, eps, target.to(dtype) if target.is_floating_point() else target, 0.5, reduction)
            assert out.shape == ref.shape
            _close(out, ref, dtype)


def test_scores_are_log_probabilities_and_rank_by_error():
    pred, eps = _inputs(3, 5, (2, 3))
    s = dc_scores(pred, eps)
    torch.testing.assert_close(s.exp().sum(-1), torch.ones(3, dtype=torch.float64))
    # the condition with the smallest error is the most probable
    assert torch.equal(s.argmax(-1), dc_errors(pred, eps).argmin(-1))


def test_unnormalised_probability_target():
    pred, eps = _inputs(3, 4, (2, 5), requires_grad=True)
    q = (torch.rand(3, 4, dtype=torch.float64) * 3).requires_grad_()
    out = dc_cross_entropy(pred, eps, q, tau=0.8, reduction="sum")
    ref = naive_ce(pred, eps, q, 0.8, "sum")
    torch.testing.assert_close(out, ref)
    for g, e in zip(torch.autograd.grad(out, (pred, eps, q)), torch.autograd.grad(ref, (pred, eps, q))):
        torch.testing.assert_close(g, e)


def test_index_target_equals_one_hot_target_and_int32_accepted():
    pred, eps = _inputs(4, 5, (3, 3))
    idx = torch.tensor([0, 4, 2, 2])
    onehot = torch.nn.functional.one_hot(idx, 5).double()
    a = dc_cross_entropy(pred, eps, idx, reduction="none")
    torch.testing.assert_close(a, dc_cross_entropy(pred, eps, onehot, reduction="none"))
    torch.testing.assert_close(a, dc_cross_entropy(pred, eps, idx.int(), reduction="none"))


def test_mixed_input_dtypes_promote():
    pred, eps = _inputs(2, 3, (4,))
    out = dc_scores(pred.bfloat16(), eps.float())
    assert out.dtype == torch.float32
    _close(out, naive_scores(pred.bfloat16(), eps.float(), 1.0), torch.bfloat16)


def test_meta_tensors_give_shapes():
    pred = torch.empty(3, 5, 2, 7, device="meta")
    eps = torch.empty(3, 2, 7, device="meta")
    assert dc_errors(pred, eps).shape == (3, 5)
    assert dc_scores(pred, eps).device.type == "meta"
    assert dc_cross_entropy(pred, eps, torch.empty(3, dtype=torch.long, device="meta"), reduction="none").shape == (3,)


# --- gradients ---------------------------------------------------------------------------------

# second derivatives: a create_graph backward differentiates the reference formula (ops/_common.py)
@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck])
@pytest.mark.parametrize("B,K,S", [(1, 1, (3,)), (2, 5, (1, 3, 2)), (3, 2, ())])
def test_gradcheck(B, K, S, check):
    pred, eps = _inputs(B, K, S, requires_grad=True)
    q = torch.softmax(torch.randn(B, K, dtype=torch.float64), -1).requires_grad_()
    idx = torch.randint(0, K, (B,))
    assert check(lambda a, b: dc_errors(a, b), (pred, eps))
    assert check(lambda a, b: dc_scores(a, b, tau=0.3), (pred, eps))
    for red in ("mean", "sum", "none"):
        assert check(lambda a, b, c: dc_cross_entropy(a, b, c, 0.7, red), (pred, eps, q))
        assert check(lambda a, b: dc_cross_entropy(a, b, idx, 0.7, red), (pred, eps))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_match_naive_autograd(dtype):
    B, K, S = 3, 5, (2, 3)
    pred, eps = _inputs(B, K, S, dtype, requires_grad=True)
    w = torch.randn(B, K, dtype=torch.float64)
    q = torch.softmax(torch.randn(B, K, dtype=torch.float64), -1).to(dtype).requires_grad_()
    cases = [
        (lambda a, b, c: (dc_errors(a, b).double() * w).sum(), lambda a, b, c: (naive_errors(a, b) * w).sum()),
        (lambda a, b, c: (dc_scores(a, b, 0.4).double() * w).sum(),
         lambda a, b, c: (naive_scores(a, b, 0.4) * w).sum()),
        (lambda a, b, c: dc_cross_entropy(a, b, c, 0.4, "sum"), lambda a, b, c: naive_ce(a, b, c, 0.4, "sum")),
    ]
    for ours, ref in cases:
        got = torch.autograd.grad(ours(pred, eps, q), (pred, eps, q), allow_unused=True)
        exp = torch.autograd.grad(ref(pred, eps, q), (pred, eps, q), allow_unused=True)
        for g, e in zip(got, exp):
            if e is None:
                assert g is None or torch.count_nonzero(g) == 0
                continue
            assert g.dtype == dtype
            _close(g, e, dtype)


def test_cross_entropy_gradient_scaled_by_grad_output():
    pred, eps = _inputs(3, 4, (5,), requires_grad=True)
    idx = torch.tensor([1, 0, 3])
    loss = dc_cross_entropy(pred, eps, idx, reduction="none")
    g = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    gp, ge = torch.autograd.grad(loss, (pred, eps), g)
    ep, ee = torch.autograd.grad((naive_ce(pred, eps, idx, 1.0, "none") * g).sum(), (pred, eps))
    torch.testing.assert_close(gp, ep)
    torch.testing.assert_close(ge, ee)


def test_index_target_and_constant_target_get_no_gradient():
    pred, eps = _inputs(2, 3, (4,), requires_grad=True)
    q = torch.softmax(torch.randn(2, 3, dtype=torch.float64), -1)  # does not require grad
    dc_cross_entropy(pred, eps, q).backward()
    assert q.grad is None and pred.grad is not None


def test_fused_op_extra_outputs_are_not_differentiable():
    pred, eps = _inputs(2, 3, (4,), requires_grad=True)
    q = torch.softmax(torch.randn(2, 3, dtype=torch.float64), -1)
    loss, gpred, geps, logp = torch.ops.cdgfast.dc_cross_entropy(pred, eps, q, 1.0)
    assert loss.requires_grad
    assert not gpred.requires_grad and not geps.requires_grad and not logp.requires_grad
    # the saved per-sample gradient is exactly d loss_b / d pred
    ref = torch.autograd.grad(naive_ce(pred, eps, q, 1.0, "sum"), pred)[0]
    torch.testing.assert_close(gpred, ref)
    torch.testing.assert_close(logp, naive_scores(pred, eps, 1.0))


# --- torch.library -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64])
def test_opcheck(dtype):
    pred, eps = _inputs(2, 5, (3, 1, 3), dtype, requires_grad=True)
    q = torch.softmax(torch.randn(2, 5, dtype=torch.float64), -1).to(dtype).requires_grad_()
    g = torch.randn(2, 5, dtype=dtype)
    logp = torch.log_softmax(torch.randn(2, 5, dtype=dtype), -1)
    ops = torch.ops.cdgfast
    cases = [
        (ops.dc_errors, (pred, eps)),
        (ops.dc_scores, (pred, eps, 0.7)),
        (ops.dc_cross_entropy, (pred, eps, q, 0.7)),
        (ops.dc_errors_backward, (g, pred.detach(), eps.detach())),
        (ops.dc_scores_backward, (g, pred.detach(), eps.detach(), logp, 0.7)),
        (ops.dc_cross_entropy_backward, (g[:, 0], pred.detach(), eps.detach(), logp)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# --- bad input ---------------------------------------------------------------------------------

def _bad(fn, name):
    with pytest.raises(ValueError, match=name):
        fn()


def test_bad_inputs_name_the_argument():
    pred, eps = _inputs(2, 3, (4, 5))
    idx = torch.tensor([0, 2])
    _bad(lambda: dc_errors(pred, eps[:, :3]), "eps")                      # mismatched S
    _bad(lambda: dc_errors(pred, eps[:1]), "eps")                         # mismatched B
    _bad(lambda: dc_errors(pred[:, 0, 0, 0], eps), "eps_pred")            # too few dims
    _bad(lambda: dc_errors(pred.long(), eps), "eps_pred")                 # non-floating
    _bad(lambda: dc_scores(pred, eps.int()), "eps")
    _bad(lambda: dc_errors(pred.numpy(), eps), "eps_pred")                # not a tensor
    _bad(lambda: dc_errors(pred[:0], eps[:0]), "eps_pred")                # empty batch
    _bad(lambda: dc_errors(pred[:, :0], eps), "eps_pred")                 # no conditions
    _bad(lambda: dc_errors(pred, eps.to("meta")), "eps")                  # different devices
    for tau in (0.0, -1.0, float("nan"), True, "1"):
        _bad(lambda: dc_scores(pred, eps, tau=tau), "tau")
        _bad(lambda: dc_cross_entropy(pred, eps, idx, tau=tau), "tau")
    _bad(lambda: dc_cross_entropy(pred, eps, idx, reduction="avg"), "reduction")
    _bad(lambda: dc_cross_entropy(pred, eps, torch.tensor([0, 3])), "target")          # index >= K
    _bad(lambda: dc_cross_entropy(pred, eps, torch.tensor([-1, 0])), "target")         # negative index
    _bad(lambda: dc_cross_entropy(pred, eps, torch.tensor([0, 1, 2])), "target")       # wrong B
    _bad(lambda: dc_cross_entropy(pred, eps, torch.rand(2, 4, dtype=torch.float64)), "target")  # wrong K
    _bad(lambda: dc_cross_entropy(pred, eps, torch.rand(2, dtype=torch.float64)), "target")     # probs need [B, K]
    _bad(lambda: dc_cross_entropy(pred, eps, torch.tensor([True, False])), "target")   # bool
    _bad(lambda: dc_cross_entropy(pred, eps, [0, 1]), "target")                        # not a tensor
    _bad(lambda: dc_cross_entropy(pred, eps, idx.to("meta")), "target")                # other device


# --- function transforms: plain-PyTorch path, so forward-mode AD and vmap are right -------------

def test_forward_mode_ad_and_vmap_of_grad():
    from torch.autograd import forward_ad as fwAD

    pred, eps = _inputs(3, 4, (2, 3))
    tan = torch.randn_like(pred)
    idx = torch.tensor([0, 3, 1])
    for ours, ref in [(lambda a: dc_errors(a, eps), lambda a: naive_errors(a, eps)),
                      (lambda a: dc_scores(a, eps, 0.6), lambda a: naive_scores(a, eps, 0.6)),
                      (lambda a: dc_cross_entropy(a, eps, idx, 0.6, "none"),
                       lambda a: naive_ce(a, eps, idx, 0.6, "none"))]:
        expected = torch.func.jvp(ref, (pred,), (tan,))[1]
        torch.testing.assert_close(torch.func.jvp(ours, (pred,), (tan,))[1], expected)
        with fwAD.dual_level():
            torch.testing.assert_close(fwAD.unpack_dual(ours(fwAD.make_dual(pred, tan))).tangent, expected)
    # per-sample gradients with vmap(grad(...)) equal the rows of the summed loss's gradient
    per_sample_grad = torch.func.grad(lambda a, b, i: dc_cross_entropy(a[None], b[None], i[None]))
    per_sample = torch.func.vmap(per_sample_grad)(pred, eps, idx)
    p = pred.clone().requires_grad_()
    torch.testing.assert_close(per_sample, torch.autograd.grad(naive_ce(p, eps, idx, 1.0, "sum"), p)[0])


# --- second derivatives through a gradient penalty ----------------------------------------------

def test_gradient_penalty_through_the_loss_matches_naive():
    """The usual pattern: g = grad(loss, x, create_graph=True), then backward through |g|^2."""
    pred, eps = _inputs(3, 4, (2, 3), requires_grad=True)
    q = torch.softmax(torch.randn(3, 4, dtype=torch.float64), -1)
    w = torch.randn(3, 4, dtype=torch.float64)
    cases = [(lambda a, b: (dc_errors(a, b) * w).sum(), lambda a, b: (naive_errors(a, b) * w).sum()),
             (lambda a, b: (dc_scores(a, b, 0.4) * w).sum(), lambda a, b: (naive_scores(a, b, 0.4) * w).sum()),
             (lambda a, b: dc_cross_entropy(a, b, q, 0.4), lambda a, b: naive_ce(a, b, q, 0.4))]
    for ours, ref in cases:
        def penalty(f):
            gp, ge = torch.autograd.grad(f(pred, eps), (pred, eps), create_graph=True)
            return gp.square().sum() + ge.square().sum()

        got = torch.autograd.grad(penalty(ours), (pred, eps))
        exp = torch.autograd.grad(penalty(ref), (pred, eps))
        for g, e in zip(got, exp):
            assert float(e.abs().max()) > 0
            torch.testing.assert_close(g, e)


# --- values that cannot be checked inside torch.compile / torch.func: NaN, never a finite loss ------

def test_out_of_range_index_poisons_the_loss_under_compile_and_vmap():
    pred, eps = _inputs(2, 3, (4,))
    bad = torch.tensor([1, 3])  # K = 3
    for target in (bad, torch.tensor([1, -1])):
        fn = torch.compile(lambda a, b, t: dc_cross_entropy(a, b, t, reduction="none"), backend="eager")
        out = fn(pred, eps, target)
        assert torch.isnan(out[1]) and torch.isfinite(out[0])
        torch.testing.assert_close(out[0], naive_ce(pred[:1], eps[:1], target[:1], 1.0))
        per_sample = torch.func.vmap(lambda a, b, t: dc_cross_entropy(a[None], b[None], t[None]))(pred, eps, target)
        assert torch.isnan(per_sample[1]) and torch.isfinite(per_sample[0])
    # meta tensors cannot be checked either: the result is still a [B] loss (no error)
    m = torch.empty(2, 3, 4, device="meta")
    assert dc_cross_entropy(m, m[:, 0], torch.empty(2, dtype=torch.long, device="meta"), reduction="none").shape == (2,)


def test_negative_probability_weight_poisons_its_sample():
    pred, eps = _inputs(3, 4, (5,), requires_grad=True)
    q = torch.rand(3, 4, dtype=torch.float64)
    q[1, 2] = -0.5
    out = dc_cross_entropy(pred, eps, q, reduction="none")
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
    assert torch.isnan(dc_cross_entropy(pred, eps, q))
    assert torch.isnan(torch.func.vmap(lambda a, b, c: dc_cross_entropy(a[None], b[None], c[None]))(pred, eps, q)[1])


# --- dtypes: no rounding to a half dtype before a scale is applied -----------------------------------

def test_float_target_is_not_rounded_to_half_precision():
    """Weights are not renormalised; in fp16 a weight of 1e5 is inf. Condition 0 fits the noise
    (log p_0 ~ -2e-3), so the loss itself, about 1e5 * 2e-3, fits fp16."""
    eps = torch.randn(2, 4, dtype=torch.float64).half()
    pred = torch.stack([eps, eps + 2.6, eps - 2.7], 1)
    q = torch.tensor([[1e5, 0.0, 0.0], [7e4, 1e-3, 0.0]], dtype=torch.float32, requires_grad=True)
    out = dc_cross_entropy(pred, eps, q, reduction="none")
    ref = naive_ce(pred, eps, q.double(), 1.0, "none")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=4e-3, atol=0)
    (gq,) = torch.autograd.grad(out.sum(), q)
    assert gq.dtype == torch.float32
    torch.testing.assert_close(gq.double(), -naive_scores(pred, eps, 1.0), rtol=4e-3, atol=1e-5)


def test_fp16_saved_gradient_survives_a_large_grad_output():
    """GradScaler-style: grad_output 2^14 times a per-element gradient of ~1e-6 (fp16 subnormal:
    a few significant bits) must keep fp16's precision for the scaled result."""
    B, K, S = 2, 3, (40, 25)
    pred = (torch.randn(B, K, *S, dtype=torch.float64) * 1e-3).half().requires_grad_()
    eps = (torch.randn(B, *S, dtype=torch.float64) * 1e-3).half().requires_grad_()
    q = torch.softmax(torch.randn(B, K, dtype=torch.float64), -1)
    scale = torch.full((B,), 2.0 ** 14, dtype=torch.float16)
    gp, ge = torch.autograd.grad(dc_cross_entropy(pred, eps, q, reduction="none"), (pred, eps), scale)
    rp = pred.detach().double().requires_grad_()
    re_ = eps.detach().double().requires_grad_()
    ep, ee = torch.autograd.grad(naive_ce(rp, re_, q, 1.0, "none"), (rp, re_), scale.double())
    assert gp.dtype == torch.float16 and ge.dtype == torch.float16
    for g, e in ((gp, ep), (ge, ee)):
        assert float(e.abs().max()) > 1e-2
        torch.testing.assert_close(g.double(), e, rtol=4e-3, atol=2e-3 * float(e.abs().max()))


# --- modes: inference tensors and inference / no-grad contexts ------------------------------------------

def test_inference_tensors_and_modes():
    pred, eps = _inputs(2, 3, (4,))
    idx = torch.tensor([2, 0])
    with torch.inference_mode():
        eps_inf, q_inf = eps.clone(), torch.softmax(torch.randn(2, 3, dtype=torch.float64), -1)
        torch.testing.assert_close(dc_errors(pred, eps), naive_errors(pred, eps))
        torch.testing.assert_close(dc_cross_entropy(pred, eps, idx), naive_ce(pred, eps, idx, 1.0))
    with torch.no_grad():
        torch.testing.assert_close(dc_scores(pred, eps), naive_scores(pred, eps, 1.0))
    # a constant made under inference_mode (the noise, a teacher's probabilities) next to a trained input
    p = pred.clone().requires_grad_()
    for ours, ref in [(lambda a: dc_errors(a, eps_inf).sum(), lambda a: naive_errors(a, eps).sum()),
                      (lambda a: dc_scores(a, eps_inf)[:, 0].sum(), lambda a: naive_scores(a, eps, 1.0)[:, 0].sum()),
                      (lambda a: dc_cross_entropy(a, eps_inf, q_inf), lambda a: naive_ce(a, eps, q_inf.clone(), 1.0))]:
        got = torch.autograd.grad(ours(p), p, create_graph=True)[0]
        exp = torch.autograd.grad(ref(p), p, create_graph=True)[0]
        torch.testing.assert_close(got, exp)
        torch.testing.assert_close(torch.autograd.grad(got.square().sum(), p)[0],
                                   torch.autograd.grad(exp.square().sum(), p)[0])
