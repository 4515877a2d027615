"""Custom ops have no forward-AD or batching rule; inside torch.func transforms and forward-AD levels
the public functions must still give the right numbers (a silent zero tangent is the failure mode)."""
import torch
from torch.func import grad, jvp, vmap

from cdgfast.ops import diag_penalty, lora_overlap_penalty, rank1_penalty

D = torch.float64


def _rank1_ref(theta, anchors, directions, coeffs):
    total = 0.0
    for k in range(anchors.shape[0]):
        s = sum(directions[k, j] * (theta[j] - anchors[k, j]) for j in range(theta.numel()))
        total = total + 0.5 * coeffs[k] * s * s
    return total


def test_rank1_penalty_jvp_and_vmap_grad():
    K, P = 3, 11
    anchors, directions = torch.randn(K, P, dtype=D), torch.randn(K, P, dtype=D)
    coeffs, theta, tangent = torch.rand(K, dtype=D), torch.randn(P, dtype=D), torch.randn(P, dtype=D)
    _, jv = jvp(lambda th: rank1_penalty(th, anchors, directions, coeffs), (theta,), (tangent,))
    g_ref = torch.autograd.functional.jacobian(lambda th: _rank1_ref(th, anchors, directions, coeffs), theta)
    assert torch.allclose(jv, g_ref @ tangent, rtol=1e-10)
    thetas = torch.randn(4, P, dtype=D)
    g = vmap(grad(lambda th: rank1_penalty(th, anchors, directions, coeffs)))(thetas)
    for i in range(4):
        ref = torch.autograd.functional.jacobian(lambda th: _rank1_ref(th, anchors, directions, coeffs), thetas[i])
        assert torch.allclose(g[i], ref, rtol=1e-10)


def test_diag_and_lora_penalty_jvp():
    P = 9
    anchor, fisher, theta, tangent = (torch.randn(P, dtype=D) for _ in range(4))
    _, jv = jvp(lambda th: diag_penalty(th, anchor, fisher), (theta,), (tangent,))
    assert torch.allclose(jv, (fisher * (theta - anchor) * tangent).sum(), rtol=1e-10)
    prev, A = torch.randn(5, 3, dtype=D), torch.randn(5, 2, dtype=D)
    B, tA = torch.randn(2, 3, dtype=D), torch.randn(5, 2, dtype=D)
    _, jv = jvp(lambda a: lora_overlap_penalty(prev, a, B), (A,), (tA,))
    # d/de sum (|prev| * ((A + e tA) B))^2 = 2 sum prev^2 * (A B) * (tA B)
    assert torch.allclose(jv, 2 * (prev ** 2 * (A @ B) * (tA @ B)).sum(), rtol=1e-10)
