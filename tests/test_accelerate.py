"""examples/accelerate_loop.py: a method inside a Hugging Face Accelerate loop on two CPU processes computes what
one process computes (issue 15): the trained model and the method's consolidated state (rank-1 anchors,
directions and coefficients, estimated with the two processes sharing the Fisher passes).

The loop uses plain SGD here: Adam's first steps divide each gradient by its own magnitude, so parameters
whose gradient is at rounding level move by +-lr depending on the summation order, which a one-process
vs two-process comparison cannot control (the example's docstring and --sgd help say so).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "accelerate_loop.py"
ARGS = ["--method", "rank1", "--set", "lam=10.0", "--steps", "3", "--epochs", "1", "--batch-size", "16",
        "--sgd", "0.01"]


def _run(cmd, out):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd + ARGS + ["--out", str(out)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=str(out.parent))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_two_accelerate_processes_equal_one(tmp_path):
    pytest.importorskip("accelerate", reason="the Accelerate example needs `pip install accelerate` (the test extra)")
    from safetensors.torch import load_file

    import cdgfast.methods as M

    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(EXAMPLE)], one)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLE)], two)
    wa = load_file(str(one / "unet" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(two / "unet" / "diffusion_pytorch_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-5, msg=k)
    ma, mb = M.load(one / "method"), M.load(two / "method")
    assert ma.task_index == mb.task_index == 1 and ma.seen_classes == mb.seen_classes
    for attr in ("anchors", "directions", "coeffs"):
        a, b = getattr(ma, attr), getattr(mb, attr)
        assert a.shape == b.shape and a.shape[0] == 2, attr
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=attr)
    # the generators stayed in step: the same draws follow in both
    assert torch.equal(ma.generator.get_state(), mb.generator.get_state())


def test_shard_batches_gives_each_block_its_one_process_noise():
    """Rank r of 2 (a DataParallel context without a group: only the rank matters to the draws) gets block r of
    the noise and label dropout one process draws for the global batch."""
    import cdgfast.methods as M
    from cdgfast.diffusion import NoiseSchedule
    from cdgfast.parallel import DataParallel

    x = torch.randn(6, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    ref = M.create("l2", label_dropout=0.5)
    ref.setup(num_classes=3, schedule=NoiseSchedule())
    full = ref.noisy_batch(x, y, dropout=True)
    for r in range(2):
        m = M.create("l2", label_dropout=0.5)
        m.setup(num_classes=3, schedule=NoiseSchedule(), parallel=DataParallel(rank=r, world_size=2))
        part = m.shard_batches().noisy_batch(x[3 * r:3 * r + 3], y[3 * r:3 * r + 3], dropout=True)
        for k in ("t", "eps", "y", "x"):
            assert torch.equal(part[k], full[k][3 * r:3 * r + 3]), k
        assert torch.equal(m.generator.get_state(), ref.generator.get_state())  # in step with one process
    with pytest.raises(ValueError, match=r"shard_batches: \['gd'\] draw replayed samples"):
        M.create("rank1+gd").shard_batches()
    with pytest.raises(ValueError, match="enabled: expected True or False"):
        M.create("l2").shard_batches("yes")
