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


@pytest.mark.parametrize("B,S", [(1, (3,)), (3, (2, 3)), (2, ())])
def test_gradcheck(B, S):
    s, t, h = _inputs(B, S, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: bregman_distill(a, b, h, 0.8), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: bregman_distill(a, b), (s, t))


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
