"""Per-method checkpoints written atomically after every finished task.

A checkpoint file `checkpoints/<method>.pt` holds everything needed to continue after task k: the
model weights, the method's state_dict (its anchors, Fisher terms, buffers, teacher, generator), the
metrics so far (FID rows, KLD, timings), the method's resolved hyperparameters, its fingerprint (the
run's settings + those hyperparameters: a changed method runs again on --resume, the others continue)
and the run fingerprint. It is written to a
temporary file in the same directory, flushed and fsynced, then moved over the old one with
os.replace, so a crash at any moment leaves either the previous complete checkpoint or the new one.

Under torchrun the ranks other than 0 also keep rank-local method state (their replay buffers are
filled from their own rows): `checkpoints/<method>.rank<r>.task<k>.pt`, written before rank 0's
checkpoint of task k and removed once the checkpoint of task k + 1 exists.

A checkpoint that cannot be read (truncated by a full disk, damaged by a copy) raises
`UnreadableCheckpoint` naming the file, never a raw torch.load traceback: the driver reports it and
goes on with the other methods.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch


class UnreadableCheckpoint(Exception):
    """`path` exists but cannot be loaded as a checkpoint; `reason` says what torch.load (or the check of
    its contents) reported."""

    def __init__(self, path: os.PathLike, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path} cannot be read ({reason})")


def method_filename(method: str) -> str:
    """A file-system-safe stem for a method name ("rank1+gd" -> "rank1+gd"; anything odd -> '_')."""
    return re.sub(r"[^A-Za-z0-9+_.-]", "_", method)


def atomic_save(obj: Any, path: os.PathLike) -> None:
    """torch.save to `path` via a temporary file in the same directory and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_path(out_dir: os.PathLike, method: str) -> Path:
    return Path(out_dir) / "checkpoints" / f"{method_filename(method)}.pt"


def save_checkpoint(out_dir: os.PathLike, method: str, state: Dict[str, Any]) -> Path:
    path = checkpoint_path(out_dir, method)
    atomic_save(state, path)
    return path


def load_checkpoint(out_dir: os.PathLike, method: str) -> Optional[Dict[str, Any]]:
    """The last complete checkpoint of `method`, or None. The file holds our own objects (method
    states with generators and Python values), hence weights_only=False: load only your own runs."""
    path = checkpoint_path(out_dir, method)
    if not path.is_file():
        return None
    return read_checkpoint(path)


def read_checkpoint(path: os.PathLike, *, mmap: bool = False) -> Dict[str, Any]:
    """Load one checkpoint file, or raise UnreadableCheckpoint. mmap: map tensor storages instead of
    reading them (to look at the metrics of a large checkpoint without loading its weights)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as exc:  # truncated zip, bad pickle, EOF, unknown classes: the file cannot be used
        raise UnreadableCheckpoint(path, f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(state, dict) or "completed_task" not in state:
        raise UnreadableCheckpoint(path, f"not a cdgfast.train checkpoint (a {type(state).__name__} without "
                                         f"'completed_task')")
    return state


def method_checkpoint_files(out_dir: os.PathLike) -> List[Path]:
    """The per-method checkpoint files of a run (not the rank-local states, not temporary files)."""
    d = Path(out_dir) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("*.pt") if not p.name.startswith(".") and not _RANK_FILE.search(p.name))


_RANK_FILE = re.compile(r"\.rank\d+\.task\d+\.pt$")


def rank_state_path(out_dir: os.PathLike, method: str, rank: int, task: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"{method_filename(method)}.rank{int(rank)}.task{int(task)}.pt"


def save_rank_state(out_dir: os.PathLike, method: str, rank: int, task: int, state: Dict[str, Any]) -> Path:
    path = rank_state_path(out_dir, method, rank, task)
    atomic_save(state, path)
    return path


def load_rank_state(out_dir: os.PathLike, method: str, rank: int, task: int) -> Optional[Dict[str, Any]]:
    path = rank_state_path(out_dir, method, rank, task)
    if not path.is_file():
        return None
    return read_checkpoint(path)


def drop_rank_state(out_dir: os.PathLike, method: str, rank: int, task: int) -> None:
    if task >= 0:
        rank_state_path(out_dir, method, rank, task).unlink(missing_ok=True)
