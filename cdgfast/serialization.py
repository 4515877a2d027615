"""State files without pickle: nested Python state (dicts, lists, tuples, numbers, strings, None, tensors)
as safetensors for the tensors plus JSON for everything else.

`flatten_state(obj)` splits a state into ({name: tensor}, skeleton): the skeleton is the same structure,
JSON-serialisable, with every tensor replaced by {"__tensor__": name}; `unflatten_state` puts them back
together. The names are the tensor's path in the structure ("model.conv_in.weight",
"method_state.generator"), so a safetensors viewer shows what each tensor is. Besides JSON's own
types the skeleton records tuples ({"__tuple__": [...]}), dicts whose keys are not all strings
(optimizer states: {"__items__": [[key, value], ...]}), numpy arrays (stored as tensors), torch dtypes
and devices. Any other object is a ValueError naming its path at save time, so what is saved is
exactly what is loaded, and loading runs no code (safetensors and json parse data only).

`save_state(path, obj)` writes one .safetensors file whose header metadata holds the skeleton (key
`cdgfast.state`) and `kind` (what the file is); written to a temporary file in the same directory,
fsynced and moved over the old one with os.replace, so a crash leaves the previous file or the new
one. `load_state(path)` reads it back (`UnreadableState` when the file cannot be parsed or is not one of
ours). A directory form (`save_state_dir` / `load_state_dir`: `state.safetensors` + `state.json`) is
what `Method.save` writes for users who ship a method's state.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

META_KEY = "cdgfast.state"
FORMAT = 1


class UnreadableState(Exception):
    """`path` cannot be read as a cdgfast state file; `reason` says why."""

    def __init__(self, path: os.PathLike, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path} cannot be read ({reason})")


def _name(path: str, used: Dict[str, torch.Tensor]) -> str:
    name = path or "tensor"
    i = 1
    while name in used:  # "a.b" under "x" and "b" under "x.a" would otherwise collide
        name = f"{path}#{i}"
        i += 1
    return name


def flatten_state(obj: Any) -> Tuple[Dict[str, torch.Tensor], Any]:
    """({name: tensor (CPU, contiguous, one storage each)}, JSON-serialisable skeleton) (module docstring)."""
    import numpy as np

    tensors: Dict[str, torch.Tensor] = {}
    storages = set()

    def tensor(t: torch.Tensor, path: str):
        t = t.detach().cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        if t.numel():
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            # safetensors refuses tensors sharing a storage (views of one another): give each its own copy
            if key in storages or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()
            storages.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        name = _name(path, tensors)
        tensors[name] = t
        return name

    def enc(v: Any, path: str):
        if isinstance(v, torch.Tensor):
            return {"__tensor__": tensor(v, path)}
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            return float(v)
        if isinstance(v, np.ndarray):
            return {"__ndarray__": tensor(torch.from_numpy(np.ascontiguousarray(v)), path)}
        if isinstance(v, np.generic):
            return enc(v.item(), path)
        if isinstance(v, torch.dtype):
            return {"__dtype__": str(v).replace("torch.", "")}
        if isinstance(v, torch.device):
            return {"__device__": str(v)}
        if isinstance(v, tuple):  # torch.Size included
            return {"__tuple__": [enc(x, f"{path}.{i}") for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [enc(x, f"{path}.{i}") for i, x in enumerate(v)]
        if isinstance(v, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in v):
                return {k: enc(x, f"{path}.{k}" if path else k) for k, x in v.items()}
            return {"__items__": [[enc(k, f"{path}.key{i}"), enc(x, f"{path}.{k}")] for i, (k, x) in enumerate(v.items())]}
        raise ValueError(f"state: {path or 'the state'} is a {type(v).__module__}.{type(v).__qualname__}, which "
                         f"cannot be saved without pickle (expected tensors, numbers, strings, None, and "
                         f"lists / tuples / dicts of them)")

    skeleton = enc(obj, "")
    return tensors, skeleton


def unflatten_state(tensors: Dict[str, torch.Tensor], skeleton: Any) -> Any:
    """The inverse of flatten_state; a skeleton naming a tensor that is not there is a ValueError."""

    def tensor(name):
        if name not in tensors:
            raise ValueError(f"state: the skeleton names a tensor {name!r} that the file does not hold")
        return tensors[name]

    def dec(v):
        if isinstance(v, list):
            return [dec(x) for x in v]
        if not isinstance(v, dict):
            return v
        if "__tensor__" in v:
            return tensor(v["__tensor__"])
        if "__ndarray__" in v:
            return tensor(v["__ndarray__"]).numpy()
        if "__tuple__" in v:
            return tuple(dec(x) for x in v["__tuple__"])
        if "__items__" in v:
            return {_hashable(dec(k)): dec(x) for k, x in v["__items__"]}
        if "__dtype__" in v:
            dt = getattr(torch, v["__dtype__"], None)
            if not isinstance(dt, torch.dtype):
                raise ValueError(f"state: unknown dtype {v['__dtype__']!r}")
            return dt
        if "__device__" in v:
            return torch.device(v["__device__"])
        return {k: dec(x) for k, x in v.items()}

    return dec(skeleton)


def _hashable(k):
    return tuple(_hashable(x) for x in k) if isinstance(k, (list, tuple)) else k


def _own(t: torch.Tensor) -> torch.Tensor:
    """A copy in a fresh allocation: a tensor read from a safetensors file may start at any byte offset,
    and CPU kernels that vectorise by alignment then sum in another order (rank-1 penalties differed in
    the 5th digit), so a resumed run would not reproduce an uninterrupted one."""
    return t.clone(memory_format=torch.contiguous_format)


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_state(path: os.PathLike, obj: Any, *, kind: str = "state") -> Path:
    """Write `obj` to one .safetensors file at `path` atomically (module docstring); returns the path."""
    from safetensors.torch import save

    tensors, skeleton = flatten_state(obj)
    meta = {META_KEY: json.dumps(skeleton), "kind": str(kind), "format": str(FORMAT)}
    data = save(tensors, metadata=meta)
    path = Path(path)
    _atomic(path, lambda f: f.write(data))
    return path


def read_metadata(path: os.PathLike) -> Dict[str, str]:
    """The safetensors header metadata of `path` (no tensor is read), or UnreadableState."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # a truncated or foreign file: say so, never a raw traceback
        raise UnreadableState(path, f"{type(exc).__name__}: {str(exc)[:200]}") from None


def load_state(path: os.PathLike, *, kind: Optional[str] = None, device="cpu") -> Any:
    """The state saved by save_state at `path` (tensors on `device`). `kind`: the kind it must have.
    Raises UnreadableState for a file that is not a readable cdgfast state file."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = dict(f.metadata() or {})
            tensors = {k: _own(f.get_tensor(k)) for k in f.keys()}
    except Exception as exc:  # a truncated or foreign file
        raise UnreadableState(path, f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if META_KEY not in meta:
        raise UnreadableState(path, "a safetensors file without cdgfast's state metadata (plain weights?)")
    if kind is not None and meta.get("kind") != kind:
        raise UnreadableState(path, f"expected a {kind!r} file, it is a {meta.get('kind')!r} one")
    try:
        return unflatten_state(tensors, json.loads(meta[META_KEY]))
    except (ValueError, TypeError) as exc:
        raise UnreadableState(path, str(exc)[:200]) from None


STATE_FILE, JSON_FILE = "state.safetensors", "state.json"


def save_state_dir(directory: os.PathLike, obj: Any, info: Optional[Dict[str, Any]] = None) -> Path:
    """`directory`/state.safetensors (the tensors) + `directory`/state.json ({"format", "info", "state":
    skeleton}): the safetensors-plus-JSON form of a state. `info`: JSON values stored next to it."""
    from safetensors.torch import save

    tensors, skeleton = flatten_state(obj)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    data = save(tensors, metadata={"format": str(FORMAT)})
    _atomic(d / STATE_FILE, lambda f: f.write(data))
    text = json.dumps({"format": FORMAT, "info": info or {}, "state": skeleton}, indent=1)
    _atomic(d / JSON_FILE, lambda f: f.write(text.encode()))
    return d


def load_state_dir(directory: os.PathLike, device="cpu") -> Tuple[Any, Dict[str, Any]]:
    """(state, info) saved by save_state_dir, or UnreadableState naming the file."""
    from safetensors.torch import load_file

    d = Path(directory)
    try:
        doc = json.loads((d / JSON_FILE).read_text())
        skeleton, info = doc["state"], doc.get("info", {})
    except Exception as exc:
        raise UnreadableState(d / JSON_FILE, f"{type(exc).__name__}: {str(exc)[:200]}") from None
    try:
        tensors = {k: _own(v) for k, v in load_file(str(d / STATE_FILE), device=str(device)).items()}
    except Exception as exc:
        raise UnreadableState(d / STATE_FILE, f"{type(exc).__name__}: {str(exc)[:200]}") from None
    try:
        return unflatten_state(tensors, skeleton), info
    except (ValueError, TypeError) as exc:
        raise UnreadableState(d, str(exc)[:200]) from None


__all__ = ["flatten_state", "unflatten_state", "save_state", "load_state", "read_metadata", "save_state_dir",
           "load_state_dir", "UnreadableState"]
