"""Pre-generated replay pools (generative distillation / generative replay): class-balanced DDIM samples
from a frozen previous model, generated in chunks that are each seeded on their own, so a pool is a
fixed function of (model, classes, per_class, schedule, num_steps, eta, batch_size, seed) and an
interrupted run resumes to the same samples.

On disk (`path`, a directory): meta.json (the settings, written first) and one chunk_<i>.pt per finished
chunk, each written to a temporary file and moved into place with os.replace, so a crash never leaves a
half-written chunk. A rerun with the same settings skips the chunks that exist; a rerun with other
settings, or with a model whose weights differ (model_fingerprint), raises ValueError instead of mixing pools.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .._validation import check_nonnegative
from ..diffusion import NoiseSchedule, as_schedule
from ..parallel import DataParallel, resolve
from ..sampling import _infer_shape, ddim_sample, null_class_of

_META = "meta.json"


def chunk_seed(seed: int, chunk: int) -> int:
    """Independent 63-bit seed for chunk `chunk` of a pool seeded by `seed` (numpy SeedSequence mixing)."""
    return int(np.random.SeedSequence([int(seed), int(chunk)]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha1 over the model's parameters and buffers (names, shapes, dtypes and bytes, read on the CPU), so
    a pool directory is never resumed with another model (e.g. the next task's teacher)."""
    h = hashlib.sha1()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _atomic_save(obj, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=str(target.parent), prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(obj, (bytes, bytearray)):
                f.write(obj)
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def generate_replay_pool(model: torch.nn.Module, classes: Sequence[int], per_class: int, *,
                         schedule: NoiseSchedule, num_steps: int = 50, batch_size: int = 256, seed: int = 0,
                         path: Optional[Union[str, os.PathLike]] = None, device=None, progress: bool = False,
                         eta: float = 0.0, shape: Optional[Sequence[int]] = None,
                         parallel: Optional[DataParallel] = None, guidance: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generate `per_class` DDIM samples for every class in `classes` -> (x [N, C, H, W], y [N]) on the CPU,
    N = len(classes) * per_class, ordered class by class as given.

    Generation runs on `device` (default: the model's device; the model is moved there if needed) in
    chunks of `batch_size` samples; chunk i uses a CPU generator seeded with chunk_seed(seed, i).
    `path`: a directory for resumable generation (module docstring). `shape`: (C, H, W) when the model
    has no config.in_channels / sample_size. progress: a tqdm bar over the chunks (quiet by default, as
    library code should be; the driver asks for it).
    parallel: a `cdgfast.parallel.DataParallel`; chunk i is then made (or read from `path`) by rank
    i % world_size and the chunks are gathered, so every process returns the one-process pool.
    eta, guidance: the sampler's (`cdgfast.sampling.ddim_sample`; guidance != 1 is classifier-free guidance).
    """
    par = resolve(parallel)
    schedule = as_schedule(schedule)  # a NoiseSchedule or a diffusers scheduler
    classes = [int(c) for c in classes]
    if not classes:
        raise ValueError("classes: expected at least one class")
    if not isinstance(per_class, int) or isinstance(per_class, bool) or per_class < 1:
        raise ValueError(f"per_class: expected a positive integer, got {per_class!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if shape is not None and len(shape) != 3:
        raise ValueError(f"shape: expected (C, H, W), got {tuple(shape)}")
    guidance = check_nonnegative("guidance", guidance)
    if guidance != 1.0 and null_class_of(model) is None:
        raise ValueError(f"guidance: classifier-free guidance (got {guidance}) needs a class-conditional model "
                         f"(config.num_class_embeds with the null class last)")
    if device is not None:
        device = torch.device(device)
        p = next(iter(model.parameters()), None)
        if p is not None and p.device != device:
            model.to(device)

    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(per_class)
    n = labels.numel()
    num_chunks = -(-n // batch_size)
    meta = {"classes": classes, "per_class": per_class, "num_steps": int(num_steps), "batch_size": batch_size,
            "seed": int(seed), "eta": float(eta), "num_timesteps": schedule.num_timesteps,
            "beta_start": schedule.beta_start, "beta_end": schedule.beta_end,
            **({} if guidance == 1.0 else {"guidance": guidance}),  # pools made before guidance existed keep their meta
            "shape": None if shape is None else [int(v) for v in shape]}
    if schedule != NoiseSchedule(schedule.num_timesteps, schedule.beta_start, schedule.beta_end):
        # another beta schedule or prediction type: recorded (pools of the linear eps default keep their meta)
        meta["schedule"] = {"prediction_type": schedule.prediction_type, "betas": schedule.betas.tolist()}

    out_dir = None
    if path is not None:
        out_dir = Path(path)
        out_dir.mkdir(parents=True, exist_ok=True)
        meta["model"] = model_fingerprint(model)
        meta_file = out_dir / _META
        if meta_file.exists():
            old = json.loads(meta_file.read_text())
            if old != meta:
                diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
                raise ValueError(f"path: {out_dir} holds a pool generated with other settings ({', '.join(diff)}); "
                                 f"use another path or delete it")
        else:
            _atomic_save(json.dumps(meta, indent=1).encode(), meta_file)

    xs, ys = [None] * num_chunks, [None] * num_chunks
    mine = range(par.rank, num_chunks, par.world_size)  # every chunk in one process
    todo = []
    for i in mine:
        f = out_dir / f"chunk_{i:06d}.pt" if out_dir is not None else None
        if f is not None and f.exists():
            saved = torch.load(f, map_location="cpu", weights_only=True)
            xs[i], ys[i] = saved["x"], saved["y"]
        else:
            todo.append(i)

    from tqdm.auto import tqdm
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="replay pool", unit="chunk",
               disable=not (progress and par.is_main))
    try:
        for i in todo:
            y = labels[i * batch_size:(i + 1) * batch_size]
            dev = next(iter(model.parameters())).device if device is None else device
            g = torch.Generator().manual_seed(chunk_seed(seed, i))
            shp = None if shape is None else (y.numel(), *shape)
            x = ddim_sample(model, y.to(dev), schedule=schedule, num_steps=num_steps, eta=eta, generator=g,
                            shape=shp, guidance=guidance).cpu()
            xs[i], ys[i] = x, y.clone()
            if out_dir is not None:
                _atomic_save({"x": x, "y": ys[i]}, out_dir / f"chunk_{i:06d}.pt")
            bar.update(1)
    finally:
        bar.close()
    if not par.enabled:
        return torch.cat(xs), torch.cat(ys)
    # the gather runs on the model's device (NCCL needs CUDA tensors); an empty share keeps the sample shape
    p = next(iter(model.parameters()))
    dev = p.device if device is None else device
    sample = tuple(shape) if shape is not None else _infer_shape(model, 0)[1:]
    local = torch.cat([xs[i] for i in mine]) if len(mine) else torch.zeros((0, *sample), dtype=p.dtype)
    return par.gather_round_robin(local.to(dev), n, batch_size), labels.clone()
