"""Per-method checkpoints written atomically after every finished task, without pickle.

A checkpoint file `checkpoints/<method>.safetensors` holds everything needed to continue after task k:
the model weights, the method's state_dict (its anchors, Fisher terms, buffers, teacher, generator),
the metrics so far (FID rows, KLD, timings), the method's resolved hyperparameters, its fingerprint (the
run's settings + those hyperparameters: a changed method runs again on --resume, the others continue)
and the run fingerprint. It is written with `cdgfast.serialization.save_state`: the tensors as
safetensors, every other value (generator states are tensors; counters, configs, metrics) as JSON in the
file's header, so reading it runs no code. It is written to a temporary file in the same directory,
flushed and fsynced, then moved over the old one with os.replace, so a crash at any moment leaves
either the previous complete checkpoint or the new one. A model whose structure a method changed
(LoRA adapters) is not stored as an object: on --resume the method adds its adapters to the freshly
built model again (`Method.restore_model_structure`) and the weights are loaded into it.

Under torchrun the ranks other than 0 also keep rank-local method state (their replay buffers are
filled from their own rows): `checkpoints/<method>.rank<r>.task<k>.safetensors`, written before rank 0's
checkpoint of task k and removed once the checkpoint of task k + 1 exists.

Checkpoints of earlier versions (`<method>.pt`, torch.save pickles) are read only with
`allow_pickle=True` (the driver's --allow-pickle): unpickling a file can run any code it contains, so
by default such a file is reported as unreadable with that reason.

A checkpoint that cannot be read (truncated by a full disk, damaged by a copy) raises
`UnreadableCheckpoint` naming the file, never a raw traceback: the driver reports it and goes on with
the other methods.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..serialization import UnreadableState, load_state, save_state

EXT = ".safetensors"
LEGACY_EXT = ".pt"  # torch.save pickles of earlier versions: only with allow_pickle
KIND = "cdgfast.train.checkpoint"
PICKLE_REASON = ("an old pickle checkpoint (torch.save): unpickling can run any code the file contains, so it is "
                 "loaded only with --allow-pickle (allow_pickle=True); use that only for runs you made yourself")


class UnreadableCheckpoint(Exception):
    """`path` exists but cannot be loaded as a checkpoint; `reason` says what the reader (or the check of
    its contents) reported."""

    def __init__(self, path: os.PathLike, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path} cannot be read ({reason})")


def method_filename(method: str) -> str:
    """A file-system-safe stem for a method name ("rank1+gd" -> "rank1+gd"; anything odd -> '_')."""
    return re.sub(r"[^A-Za-z0-9+_.-]", "_", method)


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
    return Path(out_dir) / "checkpoints" / f"{method_filename(method)}{EXT}"


def save_checkpoint(out_dir: os.PathLike, method: str, state: Dict[str, Any]) -> Path:
    return save_state(checkpoint_path(out_dir, method), state, kind=KIND)


def _existing(path: Path, allow_pickle: bool) -> Optional[Path]:
    """`path`, else its legacy .pt twin when one exists, else None."""
    if path.is_file():
        return path
    legacy = path.with_name(path.name[:-len(EXT)] + LEGACY_EXT)
    return legacy if legacy.is_file() else None


def load_checkpoint(out_dir: os.PathLike, method: str, *, allow_pickle: bool = False) -> Optional[Dict[str, Any]]:
    """The last complete checkpoint of `method`, or None (module docstring: a legacy .pt only with
    allow_pickle, else UnreadableCheckpoint)."""
    path = _existing(checkpoint_path(out_dir, method), allow_pickle)
    return None if path is None else read_checkpoint(path, allow_pickle=allow_pickle)


def read_checkpoint(path: os.PathLike, *, mmap: bool = False, allow_pickle: bool = False) -> Dict[str, Any]:
    """Load one checkpoint file, or raise UnreadableCheckpoint. A .safetensors checkpoint is parsed
    without running code; a legacy .pt one needs allow_pickle (module docstring). mmap: for a legacy
    file, map tensor storages instead of reading them (safetensors files are memory-mapped anyway)."""
    path = Path(path)
    if path.suffix == LEGACY_EXT:
        if not allow_pickle:
            raise UnreadableCheckpoint(path, PICKLE_REASON)
        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        except Exception as exc:  # truncated zip, bad pickle, EOF, unknown classes: the file cannot be used
            raise UnreadableCheckpoint(path, f"{type(exc).__name__}: {str(exc)[:200]}") from None
    else:
        try:
            state = load_state(path)
        except UnreadableState as exc:
            raise UnreadableCheckpoint(path, exc.reason) from None
    if not isinstance(state, dict) or "completed_task" not in state:
        raise UnreadableCheckpoint(path, f"not a cdgfast.train checkpoint (a {type(state).__name__} without "
                                         f"'completed_task')")
    return state


def method_checkpoint_files(out_dir: os.PathLike) -> List[Path]:
    """The per-method checkpoint files of a run (not the rank-local states, not temporary files); a legacy
    .pt file only where the method has no .safetensors checkpoint."""
    d = Path(out_dir) / "checkpoints"
    if not d.is_dir():
        return []
    new = [p for p in d.glob("*" + EXT) if not p.name.startswith(".") and not _RANK_FILE.search(p.name)]
    stems = {p.name[:-len(EXT)] for p in new}
    old = [p for p in d.glob("*" + LEGACY_EXT) if not p.name.startswith(".") and not _RANK_FILE.search(p.name)
           and p.name[:-len(LEGACY_EXT)] not in stems]
    return sorted(new + old)


_RANK_FILE = re.compile(r"\.rank\d+\.task\d+\.(pt|safetensors)$")


def rank_state_path(out_dir: os.PathLike, method: str, rank: int, task: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"{method_filename(method)}.rank{int(rank)}.task{int(task)}{EXT}"


def save_rank_state(out_dir: os.PathLike, method: str, rank: int, task: int, state: Dict[str, Any]) -> Path:
    return save_state(rank_state_path(out_dir, method, rank, task), state, kind=KIND)


def load_rank_state(out_dir: os.PathLike, method: str, rank: int, task: int, *,
                    allow_pickle: bool = False) -> Optional[Dict[str, Any]]:
    path = _existing(rank_state_path(out_dir, method, rank, task), allow_pickle)
    return None if path is None else read_checkpoint(path, allow_pickle=allow_pickle)


def drop_rank_state(out_dir: os.PathLike, method: str, rank: int, task: int) -> None:
    if task >= 0:
        path = rank_state_path(out_dir, method, rank, task)
        path.unlink(missing_ok=True)
        path.with_name(path.name[:-len(EXT)] + LEGACY_EXT).unlink(missing_ok=True)
