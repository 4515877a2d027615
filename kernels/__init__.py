"""Triton kernels, installed as `cdgfast.kernels`. Each module holds kernels and their launchers;
the ops in `cdgfast.ops` import them lazily on the CUDA path (and tests run them on the CPU with
TRITON_INTERPRET=1)."""
