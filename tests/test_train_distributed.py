"""cdgfast.parallel and cdgfast.train.distributed: two gloo processes on 127.0.0.1. The rank-1 and
diagonal Fisher computed by cdgfast.fisher.rank1_fisher / diag_fisher with a 2-rank context (each rank
its batches of the global stream, sums and counts all-reduced) must equal the same functions in one
process over all the data; the sharded replay pool equals the single-process pool; gather and gradient
averaging are checked against plain concatenation / means."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from cdgfast import parallel as P
from cdgfast.train import distributed as D
from naive import per_sample_gradient_rows


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
    ctx = info.parallel
    assert isinstance(ctx, P.ProcessGroup) and (ctx.rank, ctx.world_size) == (rank, world)
    model, batches = make_model_and_batches()
    import cdgfast.data as data_mod
    import cdgfast.fisher as F
    before = {(m.__name__, k): id(v) for m in (F, data_mod) for k, v in vars(m).items()}
    # every rank passes the GLOBAL stream; the estimators take this rank's batches of it
    r1 = F.rank1_fisher(model, loss_fn, batches, parallel=ctx)
    dg = F.diag_fisher(model, loss_fn, batches, parallel=ctx)
    r1b = F.rank1_fisher(model, loss_fn, lambda: iter(batches), parallel=ctx)  # the callable form of the stream
    # nothing is swapped in on the modules: the context is an argument
    assert {(m.__name__, k): id(v) for m in (F, data_mod) for k, v in vars(m).items()} == before
    # gather of uneven pieces, gradient averaging
    piece = torch.full((rank + 1, 2), float(rank))
    gathered = ctx.gather_cat(piece)
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), float(rank + 1))
    ctx.average_gradients([p])
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
    G = per_sample_gradient_rows(model, loss_fn, batches, list(model.parameters()))
    mu = G.mean(0)
    torch.testing.assert_close(got["mu"], mu, rtol=1e-9, atol=1e-12)
    assert got["coeff"] == pytest.approx(float(((G @ mu) ** 2).mean() / mu.dot(mu) ** 2), rel=1e-8)
    torch.testing.assert_close(got["diag"], (G ** 2).mean(0), rtol=1e-9, atol=1e-14)

    # gather / all-reduce helpers
    torch.testing.assert_close(got["gathered"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
    torch.testing.assert_close(got["grad"], torch.full((3,), 1.5))



def test_sharded_replay_pool_equals_single_process():
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

    class Rank(P.DataParallel):  # two ranks simulated in one process: rank 1 runs first, rank 0 gathers
        def gather_cat(self, t):
            return pieces.setdefault(1, t) if self.rank == 1 else torch.cat([t, pieces[1]])

    generate_replay_pool(unet, [0, 2], 3, parallel=Rank(1, 2), **kw)
    px, py = generate_replay_pool(unet, [0, 2], 3, parallel=Rank(0, 2), **kw)
    assert pieces[1].shape[0] == 2
    assert torch.equal(py, ry)
    torch.testing.assert_close(px, rx, rtol=1e-5, atol=1e-6)


def test_single_process_helpers_are_identity():
    t = torch.arange(4.0)
    assert P.LOCAL.all_reduce_sum(t.clone()).tolist() == t.tolist()
    assert P.LOCAL.gather_cat(t) is t
    stream = [1, 2]
    assert P.LOCAL.rows(t)[0] is t and P.LOCAL.batches(stream) is stream and P.LOCAL.sum_counts(3, 4) == (3, 4)
    assert list(P.DataParallel(1, 2).batches([1, 2, 3])) == [2]
    assert list(P.DataParallel(0, 2).batches(iter(range(5)))) == [0, 2, 4]
    assert [x.tolist() for x in P.DataParallel(1, 2).rows(t, t + 1)] == [[1.0, 3.0], [2.0, 4.0]]
    assert [list(P.DataParallel(r, 3).shard_range(10)) for r in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    for bad in (dict(rank=2, world_size=2), dict(rank=-1), dict(world_size=0), dict(world_size=True)):
        with pytest.raises(ValueError, match="rank|world_size"):
            P.DataParallel(**bad)
    with pytest.raises(NotImplementedError, match="process group"):  # two ranks need a real group
        P.DataParallel(0, 2).all_reduce_sum(t)
    with pytest.raises(ValueError, match="parallel"):
        P.resolve("gloo")
    with pytest.raises(ValueError, match="not initialised"):
        P.ProcessGroup()
    assert P.current() is P.LOCAL and P.resolve(None) is P.LOCAL
    info = D.init_from_env("cpu")
    assert info.world_size in (1, int(os.environ.get("WORLD_SIZE", "1"))) and info.is_main
    assert info.parallel is P.LOCAL


# --------------------------------------------------------------------------------------------------
# DistributedDataParallel training step and the methods' end-of-task work under torchrun
def _ddp_worker(rank, world, port, out_dir):
    """Two forwards through the DDP view, a parameter-space penalty, one backward: the averaged gradient
    must equal one process's gradient of the same loss over the whole global batch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    D.init_from_env("cpu")
    model, batches = make_model_and_batches()
    x = torch.cat([b["x"] for b in batches])[:8]   # global batch of 8: 4 rows per rank
    e = torch.cat([b["eps"] for b in batches])[:8]
    student = D.data_parallel(model)
    assert isinstance(student, D.DataParallelView) and student.lin is model.lin  # attributes: the bare module
    import copy
    assert type(copy.deepcopy(student)) is TinyNet                                 # teachers: bare copies
    xl, el = D.context().rows(x, e)
    anchor = [p.detach() + 0.1 for p in model.parameters()]
    loss = (student(xl) - el).pow(2).mean() + 0.5 * student(xl * 0.5).pow(2).mean() \
        + sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.save(grads, os.path.join(out_dir, f"ddp{rank}.pt"))
    D.barrier()
    D.cleanup()


def test_ddp_step_averages_the_gradient_of_the_global_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    g0, g1 = (torch.load(tmp_path / f"ddp{r}.pt") for r in (0, 1))
    torch.testing.assert_close(g0, g1, rtol=0, atol=0)  # every rank steps with the same gradient
    model, batches = make_model_and_batches()
    x = torch.cat([b["x"] for b in batches])[:8]
    e = torch.cat([b["eps"] for b in batches])[:8]
    anchor = [p.detach() + 0.1 for p in model.parameters()]
    # one process: the mean of the two ranks' per-row means (equal halves) = the global mean
    halves = [(model(x[r::2]) - e[r::2]).pow(2).mean() + 0.5 * model(x[r::2] * 0.5).pow(2).mean() for r in (0, 1)]
    loss = sum(halves) / 2 + sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
    ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    torch.testing.assert_close(g0, ref, rtol=1e-10, atol=1e-12)


def _method_states(parallel=None):
    """end_task of rank1 / ewc / ewc_dc / gd (pool) and a DSC phase on the same model and global data; returns
    the states that must not depend on the number of processes."""
    from cdgfast.diffusion import NoiseSchedule
    from cdgfast.methods import create
    from cdgfast.models.unet import tiny_unet

    torch.manual_seed(3)
    model = tiny_unet(num_classes=4, sample_size=8).double()
    g = torch.Generator().manual_seed(11)
    data = [(torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.tensor([2, 3, 2, 3, 2][:n]))
            for n in (3, 5, 2, 4)]
    out = {}
    schedule = NoiseSchedule()
    for name, kw in (("rank1", {"fisher_max_samples": 11}), ("ewc", {}), ("ewc_dc", {"k": 3}),
                     ("gd", {"replay": "pool", "pool_per_class": 3, "pool_steps": 2, "pool_batch_size": 2})):
        m = create(name, seed=5, **kw)
        m.setup(num_classes=4, schedule=schedule, parallel=parallel)
        if name == "ewc_dc":  # earlier classes exist: the DC conditions include one of them
            m.seen_classes = [0, 1]
        m.begin_task(model, type("T", (), {"classes": [2, 3], "index": 0})())
        m.end_task(model, data)
        out[name] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(m).items()
                     if k in ("directions", "coeffs", "weights", "pool_x", "pool_y")}
    # DSC: the consolidation phase trains the model; each rank keeps its rows of every (even-sized)
    # global batch and the gradients are averaged, which is the one-process step
    even = [(x[:2], y[:2]) for x, y in data] + [(data[1][0][:4], data[1][1][:4])]
    dsc = create("dsc", seed=5, iterations=3)
    dsc.setup(num_classes=4, schedule=schedule, parallel=parallel)
    for k, classes in enumerate(([0, 1], [2, 3])):
        dsc.begin_task(model, type("T", (), {"classes": classes, "index": k})())
        dsc.end_task(model, even)
        dsc.post_task_phase(model, even)
    out["dsc"] = {"params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
                  "teachers": list(dsc.teacher_history)}
    return out


def _methods_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = D.init_from_env("cpu")
    torch.save(_method_states(info.parallel), os.path.join(out_dir, f"methods{rank}.pt"))
    D.barrier()
    D.cleanup()


def test_methods_end_task_sharded_equals_single_process(tmp_path):
    """The methods hand their context (setup(..., parallel=ctx)) to the estimators and the replay pool,
    so a 2-process end_task (global batch stream, each rank estimating on its share, all-reduced) gives
    the single-process rank-1 Fisher, diagonal Fisher, DC-score (ewc_dc) Fisher and replay pool."""
    mp.spawn(_methods_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ref = _method_states()
    for r in (0, 1):
        got = torch.load(tmp_path / f"methods{r}.pt", weights_only=False)
        for name, state in ref.items():
            assert state, name
            for k, v in state.items():
                torch.testing.assert_close(got[name][k], v, rtol=1e-9, atol=1e-12, msg=f"rank {r} {name}.{k}")


def test_torchrun_cli_two_processes_with_crash_and_resume(tmp_path):
    """`torchrun --nproc_per_node 2 -m cdgfast.train`: DDP training of rank1+gd, er (rank-local replay
    buffers) and dsc; a crash in er's second task, then --resume (each rank reloads its own buffer)."""
    import json
    import subprocess
    import sys

    out, cache = tmp_path / "run", tmp_path / "cache"
    from train_hooks import HOOKED_CLI

    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["--preset", "default", "--scale", "smoke", "--method", "rank1+gd", "er", "dsc",
            "--steps", "2", "--num-tasks", "2", "--fid-samples", "3", "--out", str(out), "--cache-dir", str(cache),
            "--no-progress", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run(launch + HOOKED_CLI[1:] + ["--crash-at", "er:1:2"] + args, env=env, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode != 0 and "injected crash" in first.stderr, first.stderr[-3000:]
    ck = out / "checkpoints"
    assert (ck / "er.safetensors").is_file() and (ck / "er.rank1.task0.safetensors").is_file()
    second = subprocess.run(launch + ["-m", "cdgfast.train"] + args + ["--resume"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2
    assert set(res["methods"]) == {"rank1+gd", "er", "dsc"}
    for m in res["methods"].values():
        assert len(m["fid"]) == 2 and all(v is not None and v == v for v in m["fid"][1])
    log = (out / "train.log").read_text()
    assert "er: resuming after task 1" in log and "world size 2" in log
    # rank 1's state of the last task is kept, the older one removed once rank 0's checkpoint moved on
    assert (ck / "er.rank1.task1.safetensors").is_file() and not (ck / "er.rank1.task0.safetensors").exists()


def _ccd_worker(rank, world, port, out_dir):
    """CCD trains its label regressor inside `loss` on this rank's rows: averaged gradients keep one regressor."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = D.init_from_env("cpu").parallel
    from cdgfast.diffusion import NoiseSchedule
    from cdgfast.methods import create
    from cdgfast.models.unet import tiny_unet

    torch.manual_seed(0)
    model = tiny_unet(num_classes=4, sample_size=8)
    m = create("ccd", seed=1, buffer_size=8)
    m.setup(num_classes=4, schedule=NoiseSchedule(), parallel=ctx)
    m.begin_task(model, type("T", (), {"classes": [0, 1], "index": 0})())
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        x, y = ctx.rows(torch.randn(6, 1, 8, 8, generator=g), torch.tensor([0, 1, 0, 1, 1, 0]))
        m.loss(model, {"x": x, "y": y})
    torch.save({k: v.detach().clone() for k, v in m.regressor.state_dict().items()},
               os.path.join(out_dir, f"ccd{rank}.pt"))
    D.barrier()
    D.cleanup()


def test_ccd_regressor_stays_one_across_ranks(tmp_path):
    mp.spawn(_ccd_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"ccd{r}.pt") for r in (0, 1))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
