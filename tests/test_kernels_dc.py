"""Triton launchers of kernels/dc.py on CPU tensors (TRITON_INTERPRET=1, set by conftest.py) against
the PyTorch composites of cdgfast/ops/dc.py, plus the CUDA-registration wiring and the GPU launch path
(autotuned kernels, GPU tile heuristic) exercised in the interpreter."""
import pytest
import torch
from kernel_tolerances import close as _close
from kernel_tolerances import gpu_close as _gclose

triton = pytest.importorskip("triton")

import cdgfast._dispatch  # noqa: E402
import cdgfast.ops.dc as dc_ops  # noqa: E402
from cdgfast.kernels import dc as kd  # noqa: E402

# K = 17 spans two K blocks of the reduction kernel and three of the gradient kernel;
# N = 243 spans several chunks and several tiles per chunk; S = () is N = 1. Some cases take the
# single-kernel path (one program per sample), the others the three-stage path.
DC_CASES = [(1, 1, (7,), torch.float32), (2, 5, (3, 9, 9), torch.float32), (3, 17, (1, 7, 5), torch.float64),
            (2, 3, (), torch.float64), (2, 5, (3, 9, 9), torch.float16), (3, 4, (5, 3), torch.bfloat16),
            (4, 3, (5, 7), torch.float16)]


def _single_kernel_path(B, K, S, on_gpu=False):
    N = int(torch.Size(S).numel())
    _, _, _, t, kc = kd._tiles(K, N, B, on_gpu)
    return t == 1 and kc == 1


def test_cases_cover_both_launch_paths():
    assert {_single_kernel_path(B, K, S) for B, K, S, _ in DC_CASES} == {True, False}


def _dc_inputs(B, K, S, dtype):
    pred = torch.randn(B, K, *S, dtype=torch.float64).to(dtype)
    eps = torch.randn(B, *S, dtype=torch.float64).to(dtype)
    q = torch.rand(B, K, dtype=torch.float64).to(dtype)  # rows need not sum to one
    return pred, eps, q


def _check_dc_launchers(B, K, S, dtype):
    pred, eps, q = _dc_inputs(B, K, S, dtype)
    ops = torch.ops.cdgfast
    _close(kd.dc_errors(pred, eps), ops.dc_errors(pred, eps), dtype)
    _close(kd.dc_scores(pred, eps, 0.37), ops.dc_scores(pred, eps, 0.37), dtype)
    for got, exp in zip(kd.dc_cross_entropy(pred, eps, q, 0.37), ops.dc_cross_entropy(pred, eps, q, 0.37)):
        assert got.shape == exp.shape and got.dtype == exp.dtype
        _close(got, exp, dtype)
    coef = torch.randn(B, K, dtype=torch.float64)
    for got, exp in zip(kd.dc_apply_coef(pred, eps, coef), dc_ops._apply_coef_composite(pred, eps, coef)):
        assert got.shape == exp.shape and got.dtype == dtype
        _close(got, exp, dtype)


@pytest.mark.parametrize("B,K,S,dtype", DC_CASES)
def test_dc_launchers_match_composite(B, K, S, dtype):
    _check_dc_launchers(B, K, S, dtype)


def test_dc_launcher_accepts_non_contiguous_inputs():
    pred, eps, q = _dc_inputs(3, 4, (6, 5), torch.float32)
    pred_t, eps_t = pred.transpose(-1, -2), eps.transpose(-1, -2)
    _close(kd.dc_scores(pred_t, eps_t, 1.0), torch.ops.cdgfast.dc_scores(pred_t, eps_t, 1.0), torch.float32)


def test_dc_cross_entropy_launcher_saves_fp16_gradients_as_fp32():
    cases = [(4, 3, (5, 7)), (2, 3, (3, 19, 21))]
    assert [_single_kernel_path(B, K, S) for B, K, S in cases] == [True, False]
    for B, K, S in cases:
        pred, eps, q = _dc_inputs(B, K, S, torch.float16)
        got = kd.dc_cross_entropy(pred, eps, q, 0.5)
        exp = torch.ops.cdgfast.dc_cross_entropy(pred, eps, q, 0.5)
        assert got[1].dtype == got[2].dtype == torch.float32
        for g, e in zip(got, exp):
            assert g.dtype == e.dtype
            _close(g, e, torch.float16)


# --- the CUDA registrations, wired to the Triton launchers, on CPU tensors ---------------------

def test_cuda_registrations_call_triton_and_agree(monkeypatch):
    # the one dispatch helper (cdgfast._dispatch.triton_or_composite) decides for every op
    monkeypatch.setattr(cdgfast._dispatch, "use_triton", lambda x: True)
    called = set()
    for name in ("dc_errors", "dc_scores", "dc_cross_entropy", "dc_apply_coef"):
        def spy(*args, _real=getattr(kd, name), _name=name):
            called.add(_name)
            return _real(*args)
        monkeypatch.setattr(kd, name, spy)
    pred, eps, q = _dc_inputs(2, 5, (3, 7), torch.float64)
    ops = torch.ops.cdgfast
    _close(dc_ops._dc_errors_cuda(pred, eps), ops.dc_errors(pred, eps), torch.float64)
    _close(dc_ops._dc_scores_cuda(pred, eps, 0.5), ops.dc_scores(pred, eps, 0.5), torch.float64)
    for g, e in zip(dc_ops._dc_ce_cuda(pred, eps, q, 0.5), dc_ops._ce_composite(pred, eps, q, 0.5)):
        _close(g, e, torch.float64)
    # backward ops go through the Triton gradient kernel now: compare with plain autograd
    p, e = pred.clone().requires_grad_(), eps.clone().requires_grad_()
    w = torch.randn(2, 5, dtype=torch.float64)

    def ref_err(a, b):
        return (a.reshape(2, 5, -1) - b.reshape(2, 1, -1)).square().mean(-1)

    cases = [(lambda a, b: dc_ops.dc_errors(a, b), ref_err),
             (lambda a, b: dc_ops.dc_scores(a, b, 0.5), lambda a, b: torch.log_softmax(-ref_err(a, b) / 0.5, -1))]
    for ours, ref in cases:
        got = torch.autograd.grad((ours(p, e) * w).sum(), (p, e))
        exp = torch.autograd.grad((ref(p, e) * w).sum(), (p, e))
        for a, b in zip(got, exp):
            _close(a, b, torch.float64)
    assert called == {"dc_errors", "dc_scores", "dc_cross_entropy", "dc_apply_coef"}



# --- the GPU launch path (autotuned kernels, GPU tile heuristic) in the interpreter ------------

def test_gpu_launch_path_in_interpreter(monkeypatch):
    """One-config autotuners skip benchmarking, so the GPU branch (grid lambdas, tuned kernels,
    GPU tile sizes) runs in the interpreter."""
    monkeypatch.setattr(kd, "_use_tuned", lambda x: True)
    monkeypatch.setattr(kd, "_partial_tuned", triton.autotune(
        configs=[triton.Config({}, num_warps=4)], key=["K", "N"])(kd._dc_partial_kernel))
    monkeypatch.setattr(kd, "_fused_tuned", triton.autotune(
        configs=[triton.Config({}, num_warps=4)], key=["K", "N"])(kd._dc_fused_kernel))
    monkeypatch.setattr(kd, "_grad_tuned", triton.autotune(
        configs=[triton.Config({"BLOCK_S": 64}, num_warps=4)], key=["K", "N"])(kd._dc_grad_kernel))
    assert _single_kernel_path(2, 3, (5, 7), on_gpu=True)
    assert not _single_kernel_path(2, 3, (3, 19, 21), on_gpu=True)
    _check_dc_launchers(2, 3, (5, 7), torch.float32)
    _check_dc_launchers(2, 3, (3, 19, 21), torch.float32)


def test_tile_heuristics_cover_every_element():
    for K, N, B in [(1, 1, 1), (5, 243, 2), (17, 35, 3), (1000, 16384, 8), (5, 3 * 64 * 64, 1)]:
        for on_gpu in (False, True):
            block_k, block_s, chunk, t, kc = kd._tiles(K, N, B, on_gpu)
            assert chunk % block_s == 0 and t * chunk >= N and (t - 1) * chunk < N and kc * block_k >= K
            assert block_k * block_s <= 4096 and t <= 65535 and kc <= 65535


# --- on a CUDA device: the registered CUDA kernels (Triton) at realistic sizes ------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_ops_match_float64_reference(dtype):
    from cdgfast.ops.dc import dc_cross_entropy, dc_errors, dc_scores

    B, K, S = 6, 5, (4, 33, 31)  # odd sizes, several chunks per sample on the GPU
    pred64 = torch.randn(B, K, *S, dtype=torch.float64)
    eps64 = torch.randn(B, *S, dtype=torch.float64)
    q = torch.rand(B, K, dtype=torch.float64)
    pred = pred64.to(dtype).cuda().requires_grad_()
    eps = eps64.to(dtype).cuda().requires_grad_()
    ref_p = pred.detach().cpu().double().requires_grad_()
    ref_e = eps.detach().cpu().double().requires_grad_()
    _gclose(dc_errors(pred, eps).cpu(), dc_errors(ref_p, ref_e), dtype)
    _gclose(dc_scores(pred, eps, 0.05).cpu(), dc_scores(ref_p, ref_e, 0.05), dtype)
    loss = dc_cross_entropy(pred, eps, q.to(dtype).cuda(), 0.7, "sum")
    ref = dc_cross_entropy(ref_p, ref_e, q.to(dtype).double(), 0.7, "sum")
    _gclose(loss.cpu(), ref, dtype)
    for g, e in zip(torch.autograd.grad(loss, (pred, eps)), torch.autograd.grad(ref, (ref_p, ref_e))):
        _gclose(g.cpu(), e, dtype)
    w = torch.randn(B, K, dtype=torch.float64)
    got = torch.autograd.grad((dc_scores(pred, eps, 0.3).double() * w.cuda()).sum(), (pred, eps))
    exp = torch.autograd.grad((dc_scores(ref_p, ref_e, 0.3) * w).sum(), (ref_p, ref_e))
    for g, e in zip(got, exp):
        _gclose(g.cpu(), e, dtype)
