"""lora_overlap_penalty against a naive triple loop, gradients for A, B and prev_delta, gradcheck, opcheck."""
import pytest
import torch
from torch.library import opcheck

from cdgfast.ops.lora import lora_overlap_penalty

TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def close(got, ref, rtol):
    got, ref = torch.as_tensor(got).detach().double(), torch.as_tensor(ref).detach().double()
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * max(float(ref.abs().max()), 1e-30))


def naive(prev_delta, A, B):
    """sum_ij (|D_ij| * sum_k A_ik B_kj)^2, one entry at a time."""
    d1, r = A.shape
    d2 = B.shape[1]
    loss = 0.0
    for i in range(d1):
        for j in range(d2):
            m = 0.0
            for k in range(r):
                m = m + A[i, k] * B[k, j]
            loss = loss + (prev_delta[i, j].abs() * m) ** 2
    return loss


@pytest.mark.parametrize("d1,r,d2", [(5, 3, 7), (1, 1, 1), (4, 1, 6), (6, 2, 1)])
def test_matches_naive_with_all_gradients(d1, r, d2):
    D = torch.randn(d1, d2, dtype=torch.float64, requires_grad=True)
    A = torch.randn(d1, r, dtype=torch.float64, requires_grad=True)
    B = torch.randn(r, d2, dtype=torch.float64, requires_grad=True)
    got = lora_overlap_penalty(D, A, B)
    ref = naive(D, A, B)
    assert got.shape == () and got.dtype == torch.float64
    close(got, ref, 1e-12)
    for a, b in zip(torch.autograd.grad(got, (D, A, B)), torch.autograd.grad(ref, (D, A, B))):
        close(a, b, 1e-12)


def test_prev_delta_as_constant_gets_no_gradient_and_orthogonal_supports_vanish():
    D = torch.zeros(4, 5)
    D[:2] = torch.randn(2, 5)  # previous tasks used rows 0-1 only
    A = torch.zeros(4, 2)
    A[2:] = torch.randn(2, 2)  # the new task writes rows 2-3 only
    A.requires_grad_(True)
    B = torch.randn(2, 5, requires_grad=True)
    loss = lora_overlap_penalty(D, A, B)
    assert loss.item() == 0.0
    gA, gB = torch.autograd.grad(loss * 1e8, (A, B))
    assert torch.count_nonzero(gA) == 0 and torch.count_nonzero(gB) == 0
    assert D.grad is None


@pytest.mark.parametrize("dtype", list(TOL))
def test_dtype_tolerance_table(dtype):
    D = torch.randn(9, 11)
    A, B = torch.randn(9, 4).to(dtype).requires_grad_(True), torch.randn(4, 11).to(dtype).requires_grad_(True)
    got = lora_overlap_penalty(D, A, B)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    A64, B64 = A.detach().double().requires_grad_(True), B.detach().double().requires_grad_(True)
    ref = ((D.double() * (A64 @ B64)) ** 2).sum()
    close(got, ref, TOL[dtype])
    gA, gB = torch.autograd.grad(got, (A, B))
    rA, rB = torch.autograd.grad(ref, (A64, B64))
    assert gA.dtype == dtype and gB.dtype == dtype
    close(gA, rA, 4 * TOL[dtype])
    close(gB, rB, 4 * TOL[dtype])


def test_gradcheck_and_opcheck():
    D = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    B = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lora_overlap_penalty, (D, A, B))
    opcheck(torch.ops.cdgfast.lora_overlap_penalty.default, (D.detach(), A, B))
    opcheck(torch.ops.cdgfast.lora_overlap_penalty_backward.default,
            (torch.tensor(2.0, dtype=torch.float64), D.detach(), A.detach(), B.detach(), True, True, False),
            test_utils=("test_schema", "test_faketensor"))


def test_meta_shapes():
    out = lora_overlap_penalty(*(torch.empty(s, device="meta") for s in ((6, 5), (6, 2), (2, 5))))
    assert out.shape == () and out.device.type == "meta"


def test_bad_input_names_the_argument():
    D, A, B = torch.randn(4, 5), torch.randn(4, 2), torch.randn(2, 5)
    with pytest.raises(ValueError, match=r"B.*r = 2"):
        lora_overlap_penalty(D, A, torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"prev_delta.*\(4, 5\)"):
        lora_overlap_penalty(torch.randn(5, 4), A, B)
    with pytest.raises(ValueError, match="A.*2 dimensions"):
        lora_overlap_penalty(D, torch.randn(4), B)
    with pytest.raises(ValueError, match="B.*dtype"):
        lora_overlap_penalty(D, A, B.double())
    with pytest.raises(ValueError, match="B on meta"):
        lora_overlap_penalty(D, A, B.to("meta"))
    with pytest.raises(ValueError, match="prev_delta.*floating"):
        lora_overlap_penalty(D.long(), A, B)
    with pytest.raises(ValueError, match="A.*empty"):
        lora_overlap_penalty(D, torch.randn(4, 0), torch.randn(0, 5))


def test_gradgradcheck_and_gradient_penalty():
    D = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    B = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lora_overlap_penalty, (D, A, B))
    D0 = D.detach().clone()
    D0[1] = 0.0  # previous tasks never touched row 1: d^2 L / d prev_delta^2 = 2 (A B)^2 there, not 0
    assert torch.autograd.gradgradcheck(lora_overlap_penalty, (D0.requires_grad_(), A, B))
    H = torch.func.hessian(lambda d: lora_overlap_penalty(d, A.detach(), B.detach()))(D0.detach())  # plain path
    close(H.reshape(12, 12).diagonal()[4:8], 2 * (A @ B).detach()[1] ** 2, 1e-12)
    assert torch.autograd.gradgradcheck(lambda a, b: lora_overlap_penalty(D.detach(), a, b), (A, B))
    assert torch.autograd.gradgradcheck(lambda a: lora_overlap_penalty(D, a, B.detach()), (A,))

    def penalty(f):
        return sum(g.square().sum() for g in torch.autograd.grad(f(D, A, B), (A, B), create_graph=True))

    for g, e in zip(torch.autograd.grad(penalty(lora_overlap_penalty), (D, A, B)),
                    torch.autograd.grad(penalty(naive), (D, A, B))):
        close(g, e, 1e-12)


def test_inference_prev_delta():
    """prev_delta summed from the previous tasks' factors under torch.inference_mode."""
    D, A = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    B = torch.randn(2, 5, dtype=torch.float64)
    with torch.inference_mode():
        D_inf = D.clone()
        close(lora_overlap_penalty(D_inf, A, B), naive(D, A, B), 1e-12)
    A.requires_grad_(True)
    got = torch.autograd.grad(lora_overlap_penalty(D_inf, A, B), A, create_graph=True)[0]
    exp = torch.autograd.grad(naive(D, A, B), A, create_graph=True)[0]
    close(got, exp, 1e-12)
    close(torch.autograd.grad(got.square().sum(), A)[0], torch.autograd.grad(exp.square().sum(), A)[0], 1e-12)
    close(torch.func.grad(lambda a: lora_overlap_penalty(D_inf, a, B))(A.detach()), exp, 1e-12)
