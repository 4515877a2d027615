"""cdgfast.train.distributed: two gloo processes on 127.0.0.1. The rank-1 and diagonal Fisher computed
from data sharded over 2 ranks and all-reduced must equal cdgfast.fisher.rank1_fisher / diag_fisher in
one process over all the data; the sharded replay pool equals the single-process pool; gather and
gradient averaging are checked against plain concatenation / means."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from cdgfast.train import distributed as D


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.lin = torch.nn.Linear(3 * 5 * 5, 25)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.lin(h).view(-1, 1, 5, 5)


def loss_fn(model, batch):
    return (model(batch["x"]) - batch["eps"]).pow(2).flatten(1).mean(1)


SIZES = (3, 4, 2, 5, 1)  # uneven shards: rank 0 gets 3+2+1 samples, rank 1 gets 4+5


def make_model_and_batches():
    torch.manual_seed(123)
    model = TinyNet().double()
    g = torch.Generator().manual_seed(7)
    batches = [{"x": torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64),
                "eps": torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64),
                "y": torch.zeros(n, dtype=torch.long), "t": torch.zeros(n, dtype=torch.long)} for n in SIZES]
    return model, batches


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = D.init_from_env("cpu")
    assert info.world_size == world and info.rank == rank and info.backend == "gloo"
    model, batches = make_model_and_batches()
    mine = D.shard_batches(batches)
    r1 = D.distributed_rank1_fisher(model, loss_fn, mine, progress=False)
    dg = D.distributed_diag_fisher(model, loss_fn, mine, progress=False)
    # the context manager routes the public names to the sharded versions
    import cdgfast.fisher as F
    with D.sharded_estimators():
        r1b = F.rank1_fisher(model, loss_fn, mine)
    assert F.rank1_fisher is not D.distributed_rank1_fisher
    # gather of uneven pieces, gradient averaging
    piece = torch.full((rank + 1, 2), float(rank))
    gathered = D.gather_cat(piece)
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), float(rank + 1))
    D.all_reduce_grads([p])
    if rank == 0:
        torch.save({"mu": r1.mean_grad, "coeff": r1.coeff, "n": r1.num_samples, "diag": dg, "mu_b": r1b.mean_grad,
                    "gathered": gathered, "grad": p.grad}, os.path.join(out_dir, "r0.pt"))
    D.barrier()
    D.cleanup()


def test_two_process_fisher_equals_single_process(tmp_path):
    from cdgfast.fisher import diag_fisher, rank1_fisher

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "r0.pt", weights_only=False)

    model, batches = make_model_and_batches()
    ref = rank1_fisher(model, loss_fn, batches, progress=False)
    ref_diag = diag_fisher(model, loss_fn, batches, progress=False)
    assert got["n"] == sum(SIZES) == ref.num_samples
    torch.testing.assert_close(got["mu"], ref.mean_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["mu_b"], ref.mean_grad, rtol=1e-10, atol=1e-12)
    assert got["coeff"] == pytest.approx(ref.coeff, rel=1e-9)
    torch.testing.assert_close(got["diag"], ref_diag, rtol=1e-10, atol=1e-14)

    # independent check of the single-process reference itself: per-sample gradients by a loop
    params = [p for p in model.parameters()]
    gs = []
    for b in batches:
        for i in range(b["x"].shape[0]):
            one = {k: v[i:i + 1] for k, v in b.items()}
            g = torch.autograd.grad(loss_fn(model, one).sum(), params)
            gs.append(torch.cat([x.reshape(-1) for x in g]))
    G = torch.stack(gs)
    mu = G.mean(0)
    torch.testing.assert_close(got["mu"], mu, rtol=1e-9, atol=1e-12)
    assert got["coeff"] == pytest.approx(float(((G @ mu) ** 2).mean() / mu.dot(mu) ** 2), rel=1e-8)
    torch.testing.assert_close(got["diag"], (G ** 2).mean(0), rtol=1e-9, atol=1e-14)

    # gather / all-reduce helpers
    torch.testing.assert_close(got["gathered"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
    torch.testing.assert_close(got["grad"], torch.full((3,), 1.5))



def test_sharded_replay_pool_equals_single_process(monkeypatch):
    """Chunks on rank i % 2 with their own seeds, gathered rank-major and put back in chunk order, give
    the single-process pool sample for sample (the two ranks are simulated in one process)."""
    from cdgfast.data import generate_replay_pool
    from cdgfast.diffusion import NoiseSchedule
    from cdgfast.models.unet import tiny_unet

    torch.manual_seed(0)
    unet = tiny_unet(num_classes=3, sample_size=8)
    kw = dict(schedule=NoiseSchedule(), num_steps=2, batch_size=2, seed=5, progress=False)
    rx, ry = generate_replay_pool(unet, [0, 2], 3, **kw)  # 6 samples, 3 chunks: rank 0 gets 0 and 2
    pieces = {}
    monkeypatch.setattr(D, "get_world_size", lambda: 2)
    monkeypatch.setattr(D, "get_rank", lambda: 1)
    monkeypatch.setattr(D, "gather_cat", lambda t: pieces.setdefault(1, t))
    D.distributed_replay_pool(unet, [0, 2], 3, **kw)
    monkeypatch.setattr(D, "get_rank", lambda: 0)
    monkeypatch.setattr(D, "gather_cat", lambda t: torch.cat([t, pieces[1]]))
    px, py = D.distributed_replay_pool(unet, [0, 2], 3, **kw)
    assert pieces[1].shape[0] == 2
    assert torch.equal(py, ry)
    torch.testing.assert_close(px, rx, rtol=1e-5, atol=1e-6)


def test_single_process_helpers_are_identity():
    t = torch.arange(4.0)
    assert D.all_reduce_flat(t.clone()).tolist() == t.tolist()
    assert D.gather_cat(t) is t
    assert D.shard_batches([1, 2, 3], rank=1, world=2) == [2]
    assert list(D.shard_batches(lambda: iter(range(5)), rank=0, world=2)()) == [0, 2, 4]
    assert [list(D.shard_range(10, r, 3)) for r in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with pytest.raises(ValueError, match="op"):
        D.all_reduce_flat(t, op="max")
    info = D.init_from_env("cpu")
    assert info.world_size in (1, int(os.environ.get("WORLD_SIZE", "1"))) and info.is_main
