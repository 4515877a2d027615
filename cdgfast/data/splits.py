"""Class-incremental task splits and a reproducible per-task batch iterator."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import torch


@dataclass
class Task:
    """One task: its position, its classes (in class-order), and the dataset rows that belong to it."""

    index: int
    classes: List[int]
    indices: torch.Tensor = field(repr=False)  # LongTensor of row indices into the dataset

    def __len__(self) -> int:
        return int(self.indices.numel())


def class_incremental_split(labels, *, num_tasks: int, classes_per_task: int,
                            class_order: Optional[Sequence[int]] = None, seed: int = 0) -> List[Task]:
    """Split a labelled set into `num_tasks` tasks of `classes_per_task` classes each.

    labels: LongTensor [N] (or anything with `.y`, e.g. an ImageDataset). Classes are 0..K-1 with K =
    max(label) + 1 (or the dataset's num_classes if larger). class_order: a permutation of 0..K-1 (tasks take consecutive chunks of it); None
    keeps 0..K-1 in order when seed == 0, and uses a permutation drawn from `seed` otherwise. Classes
    beyond num_tasks * classes_per_task are left out.
    """
    declared = None
    if hasattr(labels, "y") and isinstance(getattr(labels, "y"), torch.Tensor):
        declared = getattr(labels, "num_classes", None)
        labels = labels.y
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.numel() == 0 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected a non-empty integer tensor [N], got dtype {labels.dtype}, "
                         f"shape {tuple(labels.shape)}")
    if int(labels.min()) < 0:
        raise ValueError(f"labels: expected non-negative class indices, got minimum {int(labels.min())}")
    for name, v in (("num_tasks", num_tasks), ("classes_per_task", classes_per_task)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed: expected an integer, got {seed!r}")
    num_classes = max(int(labels.max()) + 1, int(declared or 0))
    if class_order is None:
        if seed == 0:
            order = list(range(num_classes))
        else:
            order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(int(seed))).tolist()
    else:
        order = [int(c) for c in class_order]
        if sorted(order) != list(range(num_classes)):
            raise ValueError(f"class_order: expected a permutation of 0..{num_classes - 1} "
                             f"({num_classes} classes in labels), got {list(class_order)}")
    if num_tasks * classes_per_task > num_classes:
        raise ValueError(f"num_tasks * classes_per_task: {num_tasks} x {classes_per_task} = "
                         f"{num_tasks * classes_per_task} exceeds the {num_classes} classes in labels")
    tasks = []
    for k in range(num_tasks):
        classes = order[k * classes_per_task:(k + 1) * classes_per_task]
        mask = torch.zeros_like(labels, dtype=torch.bool)
        for c in classes:
            mask |= labels == c
        idx = torch.nonzero(mask).flatten().long()
        if idx.numel() == 0:
            raise ValueError(f"labels: task {k} (classes {classes}) has no samples")
        # a class inside 0..K-1 without samples would be trained on nothing yet generated and scored
        empty = [c for c in classes if not bool((labels == c).any())]
        if empty:
            raise ValueError(f"labels: class{'es' if len(empty) > 1 else ''} {empty} of task {k} "
                             f"(classes {classes}) ha{'ve' if len(empty) > 1 else 's'} no samples")
        tasks.append(Task(index=k, classes=list(classes), indices=idx))
    return tasks


class TaskLoader:
    """Iterates (x, y) batches over a task's rows. Each pass reshuffles with `generator` (shuffle=True),
    so a seeded generator gives a reproducible sequence of epochs. `len()` = number of batches."""

    def __init__(self, dataset, task: Task, batch_size: int, *, shuffle: bool = True,
                 generator: Optional[torch.Generator] = None, drop_last: bool = False):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if not isinstance(task, Task):
            raise ValueError(f"task: expected a cdgfast.data.Task, got {type(task).__name__}")
        if len(task) and int(task.indices.max()) >= len(dataset):
            raise ValueError(f"task: indices reach {int(task.indices.max())} but the dataset has {len(dataset)} rows")
        if len(task) and int(task.indices.min()) < 0:  # would wrap around to the last rows
            raise ValueError(f"task: expected non-negative row indices, got minimum {int(task.indices.min())}")
        self.dataset, self.task, self.batch_size = dataset, task, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.generator = generator if generator is not None else torch.Generator().manual_seed(task.index)

    def __len__(self) -> int:
        n = len(self.task)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        idx = self.task.indices
        if self.shuffle:
            idx = idx[torch.randperm(idx.numel(), generator=self.generator)]
        x_all = getattr(self.dataset, "x", None)
        y_all = getattr(self.dataset, "y", None)
        for start in range(0, idx.numel(), self.batch_size):
            b = idx[start:start + self.batch_size]
            if self.drop_last and b.numel() < self.batch_size:
                break
            if isinstance(x_all, torch.Tensor) and isinstance(y_all, torch.Tensor):
                yield x_all[b], y_all[b]  # in-memory fast path: one gather per batch
            else:
                items = [self.dataset[int(i)] for i in b]
                yield torch.stack([it[0] for it in items]), torch.as_tensor([int(it[1]) for it in items])


def task_loader(dataset, task: Task, batch_size: int, *, shuffle: bool = True,
                generator: Optional[torch.Generator] = None, drop_last: bool = False) -> TaskLoader:
    """A re-iterable loader of (x, y) batches over `task`'s rows of `dataset` (see TaskLoader).
    Without a generator, shuffling is seeded by the task index."""
    return TaskLoader(dataset, task, batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last)
