"""A small CNN classifier trained on the benchmark's own data set. It supplies
  * the features for "classifier-FID" (used when no Inception weights are given), and
  * the class predictions for the KLD between the true class distribution and the histogram of
    classes a generator produces.
It is a fixed ruler (see `get_classifier`): the same network for every --seed and every machine, shipped
inside the package for the embedded data sets, trained once with RULER_SEED and cached by the content
hash of the training split for any other.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class SmallCNN(nn.Module):
    """conv-GN-ReLU x3 with two poolings, global average pool -> `feature_dim` features -> linear head."""

    def __init__(self, in_channels: int, num_classes: int, feature_dim: int = 64, width: int = 32):
        super().__init__()
        if in_channels < 1 or num_classes < 1 or feature_dim < 1 or width < 1:
            raise ValueError(f"SmallCNN: expected positive sizes, got in_channels={in_channels}, "
                             f"num_classes={num_classes}, feature_dim={feature_dim}, width={width}")
        self.in_channels, self.num_classes, self.feature_dim, self.width = in_channels, num_classes, feature_dim, width

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.ReLU())

        self.body = nn.Sequential(block(in_channels, width), nn.MaxPool2d(2), block(width, 2 * width),
                                  nn.MaxPool2d(2), block(2 * width, 2 * width),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(2 * width, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def default_cache_dir() -> Path:
    return Path(os.environ.get("CDGFAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "cdgfast")))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    p = next(model.parameters())
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += int((model(x[i:i + batch_size].to(p.device)).argmax(1).cpu() == y[i:i + batch_size]).sum())
    return correct / max(1, x.shape[0])


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted class indices [N] (on CPU)."""
    model.eval()
    p = next(model.parameters())
    return torch.cat([model(x[i:i + batch_size].to(p.device, p.dtype)).argmax(1).cpu()
                      for i in range(0, x.shape[0], batch_size)])


def _translate(x: torch.Tensor, offsets: torch.Tensor, shift: int) -> torch.Tensor:
    """Image i moved by (offsets[i] - shift) pixels along (H, W), the uncovered border set to -1: crop
    [a, a + H) x [b, b + W) of x padded by `shift` with the background value."""
    H, W = x.shape[-2:]
    padded = F.pad(x, (shift, shift, shift, shift), value=-1.0)
    rows = offsets[:, 0, None] + torch.arange(H)  # [N, H]
    cols = offsets[:, 1, None] + torch.arange(W)  # [N, W]
    n = torch.arange(x.shape[0])[:, None, None]
    return padded.permute(0, 2, 3, 1)[n, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def train_classifier(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, epochs: int = 8,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0, feature_dim: int = 64,
                     width: int = 32, augmentation: str = "batch_roll", max_shift: Optional[int] = None,
                     device=None, progress: bool = True) -> SmallCNN:
    """Train a SmallCNN on images x [N, C, H, W] in [-1, 1] with labels y [N]; deterministic given seed.
    Light augmentation keeps the features from keying on exact pixel positions, which generated
    samples never match: "batch_roll" rolls each batch by one random shift of up to `max_shift`
    pixels (default: 1/8 of the side; the digits ruler's), "translate" moves every image by its own
    random shift of up to `max_shift` pixels, filling with the background -1 (the MNIST ruler's: at
    16 px a 2-pixel wrap-around roll is too coarse to reach 0.99)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x: expected images [N, C, H, W], got {getattr(x, 'shape', type(x))}")
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],):
        raise ValueError(f"y: expected labels [{x.shape[0]}], got {getattr(y, 'shape', type(y))}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"y: expected integer class labels, got {y.dtype}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"y: expected labels in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    if epochs < 1:
        raise ValueError(f"epochs: expected a positive integer, got {epochs}")
    if augmentation not in ("batch_roll", "translate"):
        raise ValueError(f"augmentation: expected 'batch_roll' or 'translate', got {augmentation!r}")
    if max_shift is not None and (not isinstance(max_shift, int) or isinstance(max_shift, bool) or max_shift < 0):
        raise ValueError(f"max_shift: expected a non-negative integer or None, got {max_shift!r}")
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = SmallCNN(x.shape[1], num_classes, feature_dim=feature_dim, width=width).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = x.shape[0]
    shift = max(1, x.shape[-1] // 8) if max_shift is None else max_shift
    steps = epochs * ((n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    bar = tqdm(total=steps, desc="classifier for FID", disable=not progress, leave=False)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            xb = x[idx]
            if augmentation == "batch_roll":
                dx, dy = torch.randint(-shift, shift + 1, (2,), generator=g).tolist()
                xb = torch.roll(xb, shifts=(dx, dy), dims=(2, 3))
            elif shift > 0:
                xb = _translate(xb, torch.randint(0, 2 * shift + 1, (xb.shape[0], 2), generator=g), shift)
            loss = F.cross_entropy(model(xb.to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    return model.eval()


# ------------------------------------------------------------------------------------------------ the ruler
# The classifier behind classifier-FID and the KLD is a fixed ruler per data set and resolution: it never
# depends on --seed or on the machine. For the embedded data (scikit-learn digits; the MNIST test-set
# fallback) its weights ship inside the package (cdgfast/data/assets/, trained by
# `python -m cdgfast.train.ruler`); for any other data it is trained once on the training split
# with RULER_SEED and cached under the content hash of that split.
RULER_SEED = 0
ASSETS_DIR = Path(__file__).resolve().parents[1] / "data" / "assets"


def data_sha256(x: torch.Tensor, y: Optional[torch.Tensor] = None) -> str:
    """sha256 of images x (float32, contiguous, with their shape) and labels y (int64): the identity of a split."""
    h = hashlib.sha256()
    x = x.detach().to(torch.float32).contiguous().cpu()
    h.update(repr(tuple(x.shape)).encode())
    h.update(x.numpy().tobytes())
    if y is not None:
        h.update(y.detach().to(torch.int64).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def network_sha256(model: nn.Module) -> str:
    """sha256 over a network's state dict (names, dtypes, shapes, float32 values in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.to(torch.float32).numpy().tobytes() if t.is_floating_point() else t.numpy().tobytes())
    return h.hexdigest()


def ruler_stem(dataset_key: str, image_size: int, channels: int, num_classes: int) -> str:
    """File stem of a data set's ruler: data set, resolution, channels and classes (never the seed)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in dataset_key)
    return f"ruler-{safe}-{int(image_size)}px-c{int(channels)}-k{int(num_classes)}"


def classifier_cache_key(dataset_key: str, x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int) -> str:
    """Cache file stem of a classifier trained here: the ruler stem, the training size and epochs, and the
    sha256 of the whole training split (so a changed data set never reuses a stale net). No seed:
    every run, whatever its --seed, gets the same network (trained with RULER_SEED)."""
    return (f"{ruler_stem(dataset_key, x.shape[-1], x.shape[1], num_classes)}-n{x.shape[0]}-e{int(epochs)}"
            f"-{data_sha256(x, y)[:16]}")


def save_ruler(model: SmallCNN, path: os.PathLike, metadata: dict) -> None:
    """Write a SmallCNN as safetensors (float32) with its architecture and `metadata` (str values) in the
    header; atomically (temp + os.replace)."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"in_channels": str(model.in_channels), "num_classes": str(model.num_classes),
            "feature_dim": str(model.feature_dim), "width": str(model.width),
            **{k: str(v) for k, v in metadata.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous().float() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_ruler(path: os.PathLike) -> Tuple[SmallCNN, dict]:
    """(model, header metadata) from a safetensors file written by `save_ruler`; ValueError when it is not one."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
        model = SmallCNN(int(meta["in_channels"]), int(meta["num_classes"]), feature_dim=int(meta["feature_dim"]),
                         width=int(meta["width"]))
        model.load_state_dict(state)
    except Exception as exc:
        raise ValueError(f"classifier weights: {path} is not a cdgfast classifier file "
                         f"({type(exc).__name__}: {exc})") from exc
    return model.eval(), meta


def shipped_ruler_path(dataset_key: str, image_size: int, channels: int, num_classes: int) -> Optional[Path]:
    """The packaged weights for this data set and resolution, or None when none ship."""
    p = ASSETS_DIR / (ruler_stem(dataset_key, image_size, channels, num_classes) + ".safetensors")
    return p if p.is_file() else None


def get_classifier(dataset_key: str, x: torch.Tensor, y: torch.Tensor, num_classes: int, *, epochs: int = 8,
                   cache_dir: Optional[os.PathLike] = None, device=None, progress: bool = True,
                   log=None) -> Tuple[SmallCNN, dict]:
    """The fixed ruler of a data set: the shipped classifier when one ships for (data set, resolution,
    channels, classes) and was trained on exactly this training split (its recorded sha256); else the
    one cached for this training split's content hash; else trained once here with RULER_SEED and cached
    (atomically). `--seed` plays no part. Returns (model, info): info has "source" ("shipped" /
    "cached" / "trained"), "path", "sha256" (network_sha256) and "train_split_sha256"."""
    train_sha = data_sha256(x, y)
    shipped = shipped_ruler_path(dataset_key, x.shape[-1], x.shape[1], num_classes)
    if shipped is not None:
        model, meta = load_ruler(shipped)
        if meta.get("train_split_sha256") == train_sha:
            if log:
                log(f"classifier for FID: the shipped ruler {shipped.name}")
            return model.to(device or "cpu").eval(), {"source": "shipped", "path": str(shipped),
                                                      "sha256": network_sha256(model), "train_split_sha256": train_sha}
        if log:
            log(f"classifier for FID: the shipped {shipped.name} was trained on another split of {dataset_key} "
                f"(sha256 {meta.get('train_split_sha256', '?')[:12]}, this run's {train_sha[:12]}); using one trained "
                f"on this split instead")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / (classifier_cache_key(dataset_key, x, y, num_classes, epochs) + ".safetensors")
    if path.is_file():
        try:
            model, _ = load_ruler(path)
            if log:
                log(f"classifier for FID: loaded {path}")
            return model.to(device or "cpu").eval(), {"source": "cached", "path": str(path),
                                                      "sha256": network_sha256(model), "train_split_sha256": train_sha}
        except ValueError as exc:  # a corrupt cache entry is retrained, not fatal
            if log:
                log(f"classifier cache {path} unreadable ({exc}); retraining")
    model = train_classifier(x, y, num_classes, epochs=epochs, seed=RULER_SEED, device=device, progress=progress)
    save_ruler(model, path, {"dataset": dataset_key, "train_split_sha256": train_sha, "epochs": epochs,
                             "seed": RULER_SEED})
    if log:
        log(f"classifier for FID: trained (seed {RULER_SEED}) and cached at {path}")
    return model, {"source": "trained", "path": str(path), "sha256": network_sha256(model),
                   "train_split_sha256": train_sha}
