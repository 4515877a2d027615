"""Finding and loading the benchmark data for the driver, with the cpu/smoke-scale substitution.

Data roots searched, in order: --data-root, $CDGFAST_DATA, `<repo>/../shared/data`, `./data`,
`../shared/data` (relative to the working directory) and `~/.cache/cdgfast/data`; in each root the data
set lives in a sub-folder named after it (`mnist/`, `fashion-mnist/`, `cifar10/`, ...). A root that is
itself the data set's folder (e.g. `--data-root ../shared/data/mnist`) works too.

At the smoke and cpu scales a data set the machine lacks is replaced by the MNIST test set (10,000
images) split into train and evaluation parts (80/20, stratified); when even that is missing,
by scikit-learn digits. Every substitution is printed and recorded in results.json. At the paper
scale nothing is substituted: a missing data set is an error saying what to download and where.

Every train / evaluation split drawn here uses EVAL_SPLIT_SEED, never the run's --seed: the evaluation
split is part of the ruler (like the FID classifier), fixed per data set and resolution, so runs with
different seeds are measured on the same images.

A --data-root that does not exist is never passed over quietly: at the paper scale it is an error;
where substitution is allowed, a WARNING line says so (and the substitution records it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from cdgfast.data import DATASET_REGISTRY, ImageDataset, canonical_dataset, load_dataset, train_eval_split


# The seed of every train / evaluation split (module docstring); --seed controls training randomness only.
EVAL_SPLIT_SEED = 0


class DataUnavailable(FileNotFoundError):
    """The requested data set is not on this machine (message says what to download and where)."""


@dataclass
class BenchmarkData:
    """The data of a run: `train` and `eval` ImageDatasets of one data set (`name`, what was used;
    `requested`, what was asked for), where they came from, and the substitutions made."""

    name: str
    requested: str
    train: ImageDataset
    eval: ImageDataset
    source: str               # human-readable description of the files used
    substitutions: List[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def channels(self) -> int:
        return self.train.channels

    @property
    def image_size(self) -> int:
        return self.train.image_size


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def candidate_roots(data_root: Optional[str]) -> List[Path]:
    roots = []
    if data_root:
        roots.append(Path(data_root))
    if os.environ.get("CDGFAST_DATA"):
        roots.append(Path(os.environ["CDGFAST_DATA"]))
    roots += [_repo_root().parent / "shared" / "data", Path.cwd() / "data", Path.cwd().parent / "shared" / "data",
              Path.home() / ".cache" / "cdgfast" / "data"]
    out, seen = [], set()
    for r in roots:
        key = str(r.resolve()) if r.exists() else str(r)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _dataset_dirs(name: str, data_root: Optional[str]) -> List[Path]:
    folders = DATASET_REGISTRY[name].folders
    dirs = []
    for root in candidate_roots(data_root):
        if name == "imagefolder":
            dirs.append(root)
            continue
        if root.name in folders:
            dirs.append(root)
        dirs += [root / f for f in folders]
    return [d for d in dirs if d.is_dir()]


def _folder(name: str) -> str:
    """The sub-folder a data root should hold `name` in (the first the search accepts)."""
    return (DATASET_REGISTRY[name].folders or (name,))[0]


def _download_hint(name: str) -> str:
    return DATASET_REGISTRY[name].download or name


def substitution_allowed(scale: str) -> bool:
    """Whether a missing data set may be replaced (smoke / cpu scales: checking the plumbing, not the paper)."""
    return scale != "paper"


def _load_exact(name: str, data_root: Optional[str], image_size: Optional[int], log,
                progress: bool = False) -> BenchmarkData:
    """Load `name` (train + official test split, or the fixed 80/20 split when it has none)."""
    loader = DATASET_REGISTRY[name].loader
    if name == "digits":
        ds = load_dataset("digits", image_size=image_size)
        return BenchmarkData("digits", name, *train_eval_split(ds, 0.2, EVAL_SPLIT_SEED),
                             "scikit-learn digits (bundled), fixed 80/20 train/eval split")
    if name == "imagefolder" and not data_root:
        raise DataUnavailable("dataset imagefolder: pass the folder with --data-root (root/<class>/*.png, or "
                              "root/train/<class> and root/test/<class>)")
    errors = []
    for d in _dataset_dirs(name, data_root):
        try:
            train = load_dataset(loader, root=d, train=True, image_size=image_size, download=False,
                                 progress=progress)
        except (FileNotFoundError, ValueError) as exc:
            errors.append(f"{d}: {exc}")
            continue
        try:
            test = load_dataset(loader, root=d, train=False, image_size=image_size, download=False,
                                progress=progress)
            if loader == "imagefolder" and len(test) == len(train):
                raise FileNotFoundError("no separate test split")
            return BenchmarkData(name, name, train, test, f"{name} from {d} (official train / test splits)")
        except (FileNotFoundError, ValueError):
            return BenchmarkData(name, name, *train_eval_split(train, 0.2, EVAL_SPLIT_SEED),
                                 f"{name} from {d} (train split, fixed 80/20 train/eval split)")
    where = ", ".join(str(r / _folder(name)) if DATASET_REGISTRY[name].folders else str(r)
                      for r in candidate_roots(data_root)[:3])
    msg = (f"dataset {name}: not found. Download {_download_hint(name)} and put it in one of: {where} "
           f"(or pass --data-root DIR with DIR/{_folder(name)}/).")
    if errors:
        msg += " Tried: " + " | ".join(errors[:3])
    raise DataUnavailable(msg)


def _mnist_test_set(data_root: Optional[str], image_size: Optional[int]) -> Optional[BenchmarkData]:
    for d in _dataset_dirs("mnist", data_root):
        try:
            ds = load_dataset("mnist", root=d, train=False, image_size=image_size, download=False)
        except (FileNotFoundError, ValueError):
            continue
        return BenchmarkData("mnist-test", "mnist", *train_eval_split(ds, 0.2, EVAL_SPLIT_SEED),
                             f"MNIST test set (t10k, 10,000 images) from {d}, fixed 80/20 train/eval split")
    return None


def load_benchmark_data(name: str, *, data_root: Optional[str], image_size: Optional[int], scale: str,
                        log=print, progress: bool = False) -> BenchmarkData:
    """The data for a run: `name` if present; at smoke/cpu scale otherwise the MNIST test set (then digits).
    A `data_root` that does not exist: DataUnavailable at the paper scale, a WARNING line otherwise."""
    name = canonical_dataset(name)
    missing_root = None
    if data_root and not Path(data_root).is_dir():
        missing_root = (f"--data-root {data_root} does not exist" if not Path(data_root).exists()
                        else f"--data-root {data_root} is not a folder")
        if name == "digits":
            log(f"WARNING: {missing_root} (digits are bundled with scikit-learn and need no data folder)")
        elif not substitution_allowed(scale):
            raise DataUnavailable(f"{missing_root}; at the {scale} scale nothing is substituted: pass the folder "
                                  f"that holds {name} (DIR/{_folder(name)}/). Download {_download_hint(name)}.")
        else:
            log(f"WARNING: {missing_root}: looking for {name} in the default data folders instead, and substituting "
                f"another data set if it is not there")
    try:
        ds = _load_exact(name, data_root, image_size, log, progress)
        if missing_root and name != "digits":
            ds.substitutions.append(f"{missing_root}; {name} was found elsewhere: {ds.source}")
        return ds
    except DataUnavailable as exc:
        if not substitution_allowed(scale):
            raise
        reason = str(exc)
    sub = _mnist_test_set(data_root, image_size)
    if sub is None:
        ds = _load_exact("digits", None, image_size, log)
        note = (f"{name} is not on this machine and neither is the MNIST test set: using scikit-learn digits "
                f"instead ({ds.source})")
        ds.requested, ds.name = name, "digits"
    else:
        ds = sub
        note = f"{name} is not on this machine: using {ds.source} instead"
        ds.requested = name
    if missing_root:
        note = f"{missing_root}; {note}"
    ds.substitutions.append(note)
    log(f"DATA SUBSTITUTION: {note}. ({reason.split('. ')[0]}.)")
    return ds


def limit_per_class(x: torch.Tensor, y: torch.Tensor, per_class: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first `per_class` rows of every class (order kept); all rows when per_class is None."""
    if per_class is None:
        return x, y
    keep = torch.zeros_like(y, dtype=torch.bool)
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()[:per_class]
        keep[idx] = True
    return x[keep], y[keep]
