"""Benchmark presets (SPEC section 5), each at three scales.

  smoke  seconds to ~2 minutes on a laptop CPU: the tiny UNet, a handful of steps; checks the plumbing.
  cpu    minutes to an hour on a CPU: the tiny UNet at 16x16 on the preset's data set, or, when the
         machine lacks it, on the MNIST test set split into train / evaluation parts (the substitution
         is printed and recorded in results.json).
  paper  the papers' hyperparameters (model size, optimiser, epochs, replay pool, FID sample count) for
         an A100 / H200 class GPU; needs the real data set (no substitution).

A preset names its data set, the task structure, the methods it compares, the method hyperparameters
the paper used (`method_overrides`, passed to `cdgfast.methods.create(name, **overrides)`), and the
paper's reported numbers (`paper`), which report.md puts beside the run.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional

SCALES = ("smoke", "cpu", "paper")
DEFAULT_PRESET = "default"


@dataclass
class ScaleConfig:
    """Training / evaluation sizes of one scale. Exactly one of `steps_per_task` / `epochs_per_task`."""

    unet: str = "tiny"
    image_size: Optional[int] = 16           # None: the data set's native size
    batch_size: int = 64
    lr: float = 2e-4
    steps_per_task: Optional[int] = 100
    first_task_steps: Optional[int] = None   # task 1 trains from scratch: optionally longer (steps mode only)
    epochs_per_task: Optional[float] = None
    fid_samples_per_class: int = 50          # class-balanced DDIM samples per class for FID / KLD
    fid_real_per_class: Optional[int] = None  # cap on real reference images per class (None: all)
    ddim_steps: int = 20                     # DDIM steps of the evaluation sampler
    classifier_epochs: int = 8               # the classifier-FID / KLD classifier
    max_train_per_class: Optional[int] = None  # cap on training images per class (smoke runs)
    grid_per_class: int = 8                  # samples per class in the per-task sample grid
    method_overrides: Dict[str, dict] = field(default_factory=dict)
    # The training loop (cdgfast.train.protocol builds the optimiser and schedule from these; the
    # defaults are the loop as it always was: Adam, constant lr, no clipping, no dropout).
    optimizer: str = "adam"                  # "adam" | "adamw"
    weight_decay: float = 0.0
    lr_schedule: str = "constant"            # "constant" | "cosine" (per task, after linear warm-up)
    warmup_steps: int = 0                    # linear warm-up steps at the start of every task
    grad_clip: Optional[float] = None        # max global gradient norm (None: no clipping)
    dropout: float = 0.0                     # the UNet's dropout
    ema_decay: Optional[float] = None        # EMA of the weights within each task, swapped in at its end (train/ema.py)
    method_batch_size: Dict[str, int] = field(default_factory=dict)  # method -> its own batch size
    # The model and the evaluation.
    class_conditional: bool = True           # False: an unconditional UNet (no class embedding)
    channels: Optional[int] = None           # None: the data set's own; 3: grey images repeated to RGB
    ddim_spacing: str = "trailing"           # timestep spacing of the evaluation sampler (diffusers names)
    ddim_eta: float = 0.0                    # the evaluation sampler's eta (0: DDIM; 1: DDPM-like stochastic steps)
    guidance: float = 1.0                    # classifier-free guidance of the evaluation sampler (1: none; needs
    #                                          every method's label_dropout > 0)
    label_dropout: Optional[float] = None    # every method's label_dropout unless its overrides set one (None: its own)
    fid_protocol: str = "per_task"           # "per_task": FID_i(m_k) per task; "seen_classes": one FID of
    #                                          unconditional samples against all seen classes' test images
    fid_samples_per_task: Optional[int] = None  # per_task: class-balanced samples per task (None: per class x classes)
    fid_samples_total: Optional[int] = None  # seen_classes: unconditional samples after every task
    class_order: str = "sorted"              # "sorted" (0..K-1) | "seeded" (a permutation drawn from --seed)

    def batch_size_for(self, method: str) -> int:
        """The training batch size of `method` (its own entry of method_batch_size, else batch_size)."""
        return int(self.method_batch_size.get(method, self.batch_size))


@dataclass
class Preset:
    name: str
    description: str
    dataset: str                     # a name of cdgfast.data.DATASET_REGISTRY
    num_tasks: int
    classes_per_task: int
    methods: List[str]
    scales: Dict[str, ScaleConfig]
    method_overrides: Dict[str, dict] = field(default_factory=dict)   # every scale
    paper: Dict[str, Dict[str, float]] = field(default_factory=dict)  # method -> {metric: value}
    paper_source: str = ""
    paper_metric: str = "Inception FID"

    def scale(self, scale: str) -> ScaleConfig:
        if scale not in self.scales:
            raise ValueError(f"scale: expected one of {list(self.scales)}, got {scale!r}")
        return copy.deepcopy(self.scales[scale])

    def overrides_for(self, method: str, scale: str) -> dict:
        """Hyperparameters passed to create(method): preset-wide, then scale-specific. For a composed
        name ("rank1+gd") the members' entries are merged (later members win on clashes)."""
        out: dict = {}
        names = method.split("+") if "+" in method else [method]
        for src in (self.method_overrides, self.scales[scale].method_overrides):
            for n in names:
                out.update(src.get(n, {}))
            if "+" in method:
                out.update(src.get(method, {}))
        return out


# --------------------------------------------------------------------------------------------------
# Scales shared by families. The smoke scale is tiny everywhere; tests shrink it further with --steps.
def _smoke(**kw) -> ScaleConfig:
    base = dict(unet="tiny", image_size=16, batch_size=32, lr=1e-3, steps_per_task=3, fid_samples_per_class=8,
                ddim_steps=3, classifier_epochs=2, max_train_per_class=48, grid_per_class=4,
                method_overrides={"gd": {"pool_per_class": 8, "pool_steps": 4}, "rank1": {"fisher_max_samples": 64},
                                  "diag": {"fisher_max_samples": 64}, "ewc": {"fisher_max_samples": 64},
                                  "ewc_dc": {"fisher_max_samples": 32},
                                  "mas": {"mas_max_samples": 32}})
    base.update(kw)
    return ScaleConfig(**base)


def _cpu(**kw) -> ScaleConfig:
    base = dict(unet="tiny", image_size=16, batch_size=64, lr=1e-3, steps_per_task=400, fid_samples_per_class=100,
                ddim_steps=25, classifier_epochs=8, grid_per_class=8,
                method_overrides={"gd": {"pool_per_class": 100, "pool_steps": 25}, "rank1": {"fisher_max_samples": 1024},
                                  "diag": {"fisher_max_samples": 1024}, "ewc": {"fisher_max_samples": 1024},
                                  "ewc_dc": {"fisher_max_samples": 1024}})
    base.update(kw)
    return ScaleConfig(**base)


_RANK1_PAPER = {  # Table 1 of the rank-1 Fisher paper: AFID at the final task / forgetting F (Inception FID);
    # finetune: Table 6 (appendix E.4.2, lambda = 0: final FID / average forgetting)
    "mnist": {"joint": (2.6, None), "diag": (62.2, 51.1), "rank1": (65.2, 58.3), "gd": (10.1, 2.3),
              "diag+gd": (14.3, 5.2), "rank1+gd": (7.6, 0.6), "finetune": (102.642, 93.700)},
    "fmnist": {"joint": (5.7, None), "diag": (99.9, 81.7), "rank1": (96.9, 82.1), "gd": (19.1, 3.9),
               "diag+gd": (27.7, 9.1), "rank1+gd": (15.4, 0.9), "finetune": (103.955, 88.009)},
    "cifar10": {"joint": (23.3, None), "diag": (128.6, 74.4), "rank1": (120.0, 77.4), "gd": (61.2, 16.6),
                "diag+gd": (72.6, 17.9), "rank1+gd": (50.5, 7.4), "finetune": (115.410, 72.496)},
    "imagenet32": {"joint": (11.7, None), "diag": (86.1, 34.2), "rank1": (74.3, 41.3), "gd": (69.0, 46.2),
                   "diag+gd": (73.8, 25.8), "rank1+gd": (48.5, 15.2), "finetune": (265.902, 67.864)},
}

# CCD paper Table 1: MF / IMF per data set; rehearsal-free rows do not depend on the buffer.
_CCD_FREE = {  # method: {dataset: (MF, IMF)}
    "joint": {"mnist": (4.99, 4.99), "cifar100": (65.97, 65.97), "flowers102": (21.16, 21.16), "cub200": (35.80, 35.80)},
    "kd": {"mnist": (62.83, 58.98), "cifar100": (114.22, 103.40), "flowers102": (102.49, 117.79), "cub200": (157.70, 111.07)},
    "ewc": {"mnist": (119.29, 176.59), "cifar100": (110.07, 141.78), "flowers102": (104.91, 114.35), "cub200": (165.19, 163.08)},
    "l2": {"mnist": (105.34, 67.66), "cifar100": (134.25, 129.48), "flowers102": (153.53, 132.70), "cub200": (125.47, 108.61)},
    "si": {"mnist": (85.39, 66.95), "cifar100": (145.06, 132.67), "flowers102": (148.00, 136.80), "cub200": (142.90, 132.01)},
    "mas": {"mnist": (291.70, 304.40), "cifar100": (146.77, 169.19), "flowers102": (104.99, 317.51), "cub200": (128.66, 154.84)},
    "clora": {"mnist": (106.71, 80.63), "cifar100": (134.58, 131.47), "flowers102": (369.62, 363.88), "cub200": (142.85, 129.43)},
}
_CCD_BUFFER = {  # buffer: method: {dataset: (MF, IMF)}
    512: {"er": {"mnist": (97.57, 69.38), "cifar100": (94.19, 89.30),
                   "flowers102": (88.36, 94.06), "cub200": (130.57, 135.07)},
          "agem": {"mnist": (94.67, 66.00), "cifar100": (96.85, 90.80),
                   "flowers102": (89.41, 92.59), "cub200": (121.73, 139.66)},
          "ccd": {"mnist": (79.76, 57.63), "cifar100": (96.34, 90.14),
                   "flowers102": (86.11, 92.18), "cub200": (121.15, 101.42)}},
    2560: {"er": {"mnist": (73.60, 56.95), "cifar100": (103.38, 98.55),
                   "flowers102": (67.89, 80.33), "cub200": (373.50, 353.32)},
           "agem": {"mnist": (69.77, 54.32), "cifar100": (104.58, 99.43),
                   "flowers102": (66.36, 79.79), "cub200": (103.78, 114.93)},
           "ccd": {"mnist": (67.48, 50.94), "cifar100": (101.51, 98.68),
                   "flowers102": (65.31, 79.70), "cub200": (106.93, 84.11)}},
    5120: {"er": {"mnist": (60.40, 135.19), "cifar100": (103.34, 99.39),
                   "flowers102": (67.19, 80.23), "cub200": (135.98, 164.87)},
           "agem": {"mnist": (68.59, 107.24), "cifar100": (103.87, 100.49),
                   "flowers102": (65.39, 79.71), "cub200": (70.33, 99.21)},
           "ccd": {"mnist": (48.97, 40.08), "cifar100": (102.09, 98.33),
                   "flowers102": (64.97, 79.62), "cub200": (67.00, 61.37)}},
}

# The generative-distillation paper's protocol: an unconditional model, a seeded random class order, one
# FID of unconditional samples against every seen class (and the KLD of their classifier histogram).
_GD_PROTOCOL = dict(class_conditional=False, fid_protocol="seen_classes", class_order="seeded")

RANK1_METHODS = ["joint", "finetune", "diag", "rank1", "gd", "diag+gd", "rank1+gd"]
CCD_METHODS = ["kd", "ewc", "l2", "si", "mas", "clora", "er", "agem", "ccd"]


def _rank1_preset(key: str, dataset: str, title: str) -> Preset:
    paper = {m: {"afid": a, **({"forgetting": f} if f is not None else {})} for m, (a, f) in _RANK1_PAPER[key].items()}
    imagenet = key == "imagenet32"
    tasks, cpt = (20, 50) if imagenet else (5, 2)
    epochs = 100 if imagenet else 200
    pool = 1300 if imagenet else 5000
    native = 32  # MNIST / FMNIST padded 28 -> 32 as in the paper
    return Preset(
        name=f"rank1-{key}",
        description=f"Rank-1 Fisher paper, Table 1, {title}: {tasks} tasks x {cpt} classes; joint, diag and rank1 "
                    f"without GD, gd, diag+gd, rank1+gd, finetune",
        dataset=dataset, num_tasks=tasks, classes_per_task=cpt, methods=list(RANK1_METHODS),
        method_overrides={"rank1": {"lam": 15000.0}, "diag": {"lam": 15000.0}, "gd": {"replay": "pool"}},
        scales={
            "smoke": _smoke(),
            # Task 1 trains from scratch: 1000 steps (measured: after 400 only 40% of MNIST samples were
            # recognisable); 200 samples a class keep the classifier-FID noise below the method gaps.
            "cpu": _cpu(first_task_steps=1000, fid_samples_per_class=200),
            # PROTOCOLS.md lists the source of every value (paper Sec. 4 / App. D, official src/ddim.py)
            "paper": ScaleConfig(unet="rank1-paper", image_size=native, batch_size=128, lr=2e-4, steps_per_task=None,
                                 epochs_per_task=epochs, fid_samples_per_class=2048 // cpt if not imagenet else 50,
                                 ddim_steps=50, classifier_epochs=20, grid_per_class=8, dropout=0.1,
                                 ddim_spacing="leading",
                                 method_overrides={"gd": {"pool_per_class": pool, "pool_steps": 50}}),
        },
        paper=paper, paper_source="Avoid Catastrophic Forgetting with Rank-1 Fisher from Diffusion Models, Table 1 "
                                  "(AFID at the final task, forgetting F; Inception FID); finetune: Table 6")


def _ccd_preset(key: str, dataset: str, buffer: int, tasks: int, cpt: int) -> Preset:
    paper = {}
    for m, per in _CCD_FREE.items():
        if key in per:
            paper[m] = {"mf": per[key][0], "imf": per[key][1]}
    for m, per in _CCD_BUFFER[buffer].items():
        paper[m] = {"mf": per[key][0], "imf": per[key][1]}
    buf = {"buffer_size": buffer}
    # CLoG's baseline hyperparameters (scripts/mnist-*.sh; PROTOCOLS.md gives the lines). CLoG's EWC loss is
    # weight * sum F d^2 and its MAS loss weight/2 * sum W d^2, where cdgfast's are lam/2 * sum F d^2 and
    # lam * sum W d^2: the same penalties are lam 2 x 5e6 (EWC) and 5e-5 / 2 (MAS). Replay batch 128 (ER, A-GEM).
    clog = {"kd": {"lam": 0.01}, "ewc": {"lam": 1e7}, "l2": {"lam": 50.0}, "si": {"c": 5.0, "xi": 0.01},
            "mas": {"lam": 2.5e-5}, "er": {**buf, "replay_batch": 128}, "agem": {**buf, "replay_batch": 128},
            "ccd": dict(buf)}
    return Preset(
        name=f"ccd-{key}-{buffer}",
        description=f"CCD paper, Table 1, {dataset} {tasks} tasks x {cpt} classes, buffer {buffer}: "
                    f"{', '.join(CCD_METHODS)}",
        dataset=dataset, num_tasks=tasks, classes_per_task=cpt, methods=list(CCD_METHODS),
        method_overrides=clog,
        scales={
            "smoke": _smoke(),
            "cpu": _cpu(),
            # CLoG: RGB 32x32, Adam 1e-3 with cosine decay after 500 warm-up steps, clipping 1.0, batch 256
            # (128 for ER and A-GEM), 100 epochs, dropout 0.1; FID on 2048 class-balanced samples per task
            "paper": ScaleConfig(unet="ccd-paper", image_size=32, channels=3, batch_size=256, lr=1e-3,
                                 steps_per_task=None, epochs_per_task=100, lr_schedule="cosine", warmup_steps=500,
                                 grad_clip=1.0, dropout=0.1, method_batch_size={"er": 128, "agem": 128},
                                 fid_samples_per_class=max(1, 2048 // cpt), fid_samples_per_task=2048,
                                 ddim_steps=50, classifier_epochs=20, grid_per_class=4),
        },
        paper=paper, paper_source=f"How can Diffusion Models Evolve into Continual Generators? (CCD), Table 1, "
                                  f"buffer {buffer} (MF / IMF; Inception FID)")


def _build() -> Dict[str, Preset]:
    presets: Dict[str, Preset] = {}
    presets[DEFAULT_PRESET] = Preset(
        name=DEFAULT_PRESET,
        description="Embedded default: scikit-learn digits at 16x16, 5 tasks x 2 classes, finetune vs gd vs rank1+gd "
                    "(a few CPU minutes)",
        dataset="digits", num_tasks=5, classes_per_task=2, methods=["finetune", "gd", "rank1+gd"],
        # rank1 lam: the paper's 15000 over-constrains this short CPU schedule (70 steps a task): measured
        # rank1+gd MF 16.96 / 14.31 / 7.91 with lam 15000 / 1000 / 100 (classifier-FID, seed 0, per-method seeds); the
        # paper scale keeps 15000.
        method_overrides={"gd": {"replay": "pool", "lam_gd": 1.0}, "rank1": {"lam": 100.0}},
        scales={
            "smoke": _smoke(),
            # The `make demo` budget: measured at about 5-7 minutes on 2 busy CPU cores (see report).
            # Task 1 trains from scratch, so it gets more steps; later tasks start from a trained model.
            # Recognisable samples within the budget (issue 13; PROTOCOLS.md "default"): lr 3e-3 with an EMA
            # of the weights, label dropout 0.1 and classifier-free guidance 3 with stochastic (eta 1) DDIM
            # steps, for the evaluation and GD's replay pool alike. Measured on gd's last model (seed 0):
            # classifier accuracy on samples 0.51 (DDIM, no guidance) -> 0.86.
            "cpu": ScaleConfig(unet="tiny", image_size=16, batch_size=64, lr=3e-3, ema_decay=0.999, steps_per_task=70,
                               first_task_steps=200, fid_samples_per_class=50, ddim_steps=20, ddim_eta=1.0,
                               guidance=3.0, label_dropout=0.1, classifier_epochs=10, grid_per_class=8,
                               method_overrides={"gd": {"pool_per_class": 40, "pool_steps": 20, "replay_batch": 32,
                                                        "replay_eta": 1.0, "replay_guidance": 3.0},
                                                 "rank1": {"fisher_max_samples": 256}}),
            "paper": ScaleConfig(unet="small", image_size=16, batch_size=128, lr=2e-4, steps_per_task=None,
                                 epochs_per_task=200, fid_samples_per_class=200, ddim_steps=50, classifier_epochs=20,
                                 method_overrides={"gd": {"pool_per_class": 1000, "pool_steps": 50},
                                                   "rank1": {"lam": 15000.0}}),
        })
    for key, ds, title in (("mnist", "mnist", "MNIST"), ("fmnist", "fashion-mnist", "Fashion-MNIST"),
                           ("cifar10", "cifar10", "CIFAR-10"), ("imagenet32", "imagenet32", "ImageNet32")):
        presets[f"rank1-{key}"] = _rank1_preset(key, ds, title)
    for key, ds, tasks, cpt in (("mnist", "mnist", 5, 2), ("cifar100", "cifar100", 10, 10),
                                ("flowers102", "flowers102", 10, 10), ("cub200", "cub200", 10, 20)):
        for buffer in (512, 2560, 5120):
            presets[f"ccd-{key}-{buffer}"] = _ccd_preset(key, ds, buffer, tasks, cpt)
    presets["gd-fmnist"] = Preset(
        name="gd-fmnist",
        description="Generative distillation paper: Fashion-MNIST 5 tasks x 2 classes, generative replay (gr) vs "
                    "generative distillation (gd), FID and KLD",
        dataset="fashion-mnist", num_tasks=5, classes_per_task=2, methods=["gr", "gd"],
        # the paper's loss: data/(k+1) + k/(k+1) * lam * distillation, the replayed rows trained towards the
        # teacher's eps only; generative replay with the same weighting, its replayed rows in the task loss
        method_overrides={"gd": {"lam_gd": 3.0, "replay": "online", "online_steps": 2, "weighting": "task_fraction",
                                 "replay_in_task_loss": False},
                          "gr": {"replay": "online", "online_steps": 2, "weighting": "task_fraction"}},
        scales={
            # an unconditional model at every scale: the protocol differs in kind, not in size
            "smoke": _smoke(method_overrides={}, **_GD_PROTOCOL, fid_samples_total=32),
            "cpu": _cpu(method_overrides={}, **_GD_PROTOCOL, fid_samples_total=1000),
            "paper": ScaleConfig(unet="gd-paper", image_size=32, batch_size=128, lr=2e-4, steps_per_task=None,
                                 epochs_per_task=100, grad_clip=1.0, fid_samples_per_class=1000,
                                 fid_samples_total=10000, ddim_steps=10, classifier_epochs=20, **_GD_PROTOCOL),
        },
        paper={"gd": {"mf": 23.5, "kld": 0.25}, "gr": {"mf": 211.8, "kld": 3.39}},
        paper_source="Continual Learning of Diffusion Models with Generative Distillation (FID after the last task "
                     "and KLD of the generated class histogram; Inception FID)")
    return presets


PRESETS: Dict[str, Preset] = _build()
# Families, for --list and the docs.
FAMILIES = {
    "default": [DEFAULT_PRESET],
    "rank1": [n for n in PRESETS if n.startswith("rank1-")],
    "ccd": [n for n in PRESETS if n.startswith("ccd-")],
    "gd": ["gd-fmnist"],
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
