"""Per-method checkpoints written atomically after every finished task.

A checkpoint file `checkpoints/<method>.pt` holds everything needed to continue after task k: the
model weights, the method's state_dict (its anchors, Fisher terms, buffers, teacher, generator), the
metrics so far (FID rows, KLD, timings) and the run fingerprint (config hash). It is written to a
temporary file in the same directory, flushed and fsynced, then moved over the old one with
os.replace, so a crash at any moment leaves either the previous complete checkpoint or the new one.

Under torchrun the ranks other than 0 also keep rank-local method state (their replay buffers are
filled from their own rows): `checkpoints/<method>.rank<r>.task<k>.pt`, written before rank 0's
checkpoint of task k and removed once the checkpoint of task k + 1 exists.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, Optional

import torch


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
    return torch.load(path, map_location="cpu", weights_only=False)


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
    return torch.load(path, map_location="cpu", weights_only=False)


def drop_rank_state(out_dir: os.PathLike, method: str, rank: int, task: int) -> None:
    if task >= 0:
        rank_state_path(out_dir, method, rank, task).unlink(missing_ok=True)
