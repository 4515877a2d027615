"""Train the classifiers that ship inside the package as the fixed FID / KLD ruler of the embedded data.

    python -m cdgfast.train.ruler                 # every embedded data set found on this machine
    python -m cdgfast.train.ruler --dataset digits

For each embedded data set (`RULERS`: scikit-learn digits, the MNIST test-set fallback) at the cpu-scale resolution, it loads the
data exactly as `cdgfast.train` does (the same fixed train / evaluation split, independent of --seed), trains a SmallCNN with
`cdgfast.metrics.classifier.RULER_SEED` in one thread (deterministic on CPU: the same bytes for the same
torch version), measures its accuracy on the evaluation split and writes
`cdgfast/data/assets/<ruler stem>.safetensors` with, in its header, the sha256 of the training and
evaluation splits, that accuracy, and the training settings. A run uses the shipped file only when
the training split's sha256 matches (`get_classifier`); otherwise it trains its own.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List, Optional

import torch

# data set -> (loader name for load_benchmark_data, image size, training settings, accuracy it must reach).
# MNIST (the test-set fallback, trained on its 8,000-image train part at 16x16): the digits settings
# (one 2-pixel wrap-around roll per batch) reach 0.9895 (40 epochs, width 32); a 1-pixel translation of
# each image on its own reaches the 0.99 a shipped MNIST ruler must.
RULERS: Dict[str, dict] = {
    "digits": {"dataset": "digits", "image_size": 16, "epochs": 30, "width": 32, "min_accuracy": 0.97},
    "mnist-test": {"dataset": "mnist-test", "image_size": 16, "epochs": 40, "width": 32, "min_accuracy": 0.99,
                   "augmentation": "translate", "max_shift": 1},
}


def embedded_data(key: str, data_root: Optional[str] = None):
    """The BenchmarkData `cdgfast.train` uses for embedded data set `key`, or None when not on this machine."""
    from .data import _load_exact, _mnist_test_set

    spec = RULERS[key]
    if spec["dataset"] == "digits":
        return _load_exact("digits", None, spec["image_size"], print)
    return _mnist_test_set(data_root, spec["image_size"])


def train_ruler(key: str, data_root: Optional[str] = None, out_dir=None, progress: bool = True) -> Optional[dict]:
    """Train and write the shipped classifier of `key`; returns what it wrote (None when the data is missing)."""
    from cdgfast.metrics.classifier import (ASSETS_DIR, RULER_SEED, accuracy, data_sha256, network_sha256,
                                            ruler_stem, save_ruler, train_classifier)
    from pathlib import Path

    if key not in RULERS:
        raise ValueError(f"dataset: expected one of {sorted(RULERS)}, got {key!r}")
    spec = RULERS[key]
    data = embedded_data(key, data_root)
    if data is None:
        print(f"{key}: not on this machine; skipped")
        return None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the reduction order, hence the weights, do not depend on the machine
    try:
        t0 = time.time()
        model = train_classifier(data.train.x, data.train.y, data.num_classes, epochs=spec["epochs"],
                                 width=spec["width"], augmentation=spec.get("augmentation", "batch_roll"),
                                 max_shift=spec.get("max_shift"), seed=RULER_SEED, progress=progress)
        acc = accuracy(model, data.eval.x, data.eval.y)
    finally:
        torch.set_num_threads(threads)
    meta = {"dataset": data.name, "train_split_sha256": data_sha256(data.train.x, data.train.y),
            "eval_split_sha256": data_sha256(data.eval.x, data.eval.y), "eval_accuracy": f"{acc:.6f}",
            "num_train": len(data.train), "num_eval": len(data.eval), "epochs": spec["epochs"], "seed": RULER_SEED,
            "augmentation": spec.get("augmentation", "batch_roll"), "max_shift": spec.get("max_shift", "side // 8"),
            "torch": torch.__version__, "trained_by": "python -m cdgfast.train.ruler"}
    path = Path(out_dir or ASSETS_DIR) / (ruler_stem(data.name, data.image_size, data.channels, data.num_classes)
                                          + ".safetensors")
    if acc < spec["min_accuracy"]:
        raise RuntimeError(f"{key}: held-out accuracy {acc:.4f} < {spec['min_accuracy']}; not written")
    save_ruler(model, path, meta)
    print(f"{key}: held-out accuracy {acc:.4f} on {len(data.eval)} images, sha256 {network_sha256(model)[:16]}, "
          f"{path.stat().st_size / 1024:.0f} KiB -> {path} ({time.time() - t0:.0f}s)")
    return {"path": str(path), "accuracy": acc, **meta}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cdgfast.train.ruler", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", action="append", choices=sorted(RULERS), help="default: all")
    p.add_argument("--data-root", help="folder holding mnist/ (default: the driver's data folders)")
    p.add_argument("--out-dir", help="default: cdgfast/data/assets")
    args = p.parse_args(argv)
    for key in args.dataset or list(RULERS):
        train_ruler(key, args.data_root, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
