"""Triton launcher of kernels/bregman.py on CPU tensors (TRITON_INTERPRET=1, set by conftest.py)
against the PyTorch composite of cdgfast/ops/bregman.py, plus the CUDA-registration wiring and the GPU
launch path (autotuned kernels, GPU tile heuristic) exercised in the interpreter."""
import pytest
import torch
from kernel_tolerances import close as _close
from kernel_tolerances import gpu_close as _gclose

triton = pytest.importorskip("triton")

import cdgfast._dispatch  # noqa: E402
import cdgfast.ops.bregman as bregman_ops  # noqa: E402
from cdgfast.kernels import bregman as kb  # noqa: E402

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


# --- the CUDA registration, wired to the Triton launcher, on CPU tensors -----------------------

def test_cuda_registration_calls_triton_and_agrees(monkeypatch):
    # the one dispatch helper (cdgfast._dispatch.triton_or_composite) decides
    monkeypatch.setattr(cdgfast._dispatch, "use_triton", lambda x: True)
    called = []
    real = kb.bregman_distill
    monkeypatch.setattr(kb, "bregman_distill", lambda *args: called.append(1) or real(*args))
    s = torch.randn(2, 3, 7, dtype=torch.float64)
    t = torch.randn(2, 3, 7, dtype=torch.float64)
    for g, e in zip(bregman_ops._bregman_cuda(s, t, t.abs(), 0.5), bregman_ops._bregman_composite(s, t, t.abs(), 0.5)):
        _close(g, e, torch.float64)
    assert called == [1]


# --- the GPU launch path (autotuned kernels, GPU tile heuristic) in the interpreter ------------

def test_gpu_launch_path_in_interpreter(monkeypatch):
    """One-config autotuners skip benchmarking, so the GPU branch (grid lambdas, tuned kernels,
    GPU tile sizes) runs in the interpreter."""
    monkeypatch.setattr(kb, "_use_tuned", lambda x: True)
    one = [triton.Config({}, num_warps=4)]
    monkeypatch.setattr(kb, "_hsum_tuned", triton.autotune(configs=one, key=["N"])(kb._hsum_kernel))
    monkeypatch.setattr(kb, "_bregman_tuned", triton.autotune(configs=one, key=["N"])(kb._bregman_kernel))
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    for g, e in zip(kb.bregman_distill(s, t, t.abs(), 0.7), torch.ops.cdgfast.bregman_distill(s, t, t.abs(), 0.7)):
        _close(g, e, torch.float32)


def test_tile_heuristics_cover_every_element():
    for N, B in [(1, 1), (243, 2), (35, 3), (16384, 8), (3 * 64 * 64, 1)]:
        for on_gpu in (False, True):
            bs, ch, tb = kb._tiles(N, B, on_gpu)
            assert ch % bs == 0 and tb * ch >= N and (tb - 1) * ch < N


# --- on a CUDA device: the registered CUDA kernels (Triton) at realistic sizes ------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_op_matches_float64_reference(dtype):
    from cdgfast.ops.bregman import bregman_distill

    B, K, S = 6, 5, (4, 33, 31)  # odd sizes, several chunks per sample on the GPU
    pred = torch.randn(B, K, *S, dtype=torch.float64).to(dtype).cuda().requires_grad_()
    eps = torch.randn(B, *S, dtype=torch.float64).to(dtype).cuda().requires_grad_()
    ref_p = pred.detach().cpu().double().requires_grad_()
    ref_e = eps.detach().cpu().double().requires_grad_()
    s, t, h = pred[:, 0], eps, eps.detach().abs()
    rs, rt = ref_p[:, 0], ref_e
    out = bregman_distill(s, t, h, 0.8)
    rout = bregman_distill(rs, rt, h.cpu().double(), 0.8)
    _gclose(out.cpu(), rout, dtype)
    for g, e in zip(torch.autograd.grad(out, (pred, eps)), torch.autograd.grad(rout, (ref_p, ref_e))):
        _gclose(g.cpu(), e, dtype)
