"""Tolerances of the Triton launchers against their PyTorch composites, shared by the kernel tests.

TOL: launcher vs composite on the same CPU inputs (TRITON_INTERPRET=1), per dtype (atol, rtol): the
kernels sum in another order and, for half types, round intermediates at other points. GPU_TOL: a CUDA
result vs the float64 CPU reference at realistic sizes (N = 4092 terms in another order, tau down to 0.05).
"""
import torch

TOL = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (2e-6, 2e-5),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
GPU_TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2)}


def close(a, b, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)


def gpu_close(a, b, dtype):
    atol, rtol = GPU_TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)
