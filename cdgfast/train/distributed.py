"""The driver's process setup for `torchrun --nproc_per_node N -m cdgfast.train`.

Training is data parallel with DistributedDataParallel: every rank draws the same global batch
(identically seeded loaders) and keeps its rows `batch[rank::world]`; the method's loss calls the model
through `data_parallel(model)`, a DDP wrapper seen through a thin view, so DDP's backward hooks average
the gradients bucket by bucket while the backward runs. Everything else -- frozen deep copies as
teachers, LoRA injection, functional per-sample gradients, the end-of-task estimators -- uses the bare
module. Backend: gloo on CPU, NCCL on CUDA. Per-rank random draws (noise, label dropout) come from
per-rank streams during training (`decorrelate_generators`) and are re-joined to rank 0's stream
before the end-of-task work (`sync_generators`), so every rank takes the same decisions there.

`init_from_env` builds the data-parallel context (`cdgfast.parallel.ProcessGroup`, or LOCAL in one
process; `DistInfo.parallel`), and the driver hands it to every method (`method.setup(...,
parallel=info.parallel)`): the methods pass it to the Fisher estimators and the replay-pool generator,
which shard the global work and all-reduce or gather it exactly (see `cdgfast.parallel`), and use it in
their own optimisation loops (DSC's consolidation phase, CCD's label regressor). The evaluation
sampling is sharded here by chunk (`gather_round_robin`). Only rank 0 writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from cdgfast import parallel as P


@dataclass
class DistInfo:
    """This process in the run: its data-parallel context (rank, world size), local rank, backend, device."""

    parallel: P.DataParallel = P.LOCAL  # what the methods are handed
    local_rank: int = 0
    backend: Optional[str] = None
    device: torch.device = torch.device("cpu")

    rank = property(lambda self: self.parallel.rank)
    world_size = property(lambda self: self.parallel.world_size)
    is_main = property(lambda self: self.parallel.is_main)


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: Optional[str] = None, backend: Optional[str] = None, timeout=None) -> DistInfo:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT). Single process (no WORLD_SIZE or 1): nothing is initialised.
    device: "cpu" / "cuda" / None (cuda when available). On CUDA each rank uses cuda:LOCAL_RANK.
    backend: None picks gloo on CPU, NCCL on CUDA; timeout: the collectives' (a datetime.timedelta)."""
    world = env_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device == "cuda") or (device is None and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but torch.cuda.is_available() is False")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistInfo(P.LOCAL, 0, None, dev)
    backend = backend or ("nccl" if use_cuda else "gloo")
    ctx = P.initialize(backend, timeout)
    return DistInfo(ctx, local, backend, dev)


def context() -> P.DataParallel:
    """This process's data-parallel context (LOCAL unless a process group is initialised)."""
    return P.current()


def get_rank() -> int:
    return context().rank


def get_world_size() -> int:
    return context().world_size


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    context().barrier()


def cleanup() -> None:
    P.shutdown()


def all_reduce_grads(params: Sequence[torch.Tensor]) -> None:
    """Average .grad over ranks with one flat all-reduce (parameters without a grad count as zero)."""
    context().average_gradients(params)


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (start from identical weights)."""
    ctx = context()
    if not ctx.enabled:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            ctx.broadcast_(t.data, src=0)


def gather_round_robin(local: torch.Tensor, total: int, chunk: int) -> torch.Tensor:
    """The evaluation samples of every rank in chunk order (`cdgfast.parallel.DataParallel.gather_round_robin`)."""
    return context().gather_round_robin(local, total, chunk)


# --------------------------------------------------------------------------------------------------
class DataParallelView:
    """What a method's `loss` sees under torchrun: calls go through DistributedDataParallel (its backward
    hooks all-reduce the gradients); attribute access (parameters, config) and deep copies (teachers)
    reach the bare module."""

    __slots__ = ("ddp",)

    def __init__(self, ddp):
        object.__setattr__(self, "ddp", ddp)

    def __call__(self, *args, **kwargs):
        return self.ddp(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.ddp.module, name)

    def __deepcopy__(self, memo):
        import copy
        return copy.deepcopy(self.ddp.module, memo)


def data_parallel(model: torch.nn.Module):
    """`model` wrapped in DistributedDataParallel, as a DataParallelView; the bare model in one process.
    Built per task because methods may change the trainable set between tasks (LoRA adapters)."""
    if get_world_size() <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = next(model.parameters()).device
    ddp = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False,
              find_unused_parameters=False)
    return DataParallelView(ddp)


def method_generators(method) -> List[torch.Generator]:
    """The torch.Generators a method draws from (every member of a composition), without repeats."""
    found, seen = [], set()
    for m in [method] + list(getattr(method, "members", [])):
        g = getattr(m, "generator", None)
        if isinstance(g, torch.Generator) and id(g) not in seen:
            seen.add(id(g))
            found.append(g)
    return found


def decorrelate_generators(method) -> None:
    """Give every rank its own stream for the training phase (its own noise and label dropout for its
    rows); without this, equal-sized shards would draw identical t / eps on every rank."""
    if get_world_size() <= 1:
        return
    import hashlib
    for g in method_generators(method):
        base = int(torch.randint(0, 2 ** 62, (1,), generator=g))  # identical on every rank here
        g.manual_seed(int(hashlib.sha256(f"{base}|rank{get_rank()}".encode()).hexdigest()[:15], 16))


def sync_generators(method) -> None:
    """Set every rank's method generators to rank 0's state (before the end-of-task work)."""
    ctx = context()
    if not ctx.enabled:
        return
    gens = method_generators(method)
    states = ctx.broadcast_objects([g.get_state() for g in gens], src=0)
    for g, st in zip(gens, states):
        g.set_state(st)
