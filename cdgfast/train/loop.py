"""The benchmark loop: for every method, train through the tasks, evaluate FID on every task seen so far
after each task, checkpoint atomically, and write the results.

Reproducibility: every random draw of task k of method m comes from seeds derived from
(--seed, m, k): the global torch RNG is re-seeded at the start of each task, the data order uses its
own generator, evaluation sampling uses per-chunk generators, and the method's own generator is in its
checkpointed state. So continuing from the checkpoint after task k gives the same numbers as an
uninterrupted run (same seed, same number of threads and processes).

Finished work is never lost: --set values are checked against the methods' declared hyperparameters
before any work; --resume continues every method whose fingerprint (run settings + its resolved
hyperparameters) matches its checkpoint, reruns the ones that changed, keeps the results of finished
methods not run in this session, and reports an unreadable checkpoint by name while the other methods
go on; --overwrite deletes nothing until the options and data have been checked; Ctrl-C says where
the run stopped (RunInterrupted; the CLI prints the --resume command).

`run()` is a list of stages (`_run`): `_open_session` (options, processes, output folder, log),
`_load_inputs` (Inception weights, data, tasks), `_fingerprints` and `_start_outputs` (run.json),
`_build_ruler` (the FID classifier / features and the evaluator), one `_MethodRun` per method
(resume, then per task: train, end_task, evaluate, checkpoint), `_write_results`. `RunCallbacks`
observe a run (`run(cfg, callbacks=...)`); the tests' crash, kill and Ctrl-C hooks are callbacks of
theirs (tests/train_hooks.py), not part of the driver.

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
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import torch

from cdgfast.data import ImageDataset, Task

from . import distributed as D
from .checkpoint import (UnreadableCheckpoint, atomic_write_text, checkpoint_path, drop_rank_state, load_checkpoint,
                         load_rank_state, method_checkpoint_files, read_checkpoint, save_checkpoint, save_rank_state)
from .data import BenchmarkData, canonical_dataset, limit_per_class, load_benchmark_data
from .presets import SCALES, Preset, ScaleConfig, get_preset

if TYPE_CHECKING:
    from cdgfast.diffusion import NoiseSchedule

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


class RunStopped(RuntimeError):
    """The run stopped on a failure it names (the CLI prints the message and exits with code 1); the
    checkpoints of the tasks finished before it are kept. A `RunCallbacks` hook may raise a subclass
    to stop a run on purpose."""


class NonFiniteLoss(RunStopped):
    def __init__(self, method: str, task: int, step: int, term: str, value: float):
        self.method, self.task, self.step, self.term, self.value = method, task, step, term, value
        super().__init__(f"non-finite loss in method {method!r}, task {task + 1} (index {task}), step {step}: "
                         f"term {term!r} = {value}. The run stopped; the last good checkpoint (after task "
                         f"{task}) is kept.")


class RunInterrupted(Exception):
    """Ctrl-C (SIGINT) during a run: `where` says where it stopped, `out` holds the finished work
    (None when it stopped before the output directory was chosen)."""

    def __init__(self, where: str, out: Optional[Path], world_size: int = 1):
        self.where, self.out, self.world_size = where, out, world_size
        super().__init__(f"interrupted {where}")


class RunCallbacks:
    """Observers of a run, called by the driver at fixed points; this base class does nothing.

    Pass one to `run(cfg, callbacks=...)` or `cdgfast.train.cli.main(argv, callbacks=...)`. A hook may
    raise to stop the run where it is called, like an error there (a `RunStopped` subclass: the CLI
    prints it and exits with code 1); the tests stop, kill and interrupt runs this way
    (tests/train_hooks.py)."""

    def on_step(self, method: str, task: int, step: int) -> None:
        """After optimiser step `step` (1-based) of task `task` (0-based) of `method`, on every rank."""


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
    fid: str = "auto"                    # --fid: FID backbone, "auto" / "inception" / "classifier"
    cache_dir: Optional[str] = None
    steps: Optional[int] = None          # override: training steps per task
    fid_samples: Optional[int] = None    # override: generated samples per class for FID / KLD
    batch_size: Optional[int] = None     # override
    num_tasks: Optional[int] = None      # override: use only the first N tasks
    progress: bool = True
    allow_pickle: bool = False           # --allow-pickle: read old .pt (pickle) checkpoints on --resume
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


def text_only_methods() -> List[str]:
    """Registered methods that only run on text-conditional models (their TinyRun needs "text")."""
    from cdgfast.methods import available
    from cdgfast.methods._registry import tiny_run

    return [m for m in available() if "text" in getattr(tiny_run(m), "needs", ())]


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
    """Lines to the console (through tqdm.write, so bars stay intact) and to out/train.log (rank 0).

    The file is opened by `start_file()`, once the options and the data have been checked and the
    output directory prepared; lines logged before are kept and written then (a run refused on bad
    input leaves no directory behind)."""

    def __init__(self, path: Optional[Path], enabled: bool = True):
        self.enabled = enabled
        self.path = path
        self.file = None
        self.pending: List[str] = []

    def start_file(self) -> None:
        if self.path is None or not self.enabled or self.file is not None:
            return
        self.file = open(self.path, "a")
        for line in self.pending:
            self.file.write(line)
        self.file.flush()
        self.pending = []

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm
        tqdm.write(msg, file=sys.stdout)
        line = time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n"
        if self.file:
            self.file.write(line)
            self.file.flush()
        else:
            self.pending.append(line)

    def to_file(self, msg: str) -> None:
        """A line for train.log only (the console gets its own message)."""
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
        if m in text_only_methods():
            raise RunError(f"method: {m!r} needs a text-conditional model (modifier tokens, prompts); the driver's "
                           f"presets are class-conditional (the text-to-image presets are not in the driver yet)")
    if len(set(methods)) != len(methods):
        raise RunError(f"method: listed twice in {methods}")
    members = {part for m in methods for part in _method_base(m).split("+")} | {_method_base(m) for m in methods}
    for m in cfg.method_args:
        if m not in members:
            raise RunError(f"set: {m!r} is not a method of this run (nor a member of one); expected one of "
                           f"{sorted(members)}")
    _check_set_values(cfg.method_args)
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
        # --fid-samples counts per class whatever the protocol counts in
        sc.fid_samples_per_task = None
        if sc.fid_protocol == "seen_classes":
            sc.fid_samples_total = cfg.fid_samples * preset.num_tasks * preset.classes_per_task
    if cfg.batch_size is not None:
        if cfg.batch_size < 1:
            raise RunError(f"batch-size: expected a positive integer, got {cfg.batch_size}")
        sc.batch_size = cfg.batch_size
        sc.method_batch_size = {}  # an explicit --batch-size is every method's
    try:
        from .protocol import check_scale_config
        check_scale_config(sc)
    except ValueError as exc:
        raise RunError(f"scale config of {preset.name} at {cfg.scale}: {exc}") from None
    for m in methods:  # unknown --set keys fail here, before any data loading or training
        _check_guidance(m, _build_method(m, preset, cfg.scale, cfg.seed, cfg.method_args)[0], sc)
    return preset, sc, methods, dataset


def _check_guidance(name: str, method, sc: ScaleConfig) -> None:
    """RunError where a sampler would guide towards a null class the method never trains: the evaluation's
    classifier-free `guidance` needs label dropout in the member that computes the task loss; GD's
    `replay_guidance` needs a class-conditional model (GD itself refuses it without label dropout)."""
    owner = getattr(method, "primary", method)
    if sc.guidance != 1 and float(owner.config.get("label_dropout", 0.0)) == 0:
        raise RunError(f"guidance: the evaluation samples with classifier-free guidance {sc.guidance}, but method "
                       f"{name} trains with label_dropout = 0, so its null class is never learned; set "
                       f"--set {owner.name}.label_dropout=0.1 or a scale with guidance 1")
    for m in getattr(method, "members", [method]):
        g = float(m.config.get("replay_guidance", 1.0))
        if g != 1 and not sc.class_conditional:
            raise RunError(f"replay_guidance: method {name} guides its replay ({g}) but the model is unconditional")


def resolved_config(cfg: RunConfig) -> dict:
    """`--print-config`: the fully resolved run as a JSON-ready dict (cdgfast.train.protocol.describe), from
    the same resolve() / _build_method the run uses; reads no data and trains nothing."""
    from .protocol import describe

    from cdgfast.metrics.fid import FidBackboneUnavailable, resolve_fid_backbone

    preset, sc, methods, dataset = resolve(cfg)
    configs = {m: _as_json(_build_method(m, preset, cfg.scale, cfg.seed, cfg.method_args)[0].config) for m in methods}
    t = cfg.num_tasks if cfg.num_tasks is not None else preset.num_tasks
    # the backbone the run would use (the same resolver); where the run would refuse, say so instead
    try:
        backbone, weights = resolve_fid_backbone(cfg.fid, cfg.inception, cfg.scale)
        fid_backbone = "classifier" if backbone == "classifier" else f"inception ({weights})"
    except FidBackboneUnavailable:
        fid_backbone = "inception (weights not found here: the run refuses; --inception PATH or --fid classifier)"
    out = describe(preset=preset, scale=cfg.scale, sc=sc, methods=methods, dataset=dataset, method_configs=configs,
                   num_tasks=t, classes_per_task=preset.classes_per_task)
    out["evaluation"]["fid_backbone"] = fid_backbone
    return _as_json(out)


def _check_set_values(method_args: Dict[str, dict]) -> None:
    """Every --set value against the declared hyperparameters of its method (type, range, choices),
    before any work: a bad value is a RunError naming METHOD.KEY and the values it accepts."""
    from cdgfast.methods import create

    for member, kw in method_args.items():
        for key, value in kw.items():
            try:
                create(member, **{key: value})
            except ValueError as exc:
                raise RunError(f"set: {member}.{key}={value!r}: {exc}") from None


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


def prepare_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an output directory whose contents a run would damage: a file, a run without --resume /
    --overwrite, or a non-empty folder that is not a cdgfast.train run (its files could share our names).
    Deletes nothing: `clear_run_outputs` does that for --overwrite once the options and data are checked."""
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise RunError(f"out: {out} exists and is not a folder; choose a new or empty folder for the run")
    finished = (out / "results.json").is_file()
    started = (out / "run.json").is_file() or (out / "checkpoints").is_dir()
    foreign = out.is_dir() and not _is_run_dir(out) and any(out.iterdir())
    if foreign and not overwrite:
        listing = sorted(p.name for p in out.iterdir())
        shown = ", ".join(listing[:5]) + (f", ... ({len(listing)} entries)" if len(listing) > 5 else "")
        raise RunError(f"out: {out} is not empty and holds no cdgfast.train run (it has {shown}); choose a new or "
                       f"empty folder, or pass --overwrite to write the run into it (files named like the run's "
                       f"outputs, {', '.join(OUTPUT_FILES + OUTPUT_DIRS)}, are replaced)")
    if overwrite:
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


def clear_run_outputs(out: Path) -> None:
    """--overwrite: remove the files and folders a run writes (nothing else)."""
    for f in OUTPUT_FILES:
        if (out / f).is_file():
            (out / f).unlink()
    for f in out.glob("train.rank*.log"):  # the other ranks' logs of a torchrun personalization run
        f.unlink()
    for d in OUTPUT_DIRS:
        if (out / d).is_dir():
            shutil.rmtree(out / d)


def _is_run_dir(p: Path) -> bool:
    return ((p / "results.json").is_file() or (p / "run.json").is_file() or (p / "checkpoints").is_dir()
            or (p / "seeds.json").is_file())


def _is_free(p: Path) -> bool:
    """Nothing there yet, or an empty folder."""
    return not p.exists() or (p.is_dir() and not any(p.iterdir()))


def default_out_dir(preset: str, scale: str, resume: bool) -> Path:
    """runs/<preset>-<scale> when --out is not given. An explicit --out holding a run is refused
    (prepare_out_dir); the implicit one moves on to runs/<preset>-<scale>-2, -3, ... so that running the
    default twice (`make demo`) never fails, and never writes into a folder that holds anything. With
    --resume: the newest existing run."""
    base = Path("runs") / f"{preset}-{scale}"
    cands = [base] + [base.with_name(f"{base.name}-{i}") for i in range(2, 1000)]
    if resume:
        existing = [c for c in cands if _is_run_dir(c)]
        return existing[-1] if existing else base
    for c in cands:
        if _is_free(c):
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
        self.shape = (data.channels, data.image_size, data.image_size)
        self.log, self.progress = log, progress
        self.ref_stats, self.real_counts = [], []
        # per_task: the reference of task i is its classes' images; seen_classes: after task k, every
        # class of tasks 0..k (one FID of unconditional samples, the generative-distillation protocol)
        seen = sc.fid_protocol == "seen_classes"
        for k, t in enumerate(tasks):
            classes = [c for tt in tasks[:k + 1] for c in tt.classes] if seen else t.classes
            mask = torch.zeros_like(data.eval.y, dtype=torch.bool)
            for c in classes:
                mask |= data.eval.y == c
            x, y = limit_per_class(data.eval.x[mask], data.eval.y[mask], sc.fid_real_per_class)
            if x.shape[0] < 2:
                raise RunError(f"data: task {t.index} has {x.shape[0]} evaluation images; FID needs at least 2")
            feats = extract_features(extractor, x, device=device)
            self.ref_stats.append(feature_statistics(feats))
            self.real_counts.append(int(x.shape[0]))


    def sample(self, model, labels: Optional[torch.Tensor], key, total: Optional[int] = None) -> tuple:
        """(images, labels): one sample per label (`labels` None: `total` unconditional samples, labels
        None); chunks of 256, chunk i sampled by rank i % world with its own seed (so the result does not
        depend on the world size)."""
        from tqdm.auto import tqdm
        from cdgfast.sampling import ddim_sample

        count = labels.numel() if labels is not None else int(total)
        chunk = 256
        num_chunks = -(-count // chunk)
        rank, world = D.get_rank(), D.get_world_size()
        mine = list(range(rank, num_chunks, world))
        xs = []
        for i in tqdm(mine, desc=f"sampling {key[0]} task {key[1] + 1}", disable=not self.progress, leave=False):
            g = torch.Generator().manual_seed(derive_seed(self.seed, "eval", key[1], i))  # same for every method
            n = min(chunk, count - i * chunk)
            y = labels[i * chunk:(i + 1) * chunk].to(self.device) if labels is not None else None
            xs.append(ddim_sample(model, y, schedule=self.schedule, num_steps=self.sc.ddim_steps, generator=g,
                                  shape=(n,) + self.shape, timestep_spacing=self.sc.ddim_spacing,
                                  eta=float(self.sc.ddim_eta), guidance=float(self.sc.guidance) if y is not None else 1.0))
        if D.get_world_size() > 1:
            mine_x = torch.cat(xs) if xs else torch.zeros(
                (0, model.config.in_channels, model.config.sample_size, model.config.sample_size), device=self.device)
            return D.gather_round_robin(mine_x, count, chunk), labels
        return torch.cat(xs).cpu(), labels

    def evaluate(self, model, k: int, method: str):
        """FID_i(m_k) for i <= k, the KLD over the classes seen so far, and the samples."""
        from cdgfast.metrics import class_kld, extract_features, feature_statistics, frechet_distance, predict

        classes = [c for t in self.tasks[:k + 1] for c in t.classes]
        if self.sc.fid_protocol == "seen_classes":
            # one FID of unconditional samples against every seen class; row k repeats it for each task
            # seen, so AFID@k (and MF) is that FID
            x, _ = self.sample(model, None, (method, k), total=self.sc.fid_samples_total)
            mu, sig = feature_statistics(extract_features(self.extractor, x, device=self.device))
            fid = frechet_distance(*self.ref_stats[k], mu, sig)
            pred = predict(self.classifier, x)
            # no labels to compare with: the grid shows the samples by the class the classifier sees
            return [fid] * (k + 1), class_kld(pred, classes, self.num_classes), float("nan"), x, pred
        from .protocol import fid_labels

        x, y = self.sample(model, fid_labels(self.sc, [t.classes for t in self.tasks[:k + 1]]), (method, k))
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
def _build_method(name: str, preset: Preset, scale: str, seed: int, method_args: Optional[Dict[str, dict]] = None):
    from cdgfast.methods import create

    spec = TRAINER_METHODS.get(name)
    base = _method_base(name)
    overrides = preset.overrides_for(base, scale)
    dropout = preset.scales[scale].label_dropout
    if dropout is not None:  # the scale's label dropout (a guided evaluation needs it in every method) ...
        overrides = {"label_dropout": float(dropout), **overrides}  # ... unless the preset sets the method's own
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


def _train_task(model, method, loader_factory, steps: int, sc: ScaleConfig, name: str, k: int, T: int, log,
                progress, on_step: Callable[[str, int, int], None]):
    from tqdm.auto import tqdm
    from cdgfast.params import trainable_parameters
    from .protocol import clip_gradients, make_optimizer

    params = trainable_parameters(model)
    opt, sched = make_optimizer(params, sc, steps)  # a fresh optimiser (and schedule) every task
    rank, world = D.get_rank(), D.get_world_size()
    student = D.data_parallel(model)  # DistributedDataParallel under torchrun; the model itself otherwise
    # A-GEM-style before_step hooks edit .grad from rank-local state (its buffer): average once more then
    resync = world > 1 and _overrides_before_step(method)
    ema = None
    if sc.ema_decay is not None:
        from .ema import WeightEMA
        ema = WeightEMA(params, sc.ema_decay)  # a fresh average every task, from the weights it starts with
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
            clip_gradients(params, sc)  # after the method's own edits (A-GEM's projection): the step is clipped
            opt.step()
            if sched is not None:
                sched.step()
            method.after_step(model)
            if ema is not None:
                ema.update()
            bar.update(1)
            if step % 10 == 0 or step == steps:
                bar.set_postfix({t: f"{v.item():.4f}" for t, v in terms.items()})
            on_step(name, k, step)
    bar.close()
    opt.zero_grad(set_to_none=True)
    if ema is not None:  # what end_task, the evaluation, the checkpoint and the next task see
        ema.copy_to()
    return {t: v / max(1, steps) for t, v in sums.items()}


def _rank_method_state(out: Path, name: str, ck: dict, allow_pickle: bool = False) -> dict:
    """The method state this rank saved with checkpoint `ck` (rank 0's lives in `ck` itself)."""
    rank = D.get_rank()
    if rank == 0:
        return ck["method_state"]
    try:
        mine = load_rank_state(out, name, rank, ck["completed_task"], allow_pickle=allow_pickle)
    except UnreadableCheckpoint as exc:
        raise RunError(f"--resume: rank {rank}'s state of {name}: {exc}; delete {checkpoint_path(out, name)} "
                       f"and its rank files to rerun {name} from task 1") from None
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


@dataclass
class _Where:
    """Where a run is, for the message after Ctrl-C."""

    out: Optional[Path] = None           # set once the output directory holds the run
    world_size: int = 1
    phase: str = "checking the options"
    method: Optional[str] = None
    task: Optional[int] = None           # 0-based
    num_tasks: Optional[int] = None
    step: int = 0
    steps: int = 0
    saved: Dict[str, int] = field(default_factory=dict)   # method -> last task (0-based) in its checkpoint
    finished: List[str] = field(default_factory=list)
    log: Optional["Logger"] = None

    def describe(self) -> str:
        if self.method is None:
            text = f"while {self.phase}"
        else:
            text = f"in {self.method}"
            if self.task is not None:
                text += f", task {self.task + 1} of {self.num_tasks}"
            step = f", step {self.step} of {self.steps}" if self.phase == "training" else ""
            text += f" ({self.phase}{step})"
        if self.out is None:
            return text + "; nothing was written"
        partial = [f"{m} after task {k + 1}" for m, k in self.saved.items() if m not in self.finished]
        kept = ([f"finished: {', '.join(self.finished)}"] if self.finished else []) + \
               ([f"checkpointed: {', '.join(partial)}"] if partial else [])
        return text + f". Kept in {self.out}: " + ("; ".join(kept) if kept else "no finished task yet")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _as_json(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _changes(old: Optional[dict], new: dict) -> str:
    """"lam 15000.0 -> 100.0, ..." between two configurations (as stored in JSON)."""
    if not isinstance(old, dict):
        return "settings not recorded"
    o, n = _as_json(old), _as_json(new)
    diffs = [f"{k} {o.get(k)!r} -> {n.get(k)!r}" for k in sorted(set(o) | set(n)) if o.get(k) != n.get(k)]
    return ", ".join(diffs) if diffs else "same hyperparameters, other run settings"


def _read_json(path: Path, what: str) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"{what}: {path} cannot be read ({type(exc).__name__}: {exc}); delete it, or --overwrite "
                       f"to start the run again") from None


def _method_summary(rec: dict) -> dict:
    """results.json's entry for one method from its recorded metrics (a checkpoint, or this session's)."""
    from cdgfast.metrics import summarize

    T = rec["num_tasks"]
    matrix = [list(row) + [None] * (T - len(row)) for row in rec["fid_rows"]]
    summary = summarize(matrix, kld=rec["kld"][-1])
    timings = rec["timings"]
    summary.update({"kld_at_k": rec["kld"], "classifier_accuracy_on_samples": rec["gen_accuracy"], "timings": timings,
                    "loss_means": rec["losses"], "train_s": sum(t["train_s"] for t in timings),
                    "total_s": sum(t["train_s"] + t["end_task_s"] + t["eval_s"] for t in timings),
                    "method_config": dict(rec["method_config"]), "fingerprint": rec["fingerprint"]})
    return summary


def _unreadable_message(name: str, exc: UnreadableCheckpoint) -> str:
    return (f"the checkpoint of {name}, {exc.path}, cannot be read ({exc.reason}). Delete it to rerun {name} from "
            f"task 1 (or put back a good copy), then run the same command with --resume again")


def _earlier_results(out: Path, session: List[str], unreadable: Dict[str, str], run_fp: str, T: int,
                     log, allow_pickle: bool = False) -> Dict[str, dict]:
    """Results of this run's methods that are finished but not produced in this session (not asked for
    now, or their checkpoint cannot be read now): from their checkpoints, else from the previous
    results.json when no readable checkpoint of the method is left."""
    from .checkpoint import EXT, LEGACY_EXT

    found: Dict[str, dict] = {}
    checkpointed = set()
    own = {checkpoint_path(out, m).name[:-len(EXT)] + ext for m in session for ext in (EXT, LEGACY_EXT)}
    for path in method_checkpoint_files(out):
        if path.name in own:
            continue
        try:
            ck = read_checkpoint(path, mmap=True, allow_pickle=allow_pickle)  # the metrics only
        except UnreadableCheckpoint as exc:
            log(f"WARNING: {exc}; that method's results cannot be shown (delete the file to rerun it)")
            continue
        name = ck.get("method", path.stem)
        checkpointed.add(name)
        if ck.get("run_fingerprint") != run_fp:
            log(f"NOTE: {path} was made with other run settings; {name} is not in the results")
        elif ck["completed_task"] + 1 < T:
            log(f"NOTE: {name} stopped after task {ck['completed_task'] + 1} of {T} in an earlier session; not in the "
                f"results (finish it with --resume --method {name})")
        else:
            found[name] = _method_summary(ck)
            log(f"{name}: finished in an earlier session and not run now; its results are kept")
    try:
        prev = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else None
    except (OSError, ValueError):
        prev = None
    if isinstance(prev, dict) and prev.get("fingerprint") == run_fp:
        for name, r in (prev.get("methods") or {}).items():
            if name in found or name in checkpointed or (name in session and name not in unreadable):
                continue
            found[name] = r
            log(f"{name}: results kept from the previous results.json (its checkpoint "
                f"{'cannot be read' if name in unreadable else 'is gone'})")
    return found


# -------------------------------------------------------------------------------------------------- the run
def run(cfg: RunConfig, callbacks: Optional[RunCallbacks] = None) -> dict:
    """Run a benchmark (see the module docstring); returns the results dict also written to results.json.
    `callbacks` observe the run (RunCallbacks). Ctrl-C raises RunInterrupted saying where the run
    stopped; the checkpoints of finished tasks stay."""
    if callbacks is not None and not isinstance(callbacks, RunCallbacks):
        raise ValueError(f"callbacks: expected a cdgfast.train.RunCallbacks or None, got {type(callbacks).__name__}")
    where = _Where()
    try:
        return _run(cfg, callbacks or RunCallbacks(), where)
    except KeyboardInterrupt:
        text = where.describe()
        if where.log is not None:
            where.log.to_file(f"INTERRUPTED (Ctrl-C) {text}")
            where.log.close()
        raise RunInterrupted(text, where.out, where.world_size) from None


def _run(cfg: RunConfig, callbacks: RunCallbacks, where: _Where) -> dict:
    """The stages of a run, in order. What a run refuses on its inputs (options, output folder, data,
    other run settings on --resume) is refused before `_start_outputs` writes anything."""
    session = _open_session(cfg, callbacks, where)
    inputs = _load_inputs(session)
    ruler = _build_ruler(session, inputs)  # part of the inputs: a run with another protocol is refused on --resume
    prints = _fingerprints(session, inputs, ruler)
    run_info = _start_outputs(session, inputs, prints, ruler)
    results: Dict[str, dict] = {}
    unreadable: Dict[str, str] = {}  # method -> what to do about its checkpoint
    for name in session.methods:
        summary = _MethodRun(session, inputs, ruler, prints, name).run(unreadable)
        if summary is not None:
            results[name] = summary
    return _write_results(session, inputs, ruler, run_info, results, unreadable)


@dataclass
class _Session:
    """What `_open_session` settles: the checked options, the processes, the output folder and the log."""

    cfg: RunConfig
    preset: Preset
    sc: ScaleConfig
    methods: List[str]
    dataset: str
    info: D.DistInfo
    out: Path
    log: Logger
    where: _Where
    callbacks: RunCallbacks
    t_start: float
    c_start: float

    @property
    def main(self) -> bool:
        return self.info.is_main

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def progress(self) -> bool:
        return self.cfg.progress and self.info.is_main


def _open_session(cfg: RunConfig, callbacks: RunCallbacks, where: _Where) -> _Session:
    """Stage 1: check the options (names, --set values, sizes), join the other processes (torchrun),
    choose and check the output folder, start the log (its file opens in `_start_outputs`)."""
    t_start, c_start = time.time(), time.process_time()
    preset, sc, methods, dataset = resolve(cfg)
    try:
        info = D.init_from_env(cfg.device)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    where.world_size = info.world_size
    out = Path(cfg.out) if cfg.out else default_out_dir(preset.name, cfg.scale, cfg.resume)
    prepare_out_dir(out, cfg.resume, cfg.overwrite)
    log = Logger(out / "train.log", enabled=info.is_main)  # the file starts once the inputs are checked
    where.log = log
    log(f"cdgfast.train: preset {preset.name}, scale {cfg.scale}, methods {methods}, seed {cfg.seed}, "
        f"device {info.device}, world size {info.world_size}, out {out}")
    return _Session(cfg=cfg, preset=preset, sc=sc, methods=methods, dataset=dataset, info=info, out=out, log=log,
                    where=where, callbacks=callbacks, t_start=t_start, c_start=c_start)


@dataclass
class _Inputs:
    """What `_load_inputs` loads: the data, its tasks, and the Inception network when asked for."""

    data: BenchmarkData
    tasks: List[Task]
    inception: Optional[object]
    ruler_train: tuple = ()  # (x, y): the full training split, which the FID classifier is trained on

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)


def _load_inputs(s: _Session) -> _Inputs:
    """Stage 2: the Inception weights (--inception; checked first, so a bad path costs no data loading),
    the data (substituted at the smoke / cpu scales when missing), and the class-incremental tasks."""
    from cdgfast.data import class_incremental_split
    from cdgfast.metrics import InceptionFeatures, resolve_fid_backbone

    cfg, sc, log = s.cfg, s.sc, s.log
    s.where.phase = "loading the data"
    # the FID backbone first (--fid / --inception; no download): a refusal costs no data loading
    try:
        backbone, weights = resolve_fid_backbone(cfg.fid, cfg.inception, cfg.scale)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    inception = None
    if backbone == "inception":
        try:
            inception = InceptionFeatures(weights, device=s.device)
        except (FileNotFoundError, ImportError, ValueError) as exc:
            raise RunError(str(exc)) from None
        log(f"FID backbone: Inception ({inception.kind}, {weights})")
    data = load_benchmark_data(s.dataset, data_root=cfg.data_root, image_size=sc.image_size, scale=cfg.scale,
                               log=log, progress=s.progress)
    if sc.channels == 3 and data.channels == 1:  # CLoG trains on RGB: grey images repeated to three channels
        def rgb(ds):
            return ImageDataset(ds.x.repeat(1, 3, 1, 1), ds.y, num_classes=ds.num_classes, name=ds.name)

        data.train, data.eval = rgb(data.train), rgb(data.eval)
        log("data: grey images repeated to 3 channels (RGB), as the preset's protocol trains")
    ruler_train = (data.train.x, data.train.y)  # the ruler learns the whole training split, whatever the cap below
    if sc.max_train_per_class is not None:
        data.train = ImageDataset(*limit_per_class(data.train.x, data.train.y, sc.max_train_per_class),
                                  num_classes=data.num_classes, name=data.train.name)
    T, cpt, notes = task_structure(data.num_classes, s.preset, bool(data.substitutions), cfg.num_tasks)
    for n in notes:
        data.substitutions.append(n)
        log(f"NOTE: {n}")
    # "seeded": the class order is a permutation drawn from the run seed (the generative-distillation
    # paper's seeded random order); "sorted": 0..K-1 (seed 0 of class_incremental_split)
    order_seed = derive_seed(cfg.seed, "class_order") if sc.class_order == "seeded" else 0
    tasks = class_incremental_split(data.train.y, num_tasks=T, classes_per_task=cpt, seed=order_seed)
    log(f"data: {data.source}; train {len(data.train)}, eval {len(data.eval)}, "
        f"{data.channels}x{data.image_size}x{data.image_size}; tasks {[t.classes for t in tasks]}")
    return _Inputs(data=data, tasks=tasks, inception=inception, ruler_train=ruler_train)


@dataclass
class _Fingerprints:
    """The run's fingerprint (what every method shares: data, tasks, scale, seed; must match on
    --resume) and each method's (the run's + its resolved hyperparameters: decides whether its
    checkpoint continues or it runs again, so a corrected --set reruns only that method)."""

    run: str
    source: dict
    methods: Dict[str, str]


def _fingerprints(s: _Session, inputs: _Inputs, ruler: "_Ruler") -> _Fingerprints:
    """Stage 3a: the fingerprints of the run and of this session's methods (the evaluation protocol's
    digest included, so checkpoints measured with another ruler are never mixed in)."""
    cfg = s.cfg
    source = {"preset": s.preset.name, "scale": cfg.scale, "dataset": inputs.data.name, "seed": cfg.seed,
              "scale_config": asdict(s.sc), "tasks": [t.classes for t in inputs.tasks],
              "inception": bool(cfg.inception), "world_size": s.info.world_size,
              "protocol": protocol_digest(ruler.protocol)}
    run_fp = _digest(source)
    methods = {}
    for name in s.methods:
        m, cumulative = _build_method(name, s.preset, cfg.scale, cfg.seed, cfg.method_args)
        methods[name] = _digest({"run": run_fp, "method": name, "config": m.config, "cumulative": cumulative})
    return _Fingerprints(run=run_fp, source=source, methods=methods)


def _start_outputs(s: _Session, inputs: _Inputs, prints: _Fingerprints, ruler: "_Ruler") -> dict:
    """Stage 3b: on --resume, refuse a run.json made with another evaluation protocol or other run
    settings; then (only now, so that a run refused on its inputs deletes nothing) clear the outputs of
    --overwrite, open train.log and write run.json. Returns run.json's content."""
    cfg, out = s.cfg, s.out
    old = _read_json(out / "run.json", "--resume") if cfg.resume else None
    if old is not None:
        diff = protocol_differences(old.get("protocol"), ruler.protocol)
        if diff:
            raise RunError(f"--resume: {out} was measured with another evaluation protocol ({diff}); its numbers "
                           f"cannot be continued with this ruler. Start a new run (another --out, or --overwrite)")
    if old is not None and old.get("fingerprint") != prints.run:
        src, now = old.get("fingerprint_source"), _as_json(prints.source)
        what = (", ".join(f"{k} {v!r} -> {now.get(k)!r}" for k, v in sorted(src.items()) if now.get(k) != v)
                if isinstance(src, dict) else f"fingerprint {old.get('fingerprint')} vs {prints.run}")
        raise RunError(f"--resume: {out} was started with other run settings ({what}); use the same options "
                       f"(--set values may differ: only the methods they change run again), or --overwrite")
    all_methods = list(dict.fromkeys(list((old or {}).get("all_methods") or (old or {}).get("config", {}).get(
        "methods") or []) + s.methods))
    run_info = {"command": "cdgfast.train", "config": {**asdict(cfg), "methods": s.methods, "dataset": s.dataset},
                "scale_config": asdict(s.sc), "fingerprint": prints.run, "fingerprint_source": prints.source,
                "method_fingerprints": {**((old or {}).get("method_fingerprints") or {}), **prints.methods},
                "all_methods": all_methods, "protocol": ruler.protocol}
    D.barrier()
    if s.main:
        if cfg.overwrite:
            clear_run_outputs(out)
        out.mkdir(parents=True, exist_ok=True)
        s.log.start_file()
        atomic_write_text(out / "run.json", json.dumps(run_info, indent=1, default=str))
    D.barrier()
    s.where.out, s.where.num_tasks = out, inputs.num_tasks
    return run_info


@dataclass
class _Ruler:
    """What `_build_ruler` builds to measure the methods with: the classifier behind classifier-FID and
    the KLD, the FID features (Inception or the classifier's), the evaluator and the noise schedule."""

    classifier_path: Optional[str]
    classifier_accuracy: float
    fid_label: str
    schedule: NoiseSchedule
    evaluator: Evaluator
    protocol: dict = field(default_factory=dict)  # evaluation_protocol(): what the numbers were measured with


def _build_ruler(s: _Session, inputs: _Inputs) -> _Ruler:
    """Stage 3 (before anything is written): the classifier, fixed per data set and resolution and
    independent of --seed (shipped, or trained once with a fixed seed and cached; rank 0 trains, the
    other ranks then load the cache), the FID features, the reference statistics of every task, and
    the evaluation protocol they make up."""
    from cdgfast.diffusion import NoiseSchedule
    from cdgfast.metrics import CLASSIFIER_LABEL, ClassifierFeatures, get_classifier
    from cdgfast.metrics.classifier import accuracy

    cfg, data, log = s.cfg, inputs.data, s.log
    s.where.phase = "training the FID classifier"
    t0 = time.time()
    clf = clf_path = None
    clf_info: dict = {}
    for turn in ("main", "others"):
        if (turn == "main") == s.main:
            clf, clf_info = get_classifier(f"{data.name}", *inputs.ruler_train, data.num_classes,
                                           epochs=s.sc.classifier_epochs, cache_dir=cfg.cache_dir,
                                           device=s.device, progress=s.progress, log=log)
        D.barrier()
    clf_path = clf_info["path"]
    clf_acc = accuracy(clf, data.eval.x, data.eval.y)
    log(f"classifier: held-out accuracy {clf_acc:.4f} on {len(data.eval)} evaluation images ({clf_info['source']}, "
        f"sha256 {clf_info['sha256'][:12]}, {time.time() - t0:.1f}s)")
    extractor = inputs.inception if inputs.inception is not None else ClassifierFeatures(clf)
    if extractor.label == CLASSIFIER_LABEL:
        log("FID below is classifier-FID: Fréchet distance on the features of a small CNN trained on this data set; "
            "not comparable with published Inception FIDs (the FID Inception weights give those: --fid inception).")
    schedule = NoiseSchedule()
    evaluator = Evaluator(data=data, tasks=inputs.tasks, extractor=extractor, classifier=clf, sc=s.sc,
                          schedule=schedule, seed=cfg.seed, device=s.device, log=log, progress=s.progress)
    protocol = evaluation_protocol(data=data, sc=s.sc, extractor=extractor, classifier_info=clf_info,
                                   classifier_accuracy=clf_acc,
                                   inception=None if inputs.inception is None else inputs.inception.path,
                                   evaluator=evaluator)
    return _Ruler(classifier_path=clf_path, classifier_accuracy=clf_acc, fid_label=extractor.label,
                  schedule=schedule, evaluator=evaluator, protocol=protocol)


def _file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def evaluation_protocol(*, data: BenchmarkData, sc: ScaleConfig, extractor, classifier_info: dict,
                        classifier_accuracy: float, inception: Optional[str], evaluator: "Evaluator") -> dict:
    """What a run's numbers were measured with: the feature network (its sha256: the classifier's state
    dict, or the Inception weights file), the classifier behind the KLD and its held-out accuracy, the
    evaluation split's sha256, the sample counts and the sampler. Two runs whose protocols differ do not
    measure with the same ruler (`protocol_differences`)."""
    from cdgfast.metrics import CLASSIFIER_LABEL
    from cdgfast.metrics.classifier import data_sha256

    return {"feature_network": extractor.label,
            # "inception" (the FID Inception, torch-fidelity weights or TorchScript) or "classifier"
            "fid_backbone": "classifier" if extractor.label == CLASSIFIER_LABEL else "inception",
            "feature_network_sha256": _file_sha256(inception) if inception else classifier_info["sha256"],
            "classifier_sha256": classifier_info["sha256"], "classifier_source": classifier_info["source"],
            "classifier_eval_accuracy": round(float(classifier_accuracy), 6),
            "eval_split_sha256": data_sha256(data.eval.x, data.eval.y), "num_eval": len(data.eval),
            "real_per_task": evaluator.real_counts, "fid_samples_per_class": sc.fid_samples_per_class,
            "fid_real_per_class": sc.fid_real_per_class,
            **({} if (sc.fid_protocol, sc.fid_samples_per_task) == ("per_task", None) else  # as before by default
               {"fid_protocol": sc.fid_protocol, "fid_samples_per_task": sc.fid_samples_per_task,
                "fid_samples_total": sc.fid_samples_total}),
            "sampler": {"name": "ddim", "steps": sc.ddim_steps, "eta": float(sc.ddim_eta),
                        **({} if sc.ddim_spacing == "trailing" else {"spacing": sc.ddim_spacing}),
                        **({} if sc.guidance == 1 else {"guidance": float(sc.guidance), "null_class": "num_classes"}),
                        "noise_schedule": {"num_timesteps": evaluator.schedule.num_timesteps,
                                           "beta_start": evaluator.schedule.beta_start,
                                           "beta_end": evaluator.schedule.beta_end}}}


# Protocol entries that may differ between runs measured with the same ruler (how the net was obtained).
# fid_backbone follows from feature_network and its sha256 (kept out of the digest so that runs recorded before
# it existed still resume).
_PROTOCOL_INFORMATIONAL = ("classifier_source", "fid_backbone")


def protocol_digest(protocol: dict) -> str:
    return _digest({k: v for k, v in protocol.items() if k not in _PROTOCOL_INFORMATIONAL})


def protocol_differences(old: Optional[dict], new: dict) -> str:
    """"" when `old` and `new` measure with the same ruler, else what differs (a run without a recorded
    protocol, made before the ruler was fixed, differs)."""
    if not isinstance(old, dict):
        return "the earlier run recorded no evaluation protocol"
    o, n = _as_json(old), _as_json(new)
    keys = sorted((set(o) | set(n)) - set(_PROTOCOL_INFORMATIONAL))
    return ", ".join(f"{k} {o.get(k)!r} -> {n.get(k)!r}" for k in keys if o.get(k) != n.get(k))


# A method's metrics after each task, as its checkpoint and _method_summary hold them.
_RECORD_KEYS = ("fid_rows", "kld", "gen_accuracy", "timings", "losses")


class _MethodRun:
    """Stage 5: one method through the tasks. Build it (the same initial weights for every method);
    on --resume continue from its checkpoint when its fingerprint matches (else run it again from task
    1); then for each task: train, end_task, evaluate, checkpoint."""

    def __init__(self, s: _Session, inputs: _Inputs, ruler: _Ruler, prints: _Fingerprints, name: str):
        self.s, self.inputs, self.ruler, self.name = s, inputs, ruler, name
        self.run_fp, self.mfp = prints.run, prints.methods[name]
        self.record: Dict[str, list] = {k: [] for k in _RECORD_KEYS}
        self.start = 0  # the first task to run in this session

    def run(self, unreadable: Dict[str, str]) -> Optional[dict]:
        """Its results.json entry; None when its checkpoint cannot be read (then said in `unreadable`)."""
        t_method = time.time()
        self._build()
        if self.s.cfg.resume and not self._resume(unreadable):
            return None
        for k in range(self.start, self.inputs.num_tasks):
            self._task(k)
        return self._finish(t_method)

    def _build(self) -> None:
        from .protocol import build_model

        s, name, data, device, schedule = self.s, self.name, self.inputs.data, self.s.device, self.ruler.schedule
        cfg, sc = s.cfg, s.sc
        s.where.method, s.where.task, s.where.phase = name, None, "setting up"
        method, self.cumulative = _build_method(name, s.preset, cfg.scale, cfg.seed, cfg.method_args)
        seed_everything(derive_seed(cfg.seed, "init"))  # the same initial weights for every method
        model = build_model(sc, num_classes=data.num_classes, channels=data.channels,
                            image_size=data.image_size).to(device)
        D.broadcast_parameters(model)
        method.setup(num_classes=data.num_classes, schedule=schedule, device=device, parallel=s.info.parallel,
                     progress=s.progress)
        self.method, self.model = method, model

    def _resume(self, unreadable: Dict[str, str]) -> bool:
        """Continue from the checkpoint if it matches; False when it cannot be read."""
        s, name, out, log, mfp, T = self.s, self.name, self.s.out, self.s.log, self.mfp, self.inputs.num_tasks
        try:
            ck = load_checkpoint(out, name, allow_pickle=s.cfg.allow_pickle)
        except UnreadableCheckpoint as exc:
            unreadable[name] = _unreadable_message(name, exc)
            log(f"ERROR: {unreadable[name]}. Going on with the other methods.")
            return False
        if ck is not None and ck.get("fingerprint") != mfp:
            log(f"{name}: its checkpoint (after task {ck['completed_task'] + 1}) was made with other settings "
                f"({_changes(ck.get('method_config'), self.method.config)}); running {name} again from task 1")
            return True
        if ck is None:
            log(f"{name}: no checkpoint in {out / 'checkpoints'}; running it from task 1")
            return True
        if ck.get("model_object") is not None:  # an old pickle checkpoint (--allow-pickle) of a LoRA model
            self.model = ck["model_object"].to(s.device)
        else:
            try:
                self.model.load_state_dict(ck["model"])
            except RuntimeError:  # a method that changes the module structure (LoRA) adds it again first
                self.method.restore_model_structure(self.model)
                self.model.load_state_dict(ck["model"])
        self.method.load_state_dict(_rank_method_state(out, name, ck, s.cfg.allow_pickle))
        self.record = {k: ck[k] for k in _RECORD_KEYS}
        self.start = ck["completed_task"] + 1
        s.where.saved[name] = ck["completed_task"]
        if self.start >= T:
            log(f"{name}: finished in an earlier session (all {T} tasks); kept, nothing to run again")
        else:
            log(f"{name}: resuming after task {self.start} of {T} from {out / 'checkpoints'}")
        return True

    def _task_and_steps(self, k: int):
        """Task k (for a cumulative method, the union of tasks 0..k) and its number of training steps."""
        tasks, sc = self.inputs.tasks, self.s.sc
        task = tasks[k]
        if self.cumulative:
            task = Task(index=k, classes=[c for t in tasks[:k + 1] for c in t.classes],
                        indices=torch.cat([t.indices for t in tasks[:k + 1]]).sort().values)
        if sc.steps_per_task:
            steps = sc.first_task_steps if (k == 0 and sc.first_task_steps) else sc.steps_per_task
        else:
            steps = max(1, math.ceil(sc.epochs_per_task * len(task) / sc.batch_size_for(self.name)))
        return task, steps

    def _task(self, k: int) -> None:
        """Train task k, run end_task, evaluate on the tasks so far, checkpoint."""
        from cdgfast.data import task_loader

        s, name, method, model = self.s, self.name, self.method, self.model
        cfg, sc, log, progress, where, T = s.cfg, s.sc, s.log, s.progress, s.where, self.inputs.num_tasks
        train_ds = self.inputs.data.train
        seed_everything(derive_seed(cfg.seed, k))
        task, steps = self._task_and_steps(k)
        batch = sc.batch_size_for(name)
        data_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, k, "data"))
        where.task, where.phase, where.step, where.steps = k, "training", 0, steps

        def loader_factory(task=task, g=data_gen):
            return task_loader(train_ds, task, batch, shuffle=True, generator=g)

        def step_seen(m, k, step):
            where.step = step
            s.callbacks.on_step(m, k, step)

        t0, c0 = time.time(), time.process_time()
        method.begin_task(model, task)
        D.decorrelate_generators(method)  # each rank its own noise for its rows while training
        loss_means = _train_task(model, method, loader_factory, steps, sc, name, k, T, log, progress,
                                 step_seen)
        t1 = time.time()
        where.phase = "end of task: Fisher / replay pool / buffers"

        def task_data(task=task):
            return task_loader(train_ds, task, batch, shuffle=False)

        # the global stream, as in one process: the estimators take each rank's share (method.parallel)
        end_data = _progress_data(task_data, f"{name} task {k + 1} end_task pass", progress)
        D.sync_generators(method)
        if k == T - 1:  # nothing comes after: skip what only prepares the next task (Fisher, pool, buffer)
            method.end_last_task(model, end_data)
        else:
            method.end_task(model, end_data)
        method.post_task_phase(model, end_data)
        t2 = time.time()
        where.phase = "evaluation"
        row, kld, gen_acc, xs, ys = self.ruler.evaluator.evaluate(model, k, name)
        t3 = time.time()
        rec = self.record
        rec["fid_rows"].append(row)
        rec["kld"].append(kld)
        rec["gen_accuracy"].append(gen_acc)
        rec["losses"].append(loss_means)
        rec["timings"].append({"train_s": t1 - t0, "end_task_s": t2 - t1, "eval_s": t3 - t2, "steps": steps,
                               "cpu_s": time.process_time() - c0})
        log(f"{name} task {k + 1}/{T}: steps {steps}, loss {loss_means.get('task', float('nan')):.4f}, "
            f"{self.ruler.fid_label} per task {[round(v, 2) for v in row]}, KLD {kld:.3f}, classifier acc on "
            f"samples {gen_acc:.2f}, time train {t1 - t0:.1f}s end_task {t2 - t1:.1f}s eval {t3 - t2:.1f}s")
        self._checkpoint(k, xs, ys)

    def _checkpoint(self, k: int, xs, ys) -> None:
        """The sample grid and the checkpoint after task k (rank 0), each rank's own method state first
        (replay buffers) under torchrun."""
        s, name, method, model, mfp = self.s, self.name, self.method, self.model, self.mfp
        out, info, main, sc = s.out, s.info, s.main, s.sc
        s.where.phase = "writing the checkpoint"
        if info.world_size > 1 and not main:  # rank-local method state (replay buffers) first
            save_rank_state(out, name, info.rank, k, {"fingerprint": mfp, "completed_task": k,
                                                       "method_state": method.state_dict()})
        D.barrier()
        if main:
            from .report import save_sample_grid
            save_sample_grid(xs, ys, out / "samples" / f"{name}_task{k + 1}.png", per_class=sc.grid_per_class)
            state = {"version": 2, "fingerprint": mfp, "run_fingerprint": self.run_fp, "method": name,
                     "completed_task": k, "num_tasks": self.inputs.num_tasks, "method_config": dict(method.config),
                     "model": {kk: v.detach().cpu() for kk, v in model.state_dict().items()},
                     "method_state": method.state_dict(), **self.record}
            save_checkpoint(out, name, state)
        D.barrier()
        s.where.saved[name] = k
        if info.world_size > 1 and not main:
            drop_rank_state(out, name, info.rank, k - 1)

    def _finish(self, t_method: float) -> dict:
        summary = _method_summary({"num_tasks": self.inputs.num_tasks, **self.record,
                                   "method_config": self.method.config, "fingerprint": self.mfp})
        self.s.where.finished.append(self.name)
        self.s.log(f"{self.name}: MF {summary['mf']:.2f}, forgetting {summary['forgetting']}, IMF "
                   f"{summary['imf']:.2f}, KLD {summary['kld']:.3f} ({time.time() - t_method:.1f}s this session)")
        return summary


def _write_results(s: _Session, inputs: _Inputs, ruler: _Ruler, run_info: dict, results: Dict[str, dict],
                   unreadable: Dict[str, str]) -> dict:
    """Stage 6: results.json / results.csv / report.md / afid.png from this session's methods and (on
    --resume) the finished ones kept from earlier sessions, in the run's order of methods; then an
    unreadable checkpoint is a RunError naming it. Returns results.json's content."""
    cfg, out, log = s.cfg, s.out, s.log
    s.where.method, s.where.task, s.where.phase = None, None, "writing the results"
    kept = (_earlier_results(out, s.methods, unreadable, run_info["fingerprint"], inputs.num_tasks, log,
                                 s.cfg.allow_pickle)
            if cfg.resume else {})
    ordered = {}
    for name in run_info["all_methods"] + list(kept):
        if name in results or name in kept:
            ordered.setdefault(name, results[name] if name in results else kept[name])
    total = time.time() - s.t_start
    cpu_total = time.process_time() - s.c_start
    payload = _results_payload(s, inputs, ruler, run_info, ordered, [n for n in ordered if n not in results],
                               total, cpu_total)
    if s.main and ordered:
        from .report import write_outputs
        write_outputs(out, payload, log)
    log(f"done in {total:.1f}s wall ({cpu_total:.1f}s CPU, {torch.get_num_threads()} threads); outputs in {out}")
    log.close()
    D.barrier()
    if unreadable:
        raise RunError("; ".join(unreadable.values()) + (f". The other methods are in {out / 'results.json'}."
                                                         if ordered else "."))
    return payload


def _results_payload(s: _Session, inputs: _Inputs, ruler: _Ruler, run_info: dict, ordered: Dict[str, dict],
                     kept: List[str], total: float, cpu_total: float) -> dict:
    """results.json: the run's settings, data, metric definitions, the methods' results, timings."""
    cfg, sc, preset, data = s.cfg, s.sc, s.preset, inputs.data
    return {
        "preset": preset.name, "description": preset.description, "scale": cfg.scale,
        "config": run_info["config"], "scale_config": asdict(sc), "versions": versions(),
        "world_size": s.info.world_size, "device": str(s.device),
        "data": {"used": data.name, "requested": data.requested, "source": data.source,
                 "substitutions": data.substitutions, "num_train": len(data.train), "num_eval": len(data.eval),
                 "image_size": data.image_size, "channels": data.channels, "num_classes": data.num_classes,
                 "tasks": [t.classes for t in inputs.tasks]},
        "protocol": ruler.protocol,
        "metric": {"fid": ruler.fid_label, "fid_reference": "held-out evaluation images of each task's classes",
                   "fid_samples_per_class": sc.fid_samples_per_class, "ddim_steps": sc.ddim_steps,
                   "classifier_path": ruler.classifier_path, "classifier_eval_accuracy": ruler.classifier_accuracy,
                   "inception_weights": None if inputs.inception is None else str(inputs.inception.path),
                   "definitions": {"fid": "fid[k][i] = FID_i(m_k), task i after training task k",
                                   "afid_at_k": "mean_{i<=k} FID_i(m_k)",
                                   "forgetting": "(1/T) sum_{k<=T} FID_k(m_T) - FID_k(m_k)",
                                   "mf": "AFID@T", "imf": "mean_k AFID@k",
                                   "kld": "KL(uniform over seen classes || classifier histogram of samples)"}},
        "methods": ordered,
        "kept_from_earlier_sessions": kept,
        "paper": {"source": preset.paper_source, "metric": preset.paper_metric, "values": preset.paper},
        "timings": {"wall_s_this_session": total, "cpu_s_this_session": cpu_total, "resumed": bool(cfg.resume),
                    "torch_threads": torch.get_num_threads()},
        "fingerprint": run_info["fingerprint"],
        "method_fingerprints": run_info["method_fingerprints"],
    }


# -------------------------------------------------------------------------------------------------- --seeds
SEED_METRICS = ("mf", "imf", "forgetting", "kld", "final_accuracy_on_samples")


def seed_dir(out: Path, seed: int) -> Path:
    """Where seed `seed` of a `--seeds` run lives: a complete run of its own (run.json, checkpoints, ...)."""
    return Path(out) / f"seed-{int(seed)}"


def mean_se(values: List[float]) -> dict:
    """Mean and standard error (sample standard deviation / sqrt(n); None for one value) of finite values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return {"mean": None, "se": None, "n": 0, "values": list(values)}
    mean = sum(vals) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1) / n) if n > 1 else None
    return {"mean": mean, "se": se, "n": n, "values": list(values)}


def check_seeds(seeds, resume: bool, overwrite: bool) -> None:
    """The `--seeds` list itself: one or more distinct integers (and not --resume with --overwrite)."""
    if not isinstance(seeds, (list, tuple)) or not seeds:
        raise RunError("seeds: expected one or more integer seeds")
    if any(not isinstance(s, int) or isinstance(s, bool) for s in seeds):
        raise RunError(f"seeds: expected integers, got {list(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise RunError(f"seeds: listed twice in {list(seeds)}")
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other")


def open_seeds_dir(out: Path, seeds: List[int], resume: bool, overwrite: bool, config: dict,
                   write: bool = True) -> List[int]:
    """The folder of a `--seeds` run (the class-incremental and the personalization drivers): refuses a
    file, a non-empty folder without --resume / --overwrite, and --resume of a folder that holds no
    --seeds run; writes seeds.json (every seed asked for so far, and `config`) when `write`. Returns the
    seeds of the run, earlier sessions' first."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"out: {out} exists and is not a folder; choose a new or empty folder for the run")
    if resume and not (out / "seeds.json").is_file():
        raise RunError(f"--resume: {out} holds no --seeds run to resume (no seeds.json)")
    # only the writer refuses a non-empty folder: under torchrun rank 0 may have written seeds.json already
    if write and not resume and not overwrite and not _is_free(out):
        raise RunError(f"out: {out} is not empty. Pass --resume to continue the --seeds run there, --overwrite to "
                       f"replace it, or choose another --out.")
    old = _read_json(out / "seeds.json", "--resume") if resume else None
    all_seeds = list(dict.fromkeys(list((old or {}).get("seeds") or []) + list(seeds)))
    if write:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "seeds.json", json.dumps({"seeds": all_seeds, "config": config}, indent=1,
                                                         default=str))
    return all_seeds


def finished_seeds(out: Path, all_seeds: List[int], per_seed: Dict[int, dict]) -> None:
    """Adds to `per_seed` the finished results of seeds of earlier sessions that were not asked for now."""
    for seed in all_seeds:
        if seed not in per_seed:
            prev = _read_json(seed_dir(out, seed) / "results.json", "--resume")
            if prev is not None:
                per_seed[seed] = prev


def method_rows(per_seed: Dict[int, dict]) -> Tuple[List[int], Dict[str, List[Optional[dict]]]]:
    """The seeds in order, and per method (in order of first appearance) its results.json entry of every
    seed (None where that seed did not run it)."""
    seeds = sorted(per_seed)
    methods: List[str] = []
    for s in seeds:
        methods += [m for m in per_seed[s]["methods"] if m not in methods]
    return seeds, {m: [per_seed[s]["methods"].get(m) for s in seeds] for m in methods}


def aggregate_seeds(per_seed: Dict[int, dict]) -> dict:
    """The summary of a `--seeds` run from each seed's results.json content: per method and metric the
    per-seed values, mean and standard error; for every pair of methods the MF gap and whether it exceeds
    the combined error sqrt(se_a^2 + se_b^2); and whether every seed was measured with the same
    evaluation protocol (a seed measured with another ruler is flagged, not averaged silently)."""
    seeds, by_method = method_rows(per_seed)
    methods = list(by_method)
    summary = {}
    for m, rows in by_method.items():
        entry = {}
        for key in SEED_METRICS:
            if key == "final_accuracy_on_samples":
                vals = [r["classifier_accuracy_on_samples"][-1] if r else None for r in rows]
            else:
                vals = [r.get(key) if r else None for r in rows]
            entry[key] = mean_se(vals)
        entry["min_accuracy_on_samples"] = mean_se([min(r["classifier_accuracy_on_samples"]) if r else None
                                                    for r in rows])
        summary[m] = entry
    comparisons = []
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            ma, mb = summary[a]["mf"], summary[b]["mf"]
            if ma["mean"] is None or mb["mean"] is None:
                continue
            err = (math.sqrt(ma["se"] ** 2 + mb["se"] ** 2) if ma["se"] is not None and mb["se"] is not None
                   else None)
            gap = mb["mean"] - ma["mean"]
            comparisons.append({"a": a, "b": b, "mf_gap_b_minus_a": gap, "combined_se": err,
                                "exceeds_error": None if err is None else abs(gap) > err,
                                "exceeds_2x_error": None if err is None else abs(gap) > 2 * err})
    protocols = {s: per_seed[s].get("protocol") for s in seeds}
    digests = {s: protocol_digest(p) if isinstance(p, dict) else None for s, p in protocols.items()}
    consistent = len(set(digests.values())) == 1 and None not in digests.values()
    differing = [] if consistent else [
        f"seed {s}: " + (protocol_differences(protocols[seeds[0]], protocols[s]) or "no protocol recorded")
        for s in seeds[1:] if digests[s] != digests[seeds[0]] or digests[s] is None]
    return {"seeds": seeds, "methods": summary, "comparisons": comparisons, "protocol": protocols[seeds[0]],
            "protocol_consistent": consistent, "protocol_differences": differing}


def run_seeds(cfg: RunConfig, seeds: List[int], callbacks: Optional[RunCallbacks] = None) -> dict:
    """`--seeds S1 S2 ...`: one complete run per seed in <out>/seed-<s>/ (each with its own run.json,
    checkpoints, results and report, and its own --resume: a finished seed is kept, an interrupted one
    continues, a new one starts), then <out>/results.json with every seed's results and their mean and
    standard error, and <out>/report.md with the mean ± s.e. tables. Returns that results.json content."""
    check_seeds(seeds, cfg.resume, cfg.overwrite)
    preset, _, _, _ = resolve(cfg)  # bad names and --set values fail before any folder is touched
    out = Path(cfg.out) if cfg.out else default_out_dir(preset.name, cfg.scale, cfg.resume)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    all_seeds = open_seeds_dir(out, seeds, cfg.resume, cfg.overwrite, {**asdict(cfg), "seed": None, "out": str(out)},
                               write=main_rank)
    per_seed: Dict[int, dict] = {}
    for seed in seeds:
        d = seed_dir(out, seed)
        child = RunConfig(**{**asdict(cfg), "seed": int(seed), "out": str(d),
                             "resume": bool(cfg.resume and _is_run_dir(d)), "overwrite": bool(cfg.overwrite)})
        try:
            per_seed[seed] = run(child, callbacks)
        except RunInterrupted as exc:
            raise RunInterrupted(f"{exc.where} (seed {seed} of {list(seeds)})", out, exc.world_size) from None
    finished_seeds(out, all_seeds, per_seed)
    agg = aggregate_seeds(per_seed)
    payload = {"preset": preset.name, "description": preset.description, "scale": cfg.scale,
               "config": {**asdict(cfg), "seed": None, "seeds": sorted(per_seed)},
               "metric": per_seed[seeds[0]]["metric"], "data": per_seed[seeds[0]]["data"],
               **agg,
               "per_seed": {str(s): {"out": seed_dir(out, s).name, "methods": per_seed[s]["methods"],
                                     "protocol": per_seed[s].get("protocol"), "timings": per_seed[s].get("timings")}
                            for s in sorted(per_seed)}}
    if main_rank:
        from .report import write_seeds_outputs
        write_seeds_outputs(out, payload, print if cfg.progress else (lambda *_: None))
    return payload
