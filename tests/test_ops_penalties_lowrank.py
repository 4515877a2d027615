"""lowrank_penalty against a naive float64 reference written here (loops over tasks, directions and
parameter slices), over odd shapes; a dtype tolerance table, opcheck, gradcheck / gradgradcheck, bad
input naming the argument, inference tensors, no_grad, torch.func transforms and torch.compile."""
import pytest
import torch
from torch.library import opcheck

from cdgfast.ops import lowrank_penalty, rank1_penalty
from test_ops_penalties import assert_first_and_second_derivatives_match

TOL = {  # (loss, gradient) relative tolerances per input dtype; sums run in float32 for half inputs
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (1e-4, 2e-3),
    torch.bfloat16: (1e-4, 1.6e-2),
}
D = torch.float64
SHAPES = [(3, 2), (1,), (5,), (2, 1, 3)]  # P = 18: odd sizes, a size-1 parameter


def close(got, ref, rtol):
    got, ref = torch.as_tensor(got).detach(), torch.as_tensor(ref).detach().double()
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=rtol * max(float(ref.abs().max()), 1e-30))


def params_of(shapes, dtype=D):
    return [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]


def naive(params, anchors, directions, lambdas):
    """0.5 sum_t sum_j lambda_tj (sum over parameter slices of v_tj . (p - a_t))^2, element by element."""
    loss = 0.0
    for t in range(anchors.shape[0]):
        for j in range(directions.shape[1]):
            s, off = 0.0, 0
            for p in params:
                flat = p.reshape(-1)
                for e in range(flat.numel()):
                    s = s + directions[t, j, off + e] * (flat[e] - anchors[t, off + e])
                off += flat.numel()
            loss = loss + 0.5 * lambdas[t, j] * s * s
    return loss


@pytest.mark.parametrize("T,k", [(1, 1), (1, 4), (3, 2), (2, 5)])
def test_matches_naive_values_and_every_gradient(T, k):
    params = params_of(SHAPES)
    P = sum(p.numel() for p in params)
    A = torch.randn(T, P, dtype=D, requires_grad=True)
    V = torch.randn(T, k, P, dtype=D, requires_grad=True)
    lam = torch.rand(T, k, dtype=D, requires_grad=True)
    inputs = params + [A, V, lam]
    got = lowrank_penalty(params, A, V, lam)
    ref = naive(params, A, V, lam)
    assert got.shape == () and got.dtype == D
    close(got, ref, 1e-12)
    for a, b in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(ref, inputs)):
        assert a.shape == b.shape
        close(a, b, 1e-12)


@pytest.mark.parametrize("P", [1, 7, 1031])
def test_single_task_form_and_flat_theta(P):
    theta = torch.randn(P, dtype=D, requires_grad=True)
    a, V, lam = torch.randn(P, dtype=D, requires_grad=True), torch.randn(3, P, dtype=D), torch.rand(3, dtype=D)
    got = lowrank_penalty(theta, a, V, lam)
    diff = theta - a
    ref = 0.5 * sum(lam[j] * (V[j] * diff).sum() ** 2 for j in range(3))
    close(got, ref, 1e-12)
    ga, gt = torch.autograd.grad(got, [a, theta])
    assert ga.shape == (P,)
    close(gt, torch.autograd.grad(ref, theta, retain_graph=True)[0], 1e-12)
    close(ga, torch.autograd.grad(ref, a)[0], 1e-12)
    # [1, P] anchors and numbers for lambdas give the same value
    close(lowrank_penalty(theta, a[None], V, lam.tolist()), ref, 1e-12)


def test_one_direction_per_task_is_the_rank1_penalty():
    theta = torch.randn(11, dtype=D, requires_grad=True)
    A, V, c = torch.randn(4, 11, dtype=D), torch.randn(4, 11, dtype=D), torch.rand(4, dtype=D)
    low = lowrank_penalty(theta, A, V[:, None], c[:, None])
    r1 = rank1_penalty(theta, A, V, c)
    close(low, r1, 1e-13)
    close(torch.autograd.grad(low, theta)[0], torch.autograd.grad(r1, theta)[0], 1e-13)


def test_zero_at_the_anchor_and_orthonormal_directions_give_the_projected_norm():
    P, k = 9, 3
    a = torch.randn(P, dtype=D)
    Q, _ = torch.linalg.qr(torch.randn(P, k, dtype=D))
    assert float(lowrank_penalty(a.clone(), a, Q.T, torch.ones(k, dtype=D))) == 0.0
    theta = a + torch.randn(P, dtype=D)
    # sum_j (q_j . d)^2 = ||Q^T d||^2
    close(lowrank_penalty(theta, a, Q.T, torch.full((k,), 2.0, dtype=D)),
          (Q.T @ (theta - a)).square().sum(), 1e-13)


@pytest.mark.parametrize("dtype", list(TOL))
def test_dtype_tolerance_table(dtype):
    loss_tol, grad_tol = TOL[dtype]
    P, T, k = 257, 3, 2
    theta = torch.randn(P).to(dtype).requires_grad_(True)
    A = (theta.detach().float() + 0.3 * torch.randn(T, P)).to(dtype)
    V = torch.randn(T, k, P).to(dtype)
    lam = torch.rand(T, k).to(dtype)
    got = lowrank_penalty(theta, A, V, lam)
    assert got.dtype == (D if dtype == D else torch.float32)
    t64 = theta.detach().double().requires_grad_(True)
    diff = t64[None] - A.double()
    ref = 0.5 * (lam.double() * torch.einsum("tkp,tp->tk", V.double(), diff) ** 2).sum()
    close(got, ref, loss_tol)
    g = torch.autograd.grad(got, theta)[0]
    assert g.dtype == dtype
    close(g, torch.autograd.grad(ref, t64)[0], grad_tol)


def test_mixed_dtypes_bf16_params_fp32_state_and_large_lambdas_as_numbers():
    theta = torch.randn(33).bfloat16().requires_grad_(True)
    A, V = torch.randn(1, 33), torch.randn(1, 2, 33)
    loss = lowrank_penalty([theta], A, V, [[3e5, 1e6]])  # inf in float16: numbers become float32
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    d = theta.detach().double() - A[0].double()
    ref = 0.5 * (3e5 * (V[0, 0].double() @ d) ** 2 + 1e6 * (V[0, 1].double() @ d) ** 2)
    close(loss, ref, 1e-5)
    assert torch.autograd.grad(loss, theta)[0].dtype == torch.bfloat16


@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck])
def test_gradcheck_float64(check):
    torch.manual_seed(5)
    T, k, P = 2, 3, 5
    th = torch.randn(P, dtype=D, requires_grad=True)
    A = torch.randn(T, P, dtype=D, requires_grad=True)
    V = torch.randn(T, k, P, dtype=D, requires_grad=True)
    lam = torch.rand(T, k, dtype=D, requires_grad=True)
    assert check(torch.ops.cdgfast.lowrank_penalty_fwd, (th, A, V, lam))  # loss and s
    assert check(lowrank_penalty, (th, A, V, lam))
    p1, p2 = torch.randn(2, 2, dtype=D, requires_grad=True), torch.randn(1, dtype=D, requires_grad=True)
    assert check(lambda x, y, v: lowrank_penalty([x, y], A.detach(), v, lam.detach()), (p1, p2, V))
    # the single-task layout (views reshaped inside the public function)
    assert check(lambda x, a, v: lowrank_penalty(x, a, v, lam[0].detach()), (th, A[0].detach().clone().requires_grad_(),
                                                                              V[0].detach().clone().requires_grad_()))


def test_gradient_penalty_through_the_penalty_matches_naive():
    params = params_of(SHAPES)
    P = sum(p.numel() for p in params)
    A, V, lam = torch.randn(2, P, dtype=D), torch.randn(2, 3, P, dtype=D), torch.rand(2, 3, dtype=D)

    def penalty(f):
        return sum(g.square().sum() for g in torch.autograd.grad(f(params), params, create_graph=True))

    got = torch.autograd.grad(penalty(lambda ps: lowrank_penalty(ps, A, V, lam)), params)
    ref = torch.autograd.grad(penalty(lambda ps: naive(ps, A, V, lam)), params)
    for g, e in zip(got, ref):
        close(g, e, 1e-12)


def test_opcheck():
    T, k, P = 2, 3, 11
    th = torch.randn(P, requires_grad=True)
    A, V, lam = torch.randn(T, P), torch.randn(T, k, P, requires_grad=True), torch.rand(T, k)
    opcheck(torch.ops.cdgfast.lowrank_penalty_fwd.default, (th, A, V, lam))
    opcheck(torch.ops.cdgfast.lowrank_penalty.default, (th, A, V, lam))
    s = torch.randn(T, k)
    fast = ("test_schema", "test_faketensor")  # the backward op has no autograd of its own
    opcheck(torch.ops.cdgfast.lowrank_penalty_backward.default,
            (torch.tensor(1.5), s, th.detach(), A, V.detach(), lam, s, True, True, True), test_utils=fast)
    opcheck(torch.ops.cdgfast.lowrank_penalty_backward.default,
            (torch.tensor(0.5), None, th.detach(), A, V.detach(), lam, s, False, False, True), test_utils=fast)


def test_meta_tensors_propagate_shapes():
    th, A, V, lam = (torch.empty(s, device="meta") for s in ((10,), (4, 10), (4, 2, 10), (4, 2)))
    out = lowrank_penalty(th, A, V, lam)
    assert out.device.type == "meta" and out.shape == ()


def _valid(P=6, T=2, k=3):
    return torch.randn(P), torch.randn(T, P), torch.randn(T, k, P), torch.rand(T, k)


@pytest.mark.parametrize("case,name", [
    (lambda th, A, V, lm: (th, A, V[..., :-1], lm), "directions"),
    (lambda th, A, V, lm: (th, A, V[0, 0], lm), "directions"),
    (lambda th, A, V, lm: (th, A, V[None], lm), "directions"),
    (lambda th, A, V, lm: (th, A, V.long(), lm), "directions"),
    (lambda th, A, V, lm: (th, A[:1], V, lm), "anchors"),
    (lambda th, A, V, lm: (th, A[:, :-1], V, lm), "anchors"),
    (lambda th, A, V, lm: (th, A[0], V, lm), "anchors"),
    (lambda th, A, V, lm: (th, A, V, lm[:, :2]), "lambdas"),
    (lambda th, A, V, lm: (th, A, V, lm[0]), "lambdas"),
    (lambda th, A, V, lm: (th, A, V, "big"), "lambdas"),
    (lambda th, A, V, lm: (th, A, V, lm.long()), "lambdas"),
    (lambda th, A, V, lm: (th.long(), A, V, lm), "params"),
    (lambda th, A, V, lm: (th[:0], A, V, lm), "params"),
    (lambda th, A, V, lm: (th, A, V[:, :0], lm[:, :0]), "directions"),
    (lambda th, A, V, lm: (th, A, V[0], lm[0]), "anchors"),  # single-task directions need [P] or [1, P] anchors
])
def test_bad_input_names_the_argument(case, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        lowrank_penalty(*case(*_valid()))


def test_mixed_devices_are_refused():
    th, A, V, lam = _valid()
    with pytest.raises(ValueError, match="one device"):
        lowrank_penalty(th, A, V, lam.to("meta"))


def test_no_grad_and_gradients_only_where_asked():
    theta = torch.randn(9, dtype=D, requires_grad=True)
    A, V, lam = torch.randn(1, 9, dtype=D), torch.randn(1, 2, 9, dtype=D), torch.rand(1, 2, dtype=D)
    loss = lowrank_penalty(theta, A, V, lam)
    (g,) = torch.autograd.grad(loss * 3.0, theta)
    s = V[0] @ (theta.detach() - A[0])
    close(g, 3.0 * V[0].T @ (lam[0] * s), 1e-13)
    with torch.no_grad():
        nl = lowrank_penalty(theta, A, V, lam)
    assert not nl.requires_grad
    close(nl, loss.detach(), 1e-14)
    Vr = V.clone().requires_grad_(True)
    (gv,) = torch.autograd.grad(lowrank_penalty(theta.detach(), A, Vr, lam), Vr)
    close(gv[0], (lam[0] * s)[:, None] * (theta.detach() - A[0])[None], 1e-13)


def test_inference_tensors_as_state_first_and_second_derivatives():
    """State computed under torch.inference_mode at a task's end, used while training the next task."""
    params = params_of(SHAPES)
    P = sum(p.numel() for p in params)
    A, V, lam = torch.randn(2, P, dtype=D), torch.randn(2, 2, P, dtype=D), torch.rand(2, 2, dtype=D)
    with torch.inference_mode():
        Ai, Vi, li = A.clone(), V.clone(), lam.clone()
        close(lowrank_penalty(params, Ai, Vi, li), naive(params, A, V, lam), 1e-12)
    assert_first_and_second_derivatives_match(lambda ps: lowrank_penalty(ps, Ai, Vi, li),
                                              lambda ps: naive(ps, A, V, lam), params, 1e-12)


def test_torch_func_transforms_give_the_right_numbers():
    """Custom ops have no forward-AD or batching rule: the public function takes the reference path."""
    T, k, P = 2, 3, 7
    A, V, lam = torch.randn(T, P, dtype=D), torch.randn(T, k, P, dtype=D), torch.rand(T, k, dtype=D)
    theta, tangent = torch.randn(P, dtype=D), torch.randn(P, dtype=D)

    def ref_grad(th):
        th = th.clone().requires_grad_(True)
        return torch.autograd.grad(naive([th], A, V, lam), th)[0]

    _, jv = torch.func.jvp(lambda th: lowrank_penalty(th, A, V, lam), (theta,), (tangent,))
    close(jv, ref_grad(theta) @ tangent, 1e-10)
    thetas = torch.randn(4, P, dtype=D)
    g = torch.func.vmap(torch.func.grad(lambda th: lowrank_penalty(th, A, V, lam)))(thetas)
    for i in range(4):
        close(g[i], ref_grad(thetas[i]), 1e-10)


def test_torch_compile_matches_eager():
    T, k, P = 2, 2, 13
    A, V, lam = torch.randn(T, P), torch.randn(T, k, P), torch.rand(T, k)
    theta = torch.randn(P, requires_grad=True)
    fn = torch.compile(lambda th: lowrank_penalty(th, A, V, lam), backend="aot_eager", fullgraph=True)
    got = fn(theta)
    eager = lowrank_penalty(theta, A, V, lam)
    close(got, eager, 1e-6)
    close(torch.autograd.grad(got, theta)[0], torch.autograd.grad(eager, theta)[0], 1e-6)
