"""A small CNN classifier trained on the benchmark's own data set. It supplies
  * the features for "classifier-FID" (used when no Inception weights are given), and
  * the class predictions for the KLD between the true class distribution and the histogram of
    classes a generator produces.
Trained classifiers are cached on disk, keyed by data set, resolution, channels, classes, training
set size, epochs and seed, so every method (and a resumed run) is measured with the same network.
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
        self.in_channels, self.num_classes, self.feature_dim = in_channels, num_classes, feature_dim

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


def classifier_cache_key(dataset_key: str, x: torch.Tensor, num_classes: int, epochs: int, seed: int) -> str:
    """File stem identifying a classifier: data set, resolution, channels, classes, size, epochs, seed,
    plus a short content hash of the training images so a changed data set never reuses a stale net."""
    h = hashlib.sha1()
    h.update(x[:: max(1, x.shape[0] // 64)].contiguous().numpy().tobytes())
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in dataset_key)
    return (f"classifier-{safe}-{x.shape[-1]}px-c{x.shape[1]}-k{num_classes}-n{x.shape[0]}-e{epochs}"
            f"-seed{seed}-{h.hexdigest()[:8]}")


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


def train_classifier(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, epochs: int = 8,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0, feature_dim: int = 64,
                     device=None, progress: bool = True) -> SmallCNN:
    """Train a SmallCNN on images x [N, C, H, W] in [-1, 1] with labels y [N]; deterministic given seed.
    Light augmentation (random shifts of up to 1/8 of the side) keeps the features from keying on
    exact pixel positions, which generated samples never match."""
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
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = SmallCNN(x.shape[1], num_classes, feature_dim=feature_dim).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = x.shape[0]
    shift = max(1, x.shape[-1] // 8)
    steps = epochs * ((n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    bar = tqdm(total=steps, desc="classifier for FID", disable=not progress, leave=False)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            xb = x[idx]
            dx, dy = torch.randint(-shift, shift + 1, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=(dx, dy), dims=(2, 3))
            loss = F.cross_entropy(model(xb.to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    return model.eval()


def get_classifier(dataset_key: str, x: torch.Tensor, y: torch.Tensor, num_classes: int, *, seed: int = 0,
                   epochs: int = 8, cache_dir: Optional[os.PathLike] = None, device=None,
                   progress: bool = True, log=None) -> Tuple[SmallCNN, str]:
    """Load the cached classifier for (data set, resolution, ..., seed) or train and cache it.
    Returns (model, cache file path). The cache file is written atomically (temp + os.replace)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / (classifier_cache_key(dataset_key, x, num_classes, epochs, seed) + ".pt")
    model = SmallCNN(x.shape[1], num_classes)
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            if log:
                log(f"classifier for FID: loaded {path}")
            return model.to(device or "cpu").eval(), str(path)
        except Exception as exc:  # a corrupt cache entry is retrained, not fatal
            if log:
                log(f"classifier cache {path} unreadable ({exc}); retraining")
    model = train_classifier(x, y, num_classes, epochs=epochs, seed=seed, device=device, progress=progress)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    if log:
        log(f"classifier for FID: trained and cached at {path}")
    return model, str(path)
