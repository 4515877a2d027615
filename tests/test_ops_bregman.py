"""Bregman-preconditioned distillation and the Hutchinson metric (cdgfast/ops/bregman.py)."""
import pytest
import torch

from cdgfast.ops.bregman import bregman_distill, hutchinson_metric

TOL = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
SHAPES = [(1, (7,)), (3, (9, 9)), (2, (1, 7, 5)), (4, ())]


def naive_bregman(student, teacher, precond, kappa):
    """Loop over samples; float64; w = 1 for a sample whose precond is all zero."""
    B = student.shape[0]
    total = 0.0
    n = 0
    for b in range(B):
        d = (student[b].double() - teacher[b].double()).reshape(-1)
        if precond is None:
            w = torch.ones_like(d)
        else:
            h = precond[b].double().reshape(-1)
            hm = h.sum() / h.numel()
            w = torch.ones_like(d) if float(hm) == 0.0 else 1.0 + kappa * h / hm
        total = total + (w * d * d).sum()
        n += d.numel()
    return total / n


def _inputs(B, S, dtype=torch.float64, requires_grad=False):
    s = torch.randn(B, *S, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
    t = torch.randn(B, *S, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
    h = torch.rand(B, *S, dtype=torch.float64).square().to(dtype)
    return s, t, h


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("B,S", SHAPES)
def test_matches_naive(B, S, dtype):
    s, t, h = _inputs(B, S, dtype)
    atol, rtol = TOL[dtype]
    for precond, kappa in ((h, 1.0), (h, 2.5), (None, 1.0), (h, 0.0)):
        out = bregman_distill(s, t, precond, kappa)
        assert out.shape == () and out.dtype == dtype
        torch.testing.assert_close(out.double(), naive_bregman(s, t, precond, kappa), atol=atol, rtol=rtol)


def test_plain_kd_cases_equal_mse():
    s, t, h = _inputs(3, (4, 5))
    mse = torch.nn.functional.mse_loss(s, t)
    torch.testing.assert_close(bregman_distill(s, t), mse)
    torch.testing.assert_close(bregman_distill(s, t, h, kappa=0.0), mse)
    # a constant metric gives w = 1 + kappa everywhere
    torch.testing.assert_close(bregman_distill(s, t, torch.full_like(h, 3.0), kappa=0.5), 1.5 * mse)


def test_zero_precond_sample_falls_back_to_weight_one():
    s, t, h = _inputs(3, (2, 5))
    h[1] = 0.0
    out = bregman_distill(s, t, h, kappa=2.0)
    assert torch.isfinite(out)
    torch.testing.assert_close(out, naive_bregman(s, t, h, 2.0))
    g = torch.autograd.grad(bregman_distill(s.requires_grad_(), t, h, 2.0), s)[0]
    assert torch.isfinite(g).all()
    d = (s - t).detach()
    torch.testing.assert_close(g[1], 2 * d[1] / s.numel())  # w = 1 in sample 1


# second derivatives: a create_graph backward differentiates the reference formula (ops/_common.py)
@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck])
@pytest.mark.parametrize("B,S", [(1, (3,)), (3, (2, 3)), (2, ())])
def test_gradcheck(B, S, check):
    s, t, h = _inputs(B, S, requires_grad=True)
    assert check(lambda a, b: bregman_distill(a, b, h, 0.8), (s, t))
    assert check(lambda a, b: bregman_distill(a, b), (s, t))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_match_naive_autograd(dtype):
    s, t, h = _inputs(3, (3, 5), dtype, requires_grad=True)
    for precond in (h, None):
        got = torch.autograd.grad(bregman_distill(s, t, precond, 1.3) * 2.5, (s, t))
        exp = torch.autograd.grad(naive_bregman(s, t, precond, 1.3) * 2.5, (s, t))
        for g, e in zip(got, exp):
            assert g.dtype == dtype
            torch.testing.assert_close(g.double(), e.double(), **dict(zip(("atol", "rtol"), TOL[dtype])))


def test_precond_is_detached():
    s, t, h = _inputs(2, (4,), requires_grad=True)
    h.requires_grad_()
    bregman_distill(s, t, h, 1.0).backward()
    assert h.grad is None and s.grad is not None and t.grad is not None
    torch.testing.assert_close(t.grad, -s.grad)


def test_opcheck():
    s, t, h = _inputs(3, (2, 5), requires_grad=True)
    torch.library.opcheck(torch.ops.cdgfast.bregman_distill, (s, t, h, 0.7))
    torch.library.opcheck(torch.ops.cdgfast.bregman_distill, (s, t, None, 1.0))
    grad = torch.tensor(1.5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.cdgfast.bregman_distill_backward, (grad, s.detach()))


def test_mixed_dtypes_and_meta():
    s, t, h = _inputs(2, (3,))
    assert bregman_distill(s.half(), t.float(), h.half()).dtype == torch.float32
    m = torch.empty(2, 3, device="meta")
    assert bregman_distill(m, m, m).device.type == "meta"


def test_bad_inputs_name_the_argument():
    s, t, h = _inputs(2, (3, 4))

    def bad(fn, name):
        with pytest.raises(ValueError, match=name):
            fn()

    bad(lambda: bregman_distill(s, t[:, :2]), "teacher")
    bad(lambda: bregman_distill(s, t, h[:1]), "precond")
    bad(lambda: bregman_distill(s.long(), t), "student")
    bad(lambda: bregman_distill(s, t.int()), "teacher")
    bad(lambda: bregman_distill(s, t, h.long()), "precond")
    bad(lambda: bregman_distill(s[:0], t[:0]), "student")                 # empty batch
    bad(lambda: bregman_distill(s, t.to("meta")), "teacher")              # different devices
    bad(lambda: bregman_distill(s, t, h.to("meta")), "precond")
    for kappa in (-0.1, float("nan"), float("inf"), True, "1"):
        bad(lambda: bregman_distill(s, t, h, kappa), "kappa")


# --- Hutchinson metric -------------------------------------------------------------------------

def _tiny_fn():
    g = torch.Generator().manual_seed(7)
    W = torch.randn(6, 6, generator=g, dtype=torch.float64)

    def fn(x):  # [B, 2, 3] -> [B, 2, 3], couples all entries of a sample non-linearly
        y = torch.tanh(x.reshape(x.shape[0], -1) @ W) * x.reshape(x.shape[0], -1)
        return y.reshape(x.shape)

    return fn


def _explicit_jacobian(fn, x):
    J = torch.autograd.functional.jacobian(fn, x)  # [*y.shape, *x.shape]
    return J.reshape(fn(x).numel(), x.numel())


def test_hutchinson_equals_jtv_squared_for_the_drawn_probe():
    fn = _tiny_fn()
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    h = hutchinson_metric(fn, x, generator=torch.Generator().manual_seed(123))
    # the documented probe: torch.randint(0, 2, ...) from the generator, mapped to +-1
    v = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(123)).double() * 2 - 1
    expected = (_explicit_jacobian(fn, x).T @ v.reshape(-1)).square().reshape(x.shape)
    assert h.shape == x.shape and h.dtype == x.dtype and not h.requires_grad
    torch.testing.assert_close(h, expected)
    # same seed, same estimate; another seed, another probe
    torch.testing.assert_close(h, hutchinson_metric(fn, x, generator=torch.Generator().manual_seed(123)))
    assert not torch.equal(h, hutchinson_metric(fn, x, generator=torch.Generator().manual_seed(124)))


def test_hutchinson_is_unbiased_for_diag_jtj():
    fn = _tiny_fn()
    x = torch.randn(1, 2, 3, dtype=torch.float64)
    J = _explicit_jacobian(fn, x)
    diag = (J * J).sum(0).reshape(x.shape)
    g = torch.Generator().manual_seed(0)
    mean = sum(hutchinson_metric(fn, x, generator=g) for _ in range(1500)) / 1500
    torch.testing.assert_close(mean, diag, rtol=0.15, atol=0.02 * float(diag.max()))


def test_hutchinson_leaves_caller_graph_alone_and_handles_constant_fn():
    fn = _tiny_fn()
    x = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    h = hutchinson_metric(fn, x * 2)
    assert not h.requires_grad and x.grad is None
    assert torch.equal(hutchinson_metric(lambda z: torch.ones_like(z), x), torch.zeros_like(x))
    assert torch.equal(hutchinson_metric(lambda z: z.detach() * 2, x), torch.zeros_like(x))


def test_hutchinson_bad_inputs():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="fn"):
        hutchinson_metric("not callable", x)
    with pytest.raises(ValueError, match="fn"):
        hutchinson_metric(lambda z: z.long(), x)
    with pytest.raises(ValueError, match="x"):
        hutchinson_metric(lambda z: z, x.long())
    with pytest.raises(ValueError, match="x"):
        hutchinson_metric(lambda z: z, x[:0])
    with pytest.raises(ValueError, match="generator"):
        hutchinson_metric(lambda z: z, x, generator=0)


def test_forward_mode_ad_and_vmap():
    s, t, h = _inputs(3, (2, 5))
    tan = torch.randn_like(s)
    expected = torch.func.jvp(lambda a: naive_bregman(a, t, h, 0.9), (s,), (tan,))[1]
    torch.testing.assert_close(torch.func.jvp(lambda a: bregman_distill(a, t, h, 0.9), (s,), (tan,))[1], expected)
    per_sample = torch.func.vmap(lambda a, b, c: bregman_distill(a[None], b[None], c[None], 0.9))(s, t, h)
    torch.testing.assert_close(per_sample, torch.stack([naive_bregman(s[i:i + 1], t[i:i + 1], h[i:i + 1], 0.9)
                                                        for i in range(3)]))


# --- second derivatives through a gradient penalty ----------------------------------------------

def test_gradient_penalty_through_the_loss_matches_naive():
    s, t, h = _inputs(3, (2, 5), requires_grad=True)

    def penalty(f):
        gs, gt = torch.autograd.grad(f(s, t), (s, t), create_graph=True)
        return (gs.square().sum() + 3 * (gs * gt).sum()) * 1e3

    for precond in (h, None):
        got = torch.autograd.grad(penalty(lambda a, b: bregman_distill(a, b, precond, 1.7)), (s, t))
        exp = torch.autograd.grad(penalty(lambda a, b: naive_bregman(a, b, precond, 1.7)), (s, t))
        for g, e in zip(got, exp):
            assert float(e.abs().max()) > 0
            torch.testing.assert_close(g, e)


# --- dtypes: precond is normalised in fp32 or wider, scaled before dividing --------------------------

@pytest.mark.parametrize("scale", [1e6, 1e30, 1e-9, 1e-40, 1e-42])
def test_precond_of_any_scale_gives_the_weights_of_rescaled_h(scale):
    """fp16 student + fp32 precond: no overflow to inf / NaN for a large h, no collapse to plain KD
    for a tiny (even denormal) h; the weights equal those of h rescaled to O(1)."""
    s, t, _ = _inputs(3, (4, 5), torch.float16)
    base = torch.rand(3, 4, 5, dtype=torch.float64) + 0.1
    h = (base * scale).float()
    expected = naive_bregman(s, t, h.double() / scale, 2.0)
    assert abs(float(expected) - float(naive_bregman(s, t, None, 2.0))) > 0.01  # not plain KD
    for student in (s, s.float()):
        out = bregman_distill(student, t, h, 2.0)
        assert torch.isfinite(out)
        # the loss is fp16 for the fp16 student; denormal h carries fewer significant bits
        torch.testing.assert_close(out.double(), expected, rtol=2e-3, atol=0)


def test_fp16_saved_gradient_survives_a_large_grad_output():
    """2 w d / (B N) with d ~ 1e-3 is fp16-subnormal; grad_output 2^14 (a loss scaler) brings it back."""
    s = (torch.randn(4, 3, 17, 11, dtype=torch.float64) * 1e-3).half().requires_grad_()
    t = (torch.randn(4, 3, 17, 11, dtype=torch.float64) * 1e-3).half().requires_grad_()
    h = torch.rand(4, 3, 17, 11)
    g = torch.tensor(2.0 ** 14, dtype=torch.float16)
    for precond in (h, None):
        gs, gt = torch.autograd.grad(bregman_distill(s, t, precond, 1.0), (s, t), g)
        rs, rt = (x.detach().double().requires_grad_() for x in (s, t))
        es, et = torch.autograd.grad(naive_bregman(rs, rt, precond, 1.0), (rs, rt), g.double())
        assert gs.dtype == torch.float16 and float(es.abs().max()) > 1e-2
        for a, e in ((gs, es), (gt, et)):
            torch.testing.assert_close(a.double(), e, rtol=4e-3, atol=2e-3 * float(e.abs().max()))


# --- values that are not checked (a device sync): NaN, never a silently finite loss ------------------

def test_negative_or_non_finite_precond_poisons_the_loss():
    s, t, h = _inputs(2, (3, 4))
    for bad in (-1e-3, float("inf"), float("nan")):
        hb = h.clone()
        hb[1, 2, 3] = bad
        assert torch.isnan(bregman_distill(s, t, hb, 1.0))
        assert torch.isnan(torch.func.vmap(lambda a, b, c: bregman_distill(a[None], b[None], c[None]))(s, t, hb)[1])
        fn = torch.compile(lambda a, b, c: bregman_distill(a, b, c, 1.0), backend="eager")
        assert torch.isnan(fn(s, t, hb))


# --- modes: inference mode / no_grad -----------------------------------------------------------------

class _Teacher(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6).double()

    def forward(self, x):  # [B, 2, 3] -> [B, 2, 3]
        return torch.tanh(self.lin(x.reshape(x.shape[0], -1))).reshape(x.shape) * x


def test_hutchinson_under_inference_mode_and_no_grad_matches_grad_mode():
    teacher = _Teacher()
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    ref = hutchinson_metric(teacher, x, generator=torch.Generator().manual_seed(5))
    assert float(ref.abs().min()) > 0
    with torch.no_grad():
        torch.testing.assert_close(hutchinson_metric(teacher, x, generator=torch.Generator().manual_seed(5)), ref)
    with torch.inference_mode():
        x_inf = x.clone()  # an inference tensor, e.g. x_t made under inference mode
        h = hutchinson_metric(teacher, x_inf, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(h, ref)
        # CCD's term with a teacher run under inference mode: Bregman weights, not plain KD
        teacher_out = teacher(x_inf)
    s = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    loss = bregman_distill(s, teacher_out, h, 1.0)
    torch.testing.assert_close(loss, naive_bregman(s, teacher(x).detach(), ref, 1.0))
    assert abs(float(loss.detach()) - float(bregman_distill(s, teacher_out).detach())) > 1e-3
    torch.testing.assert_close(hutchinson_metric(teacher, x_inf, generator=torch.Generator().manual_seed(5)), ref)
    gs = torch.autograd.grad(loss, s, create_graph=True)[0]  # the inference-tensor teacher is a constant
    torch.testing.assert_close(gs, torch.autograd.grad(naive_bregman(s, teacher(x).detach(), ref, 1.0), s,
                                                       create_graph=True)[0])


def test_hutchinson_refuses_inference_tensors_it_cannot_differentiate_through():
    x = torch.randn(2, 2, 3, dtype=torch.float64)
    with torch.inference_mode():
        frozen = _Teacher()  # parameters made under inference mode
    with pytest.raises(ValueError, match=r"fn.*lin\.weight.*inference_mode"):
        hutchinson_metric(frozen, x)
    with pytest.raises(ValueError, match=r"fn.*inference_mode"):
        hutchinson_metric(lambda z: frozen(z), x)
    teacher = _Teacher()
    with pytest.raises(ValueError, match=r"fn.*inference tensor"):
        hutchinson_metric(torch.inference_mode()(teacher), x)


def test_hutchinson_half_precision_input_gives_fp32_metric():
    """(J^T v)^2 above 65504 is inf in fp16: h is returned in fp32 for half inputs."""
    x = torch.randn(2, 8).half()
    h = hutchinson_metric(lambda z: 300.0 * z.float(), x)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, torch.full((2, 8), 9e4))


def test_hutchinson_inside_function_transforms():
    """autograd.grad is refused inside torch.func transforms; there the metric is torch.func.vjp.
    fn(x) = 1.5 x^2 has J = diag(3 x): h = 9 x^2 for every probe."""
    fn = lambda z: 1.5 * z ** 2  # noqa: E731
    xs = torch.randn(3, 2, 5, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(lambda z: hutchinson_metric(fn, z), randomness="different")(xs),
                               9 * xs ** 2)
    # h is a constant for an outer transform: d/dx sum(h * x) = h, the jvp of h is zero
    torch.testing.assert_close(torch.func.grad(lambda z: (hutchinson_metric(fn, z) * z).sum())(xs[0]), 9 * xs[0] ** 2)
    h, tangent = torch.func.jvp(lambda z: hutchinson_metric(fn, z), (xs[0],), (xs[1],))
    torch.testing.assert_close(h, 9 * xs[0] ** 2)
    assert torch.count_nonzero(tangent) == 0
