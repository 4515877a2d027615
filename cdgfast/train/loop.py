"""The benchmark loop: for every method, train through the tasks, evaluate FID on every task seen so far
after each task, checkpoint atomically, and write the results.

Reproducibility: every random draw of task k of method m comes from seeds derived from
(--seed, m, k): the global torch RNG is re-seeded at the start of each task, the data order uses its
own generator, evaluation sampling uses per-chunk generators, and the method's own generator is in its
checkpointed state. So continuing from the checkpoint after task k gives the same numbers as an
uninterrupted run (same seed, same number of threads and processes).

Trainer-level method names (besides cdgfast.methods.available()):
  joint  non-continual upper bound: `finetune` trained at task k on the data of tasks 0..k together.
  gr     generative replay: `gd` with lam_gd = 0 (replayed samples in the task loss, no distillation term).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from . import distributed as D
from .checkpoint import (atomic_write_text, drop_rank_state, load_checkpoint, load_rank_state, save_checkpoint,
                         save_rank_state)
from .data import BenchmarkData, canonical_dataset, limit_per_class, load_benchmark_data
from .presets import SCALES, Preset, ScaleConfig, get_preset

TRAINER_METHODS = {
    "joint": {"base": "finetune", "overrides": {}, "cumulative": True,
              "help": "non-continual upper bound: finetune on the union of all tasks so far"},
    "gr": {"base": "gd", "overrides": {"lam_gd": 0.0}, "cumulative": False,
           "help": "generative replay: gd without the distillation term (lam_gd = 0)"},
}
OUTPUT_FILES = ("results.json", "results.csv", "report.md", "afid.png", "train.log", "run.json")
OUTPUT_DIRS = ("checkpoints", "samples")


class RunError(Exception):
    """A clean, user-facing error (bad names, refused output directory, missing data); exit code 2."""


class NonFiniteLoss(RuntimeError):
    def __init__(self, method: str, task: int, step: int, term: str, value: float):
        self.method, self.task, self.step, self.term, self.value = method, task, step, term, value
        super().__init__(f"non-finite loss in method {method!r}, task {task + 1} (index {task}), step {step}: "
                         f"term {term!r} = {value}. The run stopped; the last good checkpoint (after task "
                         f"{task}) is kept.")


class InjectedCrash(RuntimeError):
    """Raised by the test hook CDGFAST_CRASH_AT=method:task:step (0-based task, 1-based step)."""


@dataclass
class RunConfig:
    preset: str = "default"
    methods: Optional[List[str]] = None
    dataset: Optional[str] = None
    scale: str = "cpu"
    data_root: Optional[str] = None
    out: Optional[str] = None
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    device: Optional[str] = None
    inception: Optional[str] = None
    cache_dir: Optional[str] = None
    steps: Optional[int] = None          # override: training steps per task
    fid_samples: Optional[int] = None    # override: generated samples per class for FID / KLD
    batch_size: Optional[int] = None     # override
    num_tasks: Optional[int] = None      # override: use only the first N tasks
    progress: bool = True
    method_args: Dict[str, dict] = field(default_factory=dict)  # --set METHOD.KEY=VALUE: {method: {key: value}}


def _method_base(name: str) -> str:
    """The cdgfast.methods name behind a run method ("joint" -> "finetune", "rank1+gd" -> itself)."""
    spec = TRAINER_METHODS.get(name)
    return spec["base"] if spec else name


def parse_method_args(items: List[str]) -> Dict[str, dict]:
    """`["rank1.lam=100", "gd.replay=pool"]` -> `{"rank1": {"lam": 100}, "gd": {"replay": "pool"}}`. Values are
    Python literals (numbers, True/False/None, quoted strings); anything else is kept as a string."""
    import ast

    out: Dict[str, dict] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        method, dot, hp = key.strip().partition(".")
        if not eq or not dot or not method or not hp or "." in hp:
            raise ValueError(f"set: expected METHOD.KEY=VALUE (e.g. rank1.lam=100), got {item!r}")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        out.setdefault(method, {})[hp] = value
    return out


def all_method_names() -> List[str]:
    from cdgfast.methods import available
    return list(available()) + [m for m in TRAINER_METHODS if m not in available()]


def derive_seed(seed: int, *keys) -> int:
    """A 31-bit seed from (seed, keys...), stable across processes and Python versions."""
    h = hashlib.sha256("|".join([str(int(seed))] + [str(k) for k in keys]).encode()).hexdigest()
    return int(h[:8], 16) & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % (2 ** 32))
    except ImportError:
        pass
    torch.manual_seed(seed)


class Logger:
    """Lines to the console (through tqdm.write, so bars stay intact) and to out/train.log (rank 0)."""

    def __init__(self, path: Optional[Path], enabled: bool = True):
        self.enabled = enabled
        self.file = open(path, "a") if (path is not None and enabled) else None

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm
        tqdm.write(msg, file=sys.stdout)
        if self.file:
            self.file.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()
            self.file = None


# --------------------------------------------------------------------------------------------------
def resolve(cfg: RunConfig):
    """Validate names and build (preset, scale config, method list, data set name)."""
    try:
        preset = get_preset(cfg.preset)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    if cfg.scale not in SCALES:
        raise RunError(f"scale: unknown scale {cfg.scale!r}; expected one of {list(SCALES)}")
    names = all_method_names()
    methods = list(cfg.methods) if cfg.methods else list(preset.methods)
    for m in methods:
        if m not in names:
            raise RunError(f"method: unknown method {m!r}; expected one of {names}")
    if len(set(methods)) != len(methods):
        raise RunError(f"method: listed twice in {methods}")
    members = {part for m in methods for part in _method_base(m).split("+")} | {_method_base(m) for m in methods}
    for m in cfg.method_args:
        if m not in members:
            raise RunError(f"set: {m!r} is not a method of this run (nor a member of one); expected one of "
                           f"{sorted(members)}")
    try:
        dataset = canonical_dataset(cfg.dataset) if cfg.dataset else preset.dataset
    except ValueError as exc:
        raise RunError(str(exc)) from None
    sc = preset.scale(cfg.scale)
    if cfg.steps is not None:
        if cfg.steps < 1:
            raise RunError(f"steps: expected a positive integer, got {cfg.steps}")
        sc.steps_per_task, sc.epochs_per_task, sc.first_task_steps = cfg.steps, None, None
    if cfg.fid_samples is not None:
        if cfg.fid_samples < 2:
            raise RunError(f"fid-samples: expected at least 2 samples per class, got {cfg.fid_samples}")
        sc.fid_samples_per_class = cfg.fid_samples
    if cfg.batch_size is not None:
        if cfg.batch_size < 1:
            raise RunError(f"batch-size: expected a positive integer, got {cfg.batch_size}")
        sc.batch_size = cfg.batch_size
    for m in methods:  # unknown --set keys fail here, before any data loading or training
        _build_method(m, preset, cfg.scale, cfg.seed, cfg.method_args)
    return preset, sc, methods, dataset


def task_structure(num_classes: int, preset: Preset, substituted: bool, num_tasks_override: Optional[int]):
    """(num_tasks, classes_per_task) that fit the data actually used."""
    t, c = preset.num_tasks, preset.classes_per_task
    notes = []
    if t * c > num_classes:
        if substituted and num_classes == 10:
            t2, c2 = 5, 2
        elif num_classes >= t:
            t2, c2 = t, num_classes // t
        else:
            t2, c2 = num_classes, 1
        notes.append(f"task structure {t} x {c} classes does not fit {num_classes} classes: using {t2} x {c2}")
        t, c = t2, c2
    if num_tasks_override is not None:
        if not 1 <= num_tasks_override <= t:
            raise RunError(f"num-tasks: expected 1..{t}, got {num_tasks_override}")
        t = num_tasks_override
    return t, c, notes


def prepare_out_dir(out: Path, resume: bool, overwrite: bool, is_main: bool) -> None:
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other")
    finished = (out / "results.json").is_file()
    started = (out / "run.json").is_file() or (out / "checkpoints").is_dir()
    if overwrite:
        if is_main:
            for f in OUTPUT_FILES:
                if (out / f).is_file():
                    (out / f).unlink()
            for d in OUTPUT_DIRS:
                if (out / d).is_dir():
                    shutil.rmtree(out / d)
        return
    if resume:
        if not started:
            raise RunError(f"--resume: {out} holds no run to resume (no run.json / checkpoints)")
        return
    if finished:
        raise RunError(f"out: {out} already holds a finished run (results.json). Pass --resume to reuse it, "
                       f"--overwrite to replace it, or choose another --out.")
    if started:
        raise RunError(f"out: {out} holds an unfinished run. Pass --resume to continue it from the last complete "
                       f"task, or --overwrite to start again.")


def _is_run_dir(p: Path) -> bool:
    return (p / "results.json").is_file() or (p / "run.json").is_file() or (p / "checkpoints").is_dir()


def default_out_dir(preset: str, scale: str, resume: bool) -> Path:
    """runs/<preset>-<scale> when --out is not given. An explicit --out holding a run is refused
    (prepare_out_dir); the implicit one moves on to runs/<preset>-<scale>-2, -3, ... so that running the
    default twice (`make demo`) never fails. With --resume: the newest existing one."""
    base = Path("runs") / f"{preset}-{scale}"
    cands = [base] + [base.with_name(f"{base.name}-{i}") for i in range(2, 1000)]
    if resume:
        existing = [c for c in cands if _is_run_dir(c)]
        return existing[-1] if existing else base
    for c in cands:
        if not _is_run_dir(c):
            return c
    return base


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    for mod in ("cdgfast", "diffusers", "numpy", "sklearn"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception:
            out[mod] = "not installed"
    return out


# --------------------------------------------------------------------------------------------------
class Evaluator:
    """Class-balanced DDIM sampling + features + per-task FID and the class KLD."""

    def __init__(self, *, data: BenchmarkData, tasks, extractor, classifier, sc: ScaleConfig, schedule, seed: int,
                 device, log, progress: bool):
        from cdgfast.metrics import extract_features, feature_statistics

        self.tasks, self.extractor, self.classifier = tasks, extractor, classifier
        self.sc, self.schedule, self.seed, self.device = sc, schedule, seed, device
        self.num_classes = data.num_classes
        self.log, self.progress = log, progress
        self.ref_stats = []
        for t in tasks:
            mask = torch.zeros_like(data.eval_y, dtype=torch.bool)
            for c in t.classes:
                mask |= data.eval_y == c
            x, y = limit_per_class(data.eval_x[mask], data.eval_y[mask], sc.fid_real_per_class)
            if x.shape[0] < 2:
                raise RunError(f"data: task {t.index} has {x.shape[0]} evaluation images; FID needs at least 2")
            feats = extract_features(extractor, x, device=device)
            self.ref_stats.append(feature_statistics(feats))

    def sample(self, model, classes: List[int], key) -> tuple:
        """(images, labels) class-balanced, `fid_samples_per_class` per class; chunks of 256 labels, chunk
        i sampled by rank i % world with its own seed (so the result does not depend on the world size)."""
        from tqdm.auto import tqdm
        from cdgfast.sampling import ddim_sample

        n = self.sc.fid_samples_per_class
        labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(n)
        chunk = 256
        num_chunks = -(-labels.numel() // chunk)
        rank, world = D.get_rank(), D.get_world_size()
        mine = list(range(rank, num_chunks, world))
        xs = []
        for i in tqdm(mine, desc=f"sampling {key[0]} task {key[1] + 1}", disable=not self.progress, leave=False):
            y = labels[i * chunk:(i + 1) * chunk]
            g = torch.Generator().manual_seed(derive_seed(self.seed, "eval", key[1], i))  # same for every method
            xs.append(ddim_sample(model, y.to(self.device), schedule=self.schedule, num_steps=self.sc.ddim_steps,
                                  generator=g))
        if D.get_world_size() > 1:
            mine_x = torch.cat(xs) if xs else torch.zeros(
                (0, model.config.in_channels, model.config.sample_size, model.config.sample_size), device=self.device)
            return D.gather_round_robin(mine_x, labels.numel(), chunk), labels
        return torch.cat(xs).cpu(), labels

    def evaluate(self, model, k: int, method: str):
        """FID_i(m_k) for i <= k, the KLD over the classes seen so far, and the samples."""
        from cdgfast.metrics import class_kld, extract_features, feature_statistics, frechet_distance, predict

        classes = [c for t in self.tasks[:k + 1] for c in t.classes]
        x, y = self.sample(model, classes, (method, k))
        feats = extract_features(self.extractor, x, device=self.device)
        row = []
        for i in range(k + 1):
            mask = torch.zeros_like(y, dtype=torch.bool)
            for c in self.tasks[i].classes:
                mask |= y == c
            mu, sig = feature_statistics(feats[mask])
            row.append(frechet_distance(*self.ref_stats[i], mu, sig))
        pred = predict(self.classifier, x)
        kld = class_kld(pred, classes, self.num_classes)
        acc = float((pred == y).double().mean())
        return row, kld, acc, x, y


# --------------------------------------------------------------------------------------------------
def _crash_spec(var: str = "CDGFAST_CRASH_AT"):
    spec = os.environ.get(var)
    if not spec:
        return None
    m, t, s = spec.rsplit(":", 2)
    return m, int(t), int(s)


def _build_method(name: str, preset: Preset, scale: str, seed: int, method_args: Optional[Dict[str, dict]] = None):
    from cdgfast.methods import create

    spec = TRAINER_METHODS.get(name)
    base = _method_base(name)
    overrides = preset.overrides_for(base, scale)
    if spec:
        overrides.update(spec["overrides"])
    for member, kw in (method_args or {}).items():  # --set: member-qualified keys inside a composition
        if member == base:
            overrides.update(kw)
        elif "+" in base and member in base.split("+"):
            # inserted after the preset's bare keys, so Compose.route_overrides lets them win for this member
            overrides.update({f"{member}.{k}": v for k, v in kw.items()})
    # Common random numbers: every method gets the same seeds (method noise, data order, evaluation
    # noise), so on task 1, where the rank-1 paper's methods all reduce to plain training, they train the
    # same model, and later differences come from the methods rather than from the draws.
    overrides["seed"] = derive_seed(seed, "method")
    try:
        return create(base, **overrides), bool(spec and spec["cumulative"])
    except ValueError as exc:
        raise RunError(f"method {name}: {exc}") from None


def _train_task(model, method, loader_factory, steps: int, lr: float, name: str, k: int, T: int, log, progress,
                on_step: Optional[Callable] = None):
    from tqdm.auto import tqdm
    from cdgfast._params import trainable_parameters

    params = trainable_parameters(model)
    opt = torch.optim.Adam(params, lr=lr)
    crash = _crash_spec()
    kill = _crash_spec("CDGFAST_KILL_AT")  # test hook: SIGKILL this process, no cleanup, at method:task:step
    rank, world = D.get_rank(), D.get_world_size()
    student = D.data_parallel(model)  # DistributedDataParallel under torchrun; the model itself otherwise
    # A-GEM-style before_step hooks edit .grad from rank-local state (its buffer): average once more then
    resync = world > 1 and _overrides_before_step(method)
    sums: Dict[str, float] = {}
    step = 0
    bar = tqdm(total=steps, desc=f"{name} task {k + 1}/{T} train", disable=not progress, leave=False)
    model.train()
    while step < steps:
        for x, y in loader_factory():
            if step >= steps:
                break
            step += 1
            if world > 1:  # every rank sees the same global batch and keeps its slice
                x, y = x[rank::world], y[rank::world]
            x, y = x.to(next(model.parameters()).device), y.to(next(model.parameters()).device)
            terms = method.loss(student, {"x": x, "y": y})
            for tname, v in terms.items():
                val = float(v.detach())
                if not math.isfinite(val):
                    raise NonFiniteLoss(name, k, step, tname, val)
                sums[tname] = sums.get(tname, 0.0) + val
            total = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            total.backward()  # under DDP the gradients are averaged over ranks during this backward
            if world > 1 and step == 1:
                _check_all_parameters_used(model, name)
            method.before_step(model)
            if resync:
                D.all_reduce_grads(params)
            opt.step()
            method.after_step(model)
            bar.update(1)
            if step % 10 == 0 or step == steps:
                bar.set_postfix({t: f"{v.item():.4f}" for t, v in terms.items()})
            if on_step is not None:
                on_step(name, k, step)
            if crash is not None and crash == (name, k, step):
                raise InjectedCrash(f"injected crash (CDGFAST_CRASH_AT) at {name}:{k}:{step}")
            if kill is not None and kill == (name, k, step):
                import signal
                os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    opt.zero_grad(set_to_none=True)
    return {t: v / max(1, steps) for t, v in sums.items()}


def _rank_method_state(out: Path, name: str, ck: dict) -> dict:
    """The method state this rank saved with checkpoint `ck` (rank 0's lives in `ck` itself)."""
    rank = D.get_rank()
    if rank == 0:
        return ck["method_state"]
    mine = load_rank_state(out, name, rank, ck["completed_task"])
    if mine is None or mine.get("fingerprint") != ck.get("fingerprint"):
        raise RunError(f"--resume: rank {rank} has no state for {name} after task {ck['completed_task'] + 1} in "
                       f"{out / 'checkpoints'}; resume with the same number of processes and output directory")
    return mine["method_state"]


def _overrides_before_step(method) -> bool:
    from cdgfast.methods import Method
    members = list(getattr(method, "members", [])) or [method]
    return any(type(m).before_step is not Method.before_step for m in members)


def _check_all_parameters_used(model, name: str) -> None:
    """DistributedDataParallel (without find_unused_parameters) averages a gradient bucket only when all
    of its parameters received a gradient: refuse to step on a partly reduced gradient."""
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if unused:
        raise RunError(f"method {name}: {len(unused)} trainable parameter(s) got no gradient in the training loss "
                       f"(e.g. {unused[:3]}); torchrun training needs every trainable parameter in the loss. "
                       f"Freeze them (requires_grad False) or run in one process.")


def _progress_data(factory, desc, progress):
    """Wrap a data callable so every pass over it shows a tqdm bar (Fisher passes, buffer filling)."""
    from tqdm.auto import tqdm

    def gen():
        it = factory()
        total = len(it) if hasattr(it, "__len__") else None
        return iter(tqdm(it, total=total, desc=desc, disable=not progress, leave=False))

    return gen


def run(cfg: RunConfig, on_step: Optional[Callable] = None) -> dict:
    """Run a benchmark (see the module docstring); returns the results dict also written to results.json."""
    from cdgfast.data import Task, class_incremental_split, task_loader
    from cdgfast.diffusion import NoiseSchedule
    from cdgfast.metrics import (CLASSIFIER_LABEL, ClassifierFeatures, InceptionFeatures, get_classifier,
                                 summarize)
    from cdgfast.models.unet import build_unet
    from cdgfast.metrics.classifier import accuracy

    t_start, c_start = time.time(), time.process_time()
    preset, sc, methods, dataset = resolve(cfg)
    try:
        info = D.init_from_env(cfg.device)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    main = info.is_main
    out = Path(cfg.out) if cfg.out else default_out_dir(preset.name, cfg.scale, cfg.resume)
    prepare_out_dir(out, cfg.resume, cfg.overwrite, main)
    D.barrier()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    D.barrier()
    log = Logger(out / "train.log", enabled=main)
    progress = cfg.progress and main
    device = info.device
    log(f"cdgfast.train: preset {preset.name}, scale {cfg.scale}, methods {methods}, seed {cfg.seed}, device {device}"
        f", world size {info.world_size}, out {out}")

    inception = None
    if cfg.inception:  # fail before any training when the weights are missing
        try:
            inception = InceptionFeatures(cfg.inception, device=device)
        except (FileNotFoundError, ImportError, ValueError) as exc:
            raise RunError(str(exc)) from None
    data = load_benchmark_data(dataset, data_root=cfg.data_root, image_size=sc.image_size, scale=cfg.scale,
                               seed=cfg.seed, log=log)
    if sc.max_train_per_class is not None:
        data.train_x, data.train_y = limit_per_class(data.train_x, data.train_y, sc.max_train_per_class)
    T, cpt, notes = task_structure(data.num_classes, preset, bool(data.substitutions), cfg.num_tasks)
    for n in notes:
        data.substitutions.append(n)
        log(f"NOTE: {n}")
    from cdgfast.data import ImageDataset
    train_ds = ImageDataset(data.train_x, data.train_y, num_classes=data.num_classes, name=data.name)
    tasks = class_incremental_split(train_ds.y, num_tasks=T, classes_per_task=cpt)
    log(f"data: {data.source}; train {len(train_ds)}, eval {data.eval_x.shape[0]}, "
        f"{data.channels}x{data.image_size}x{data.image_size}; tasks {[t.classes for t in tasks]}")

    fingerprint_src = {"preset": preset.name, "scale": cfg.scale, "dataset": data.name, "seed": cfg.seed,
                       "method_args": cfg.method_args,
                       "scale_config": asdict(sc), "tasks": [t.classes for t in tasks], "inception": bool(cfg.inception),
                       "world_size": info.world_size}
    fingerprint = hashlib.sha256(json.dumps(fingerprint_src, sort_keys=True, default=str).encode()).hexdigest()[:16]
    run_info = {"config": {**asdict(cfg), "methods": methods, "dataset": dataset}, "scale_config": asdict(sc),
                "fingerprint": fingerprint}
    if main:
        old = json.loads((out / "run.json").read_text()) if (cfg.resume and (out / "run.json").is_file()) else None
        if old is not None and old.get("fingerprint") != fingerprint:
            raise RunError(f"--resume: {out} was started with another configuration (fingerprint "
                           f"{old.get('fingerprint')} vs {fingerprint}); use the same options or --overwrite")
        atomic_write_text(out / "run.json", json.dumps(run_info, indent=1, default=str))

    # The classifier behind classifier-FID and the KLD, cached by data set / resolution / seed.
    t0 = time.time()
    clf = clf_path = None
    for turn in ("main", "others"):  # rank 0 trains and caches it; the other ranks then load the cache
        if (turn == "main") == main:
            clf, clf_path = get_classifier(f"{data.name}", data.train_x, data.train_y, data.num_classes,
                                           seed=cfg.seed, epochs=sc.classifier_epochs, cache_dir=cfg.cache_dir,
                                           device=device, progress=progress, log=log)
        D.barrier()
    clf_acc = accuracy(clf, data.eval_x, data.eval_y)
    log(f"classifier: held-out accuracy {clf_acc:.3f} ({time.time() - t0:.1f}s)")
    extractor = inception if inception is not None else ClassifierFeatures(clf)
    fid_label = extractor.label
    if fid_label == CLASSIFIER_LABEL:
        log("FID below is classifier-FID: Fréchet distance on the features of a small CNN trained on this data set; "
            "not comparable with published Inception FIDs (pass --inception PATH for those).")
    schedule = NoiseSchedule()
    evaluator = Evaluator(data=data, tasks=tasks, extractor=extractor, classifier=clf, sc=sc, schedule=schedule,
                          seed=cfg.seed, device=device, log=log, progress=progress)

    results: Dict[str, dict] = {}
    for name in methods:
        t_method = time.time()
        method, cumulative = _build_method(name, preset, cfg.scale, cfg.seed, cfg.method_args)
        seed_everything(derive_seed(cfg.seed, "init"))  # the same initial weights for every method
        model = build_unet(sc.unet, num_classes=data.num_classes, in_channels=data.channels,
                           sample_size=data.image_size).to(device)
        D.broadcast_parameters(model)
        method.setup(num_classes=data.num_classes, schedule=schedule, device=device)
        fid_rows: List[List[float]] = []
        klds: List[float] = []
        accs: List[float] = []
        timings: List[dict] = []
        losses: List[dict] = []
        start = 0
        ck = load_checkpoint(out, name) if cfg.resume else None
        if ck is not None:
            if ck.get("fingerprint") != fingerprint:
                raise RunError(f"--resume: the checkpoint of {name} in {out} comes from another configuration")
            try:
                model.load_state_dict(ck["model"])
            except RuntimeError:  # methods that change the module structure (LoRA): the pickled module
                model = ck["model_object"].to(device)
            method.load_state_dict(_rank_method_state(out, name, ck))
            fid_rows, klds, accs = ck["fid_rows"], ck["kld"], ck["gen_accuracy"]
            timings, losses = ck["timings"], ck["losses"]
            start = ck["completed_task"] + 1
            log(f"{name}: resuming after task {start} of {T} from {out / 'checkpoints'}")
        for k in range(start, T):
            seed_everything(derive_seed(cfg.seed, k))
            task = tasks[k]
            if cumulative:
                task = Task(index=k, classes=[c for t in tasks[:k + 1] for c in t.classes],
                            indices=torch.cat([t.indices for t in tasks[:k + 1]]).sort().values)
            if sc.steps_per_task:
                steps = sc.first_task_steps if (k == 0 and sc.first_task_steps) else sc.steps_per_task
            else:
                steps = max(1, math.ceil(sc.epochs_per_task * len(task) / sc.batch_size))
            data_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, k, "data"))

            def loader_factory(task=task, g=data_gen):
                return task_loader(train_ds, task, sc.batch_size, shuffle=True, generator=g)

            t0, c0 = time.time(), time.process_time()
            method.begin_task(model, task)
            D.decorrelate_generators(method)  # each rank its own noise for its rows while training
            with D.sharded_estimators(progress=progress):  # the methods' data-parallel hooks (CCD's regressor)
                loss_means = _train_task(model, method, loader_factory, steps, sc.lr, name, k, T, log, progress,
                                         on_step)
            t1 = time.time()

            def task_data(task=task):
                return task_loader(train_ds, task, sc.batch_size, shuffle=False)

            # the global stream, as in one process: the sharded estimators take each rank's share
            end_data = _progress_data(task_data, f"{name} task {k + 1} end_task pass", progress)
            D.sync_generators(method)
            with D.sharded_estimators(progress=progress):
                method.end_task(model, end_data)
                method.post_task_phase(model, end_data)
            t2 = time.time()
            row, kld, gen_acc, xs, ys = evaluator.evaluate(model, k, name)
            t3 = time.time()
            fid_rows.append(row)
            klds.append(kld)
            accs.append(gen_acc)
            losses.append(loss_means)
            timings.append({"train_s": t1 - t0, "end_task_s": t2 - t1, "eval_s": t3 - t2, "steps": steps,
                            "cpu_s": time.process_time() - c0})
            log(f"{name} task {k + 1}/{T}: steps {steps}, loss {loss_means.get('task', float('nan')):.4f}, "
                f"{fid_label} per task {[round(v, 2) for v in row]}, KLD {kld:.3f}, classifier acc on samples "
                f"{gen_acc:.2f}, time train {t1 - t0:.1f}s end_task {t2 - t1:.1f}s eval {t3 - t2:.1f}s")
            if info.world_size > 1 and not main:  # rank-local method state (replay buffers) first
                save_rank_state(out, name, info.rank, k, {"fingerprint": fingerprint, "completed_task": k,
                                                           "method_state": method.state_dict()})
            D.barrier()
            if main:
                from .report import save_sample_grid
                save_sample_grid(xs, ys, out / "samples" / f"{name}_task{k + 1}.png", per_class=sc.grid_per_class)
                state = {"version": 1, "fingerprint": fingerprint, "method": name, "completed_task": k,
                         "model": {kk: v.detach().cpu() for kk, v in model.state_dict().items()},
                         "model_object": None, "method_state": method.state_dict(), "fid_rows": fid_rows,
                         "kld": klds, "gen_accuracy": accs, "timings": timings, "losses": losses}
                if _structure_changed(model, data, sc):
                    state["model_object"] = model
                save_checkpoint(out, name, state)
            D.barrier()
            if info.world_size > 1 and not main:
                drop_rank_state(out, name, info.rank, k - 1)
        matrix = [row + [None] * (T - len(row)) for row in fid_rows]
        summary = summarize(matrix, kld=klds[-1])
        summary.update({"kld_at_k": klds, "classifier_accuracy_on_samples": accs, "timings": timings,
                        "loss_means": losses, "train_s": sum(t["train_s"] for t in timings),
                        "total_s": sum(t["train_s"] + t["end_task_s"] + t["eval_s"] for t in timings),
                        "method_config": {k: v for k, v in getattr(method, "config", {}).items()}})
        results[name] = summary
        log(f"{name}: MF {summary['mf']:.2f}, forgetting {summary['forgetting']}, IMF {summary['imf']:.2f}, "
            f"KLD {summary['kld']:.3f} ({time.time() - t_method:.1f}s this session)")

    total = time.time() - t_start
    cpu_total = time.process_time() - c_start
    payload = {
        "preset": preset.name, "description": preset.description, "scale": cfg.scale,
        "config": run_info["config"], "scale_config": asdict(sc), "versions": versions(),
        "world_size": info.world_size, "device": str(device),
        "data": {"used": data.name, "requested": data.requested, "source": data.source,
                 "substitutions": data.substitutions, "num_train": len(train_ds), "num_eval": int(data.eval_x.shape[0]),
                 "image_size": data.image_size, "channels": data.channels, "num_classes": data.num_classes,
                 "tasks": [t.classes for t in tasks]},
        "metric": {"fid": fid_label, "fid_reference": "held-out evaluation images of each task's classes",
                   "fid_samples_per_class": sc.fid_samples_per_class, "ddim_steps": sc.ddim_steps,
                   "classifier_cache": clf_path, "classifier_eval_accuracy": clf_acc,
                   "inception_weights": cfg.inception,
                   "definitions": {"fid": "fid[k][i] = FID_i(m_k), task i after training task k",
                                   "afid_at_k": "mean_{i<=k} FID_i(m_k)",
                                   "forgetting": "mean_{k<T} FID_k(m_T) - FID_k(m_k)",
                                   "mf": "AFID@T", "imf": "mean_k AFID@k",
                                   "kld": "KL(uniform over seen classes || classifier histogram of samples)"}},
        "methods": results,
        "paper": {"source": preset.paper_source, "metric": preset.paper_metric, "values": preset.paper},
        "timings": {"wall_s_this_session": total, "cpu_s_this_session": cpu_total, "resumed": bool(cfg.resume),
                    "torch_threads": torch.get_num_threads()},
        "fingerprint": fingerprint,
    }
    if main:
        from .report import write_outputs
        write_outputs(out, payload, log)
    log(f"done in {total:.1f}s wall ({cpu_total:.1f}s CPU, {torch.get_num_threads()} threads); outputs in {out}")
    log.close()
    D.barrier()
    return payload


def _structure_changed(model, data, sc) -> bool:
    """True when the model has parameters a fresh build_unet lacks (LoRA adapters)."""
    return any("lora" in n.lower() for n, _ in model.named_parameters())
