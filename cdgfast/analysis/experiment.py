"""The rank-1 paper's section 3.2 experiment on any cdgfast data set: train (or load) a small
class-conditional UNet, then at each fixed timestep t draw n data points with fresh noise and measure
Fig. 1 (scaled-prediction MSE), Fig. 2 (|cos(g_i, mu_t)|), Fig. 3a (cos(mu_t, mu_s)), Fig. 3b-d
(top eigenvalues, lambda_2 / lambda_1, rank-1 vs diagonal relative Frobenius error).

Differences from the paper (appendix D: UNet with 16-channel blocks, MNIST, 200 epochs, Adam 2e-4,
n = 1024): the model is a cdgfast preset ("tiny" by default), the data set and the number of training
steps are the caller's, and the default learning rate is 1e-3 so that a CPU-minutes run gets near
convergence (the paper's argument assumes a converged model).
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional, Sequence

import torch

from ..diffusion import DiffusionLoss, NoiseSchedule, as_schedule
from .geometry import fisher_geometry, scaled_prediction_mse

CHECKPOINT_NAME = "model.safetensors"
LEGACY_CHECKPOINT_NAME = "model.pt"  # written by earlier versions (pickle)
RESULT_NAME = "geometry.json"
# What an analysis writes (plots.plot_all's figures too): a folder holding one of these holds an analysis.
FIGURE_NAMES = ("fig1_mse.png", "fig2_cosine.png", "fig3a_mean_grad_cosine.png", "fig3b_eigenvalues.png",
                "fig3c_eig_ratio.png", "fig3d_rel_frobenius.png")
OUTPUT_NAMES = (RESULT_NAME, CHECKPOINT_NAME, LEGACY_CHECKPOINT_NAME) + FIGURE_NAMES


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def resolve_device(device) -> torch.device:
    """"cpu", "cuda" or "cuda:N" as a torch.device that exists on this machine, else ValueError."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested but CUDA is not available here "
                             f"(torch.cuda.is_available() is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r} requested but this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return dev


def check_out_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse an output folder the analysis would damage: a file; a previous analysis (unless
    `overwrite`); a non-empty folder holding something else (unless `overwrite`). Removes nothing."""
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir):
        raise ValueError(f"out_dir: expected a folder path, got {out_dir!r}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out: {out_dir} exists and is not a folder; choose a new or empty folder")
    entries = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if not entries or overwrite:
        return
    if RESULT_NAME in entries:
        raise ValueError(f"out: {out_dir} already holds a Fisher analysis ({RESULT_NAME}); pass --overwrite to "
                         f"replace it, or choose another --out")
    shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
    raise ValueError(f"out: {out_dir} is not empty and holds no Fisher analysis (it has {shown}); choose a new "
                     f"or empty folder, or pass --overwrite to write into it (files named like the analysis "
                     f"outputs, {', '.join(OUTPUT_NAMES)}, are replaced)")


def clear_previous_analysis(out_dir: str, keep: Optional[str] = None) -> None:
    """--overwrite: remove the files a previous analysis wrote in `out_dir` (so no stale figure stays
    beside the new geometry.json), except `keep` (the checkpoint being analysed)."""
    if not os.path.isdir(out_dir):
        return
    keep_path = os.path.realpath(keep) if keep else None
    for e in OUTPUT_NAMES:
        path = os.path.join(out_dir, e)
        if os.path.isfile(path) and os.path.realpath(path) != keep_path:
            os.unlink(path)


def validate_timesteps(timesteps: Sequence[int], num_timesteps: int) -> List[int]:
    ts = list(timesteps)
    if not ts:
        raise ValueError("timesteps: expected at least one timestep")
    for t in ts:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < num_timesteps:
            raise ValueError(f"timesteps: expected integers in [0, {num_timesteps}), got {t!r}")
    if len(set(ts)) != len(ts):
        raise ValueError(f"timesteps: expected distinct values, got {ts}")
    return ts


def train_model(data, *, preset: str = "tiny", steps: int = 2000, batch_size: int = 128, lr: float = 1e-3,
                schedule: Optional[NoiseSchedule] = None, seed: int = 0, device="cpu", progress: bool = True):
    """Train a class-conditional UNet (cdgfast.models.build_unet) on an ImageDataset with the SPEC loss
    (uniform t, fresh eps, Adam). Returns (model, list of (step, loss))."""
    from tqdm.auto import tqdm

    from ..models import build_unet

    schedule = NoiseSchedule() if schedule is None else as_schedule(schedule)
    torch.manual_seed(seed)
    model = build_unet(preset, num_classes=data.num_classes, in_channels=data.channels,
                       sample_size=data.image_size).to(device)
    loss_fn = DiffusionLoss(schedule)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = data.x, data.y
    history = []
    model.train()
    bar = tqdm(range(steps), desc="train", disable=not progress)
    running = None
    for step in bar:
        idx = torch.randint(0, len(data), (batch_size,), generator=gen)
        batch = {"x": x_all[idx].to(device), "y": y_all[idx].to(device),
                 "t": torch.randint(0, schedule.num_timesteps, (batch_size,), generator=gen).to(device),
                 "eps": torch.randn((batch_size, *x_all.shape[1:]), generator=gen).to(device)}
        loss = loss_fn(model, batch).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.detach().item()
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 50 == 0 or step == steps - 1:
            history.append((step, value))
            bar.set_postfix(loss=f"{running:.4f}")
    model.eval()
    return model, history


ANALYSIS_KIND = "cdgfast.analysis.checkpoint"
PICKLE_REASON = ("a pickle file (torch.save); unpickling can run any code the file contains, so it is loaded only "
                 "with --allow-pickle (allow_pickle=True), for files you made yourself. Prefer a .safetensors "
                 "file or a diffusers model folder")


def save_checkpoint(path: str, model, *, preset: str, data, extra: Optional[dict] = None) -> None:
    """The analysed model as `path` (.safetensors: the weights, and the UNet config as JSON metadata)."""
    from ..serialization import save_state

    save_state(path, {"model": model.state_dict(), "preset": preset, "num_classes": data.num_classes,
                      "in_channels": data.channels, "sample_size": data.image_size, "dataset": data.name,
                      **(extra or {})}, kind=ANALYSIS_KIND)


def _read_model_file(path: str, allow_pickle: bool):
    """The object a --checkpoint file holds: a .safetensors file is parsed without running code (a
    cdgfast state file, or plain weights); anything else is a pickle, read only with allow_pickle."""
    from safetensors import SafetensorError  # noqa: F401  (the error type the readers below raise)

    from ..serialization import UnreadableState, load_state, read_metadata

    def unreadable(reason):
        return ValueError(f"checkpoint: {path} cannot be read ({reason}); pass another --checkpoint, or none to "
                          f"train a model")

    if path.endswith(".safetensors"):
        try:
            meta = read_metadata(path)
            if "cdgfast.state" in meta:
                return load_state(path)
            from safetensors.torch import load_file

            return load_file(path)
        except UnreadableState as exc:
            raise unreadable(exc.reason) from None
        except Exception as exc:  # a damaged file
            raise unreadable(f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if not allow_pickle:
        raise unreadable(PICKLE_REASON)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated zip, bad pickle, EOF: the file cannot be used, say which one
        raise unreadable(f"{type(exc).__name__}: {str(exc)[:200]}; it is truncated or not a PyTorch "
                         f"checkpoint") from None


def _diffusers_folder(path: str, data, device):
    """A diffusers model folder (config.json + diffusion_pytorch_model.safetensors), safetensors only."""
    from diffusers import UNet2DModel

    try:
        model = UNet2DModel.from_pretrained(path, use_safetensors=True)
    except Exception as exc:  # no config, no safetensors weights, another model class
        raise ValueError(f"checkpoint: {path} is not a diffusers UNet2DModel folder with safetensors weights "
                         f"({type(exc).__name__}: {str(exc)[:200]})") from None
    cfg = model.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)[0]
    if cfg.in_channels != data.channels or size != data.image_size:
        raise ValueError(f"checkpoint: the model in {path} takes {cfg.in_channels} channels at {size}px, the data "
                         f"set has {data.channels} channels at {data.image_size}px")
    return model.to(device).eval()


def load_checkpoint(path: str, data, *, preset: str = "tiny", device="cpu", allow_pickle: bool = False):
    """Load a model to analyse. Accepted: a diffusers UNet2DModel folder (safetensors weights); a
    .safetensors file: one written by `save_checkpoint` (weights and the UNet config), a
    `python -m cdgfast.train` checkpoint (for LoRA methods the adapter is added again from the saved
    method config before the weights load), or plain weights of a `build_unet(preset)` model sized for
    `data`. Pickle files (.pt: the same contents, a pickled nn.Module, a plain state dict) only with
    `allow_pickle` (module constant PICKLE_REASON says why)."""
    from ..models import UNET_PRESETS, build_unet

    if os.path.isdir(path):
        return _diffusers_folder(path, data, device)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint: expected an existing file or a diffusers model folder, got {path!r}")
    state = _read_model_file(path, allow_pickle)
    if isinstance(state, torch.nn.Module):
        return state.to(device).eval()
    if isinstance(state, dict) and isinstance(state.get("model_object"), torch.nn.Module):
        return state["model_object"].to(device).eval()
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint: expected a state dict or a dict with 'model', got {type(state).__name__}")
    stored = state.get("preset")
    cfg = dict(preset=stored if isinstance(stored, str) and stored in UNET_PRESETS else preset,
               num_classes=state.get("num_classes", data.num_classes),
               in_channels=state.get("in_channels", data.channels),
               sample_size=state.get("sample_size", data.image_size))
    weights = state["model"] if "model" in state else state
    if cfg["num_classes"] != data.num_classes or cfg["in_channels"] != data.channels \
            or cfg["sample_size"] != data.image_size:
        raise ValueError(f"checkpoint: model config {cfg} does not match the data set "
                         f"({data.num_classes} classes, {data.channels} channels, {data.image_size}px)")
    model = build_unet(cfg.pop("preset"), **cfg)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as exc:
        if not _restore_method_structure(model, state):
            raise ValueError(f"checkpoint: weights do not fit build_unet({preset!r}) for this data set "
                             f"(pass the right --preset): {str(exc)[:300]}") from None
        try:
            model.load_state_dict(weights)
        except (RuntimeError, TypeError, AttributeError) as exc2:
            raise ValueError(f"checkpoint: weights do not fit build_unet({preset!r}) with the adapters of "
                             f"{state.get('method')!r}: {str(exc2)[:300]}") from None
    return model.to(device).eval()


def _restore_method_structure(model, state) -> bool:
    """For a cdgfast.train checkpoint of a method that changes the model (LoRA): add its structure to
    `model` from the saved method name and config. False when the state names no such method."""
    name, config = state.get("method"), state.get("method_config")
    if not isinstance(name, str) or not isinstance(config, dict) or "completed_task" not in state:
        return False
    from .. import methods

    if name not in methods.available():  # a driver-only name ("joint"): plain training, no structure
        return False
    methods.create(name, **config).restore_model_structure(model)
    return True


def run_fisher_analysis(*, dataset: str = "digits", timesteps: Sequence[int] = tuple(range(100, 1000, 100)),
                        samples: int = 1024, out_dir: str, checkpoint: Optional[str] = None,
                        train_steps: int = 2000, batch_size: int = 128, lr: float = 1e-3,
                        preset: str = "tiny", data_root: Optional[str] = None, device="cpu", seed: int = 0,
                        top_k: int = 5, chunk_params: Optional[int] = None, micro_batch: int = 64,
                        figures: bool = True, progress: bool = True, overwrite: bool = False,
                        allow_pickle: bool = False) -> Dict:
    """Run the section 3.2 measurements and write `out_dir`/geometry.json and the figures.

    If `checkpoint` is None a model is trained for `train_steps` steps and saved to
    `out_dir`/model.safetensors; otherwise the checkpoint (a file or a diffusers model folder,
    `load_checkpoint`) is loaded. For each t, `samples` data points are drawn
    (without replacement when the data set is large enough), with the timestep fixed to t and fresh eps.
    Every argument is checked, the data and the checkpoint loaded, before anything is written; an
    `out_dir` holding a previous analysis, or other files, is refused unless `overwrite`.
    """
    from tqdm.auto import tqdm

    from ..data import DATASETS, load_dataset
    from ..models import UNET_PRESETS

    if dataset not in DATASETS:
        raise ValueError(f"dataset: expected one of {list(DATASETS)}, got {dataset!r}")
    schedule = NoiseSchedule()
    ts = validate_timesteps(timesteps, schedule.num_timesteps)
    _check_int("samples", samples, 2)
    _check_int("train_steps", train_steps, 0)
    _check_int("batch_size", batch_size, 1)
    _check_int("top_k", top_k, 1)
    _check_int("micro_batch", micro_batch, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an integer, got {seed!r}")
    if chunk_params is not None:
        _check_int("chunk_params", chunk_params, 1)
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and 0 < lr < float("inf")):
        raise ValueError(f"lr: expected a positive number, got {lr!r}")
    if preset not in UNET_PRESETS:
        raise ValueError(f"preset: expected one of {list(UNET_PRESETS)}, got {preset!r}")
    device = resolve_device(device)
    if data_root is not None and not os.path.isdir(data_root):
        what = "is not a folder" if os.path.exists(data_root) else "does not exist"
        raise ValueError(f"data_root: {data_root} {what}; pass the folder that holds the {dataset} files")
    if checkpoint is not None and not os.path.exists(checkpoint):
        raise ValueError(f"checkpoint: expected an existing file or a diffusers model folder, got {checkpoint!r}")
    check_out_dir(out_dir, overwrite)
    try:
        data = load_dataset(dataset, data_root, progress=progress)
    except FileNotFoundError as exc:
        raise ValueError(f"dataset: {exc}") from None
    t0 = time.time()
    history = []
    model = None if checkpoint is None else load_checkpoint(checkpoint, data, preset=preset, device=device,
                                                            allow_pickle=allow_pickle)
    if overwrite:  # only now: an analysis refused on its inputs removes nothing
        clear_previous_analysis(out_dir, keep=checkpoint)
    os.makedirs(out_dir, exist_ok=True)
    if checkpoint is None:
        model, history = train_model(data, preset=preset, steps=train_steps, batch_size=batch_size, lr=lr,
                                     schedule=schedule, seed=seed, device=device, progress=progress)
        checkpoint_path = os.path.join(out_dir, CHECKPOINT_NAME)
        save_checkpoint(checkpoint_path, model, preset=preset, data=data,
                        extra={"train_steps": train_steps, "lr": lr, "batch_size": batch_size, "seed": seed})
    else:
        checkpoint_path = checkpoint
    train_seconds = time.time() - t0

    loss_fn = DiffusionLoss(schedule)
    gen = torch.Generator().manual_seed(seed + 1)
    per_t, mean_grads = [], []
    t1 = time.time()
    for t in tqdm(ts, desc="timesteps", disable=not progress):
        if samples <= len(data):
            idx = torch.randperm(len(data), generator=gen)[:samples]
        else:
            idx = torch.randint(0, len(data), (samples,), generator=gen)
        batch = {"x": data.x[idx].to(device), "y": data.y[idx].to(device),
                 "t": torch.full((samples,), t, dtype=torch.long, device=device),
                 "eps": torch.randn((samples, *data.x.shape[1:]), generator=gen).to(device)}
        mse = scaled_prediction_mse(model, batch, schedule)
        with torch.no_grad():
            loss_mean = float(loss_fn(model, batch).mean())
        geo = fisher_geometry(model, loss_fn, batch, top_k=top_k, chunk_params=chunk_params,
                              micro_batch=micro_batch, return_diagonal=False, progress=progress)
        mean_grads.append(geo.mean_grad.cpu())
        row = {"t": t, "abar": float(schedule.alphas_cumprod[t]),
               "scaled_prediction_mse": {"mean": float(mse.mean()), "std": float(mse.std()),
                                         "median": float(mse.median())},
               "loss_mean": loss_mean, **geo.summary(), "cosine": [round(float(c), 6) for c in geo.cosine]}
        per_t.append(row)

    # Fig. 3a: cos(mu_t, mu_s), from the float64 mean gradients.
    M = torch.stack(mean_grads)
    norms = M.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    U = M / norms
    cos_mat = (U @ U.T).clamp(-1, 1)
    result = {
        "config": {"dataset": dataset, "timesteps": ts, "samples": samples, "checkpoint": checkpoint_path,
                   "trained": checkpoint is None, "train_steps": train_steps if checkpoint is None else None,
                   "batch_size": batch_size, "lr": lr, "preset": preset, "seed": seed, "device": str(device),
                   "top_k": top_k, "chunk_params": chunk_params, "micro_batch": micro_batch,
                   "num_params": per_t[0]["num_params"], "num_timesteps": schedule.num_timesteps,
                   "train_seconds": round(train_seconds, 1), "analysis_seconds": round(time.time() - t1, 1)},
        "train_loss": history,
        "timesteps": per_t,
        "mean_grad_cosine": cos_mat.tolist(),
        "notes": ("eigenvalues: top-k of F_t = mean_i g_i g_i^T (from the n x n Gram matrix); "
                  "rank1_rel_err uses c* mu mu^T with c* = mean_i (mu.g_i)^2/||mu||^4; "
                  "best_rank1_rel_err is the Eckart-Young optimum; scaled_prediction_mse is "
                  "mean_pixels (x_t - sqrt(1-abar_t) eps_hat)^2."),
    }
    tmp = os.path.join(out_dir, f".{RESULT_NAME}.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, RESULT_NAME))
    if figures:
        from .plots import plot_all
        result["figures"] = plot_all(result, out_dir)
    return result
