"""Triton kernels, installed as `cdgfast.kernels`. Each module holds kernels and their launchers;
`_common` holds the helpers they share (import them, never copy them). The ops in `cdgfast.ops` import
the modules lazily on the CUDA path (and tests run them on the CPU with TRITON_INTERPRET=1).
`fisher_update` also launches the hand-written csrc/fisher_update.cu through `cdgfast._cuda`."""
