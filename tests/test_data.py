"""cdgfast.data: loaders (digits, IDX, CIFAR pickles, image folders), splits, buffers, replay pools."""
import gzip
import hashlib
import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cdgfast.data import (DATASETS, ClassBalancedBuffer, ImageDataset, ReplaceWhenFullBuffer, ReservoirBuffer, Task,
                          class_incremental_split, generate_replay_pool, load_dataset, read_idx, task_loader,
                          train_eval_split)
from cdgfast.diffusion import NoiseSchedule
from cdgfast.models import build_unet

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
# The official MNIST test-set label histogram (10,000 images).
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ------------------------------------------------------------------------------------------ digits
def naive_bilinear(img, out):
    """Half-pixel-centre bilinear resize (align_corners=False), edge-clamped, by loops."""
    h = img.shape[0]
    scale = h / out
    res = torch.empty(out, out, dtype=torch.float64)
    for i in range(out):
        for j in range(out):
            si = max((i + 0.5) * scale - 0.5, 0.0)
            sj = max((j + 0.5) * scale - 0.5, 0.0)
            i0, j0 = min(int(math.floor(si)), h - 1), min(int(math.floor(sj)), h - 1)
            i1, j1 = min(i0 + 1, h - 1), min(j0 + 1, h - 1)
            di, dj = si - i0, sj - j0
            res[i, j] = ((1 - di) * (1 - dj) * img[i0, j0] + (1 - di) * dj * img[i0, j1]
                         + di * (1 - dj) * img[i1, j0] + di * dj * img[i1, j1])
    return res


def test_digits_shapes_range_labels():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    assert isinstance(ds, ImageDataset) and "digits" in DATASETS
    assert ds.x.shape == (1797, 1, 16, 16) and ds.x.dtype == torch.float32
    assert ds.y.dtype == torch.long and len(ds) == 1797
    assert (ds.channels, ds.image_size, ds.num_classes, ds.name) == (1, 16, 10, "digits")
    assert ds.x.min() >= -1 and ds.x.max() <= 1 and ds.x.min() == -1 and ds.x.max() == 1
    raw = load_digits()
    assert torch.equal(ds.y, torch.from_numpy(raw.target).long())
    assert ds.y.bincount().tolist() == np.bincount(raw.target).tolist()
    x8 = load_dataset("digits", image_size=8).x
    torch.testing.assert_close(x8[:, 0].double(), torch.from_numpy(raw.images) / 8.0 - 1.0)
    for k in (0, 17, 1796):
        ref = naive_bilinear(torch.from_numpy(raw.images[k]) / 8.0 - 1.0, 16)
        torch.testing.assert_close(ds.x[k, 0].double(), ref, rtol=1e-5, atol=1e-5)
    xi, yi = ds[5]
    assert xi.shape == (1, 16, 16) and int(yi) == raw.target[5]


# ------------------------------------------------------------------------------------------ IDX
def write_idx(path, arr, code, gz):
    dt = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
    body = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}i", *arr.shape)
    body += np.ascontiguousarray(arr, dtype=dt).tobytes()
    Path(path).write_bytes(gzip.compress(body) if gz else body)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("code,dtype", [(0x08, np.uint8), (0x0C, np.int32), (0x0D, np.float32)])
def test_read_idx_roundtrip(tmp_path, gz, code, dtype):
    rng = np.random.default_rng(0)
    arr = (rng.integers(0, 250, size=(3, 5, 7)) if code != 0x0D else rng.normal(size=(3, 5, 7))).astype(dtype)
    p = tmp_path / "a.idx"
    write_idx(p, arr, code, gz)
    out = read_idx(p)
    assert out.shape == (3, 5, 7) and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, arr)


def test_read_idx_bad_files(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="path"):
        read_idx(p)
    write_idx(p, np.zeros((4, 2), np.uint8), 0x08, False)
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(ValueError, match="data bytes"):
        read_idx(p)


@pytest.mark.skipif(not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(), reason="shared MNIST test set absent")
def test_real_mnist_test_set():
    # Official checksums (the same ones torchvision checks).
    md5 = hashlib.md5((MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()).hexdigest()
    assert md5 == "ec29112dd5afa0611ce80d1b7f02629c"
    raw = read_idx(MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    assert raw.shape == (10000, 28, 28) and raw.dtype == np.uint8 and raw.min() == 0 and raw.max() == 255
    ds = load_dataset("mnist", MNIST_DIR, train=False)
    assert len(ds) == 10000 and ds.x.shape == (10000, 1, 32, 32)
    counts = ds.y.bincount(minlength=10).tolist()
    assert counts == MNIST_TEST_COUNTS and sum(counts) == 10000
    assert ds.y[:5].tolist() == [7, 2, 1, 0, 4]
    assert ds.x.min() == -1 and ds.x.max() == 1
    # 28 -> 32 by padding with the background value (-1): the border is empty, the centre is the original.
    assert torch.all(ds.x[:, :, :2] == -1) and torch.all(ds.x[:, :, -2:] == -1)
    assert torch.all(ds.x[:, :, :, :2] == -1) and torch.all(ds.x[:, :, :, -2:] == -1)
    ds28 = load_dataset("mnist", MNIST_DIR, split="test", image_size=28)
    assert torch.equal(ds.x[:, :, 2:30, 2:30], ds28.x)
    torch.testing.assert_close(ds28.x[:, 0].double(), torch.from_numpy(raw).double() / 127.5 - 1.0)
    # Only t10k-* is shared: asking for the training set fails with directions.
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("mnist", MNIST_DIR, train=True, download=False)
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and "train=False" in msg and "train_eval_split" in msg


def make_idx_dir(root, prefix, n, gz, seed):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
    labs = (np.arange(n) % 10).astype(np.uint8)
    sfx = ".gz" if gz else ""
    write_idx(root / f"{prefix}-images-idx3-ubyte{sfx}", imgs, 0x08, gz)
    write_idx(root / f"{prefix}-labels-idx1-ubyte{sfx}", labs, 0x08, gz)
    return imgs, labs


def test_idx_loader_on_written_files(tmp_path):
    imgs, labs = make_idx_dir(tmp_path, "train", 23, gz=False, seed=1)
    timgs, tlabs = make_idx_dir(tmp_path, "t10k", 11, gz=True, seed=2)
    tr = load_dataset("fashion-mnist", tmp_path, train=True, image_size=28, download=False)
    te = load_dataset("fashion-mnist", tmp_path, train=False, image_size=28, download=False)
    assert tr.x.shape == (23, 1, 28, 28) and te.x.shape == (11, 1, 28, 28) and tr.name == "fashion-mnist"
    torch.testing.assert_close(tr.x[:, 0].double(), torch.from_numpy(imgs).double() / 127.5 - 1)
    torch.testing.assert_close(te.x[:, 0].double(), torch.from_numpy(timgs).double() / 127.5 - 1)
    assert tr.y.tolist() == labs.tolist() and te.y.tolist() == tlabs.tolist()
    # torchvision's layout root/<Name>/raw is found too.
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    make_idx_dir(raw, "t10k", 4, gz=True, seed=3)
    assert len(load_dataset("mnist", tmp_path / "tv", train=False, download=False)) == 4


def test_missing_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path, train=False, download=False)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_dataset("fashion-mnist", tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_dataset("cifar100", tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match="imagefolder"):
        load_dataset("imagefolder", tmp_path / "none")
    with pytest.raises(ValueError, match="root"):
        load_dataset("imagefolder")


def test_bad_arguments():
    with pytest.raises(ValueError, match="name"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", split="validation")
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits", image_size=0)


# ------------------------------------------------------------------------------------------ CIFAR, folders
def test_cifar_pickles(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    all_x, all_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, size=(3, 3072)).astype(np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=3)]
        all_x.append(x)
        all_y += y
        with open(base / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": x, b"labels": y}, f)
    with open(base / "test_batch", "wb") as f:
        pickle.dump({b"data": all_x[0], b"labels": all_y[:3]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert ds.x.shape == (15, 3, 32, 32) and ds.num_classes == 10 and ds.class_names[3] == "c3"
    ref = torch.from_numpy(np.concatenate(all_x).reshape(15, 3, 32, 32)).double() / 127.5 - 1
    torch.testing.assert_close(ds.x.double(), ref)
    assert ds.y.tolist() == all_y
    te = load_dataset("cifar10", tmp_path, train=False, image_size=16, download=False)
    assert te.x.shape == (3, 3, 16, 16) and te.x.min() >= -1 and te.x.max() <= 1


def test_imagefolder(tmp_path):
    from PIL import Image

    colours = {"b_blue": (0, 0, 255), "a_red": (255, 0, 0), "c_grey": (128, 128, 128)}
    for split, n in (("train", 3), ("test", 1)):
        for name, col in colours.items():
            d = tmp_path / split / name
            d.mkdir(parents=True)
            for k in range(n):
                Image.new("RGB", (20 + k, 14), col).save(d / f"{k}.png")
    (tmp_path / "train" / "a_red" / "notes.txt").write_text("not an image")
    ds = load_dataset("imagefolder", tmp_path, image_size=8, progress=False)
    te = load_dataset("imagefolder", tmp_path, train=False, image_size=8, progress=False)
    assert ds.x.shape == (9, 3, 8, 8) and te.x.shape == (3, 3, 8, 8)
    assert ds.class_names == ["a_red", "b_blue", "c_grey"] and ds.num_classes == 3
    assert ds.y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)
    torch.testing.assert_close(ds.x[0], red.expand(3, 8, 8))
    torch.testing.assert_close(ds.x[-1], torch.full((3, 8, 8), 128 / 127.5 - 1))


def test_train_eval_split():
    y = torch.tensor([c for c in range(7) for _ in range(10 + 3 * c)])  # imbalanced classes
    ds = ImageDataset(torch.arange(len(y), dtype=torch.float32).view(-1, 1, 1, 1), y, num_classes=7, name="ids")
    tr, ev = train_eval_split(ds, 0.25, seed=3)
    ids_tr, ids_ev = tr.x.flatten().long().tolist(), ev.x.flatten().long().tolist()
    assert sorted(ids_tr + ids_ev) == list(range(len(y)))  # disjoint and covering
    assert torch.equal(tr.y, y[tr.x.flatten().long()]) and torch.equal(ev.y, y[ev.x.flatten().long()])
    for c in range(7):
        n_c = int((y == c).sum())
        assert int((ev.y == c).sum()) == round(0.25 * n_c)  # stratified
    _, ev2 = train_eval_split(ds, 0.25, seed=3)
    assert torch.equal(ev.x, ev2.x)
    _, ev3 = train_eval_split(ds, 0.25, seed=4)
    assert not torch.equal(ev.x, ev3.x)
    with pytest.raises(ValueError, match="eval_fraction"):
        train_eval_split(ds, 1.0)


# ------------------------------------------------------------------------------------------ splits
def test_class_incremental_split():
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 7 + [3, 3])
    tasks = class_incremental_split(y, num_tasks=5, classes_per_task=2)
    assert [t.classes for t in tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    seen = torch.cat([t.indices for t in tasks])
    assert seen.sort().values.tolist() == list(range(len(y)))  # disjoint and covering
    for t in tasks:
        assert isinstance(t, Task) and t.indices.dtype == torch.long
        assert set(y[t.indices].tolist()) == set(t.classes)
        assert len(t) == int(sum((y == c).sum() for c in t.classes))
    order = [3, 1, 4, 0, 9, 2, 6, 5, 8, 7]
    t2 = class_incremental_split(y, num_tasks=3, classes_per_task=3, class_order=order)
    assert [t.classes for t in t2] == [[3, 1, 4], [0, 9, 2], [6, 5, 8]]  # class 7 left out
    a = class_incremental_split(y, num_tasks=5, classes_per_task=2, seed=11)
    b = class_incremental_split(y, num_tasks=5, classes_per_task=2, seed=11)
    assert [t.classes for t in a] == [t.classes for t in b]
    assert sorted(c for t in a for c in t.classes) == list(range(10))
    ds = load_dataset("digits", image_size=8)
    assert len(class_incremental_split(ds, num_tasks=1, classes_per_task=10)[0]) == 1797


def test_split_validation():
    y = torch.arange(10).repeat(3)
    with pytest.raises(ValueError, match="num_tasks \\* classes_per_task"):
        class_incremental_split(y, num_tasks=4, classes_per_task=3)
    with pytest.raises(ValueError, match="class_order"):
        class_incremental_split(y, num_tasks=5, classes_per_task=2, class_order=[0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
    with pytest.raises(ValueError, match="class_order"):
        class_incremental_split(y, num_tasks=5, classes_per_task=2, class_order=list(range(9)))
    with pytest.raises(ValueError, match="num_tasks"):
        class_incremental_split(y, num_tasks=0, classes_per_task=2)
    with pytest.raises(ValueError, match="classes_per_task"):
        class_incremental_split(y, num_tasks=2, classes_per_task=1.5)
    with pytest.raises(ValueError, match="labels"):
        class_incremental_split(torch.rand(5), num_tasks=1, classes_per_task=1)


def test_task_loader():
    ds = load_dataset("digits", image_size=8)
    task = class_incremental_split(ds, num_tasks=5, classes_per_task=2)[1]
    loader = task_loader(ds, task, 37, generator=torch.Generator().manual_seed(0))
    assert len(loader) == math.ceil(len(task) / 37)
    for _ in range(2):  # each epoch visits every row of the task exactly once
        ys, xs = [], []
        for x, y in loader:
            assert x.shape[1:] == (1, 8, 8) and x.shape[0] <= 37
            xs.append(x)
            ys.append(y)
        ys = torch.cat(ys)
        assert sorted(ys.tolist()) == sorted(ds.y[task.indices].tolist())
        assert set(ys.tolist()) == {2, 3}
    e1 = [y for _, y in task_loader(ds, task, 37, generator=torch.Generator().manual_seed(5))]
    e2 = [y for _, y in task_loader(ds, task, 37, generator=torch.Generator().manual_seed(5))]
    assert all(torch.equal(a, b) for a, b in zip(e1, e2))
    ordered = torch.cat([y for _, y in task_loader(ds, task, 50, shuffle=False)])
    assert torch.equal(ordered, ds.y[task.indices])
    assert all(x.shape[0] == 50 for x, _ in task_loader(ds, task, 50, drop_last=True))
    with pytest.raises(ValueError, match="batch_size"):
        task_loader(ds, task, 0)


# ------------------------------------------------------------------------------------------ buffers
def test_reservoir_inclusion_is_uniform():
    """After n offers each item is kept with probability capacity / n (checked over 1000 seeded runs)."""
    n, cap, runs = 20, 5, 1000
    freq = torch.zeros(n)
    for r in range(runs):
        buf = ReservoirBuffer(cap, seed=r)
        items = torch.arange(n, dtype=torch.float32)[:, None]
        for chunk in (items[:3], items[3:4], items[4:11], items[11:]):  # fill, single, straddling batches
            buf.add(chunk, chunk[:, 0].long())
        x, y = buf.data()
        assert len(buf) == cap and buf.num_seen == n
        assert torch.equal(x[:, 0].long(), y)  # x and y stay paired
        assert len(set(y.tolist())) == cap  # no duplicates
        freq[y] += 1
    freq /= runs
    sd = math.sqrt(cap / n * (1 - cap / n) / runs)
    assert torch.all((freq - cap / n).abs() < 5 * sd), freq
    # Early and late items share equally (catches "keep the first" or "keep the last" biases).
    assert abs(freq[:10].mean() - freq[10:].mean()) < 4 * sd


def _clog_memory_add(slots_x, slots_y, seen, cap, x, y, rng):
    """CLoG's Memory.add written out item by item (Programmergg/CLoG networks/memory.py): the target slot
    is the seen-count while not full, else a uniform slot; the count stops at the capacity."""
    for xi, yi in zip(x.tolist(), y.tolist()):
        idx = seen if seen < cap else int(rng.integers(0, cap))
        slots_x[idx], slots_y[idx] = xi, yi
        seen = min(seen + 1, cap)
    return seen


def test_replace_when_full_buffer_matches_clogs_memory_in_distribution():
    """CLoG's buffer: items 0..cap-1 fill the slots in order; every later item is stored (it always
    replaces), and an old item survives m later items with probability (1 - 1/cap)^m. Compared with a
    naive item-by-item transcription of CLoG's Memory over 400 runs each, and against the closed form;
    a reservoir keeps an old item with probability cap / n instead, which the bounds tell apart."""
    cap, n, runs = 8, 20, 400
    m = n - cap
    surv_ours, surv_ref, last_ours = 0.0, 0.0, 0.0
    for r in range(runs):
        buf = ReplaceWhenFullBuffer(cap, seed=r)
        items = torch.arange(n, dtype=torch.float32)[:, None]
        buf.add(items[:5], items[:5, 0].long())
        assert torch.equal(buf.data()[1], torch.arange(5))  # filled in order
        for chunk in (items[5:11], items[11:12], items[12:]):  # straddling the fill, single, a batch
            buf.add(chunk, chunk[:, 0].long())
        x, y = buf.data()
        assert len(buf) == cap and buf.num_seen == n and torch.equal(x[:, 0].long(), y)
        assert 19 in y.tolist()  # the last item offered is always stored
        surv_ours += (y < cap).sum().item() / cap
        last_ours += (y >= n - 4).sum().item()
        sx, sy = [None] * cap, [None] * cap
        _clog_memory_add(sx, sy, 0, cap, items[:, 0], items[:, 0].long(), np.random.default_rng(r))
        surv_ref += sum(v < cap for v in sy) / cap
    expected = (1 - 1 / cap) ** m  # 0.201; a reservoir would keep an old item with probability cap / n = 0.4
    sd = math.sqrt(expected * (1 - expected) / (runs * cap))
    assert abs(surv_ours / runs - expected) < 4 * sd * 2, surv_ours / runs  # x2: slots within a run correlate
    assert abs(surv_ref / runs - expected) < 4 * sd * 2, surv_ref / runs
    # each of the last 4 items survives the ones after it with probability (1 - 1/cap)^j, j = 0..3
    assert abs(last_ours / runs - sum((1 - 1 / cap) ** j for j in range(4))) < 0.15


def test_buffer_policy_is_a_method_option():
    from cdgfast.methods import create

    assert create("er").config["buffer_policy"] == "reservoir"
    assert create("ccd").config["buffer_policy"] == "class_balanced"
    m = create("er", buffer_policy="replace_when_full", buffer_size=4)
    assert isinstance(m._make_buffer(), ReplaceWhenFullBuffer)
    assert isinstance(create("agem")._make_buffer(), ReservoirBuffer)
    assert isinstance(create("ccd")._make_buffer(), ClassBalancedBuffer)
    with pytest.raises(ValueError, match="buffer_policy"):
        create("er", buffer_policy="fifo")


def test_class_balanced_buffer_shares():
    runs, idx0 = 100, []
    for r in range(runs):
        buf = ClassBalancedBuffer(30, seed=r)
        # Class-incremental stream: 200 of class 0, then 40 of class 1, then 10 of class 2.
        xs = torch.arange(250, dtype=torch.float32)[:, None]
        ys = torch.tensor([0] * 200 + [1] * 40 + [2] * 10)
        for s in range(0, 250, 16):
            buf.add(xs[s:s + 16], ys[s:s + 16])
        assert buf.class_counts() == {0: 10, 1: 10, 2: 10}
        x, y = buf.data()
        assert torch.equal(y, torch.where(x[:, 0] < 200, 0, torch.where(x[:, 0] < 240, 1, 2)))
        idx0 += x[y == 0, 0].tolist()
    # Within class 0 the kept items are uniform over the 200 seen: mean index 99.5, sd 57.7/sqrt(k).
    assert abs(np.mean(idx0) - 99.5) < 5 * 57.7 / math.sqrt(len(idx0))
    # Interleaved imbalanced stream: the minority class keeps all it can, the others split the rest.
    buf = ClassBalancedBuffer(60, seed=0)
    g = torch.Generator().manual_seed(0)
    ys = torch.tensor([0] * 500 + [1] * 300 + [2] * 12)[torch.randperm(812, generator=g)]
    buf.add(torch.zeros(812, 2), ys)
    counts = buf.class_counts()
    assert counts[2] == 12 and abs(counts[0] - counts[1]) <= 1 and sum(counts.values()) == 60


@pytest.mark.parametrize("cls", [ReservoirBuffer, ReplaceWhenFullBuffer, ClassBalancedBuffer])
def test_buffer_state_roundtrip_and_sample(cls):
    a = cls(16, seed=7)
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(100, 1, 3, 5, generator=g), torch.randint(0, 4, (100,), generator=g)
    a.add(xs[:40], ys[:40])
    b = cls(16, seed=123)
    b.load_state_dict(a.state_dict())
    a.add(xs[40:], ys[40:])
    b.add(xs[40:], ys[40:])
    assert torch.equal(a.data()[0], b.data()[0]) and torch.equal(a.data()[1], b.data()[1])
    sa, sb = a.sample(10), b.sample(10)
    assert torch.equal(sa[0], sb[0]) and torch.equal(sa[1], sb[1])
    x, y = a.sample(16, generator=torch.Generator().manual_seed(1))
    assert len({tuple(r) for r in x.flatten(1).tolist()}) == 16  # without replacement
    x, y = a.sample(40)
    assert x.shape == (40, 1, 3, 5) and y.shape == (40,)
    empty = cls(4)
    with pytest.raises(ValueError, match="empty"):
        empty.sample(2)
    with pytest.raises(ValueError, match="capacity"):
        cls(0)
    with pytest.raises(ValueError, match="y"):
        a.add(xs[:3], ys[:2])
    with pytest.raises(ValueError, match="x"):
        a.add(torch.randn(2, 4), ys[:2])


@pytest.mark.parametrize("cls", [ReservoirBuffer, ReplaceWhenFullBuffer, ClassBalancedBuffer])
def test_buffer_first_add_under_inference_mode(cls):
    """(3) storage allocated by a first add under inference_mode was an inference tensor: every later
    add outside it failed. The buffer now owns normal tensors, whatever mode it is filled in."""
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(12, 2, 3, generator=g), torch.randint(0, 3, (12,), generator=g)
    a, ref = cls(5, seed=1), cls(5, seed=1)
    with torch.inference_mode():
        a.add(xs[:4], ys[:4])
    ref.add(xs[:4], ys[:4])
    a.add(xs[4:], ys[4:])
    ref.add(xs[4:], ys[4:])
    assert not a.x.is_inference() and torch.equal(a.data()[0], ref.data()[0]) and torch.equal(a.data()[1], ref.data()[1])
    with torch.inference_mode():
        b = cls(5, seed=1)
        b.load_state_dict(ref.state_dict())
    b.add(xs[:2], ys[:2])


@pytest.mark.parametrize("cls", [ReservoirBuffer, ReplaceWhenFullBuffer, ClassBalancedBuffer])
def test_buffer_labels_generator_and_state_checked(cls):
    """(6) boolean labels were stored as classes 0/1, negative ones failed later in class_counts; a
    state with size > capacity loaded silently."""
    a = cls(4)
    with pytest.raises(ValueError, match="y.*integer"):
        a.add(torch.randn(2, 3), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="y.*non-negative"):
        a.add(torch.randn(2, 3), torch.tensor([-1, 2]))
    assert len(a) == 0
    a.add(torch.randn(3, 3), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="generator"):
        a.sample(2, generator=3)
    st = a.state_dict()
    with pytest.raises(ValueError, match="state: size"):
        cls(4).load_state_dict({**st, "size": 10})
    with pytest.raises(ValueError, match="state: missing"):
        ClassBalancedBuffer(4).load_state_dict(ReservoirBuffer(4).state_dict())


def test_split_class_without_samples_refused():
    """(6) a class inside 0..K-1 with no samples made a task that listed it but held none of it."""
    with pytest.raises(ValueError, match="labels: class \\[2\\] of task 1"):
        class_incremental_split(torch.tensor([0, 1, 3, 3]), num_tasks=2, classes_per_task=2)
    with pytest.raises(ValueError, match="seed"):
        class_incremental_split(torch.tensor([0, 1]), num_tasks=1, classes_per_task=2, seed=0.5)
    ds = ImageDataset(torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 0, 1]), num_classes=2, name="tiny")
    with pytest.raises(ValueError, match="task.*non-negative"):
        task_loader(ds, Task(0, [0], torch.tensor([-1, 0])), 2)


# ------------------------------------------------------------------------------------------ replay pools
def test_replay_pool_resume(tmp_path):
    torch.manual_seed(0)
    model = build_unet("tiny", num_classes=3, sample_size=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sched = NoiseSchedule()
    kw = dict(schedule=sched, num_steps=2, batch_size=4, seed=9, progress=False)
    ref_x, ref_y = generate_replay_pool(model, [2, 0], 5, **kw)
    assert ref_x.shape == (10, 1, 8, 8) and ref_y.tolist() == [2] * 5 + [0] * 5
    assert ref_x.min() >= -1 and ref_x.max() <= 1

    calls = {"n": 0}

    def crash_after_first_chunk(module, args):
        calls["n"] += 1
        if calls["n"] > 2:  # chunk 0 takes 2 DDIM steps; crash inside chunk 1
            raise KeyboardInterrupt("simulated interruption")

    h = model.register_forward_pre_hook(crash_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        generate_replay_pool(model, [2, 0], 5, path=tmp_path / "pool", **kw)
    h.remove()
    files = sorted(p.name for p in (tmp_path / "pool").iterdir())
    assert files == ["chunk_000000.pt", "meta.json"]  # no partial chunk, no temp file left

    calls["n"] = 0
    h = model.register_forward_pre_hook(lambda m, a: calls.__setitem__("n", calls["n"] + 1))
    x, y = generate_replay_pool(model, [2, 0], 5, path=tmp_path / "pool", **kw)
    assert calls["n"] == 4  # only chunks 1 and 2 were generated
    assert torch.equal(x, ref_x) and torch.equal(y, ref_y)
    calls["n"] = 0
    x2, _ = generate_replay_pool(model, [2, 0], 5, path=tmp_path / "pool", **kw)
    assert calls["n"] == 0 and torch.equal(x2, ref_x)
    h.remove()
    # Other settings never reuse the directory; another seed gives other samples.
    with pytest.raises(ValueError, match="batch_size"):
        generate_replay_pool(model, [2, 0], 5, path=tmp_path / "pool", **{**kw, "batch_size": 3})
    other_model = build_unet("tiny", num_classes=3, sample_size=8)
    with pytest.raises(ValueError, match="model"):  # another teacher never reuses the chunks
        generate_replay_pool(other_model, [2, 0], 5, path=tmp_path / "pool", **kw)
    other, _ = generate_replay_pool(model, [2, 0], 5, **{**kw, "seed": 10})
    assert not torch.allclose(other, ref_x)
    with pytest.raises(ValueError, match="per_class"):
        generate_replay_pool(model, [0], 0, schedule=sched)
    with pytest.raises(ValueError, match="classes"):
        generate_replay_pool(model, [], 3, schedule=sched)
    # guided pools: each chunk is ddim_sample with the same guidance and eta; a guided pool never reuses an
    # unguided one's chunks
    from cdgfast.data.replay import chunk_seed
    from cdgfast.sampling import ddim_sample

    gx, gy = generate_replay_pool(model, [2, 0], 5, **{**kw, "guidance": 3.0, "eta": 1.0})
    for i, sl in enumerate((slice(0, 4), slice(4, 8), slice(8, 10))):
        want = ddim_sample(model, gy[sl], schedule=sched, num_steps=2, eta=1.0, guidance=3.0,
                           generator=torch.Generator().manual_seed(chunk_seed(9, i)))
        torch.testing.assert_close(gx[sl], want, rtol=0, atol=0)
    assert not torch.allclose(gx, generate_replay_pool(model, [2, 0], 5, **{**kw, "eta": 1.0})[0])
    with pytest.raises(ValueError, match="guidance"):
        generate_replay_pool(model, [2, 0], 5, path=tmp_path / "pool", **{**kw, "guidance": 3.0})
    with pytest.raises(ValueError, match="guidance"):
        generate_replay_pool(build_unet("tiny", sample_size=8, class_conditional=False), [0], 2,
                             **{**kw, "guidance": 2.0})


def test_one_dataset_registry_for_the_loaders_and_the_driver():
    from cdgfast.data import DATASET_ALIASES, DATASET_REGISTRY, canonical_dataset
    import cdgfast.train.data as driver_data

    assert DATASETS == ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder")
    assert {info.loader for info in DATASET_REGISTRY.values()} == set(DATASETS)
    assert list(DATASET_REGISTRY) == ["digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "flowers102",
                                      "cub200", "imagenet32", "imagefolder"]
    for name, info in DATASET_REGISTRY.items():
        assert canonical_dataset(name) == name
        for alias in info.aliases:
            assert canonical_dataset(alias) == name and alias not in DATASET_REGISTRY
        if name != "digits":
            assert info.download, name
        if name not in ("digits", "imagefolder"):
            assert name in info.folders, name
    assert DATASET_ALIASES == {"fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "cifar-10": "cifar10",
                               "cifar-100": "cifar100", "flowers": "flowers102", "cub": "cub200"}
    with pytest.raises(ValueError, match=r"dataset: unknown data set 'svhn'; expected one of .*'imagenet32'"):
        canonical_dataset("svhn")
    # the driver finds its data sets through the same table
    assert driver_data.DATASET_REGISTRY is DATASET_REGISTRY and driver_data.canonical_dataset is canonical_dataset
