"""The data-parallel context: which share of the work this process does, and how the shares combine.

The Fisher estimators (`cdgfast.fisher.rank1_fisher` / `diag_fisher`), the replay-pool generator
(`cdgfast.data.generate_replay_pool`) and the methods (`Method.setup(..., parallel=ctx)`) take it
explicitly as `parallel=`. They are always handed the GLOBAL work (every batch of the stream, every
chunk of a pool), as in one process; the context says which part is this process's, and the partial
results are combined so that every process ends with the one-process numbers:

* Fisher estimates: rank r takes batches r, r + W, r + 2W, ... of the stream (`batches`; whole batches,
  so a layer that couples the samples of a batch sees what it sees in one process), computes the local
  sums and sample counts with the one-process primitives, and the SUMS and COUNTS are all-reduced
  (`all_reduce_sum`, `sum_counts`) before any division.
* Replay pools and evaluation sampling: chunk i on rank i % W with the chunk's own seed, gathered back
  in chunk order (`gather_round_robin`).
* A method's own optimisation loop (DSC's consolidation phase, CCD's label regressor): every rank draws
  the same global batch, keeps `rows(...)` of it, and averages the gradients before stepping
  (`average_gradients`).

`LOCAL` is one process: every share is everything and every combination the identity, so a function given
LOCAL (the default, `parallel=None`) computes exactly what it computes without a context. `ProcessGroup()`
is the ranks of an initialised torch.distributed process group; torch.distributed is used in this module
only. A subclass of `DataParallel` with its own `gather_cat` / `all_reduce_sum` can stand in for a group
(tests simulate two ranks in one process that way).
"""
from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Sequence

import torch

from .params import assign_grads_, flat_grads


class DataParallel:
    """This process is `rank` of `world_size`. The base class holds the sharding rules (which rows,
    batches, chunks are this rank's) and the combinations built on two primitives, `all_reduce_sum`
    and `gather_cat`, which it implements for one process only (world_size 1: the identity)."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        for name, value, lo in (("world_size", world_size, 1), ("rank", rank, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name}: expected an integer >= {lo}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"rank: expected an integer below world_size={world_size}, got {rank}")
        self.rank, self.world_size = rank, world_size

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that shows progress and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------------ shares of the global work
    def rows(self, *tensors: torch.Tensor):
        """This rank's rows `t[rank::world_size]` of every tensor of a global batch (a tuple, also for one
        tensor; all of them in one process)."""
        if not self.enabled:
            return tensors
        return tuple(t[self.rank::self.world_size] for t in tensors)

    def batches(self, stream: Iterable) -> Iterable:
        """This rank's batches of a global stream: every world_size-th, starting at `rank` (the stream
        itself in one process). The whole stream is iterated on every rank, so whatever draws random
        numbers while producing it (fresh t / eps) stays in step across ranks."""
        if not self.enabled:
            return stream
        return self._take(stream)

    def _take(self, stream: Iterable) -> Iterator:
        for i, b in enumerate(stream):
            if i % self.world_size == self.rank:
                yield b

    def shard_range(self, n: int) -> range:
        """A contiguous slice of range(n): sizes differ by at most one, earlier ranks larger."""
        base, extra = divmod(int(n), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))

    # ------------------------------------------------------------------ primitives
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` replaced in place by the sum over ranks, and returned (the identity in one process)."""
        self._one_process("all_reduce_sum")
        return t

    def gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` [n_r, ...] concatenated along dim 0 in rank order (sizes may differ)."""
        self._one_process("gather_cat")
        return t

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """`t` overwritten in place by rank `src`'s."""
        self._one_process("broadcast_")
        return t

    def broadcast_objects(self, objects: List, src: int = 0) -> List:
        """The list's items replaced in place by rank `src`'s (picklable objects)."""
        self._one_process("broadcast_objects")
        return objects

    def barrier(self) -> None:
        self._one_process("barrier")

    def _one_process(self, what: str) -> None:
        if self.enabled:
            raise NotImplementedError(f"{type(self).__name__}.{what}: world_size {self.world_size} needs a process "
                                      f"group (cdgfast.parallel.ProcessGroup) or a subclass that implements it")

    # ------------------------------------------------------------------ combinations
    def sum_counts(self, *counts: int, device=None) -> tuple:
        """Integer counts summed over ranks (one all-reduce; float64 holds counts exactly to 2^53)."""
        if not self.enabled:
            return tuple(int(c) for c in counts)
        t = self.all_reduce_sum(torch.tensor([float(c) for c in counts], dtype=torch.float64, device=device))
        return tuple(int(v) for v in t.tolist())

    def average_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """`.grad` of every parameter that requires a gradient replaced by its mean over ranks, with one
        flat all-reduce (a parameter without a grad counts as zero). Nothing to do in one process."""
        if not self.enabled:
            return
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        flat = flat_grads(params)
        self.all_reduce_sum(flat)
        flat.div_(self.world_size)
        assign_grads_(params, flat)

    def gather_round_robin(self, local: torch.Tensor, total: int, chunk: int) -> torch.Tensor:
        """Undo round-robin sharding: of `total` rows cut into chunks of `chunk` (the last one shorter),
        chunk i was made by rank i % world_size; `local` is this rank's chunks concatenated. Returns all
        rows in chunk order, on the CPU, on every rank."""
        if not self.enabled:
            return local.cpu()
        num_chunks = -(-int(total) // int(chunk))
        gathered = self.gather_cat(local).cpu()  # rank-major
        chunks, offset = [None] * num_chunks, 0
        for r in range(self.world_size):
            for i in range(r, num_chunks, self.world_size):
                n = min(chunk, total - i * chunk)
                chunks[i] = gathered[offset:offset + n]
                offset += n
        return torch.cat(chunks)


LOCAL = DataParallel()


class ProcessGroup(DataParallel):
    """The ranks of an initialised torch.distributed process group (`group`: None for the default one).
    Collectives run on the tensors' device, so with NCCL they must be CUDA tensors."""

    def __init__(self, group=None):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("parallel: torch.distributed is not initialised; call torch.distributed."
                             "init_process_group (torchrun does it through cdgfast.train) or use cdgfast.parallel.LOCAL")
        self._dist, self.group = dist, group
        super().__init__(dist.get_rank(group), dist.get_world_size(group))

    def all_reduce_sum(self, t):
        if self.enabled:
            self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM, group=self.group)
        return t

    def gather_cat(self, t):
        if not self.enabled:
            return t
        n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        self._dist.all_gather(sizes, n, group=self.group)
        sizes = [int(s) for s in sizes]
        m = max(sizes)
        pad = torch.zeros((m - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        padded = torch.cat([t, pad]) if m > t.shape[0] else t.contiguous()
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._dist.all_gather(out, padded, group=self.group)
        return torch.cat([o[:s] for o, s in zip(out, sizes)])

    def broadcast_(self, t, src: int = 0):
        if self.enabled:
            self._dist.broadcast(t, src=src, group=self.group)
        return t

    def broadcast_objects(self, objects, src: int = 0):
        if self.enabled:
            self._dist.broadcast_object_list(objects, src=src, group=self.group)
        return objects

    def barrier(self) -> None:
        if self.enabled:
            self._dist.barrier(group=self.group)


def current() -> DataParallel:
    """The default process group's context when torch.distributed is initialised, else LOCAL."""
    import torch.distributed as dist

    return ProcessGroup() if dist.is_available() and dist.is_initialized() else LOCAL


def initialize(backend: str, timeout=None) -> ProcessGroup:
    """Initialise the default process group from torchrun's environment (once) and return its context.
    timeout: a datetime.timedelta for its collectives (None: torch's default)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend=backend, **({} if timeout is None else {"timeout": timeout}))
    return ProcessGroup()


def shutdown() -> None:
    """Destroy the default process group, if there is one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve(parallel: Optional[DataParallel]) -> DataParallel:
    """`parallel` checked (a DataParallel), or LOCAL for None."""
    if parallel is None:
        return LOCAL
    if not isinstance(parallel, DataParallel):
        raise ValueError(f"parallel: expected a cdgfast.parallel.DataParallel (LOCAL, ProcessGroup()) or None, "
                         f"got {type(parallel).__name__}")
    return parallel


__all__ = ["DataParallel", "ProcessGroup", "LOCAL", "current", "initialize", "shutdown", "resolve"]
