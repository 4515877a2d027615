"""Image data sets as in-memory tensors: `.x` float [N, C, H, W] in [-1, 1], `.y` long [N].

Sources:
    "digits"                 scikit-learn's bundled 8x8 digits (1797 images, values 0..16), bilinearly
                             upsampled (16x16 by default). It has no official split: `train` is ignored
                             and all images are returned; use `train_eval_split` for a held-out part.
    "mnist", "fashion-mnist" the standard IDX files (gzip or raw) in `root`, or in torchvision's layout
                             `root/MNIST/raw`, `root/FashionMNIST/raw`. 28x28 padded to 32x32 by default
                             (as the rank-1 paper pads MNIST); `image_size=28` keeps the original size.
    "cifar10", "cifar100"    the official python pickles (`cifar-10-batches-py/`, `cifar-100-python/`)
                             in `root`; fine labels for CIFAR-100.
    "imagefolder"            `root/<class>/<image>` (class index = position in the sorted folder names);
                             if `root/train` and `root/test` (or `root/val`) exist, `train` picks one.
                             RGB, center-cropped to a square and resized to `image_size` (default 32).

When files are missing and torchvision is installed, MNIST-family and CIFAR are downloaded into `root`
through torchvision; offline or without torchvision the loader raises FileNotFoundError saying what to
download and where to put it.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F



@dataclass(frozen=True)
class DatasetInfo:
    """One data set of the registry: the loader that reads it (a name `load_dataset` accepts), the
    sub-folder names it is found under in a data root, the other names it answers to, what to
    download when it is missing, and the torchvision.datasets class that can download it (which also
    names the folder of torchvision's layout)."""

    loader: str
    folders: Tuple[str, ...] = ()
    aliases: Tuple[str, ...] = ()
    download: str = ""
    torchvision: Optional[str] = None


# The one table of data sets: `load_dataset` reads the entries that are their own loader, the driver
# (`python -m cdgfast.train --dataset`) all of them; the order is the order of --list.
DATASET_REGISTRY: Dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits"),
    "mnist": DatasetInfo(
        "mnist", ("mnist", "MNIST"),
        download="the four MNIST IDX files (train-/t10k-images-idx3-ubyte.gz, train-/t10k-labels-idx1-ubyte.gz) "
                 "from https://ossci-datasets.s3.amazonaws.com/mnist/", torchvision="MNIST"),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", ("fashion-mnist", "fashion_mnist", "fmnist", "FashionMNIST"), ("fmnist", "fashion_mnist"),
        download="the four Fashion-MNIST IDX files from http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        torchvision="FashionMNIST"),
    "cifar10": DatasetInfo(
        "cifar10", ("cifar10", "cifar-10", "CIFAR10"), ("cifar-10",),
        download="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extracted (cifar-10-batches-py/)",
        torchvision="CIFAR10"),
    "cifar100": DatasetInfo(
        "cifar100", ("cifar100", "cifar-100", "CIFAR100"), ("cifar-100",),
        download="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz, extracted (cifar-100-python/)",
        torchvision="CIFAR100"),
    "flowers102": DatasetInfo(
        "imagefolder", ("flowers102", "flowers-102", "Flowers102"), ("flowers",),
        download="Oxford Flowers-102 (https://www.robots.ox.ac.uk/~vgg/data/flowers/102/) exported as "
                 "train/<class>/*.jpg and test/<class>/*.jpg"),
    "cub200": DatasetInfo(
        "imagefolder", ("cub200", "cub-200", "CUB200", "CUB_200_2011"), ("cub",),
        download="CUB-200-2011 (https://www.vision.caltech.edu/datasets/cub_200_2011/) exported as "
                 "train/<class>/*.jpg and test/<class>/*.jpg"),
    "imagenet32": DatasetInfo(
        "imagefolder", ("imagenet32", "ImageNet32", "imagenet-32"),
        download="downsampled ImageNet 32x32 (https://image-net.org/download-images) exported as "
                 "train/<class>/*.png and val/<class>/*.png"),
    "imagefolder": DatasetInfo(
        "imagefolder", download="a folder with one sub-folder of images per class (pass it with --data-root)"),
}
# The names `load_dataset` reads (its loaders).
DATASETS: Tuple[str, ...] = tuple(n for n, info in DATASET_REGISTRY.items() if info.loader == n)
DATASET_ALIASES: Dict[str, str] = {a: n for n, info in DATASET_REGISTRY.items() for a in info.aliases}


def canonical_dataset(name: str) -> str:
    """The registry name of `name` or of its alias ("fmnist" -> "fashion-mnist"); ValueError otherwise."""
    key = DATASET_ALIASES.get(name, name)
    if key not in DATASET_REGISTRY:
        raise ValueError(f"dataset: unknown data set {name!r}; expected one of {list(DATASET_REGISTRY)} "
                         f"(aliases: {sorted(DATASET_ALIASES)})")
    return key


PathLike = Union[str, os.PathLike]


class ImageDataset(torch.utils.data.Dataset):
    """An in-memory labelled image set. `x` float32 [N, C, H, W] in [-1, 1]; `y` int64 [N]."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, num_classes: int, name: str,
                 class_names: Optional[Sequence[str]] = None):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[2] != x.shape[3]:
            raise ValueError(f"x: expected a tensor [N, C, H, H], got {getattr(x, 'shape', type(x))}")
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y: expected a tensor [N] with N = {x.shape[0]}, got {getattr(y, 'shape', type(y))}")
        if num_classes < 1:
            raise ValueError(f"num_classes: expected a positive integer, got {num_classes}")
        self.x = x
        self.y = y.long()
        self.num_classes = int(num_classes)
        self.name = name
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]

    @property
    def channels(self) -> int:
        return int(self.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x.shape[-1])

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def subset(self, indices) -> "ImageDataset":
        """A new ImageDataset holding the rows `indices` (same classes and name)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageDataset(self.x[idx], self.y[idx], num_classes=self.num_classes, name=self.name,
                            class_names=self.class_names)

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, n={len(self)}, channels={self.channels}, "
                f"image_size={self.image_size}, num_classes={self.num_classes})")


# ----------------------------------------------------------------------------------------------------
# IDX format (MNIST family): magic = 0x00 0x00 <dtype code> <ndim>, then ndim big-endian int32 sizes,
# then the data in big-endian order.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw, detected from the content) into a numpy array."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"path: {path} is not an IDX file (bad magic number {raw[:4].hex() if raw else 'empty'})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"path: {path} is truncated (header needs {header} bytes, file has {len(raw)})")
    shape = struct.unpack(f">{ndim}i", raw[4:header])
    count = int(np.prod(shape)) if ndim else 1
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(f"path: {path} has {len(raw) - header} data bytes, expected {count * dtype.itemsize} "
                         f"for shape {shape} of {dtype}")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


_IDX_URLS = {  # where the loader's message sends a user whose IDX files are missing
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/ (or http://yann.lecun.com/exdb/mnist/)",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}


def _find_file(dirs: Sequence[Path], stem: str) -> Optional[Path]:
    for d in dirs:
        for suffix in ("", ".gz"):
            p = d / (stem + suffix)
            if p.is_file():
                return p
    return None


def _idx_pair(dirs: Sequence[Path], prefix: str) -> Tuple[Optional[Path], Optional[Path]]:
    return _find_file(dirs, f"{prefix}-images-idx3-ubyte"), _find_file(dirs, f"{prefix}-labels-idx1-ubyte")


def _default_root(name: str) -> Path:
    base = os.environ.get("CDGFAST_DATA", os.path.join(os.path.expanduser("~"), ".cache", "cdgfast", "data"))
    return Path(base) / name


def _try_torchvision_download(name: str, root: Path, train: bool) -> Optional[str]:
    """Download through torchvision into `root`. Returns None on success, else the reason it failed."""
    try:
        import torchvision.datasets as tvd  # optional dependency (extras "vision")
    except ImportError:
        return "torchvision is not installed (pip install torchvision, or install cdgfast[vision])"
    cls = DATASET_REGISTRY[name].torchvision
    try:
        root.mkdir(parents=True, exist_ok=True)
        getattr(tvd, cls)(str(root), train=train, download=True)
    except Exception as exc:  # offline, blocked mirror, disk full: report, do not mask as success
        return f"torchvision download failed ({type(exc).__name__}: {exc})"
    return None


def _load_idx_dataset(name: str, root: Optional[PathLike], train: bool, image_size: Optional[int],
                      download: bool) -> ImageDataset:
    folder, url = DATASET_REGISTRY[name].torchvision, _IDX_URLS[name]
    root_path = Path(root) if root is not None else _default_root(name)
    dirs = [root_path, root_path / folder / "raw", root_path / "raw"]
    prefix = "train" if train else "t10k"
    images, labels = _idx_pair(dirs, prefix)
    why = None
    if (images is None or labels is None) and download:
        why = _try_torchvision_download(name, root_path, train)
        images, labels = _idx_pair(dirs, prefix)
    if images is None or labels is None:
        missing = [f"{prefix}-{kind}-idx{d}-ubyte(.gz)" for kind, d, p in
                   (("images", 3, images), ("labels", 1, labels)) if p is None]
        msg = (f"{name}: missing {' and '.join(missing)} in {root_path}. Download them from {url} and put "
               f"them (gzip or not) directly in {root_path}.")
        if train:
            t_img, t_lab = _idx_pair(dirs, "t10k")
            if t_img is not None and t_lab is not None:
                msg += (" Only the test set (t10k-*) is there: load it with train=False (or split='test') "
                        "and divide it with cdgfast.data.train_eval_split(dataset, eval_fraction, seed).")
        if why:
            msg += f" Automatic download: {why}."
        raise FileNotFoundError(msg)
    x = read_idx(images)
    y = read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: {images} / {labels} do not form an image/label pair "
                         f"(shapes {x.shape} and {y.shape})")
    xt = torch.from_numpy(x.astype(np.float32)).unsqueeze(1) / 255.0 * 2.0 - 1.0
    size = 32 if image_size is None else int(image_size)
    xt = _fit_size(xt, size, pad_value=-1.0)
    names = ([str(i) for i in range(10)] if name == "mnist" else
             ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
              "Ankle boot"])
    return ImageDataset(xt.contiguous(), torch.from_numpy(y.astype(np.int64)), num_classes=10, name=name,
                        class_names=names)


def _fit_size(x: torch.Tensor, size: int, pad_value: float) -> torch.Tensor:
    """Pad symmetrically when `size` exceeds the side by an even amount <= 8 (the MNIST 28 -> 32 padding),
    otherwise resize bilinearly (antialiased when shrinking)."""
    if size < 1:
        raise ValueError(f"image_size: expected a positive integer, got {size}")
    side = x.shape[-1]
    if size == side:
        return x
    extra = size - side
    if 0 < extra <= 8 and extra % 2 == 0:
        p = extra // 2
        return F.pad(x, (p, p, p, p), value=pad_value)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < side).clamp_(-1.0, 1.0)


def _load_digits(image_size: Optional[int]) -> ImageDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32)).unsqueeze(1) / 16.0 * 2.0 - 1.0  # 0..16 -> [-1, 1]
    size = 16 if image_size is None else int(image_size)
    if size < 1:
        raise ValueError(f"image_size: expected a positive integer, got {size}")
    if size != 8:
        # Bilinear interpolation is a convex combination, so the range stays [-1, 1]; clamp guards rounding.
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < 8).clamp_(-1.0, 1.0)
    return ImageDataset(x.contiguous(), torch.from_numpy(d.target.astype(np.int64)), num_classes=10,
                        name="digits")


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _load_cifar(name: str, root: Optional[PathLike], train: bool, image_size: Optional[int],
                download: bool) -> ImageDataset:
    root_path = Path(root) if root is not None else _default_root(name)
    if name == "cifar10":
        folder, files = "cifar-10-batches-py", ([f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"])
        label_key, meta, names_key, k = b"labels", "batches.meta", b"label_names", 10
        url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    else:
        folder, files = "cifar-100-python", (["train"] if train else ["test"])
        label_key, meta, names_key, k = b"fine_labels", "meta", b"fine_label_names", 100
        url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    base = root_path / folder
    why = None
    if not all((base / f).is_file() for f in files) and download:
        why = _try_torchvision_download(name, root_path, train)
    missing = [f for f in files if not (base / f).is_file()]
    if missing:
        msg = (f"{name}: missing {', '.join(missing)} in {base}. Download {url} and extract it into "
               f"{root_path} (it creates {folder}/).")
        if why:
            msg += f" Automatic download: {why}."
        raise FileNotFoundError(msg)
    xs, ys = [], []
    for f in files:
        entry = _unpickle(base / f)
        xs.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(entry[label_key], dtype=np.int64))
    class_names = None
    if (base / meta).is_file():
        class_names = [s.decode() if isinstance(s, bytes) else str(s) for s in _unpickle(base / meta)[names_key]]
    x = torch.from_numpy(np.concatenate(xs)).float() / 255.0 * 2.0 - 1.0
    size = 32 if image_size is None else int(image_size)
    if size != 32:
        if size < 1:
            raise ValueError(f"image_size: expected a positive integer, got {size}")
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < 32).clamp_(-1.0, 1.0)
    return ImageDataset(x.contiguous(), torch.from_numpy(np.concatenate(ys)), num_classes=k, name=name,
                        class_names=class_names)


_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


def _load_imagefolder(root: Optional[PathLike], train: bool, image_size: Optional[int],
                      progress: bool) -> ImageDataset:
    if root is None:
        raise ValueError("root: the 'imagefolder' data set needs root=<folder with one sub-folder per class>")
    from PIL import Image
    from tqdm.auto import tqdm

    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"imagefolder: {root_path} is not a directory; expected root/<class>/<image> "
                                f"(e.g. Flowers102, CUB200 or ImageNet32 exported to class folders)")
    split_dirs = {"train": root_path / "train", "test": root_path / "test", "val": root_path / "val"}
    if split_dirs["train"].is_dir() and (split_dirs["test"].is_dir() or split_dirs["val"].is_dir()):
        root_path = split_dirs["train"] if train else (split_dirs["test"] if split_dirs["test"].is_dir()
                                                       else split_dirs["val"])
    classes = sorted(p.name for p in root_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: List[Tuple[Path, int]] = []
    for ci, c in enumerate(classes):
        for p in sorted((root_path / c).iterdir()):
            if p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS:
                files.append((p, ci))
    if not files:
        raise FileNotFoundError(f"imagefolder: no images ({', '.join(_IMAGE_EXTENSIONS)}) found under "
                                f"{root_path}/<class>/")
    size = 32 if image_size is None else int(image_size)
    if size < 1:
        raise ValueError(f"image_size: expected a positive integer, got {size}")
    x = torch.empty(len(files), 3, size, size, dtype=torch.float32)
    y = torch.empty(len(files), dtype=torch.long)
    for i, (p, ci) in enumerate(tqdm(files, desc=f"loading {root_path.name}", disable=not progress)):
        with Image.open(p) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)  # center square crop keeps the aspect ratio before the resize
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            im = im.resize((size, size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
        x[i] = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0 * 2.0 - 1.0
        y[i] = ci
    return ImageDataset(x, y, num_classes=len(classes), name="imagefolder", class_names=classes)


def load_dataset(name: str, root: Optional[PathLike] = None, *, train: bool = True,
                 image_size: Optional[int] = None, split: Optional[str] = None, download: bool = True,
                 progress: bool = False) -> ImageDataset:
    """Load a data set into memory as an ImageDataset (x in [-1, 1], float32 [N, C, H, W]).

    name: one of DATASETS. root: the folder holding the files (default `$CDGFAST_DATA/<name>` or
    `~/.cache/cdgfast/data/<name>`; required for "imagefolder"). train / split: which split; `split`
    ("train" or "test") overrides `train`. image_size: output side (defaults: digits 16, MNIST family 32
    by padding 28 -> 32, CIFAR 32, imagefolder 32). download: try torchvision's download when files
    are missing. progress: a bar while an image folder loads (quiet by default). Missing files raise
    FileNotFoundError naming what to download and where to put it.
    """
    if name not in DATASETS:
        raise ValueError(f"name: expected one of {list(DATASETS)}, got {name!r}")
    if split is not None:
        if split not in ("train", "test"):
            raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
        train = split == "train"
    if image_size is not None and (not isinstance(image_size, (int, np.integer)) or image_size < 1):
        raise ValueError(f"image_size: expected a positive integer or None, got {image_size!r}")
    if name == "digits":
        return _load_digits(image_size)
    if name in _IDX_URLS:
        return _load_idx_dataset(name, root, train, image_size, download)
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, root, train, image_size, download)
    return _load_imagefolder(root, train, image_size, progress)


def train_eval_split(dataset: ImageDataset, eval_fraction: float = 0.2, seed: int = 0
                     ) -> Tuple[ImageDataset, ImageDataset]:
    """Stratified random split into (train, eval): each class gives round(eval_fraction * n_c) rows to
    eval (at least one when the class has two or more rows). Reproducible from `seed`."""
    if not isinstance(dataset, ImageDataset):
        raise ValueError(f"dataset: expected an ImageDataset, got {type(dataset).__name__}")
    if not (isinstance(eval_fraction, (int, float)) and 0.0 < eval_fraction < 1.0):
        raise ValueError(f"eval_fraction: expected a number in (0, 1), got {eval_fraction!r}")
    g = torch.Generator().manual_seed(int(seed))
    train_idx, eval_idx = [], []
    for c in torch.unique(dataset.y).tolist():
        idx = torch.nonzero(dataset.y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        k = int(round(eval_fraction * idx.numel()))
        if idx.numel() >= 2:
            k = min(max(k, 1), idx.numel() - 1)  # both parts keep every class
        eval_idx.append(idx[:k])
        train_idx.append(idx[k:])
    tr = torch.sort(torch.cat(train_idx)).values
    ev = torch.sort(torch.cat(eval_idx)).values
    return dataset.subset(tr), dataset.subset(ev)
