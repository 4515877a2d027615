"""Fixed-size replay buffers of real samples (ER, A-GEM, CCD use M = 512 / 2560 / 5120).

ReservoirBuffer: classic reservoir sampling (Vitter's algorithm R): after n items were offered, every
one of them is in the buffer with probability capacity / n.
ReplaceWhenFullBuffer: CLoG's buffer, kept only to reproduce its rows: once full, every new item
overwrites a random slot (not a reservoir: recent items crowd out old ones).
ClassBalancedBuffer: class-balanced reservoir sampling (Chrysakis & Moens, 2020): when the buffer is
full, a sample of a class that is not (one of) the largest in the buffer evicts a random sample of a
largest class; a sample of a largest class replaces a random sample of its own class with probability
(stored of that class) / (seen of that class). Seen classes thus converge to equal shares, and within
a class the stored samples are a uniform sample of those seen.

Both draw every random number from one internal torch.Generator seeded by `seed`; its state is part of
state_dict(), so a resumed run continues with the same draws. Storage is allocated at the first add, on
the device and with the dtype of that batch.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .._validation import check_generator


class _BufferBase:
    def __init__(self, capacity: int, *, seed: int = 0):
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"capacity: expected a positive integer, got {capacity!r}")
        self.capacity = capacity
        self.seed = int(seed)
        self._gen = torch.Generator().manual_seed(self.seed)
        self.x: Optional[torch.Tensor] = None
        self.y: Optional[torch.Tensor] = None
        self.size = 0
        self.num_seen = 0

    def __len__(self) -> int:
        return self.size

    def _check_batch(self, x, y) -> Tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise ValueError(f"x: expected a tensor [B, ...], got {type(x).__name__}")
        y = torch.as_tensor(y)
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y: expected labels [B] with B = {x.shape[0]}, got shape {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise ValueError(f"y: expected integer labels, got {y.dtype}")
        if y.numel() and int(y.min()) < 0:
            raise ValueError(f"y: expected non-negative class labels, got minimum {int(y.min())}")
        if self.x is None:
            self._allocate(x.shape[1:], x.dtype, x.device)
        elif tuple(x.shape[1:]) != tuple(self.x.shape[1:]):
            raise ValueError(f"x: expected items of shape {tuple(self.x.shape[1:])}, got {tuple(x.shape[1:])}")
        return x.detach().to(self.x.device, self.x.dtype), y.to(self.y.device, torch.long)

    def _allocate(self, item_shape, dtype, device) -> None:
        # Storage made under inference_mode would be an inference tensor, which a later add outside it
        # cannot write into: the buffer always owns normal tensors.
        with torch.inference_mode(False):
            self.x = torch.empty((self.capacity, *item_shape), dtype=dtype, device=device)
            self.y = torch.empty(self.capacity, dtype=torch.long, device=device)

    def _rand_below(self, n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=self._gen))

    def _write_in_order(self, x, y, src: torch.Tensor, slots: torch.Tensor) -> None:
        """Write items x[src[k]] into slots[k] as if one after another: a later item overwrites an
        earlier one in the same slot, so only the last writer of each slot is copied."""
        last: Dict[int, int] = {}
        for k, s in zip(src.tolist(), slots.tolist()):
            last[s] = k
        if not last:
            return
        slot_t = torch.tensor(list(last.keys()), dtype=torch.long, device=self.x.device)
        src_t = torch.tensor(list(last.values()), dtype=torch.long, device=self.x.device)
        self.x[slot_t] = x[src_t]
        self.y[slot_t] = y[src_t]

    def _fill(self, x, y) -> int:
        """Append items into the free slots; returns how many were appended."""
        fill = min(x.shape[0], self.capacity - self.size)
        if fill > 0:
            self.x[self.size:self.size + fill] = x[:fill]
            self.y[self.size:self.size + fill] = y[:fill]
            self.size += fill
            self.num_seen += fill
        return fill

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """n stored samples, without replacement when n <= len(self), else with replacement.
        Uses `generator` if given (CPU generator), else the buffer's own."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n: expected a positive integer, got {n!r}")
        check_generator("generator", generator)
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator: expected a CPU generator, got one on {generator.device}")
        if self.size == 0:
            raise ValueError("n: cannot sample from an empty buffer (add samples first)")
        g = generator if generator is not None else self._gen
        if n <= self.size:
            idx = torch.randperm(self.size, generator=g)[:n]
        else:
            idx = torch.randint(0, self.size, (n,), generator=g)
        idx = idx.to(self.x.device)
        return self.x[idx], self.y[idx]

    def data(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """All stored (x, y) (views)."""
        if self.x is None:
            raise ValueError("the buffer is empty")
        return self.x[:self.size], self.y[:self.size]

    def class_counts(self) -> Dict[int, int]:
        if self.size == 0:
            return {}
        c = torch.bincount(self.y[:self.size].cpu())
        return {i: int(v) for i, v in enumerate(c.tolist()) if v > 0}

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "seed": self.seed, "size": self.size, "num_seen": self.num_seen,
                "x": None if self.x is None else self.x[:self.size].clone(),
                "y": None if self.y is None else self.y[:self.size].clone(),
                "rng": self._gen.get_state(), **self._extra_state()}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self._state_keys()) - set(state))
        if missing:
            raise ValueError(f"state: missing {missing} (a {type(self).__name__} state_dict() was expected)")
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"state: capacity {state['capacity']} does not match this buffer's {self.capacity}")
        size = int(state["size"])
        rows = 0 if state["x"] is None else int(state["x"].shape[0])
        if not 0 <= size <= self.capacity or rows != size or (state["y"] is not None and state["y"].shape != (rows,)):
            raise ValueError(f"state: size {size} must lie in [0, {self.capacity}] and match the stored x rows "
                             f"({rows}) and y")
        self.seed, self.size, self.num_seen = int(state["seed"]), size, int(state["num_seen"])
        self._gen.set_state(state["rng"])
        if state["x"] is None:
            self.x = self.y = None
        else:
            x, y = state["x"], state["y"]
            self._allocate(x.shape[1:], x.dtype, x.device)
            self.x[:self.size] = x
            self.y[:self.size] = y
        self._load_extra_state(state)

    def _state_keys(self):
        return ("capacity", "seed", "size", "num_seen", "x", "y", "rng", *self._extra_keys)

    _extra_keys: Tuple[str, ...] = ()

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass


class ReservoirBuffer(_BufferBase):
    """Reservoir sampling: the n-th offered item (1-based) is kept with probability capacity / n, in a
    uniformly chosen slot."""

    def add(self, x: torch.Tensor, y) -> None:
        x, y = self._check_batch(x, y)
        fill = self._fill(x, y)
        rest = x.shape[0] - fill
        if rest == 0:
            return
        # Item k (0-based within `rest`) is the (num_seen + k + 1)-th offered: slot j ~ U{0..n-1}, kept if j < capacity.
        n = self.num_seen + 1 + torch.arange(rest, dtype=torch.float64)
        j = torch.floor(torch.rand(rest, generator=self._gen, dtype=torch.float64) * n).long()
        self.num_seen += rest
        keep = torch.nonzero(j < self.capacity).flatten()
        self._write_in_order(x, y, keep + fill, j[keep])


class ReplaceWhenFullBuffer(_BufferBase):
    """CLoG's replay buffer (`networks/memory.py` of Programmergg/CLoG), kept to reproduce its ER / A-GEM
    rows: it fills the free slots in order and, once full, *every* later item overwrites a uniformly
    chosen slot (its seen-counter stops at the capacity, so the reservoir's keep probability
    capacity / n is always 1). Not a reservoir: the last task crowds out the earlier ones (after m items
    of a new task each old item survives with probability (1 - 1/capacity)^m). `num_seen` counts every
    item offered, as in the other buffers."""

    def add(self, x: torch.Tensor, y) -> None:
        x, y = self._check_batch(x, y)
        fill = self._fill(x, y)
        rest = x.shape[0] - fill
        if rest == 0:
            return
        slots = torch.randint(0, self.capacity, (rest,), generator=self._gen)
        self.num_seen += rest
        self._write_in_order(x, y, torch.arange(rest) + fill, slots)


class ClassBalancedBuffer(_BufferBase):
    """Class-balanced reservoir sampling (module docstring): equal shares per seen class, evicting from
    the largest class; uniform within each class."""

    _extra_keys = ("seen_per_class",)

    def __init__(self, capacity: int, *, seed: int = 0):
        super().__init__(capacity, seed=seed)
        self.seen_per_class: Dict[int, int] = {}
        self._slots: Dict[int, List[int]] = {}  # class -> buffer slots holding it (O(1) eviction)

    def _take_slot(self, c: int) -> int:
        """Remove and return a uniformly chosen slot of class c."""
        slots = self._slots[c]
        k = self._rand_below(len(slots)) if len(slots) > 1 else 0
        slots[k], slots[-1] = slots[-1], slots[k]
        return slots.pop()

    def add(self, x: torch.Tensor, y) -> None:
        x, y = self._check_batch(x, y)
        for k, c in enumerate(y.tolist()):
            self.num_seen += 1
            self.seen_per_class[c] = self.seen_per_class.get(c, 0) + 1
            stored = len(self._slots.get(c, ()))
            if self.size < self.capacity:
                slot = self.size
                self.size += 1
            else:
                largest = max(len(v) for v in self._slots.values())
                if stored < largest:
                    # Evict from a largest class (ties broken at random).
                    victims = sorted(cl for cl, v in self._slots.items() if len(v) == largest)
                    victim = victims[self._rand_below(len(victims))] if len(victims) > 1 else victims[0]
                    slot = self._take_slot(victim)
                else:
                    # c is a largest class: reservoir sampling within c.
                    if self._rand_below(self.seen_per_class[c]) >= stored:
                        continue
                    slot = self._take_slot(c)
            self.x[slot] = x[k]
            self.y[slot] = c
            self._slots.setdefault(c, []).append(slot)

    def _extra_state(self) -> dict:
        # The slot lists' order decides which slot a draw picks: saved so a resumed run matches exactly.
        return {"seen_per_class": dict(self.seen_per_class), "slots": {c: list(v) for c, v in self._slots.items()}}

    def _load_extra_state(self, state: dict) -> None:
        self.seen_per_class = {int(k): int(v) for k, v in state["seen_per_class"].items()}
        self._slots = {int(c): [int(i) for i in v] for c, v in state.get("slots", {}).items()}
        if self.size and not self._slots:
            for slot, c in enumerate(self.y[:self.size].tolist()):
                self._slots.setdefault(c, []).append(slot)
