"""Test setup.

* Without CUDA, Triton kernels run in the interpreter on CPU tensors: TRITON_INTERPRET must be set
  before triton is first imported.
* TORCH_HOME points at an empty folder: the torch hub cache is where the FID Inception weights are
  looked for (`--fid auto`), so a machine that has them would otherwise switch the smoke runs to
  Inception-FID. Tests that need the cache create it there.
* One intra-op thread per test process (and for the subprocesses the tests start): the test models
  are tiny, so threads buy nothing, and OpenMP threads spinning against another busy process on a
  2-core machine made some tests 50x slower. Override with CDGFAST_TEST_THREADS.
"""
import os
import tempfile

os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="cdgfast-test-torch-home-")
_threads = os.environ.get("CDGFAST_TEST_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", _threads)
os.environ.setdefault("MKL_NUM_THREADS", _threads)

import torch  # noqa: E402

torch.set_num_threads(int(_threads))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
