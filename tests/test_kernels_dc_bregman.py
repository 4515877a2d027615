"""Triton launchers of kernels/dc.py and kernels/bregman.py on CPU tensors (TRITON_INTERPRET=1,
set by conftest.py) against the PyTorch composites, plus the CUDA-registration wiring and the GPU
launch path (autotuned kernels, GPU tile heuristic) exercised in the interpreter."""
import pytest
import torch

triton = pytest.importorskip("triton")

import cdgfast._dispatch  # noqa: E402
import cdgfast.ops.bregman as bregman_ops  # noqa: E402
import cdgfast.ops.dc as dc_ops  # noqa: E402
from cdgfast.kernels import bregman as kb  # noqa: E402
from cdgfast.kernels import dc as kd  # noqa: E402

TOL = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (2e-6, 2e-5),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
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


def _close(a, b, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)


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


@pytest.mark.parametrize("B,S,dtype", [(1, (7,), torch.float32), (3, (9, 9), torch.float64),
                                       (2, (1, 7, 5), torch.float16), (4, (), torch.float64),
                                       (2, (3, 11), torch.bfloat16)])
def test_bregman_launcher_matches_composite(B, S, dtype):
    s = torch.randn(B, *S, dtype=torch.float64).to(dtype)
    t = torch.randn(B, *S, dtype=torch.float64).to(dtype)
    h = torch.rand(B, *S, dtype=torch.float64).to(dtype)
    h[0] = 0  # the all-zero guard: w = 1 for sample 0
    for precond, kappa in ((h, 0.7), (None, 1.0), (h, 0.0)):
        got = kb.bregman_distill(s, t, precond, kappa)
        exp = torch.ops.cdgfast.bregman_distill(s, t, precond, kappa)
        for g, e in zip(got, exp):
            assert g.shape == e.shape and g.dtype == e.dtype
            assert torch.isfinite(g).all()
            _close(g, e, dtype)


@pytest.mark.parametrize("student_dtype,precond_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float64),
                                                         (torch.bfloat16, torch.float16)])
def test_bregman_launcher_precond_in_its_own_dtype_at_any_scale(student_dtype, precond_dtype):
    """The kernel reads h in its own dtype and scales by the per-sample max before the mean: huge,
    tiny and denormal h give the weights of h rescaled (as the composite); a negative h gives NaN."""
    B, S = 3, (5, 13)  # N = 65: several chunks and tiles per sample in the interpreter
    s = torch.randn(B, *S, dtype=torch.float64).to(student_dtype)
    t = torch.randn(B, *S, dtype=torch.float64).to(student_dtype)
    base = torch.rand(B, *S, dtype=torch.float64) + 0.1
    ref = torch.ops.cdgfast.bregman_distill(s.double(), t.double(), base, 1.5)
    finfo = torch.finfo(precond_dtype)
    scales = [1.0, finfo.max / 4, finfo.tiny * 1e-2]  # near the max; denormal
    for scale in scales:
        h = (base * scale).to(precond_dtype)
        got = kb.bregman_distill(s, t, h, 1.5)
        exp = torch.ops.cdgfast.bregman_distill(s, t, h, 1.5)
        assert got[1].dtype == exp[1].dtype == (torch.float32 if student_dtype == torch.float16 else student_dtype)
        for g, e in zip(got, exp):
            assert torch.isfinite(g).all()
            _close(g, e, student_dtype)
        # the denormal fp16 h (1e-7 * base) keeps only a few bits
        rtol = 3e-2 if precond_dtype == torch.float16 and scale < 1 else 5e-3
        torch.testing.assert_close(got[0].double(), ref[0], rtol=rtol, atol=0)
    h = base.to(precond_dtype)
    h[1, 2, 3] = -1.0
    loss, grad = kb.bregman_distill(s, t, h, 1.5)
    assert torch.isnan(loss) and torch.isnan(grad[1, 2, 3]) and torch.isfinite(grad[0]).all()


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
    for mod, names in ((kd, ("dc_errors", "dc_scores", "dc_cross_entropy", "dc_apply_coef")),
                       (kb, ("bregman_distill",))):
        for name in names:
            def spy(*args, _real=getattr(mod, name), _name=name):
                called.add(_name)
                return _real(*args)
            monkeypatch.setattr(mod, name, spy)
    pred, eps, q = _dc_inputs(2, 5, (3, 7), torch.float64)
    ops = torch.ops.cdgfast
    _close(dc_ops._dc_errors_cuda(pred, eps), ops.dc_errors(pred, eps), torch.float64)
    _close(dc_ops._dc_scores_cuda(pred, eps, 0.5), ops.dc_scores(pred, eps, 0.5), torch.float64)
    for g, e in zip(dc_ops._dc_ce_cuda(pred, eps, q, 0.5), dc_ops._ce_composite(pred, eps, q, 0.5)):
        _close(g, e, torch.float64)
    s, t = pred[:, 0], eps
    for g, e in zip(bregman_ops._bregman_cuda(s, t, t.abs(), 0.5), bregman_ops._bregman_composite(s, t, t.abs(), 0.5)):
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
    assert called == {"dc_errors", "dc_scores", "dc_cross_entropy", "dc_apply_coef", "bregman_distill"}


# --- the GPU launch path (autotuned kernels, GPU tile heuristic) in the interpreter ------------

def test_gpu_launch_path_in_interpreter(monkeypatch):
    """One-config autotuners skip benchmarking, so the GPU branch (grid lambdas, tuned kernels,
    GPU tile sizes) runs in the interpreter."""
    monkeypatch.setattr(kd, "_use_tuned", lambda x: True)
    monkeypatch.setattr(kb, "_use_tuned", lambda x: True)
    monkeypatch.setattr(kd, "_partial_tuned", triton.autotune(
        configs=[triton.Config({}, num_warps=4)], key=["K", "N"])(kd._dc_partial_kernel))
    monkeypatch.setattr(kd, "_fused_tuned", triton.autotune(
        configs=[triton.Config({}, num_warps=4)], key=["K", "N"])(kd._dc_fused_kernel))
    monkeypatch.setattr(kd, "_grad_tuned", triton.autotune(
        configs=[triton.Config({"BLOCK_S": 64}, num_warps=4)], key=["K", "N"])(kd._dc_grad_kernel))
    one = [triton.Config({}, num_warps=4)]
    monkeypatch.setattr(kb, "_hsum_tuned", triton.autotune(configs=one, key=["N"])(kb._hsum_kernel))
    monkeypatch.setattr(kb, "_bregman_tuned", triton.autotune(configs=one, key=["N"])(kb._bregman_kernel))
    assert _single_kernel_path(2, 3, (5, 7), on_gpu=True)
    assert not _single_kernel_path(2, 3, (3, 19, 21), on_gpu=True)
    _check_dc_launchers(2, 3, (5, 7), torch.float32)
    _check_dc_launchers(2, 3, (3, 19, 21), torch.float32)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    for g, e in zip(kb.bregman_distill(s, t, t.abs(), 0.7), torch.ops.cdgfast.bregman_distill(s, t, t.abs(), 0.7)):
        _close(g, e, torch.float32)


def test_tile_heuristics_cover_every_element():
    for K, N, B in [(1, 1, 1), (5, 243, 2), (17, 35, 3), (1000, 16384, 8), (5, 3 * 64 * 64, 1)]:
        for on_gpu in (False, True):
            block_k, block_s, chunk, t, kc = kd._tiles(K, N, B, on_gpu)
            assert chunk % block_s == 0 and t * chunk >= N and (t - 1) * chunk < N and kc * block_k >= K
            assert block_k * block_s <= 4096 and t <= 65535 and kc <= 65535
            bs, ch, tb = kb._tiles(N, B, on_gpu)
            assert ch % bs == 0 and tb * ch >= N and (tb - 1) * ch < N


# --- on a CUDA device: the registered CUDA kernels (Triton) at realistic sizes ------------------

# fp64 reference on the CPU; N = 4092 terms summed in a different order, tau down to 0.05
GPU_TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2)}


def _gclose(a, b, dtype):
    atol, rtol = GPU_TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_ops_match_float64_reference(dtype):
    from cdgfast.ops.bregman import bregman_distill
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
    s, t, h = pred[:, 0], eps, eps.detach().abs()
    rs, rt = ref_p[:, 0], ref_e
    out = bregman_distill(s, t, h, 0.8)
    rout = bregman_distill(rs, rt, h.cpu().double(), 0.8)
    _gclose(out.cpu(), rout, dtype)
    for g, e in zip(torch.autograd.grad(out, (pred, eps)), torch.autograd.grad(rout, (ref_p, ref_e))):
        _gclose(g.cpu(), e, dtype)
