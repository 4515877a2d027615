"""Metrics of text-to-image continual personalization (DC-score paper, section 4 and Appendix E).

All metrics work on feature matrices [N, D] (any floating dtype, any device; computed in float64 on the
features' device): CLIP image features when a local CLIP directory is given (`CLIPImageFeatures`),
otherwise the project's classifier features, and every result carries the label of the features it was
computed on ("clip:<name>" or "classifier-fallback"), so that the two are never confused.

    MMD(X, Y)  unbiased quadratic-time estimate of MMD^2 (Gretton et al. 2012, Lemma 6: MMD^2_u)
               = sum_{a != b} k(x_a, x_b) / (m (m-1)) + sum_{a != b} k(y_a, y_b) / (n (n-1))
                 - 2 sum_{a, b} k(x_a, y_b) / (m n)
               with the polynomial kernel k(x, y) = (gamma x.y + coef)^degree, gamma = 1/D, coef = 1.
    kid        KID (Binkowski et al. 2018): the same estimate with the cubic kernel (degree 3) on `subsets`
               random subsets of `subset_size` rows of each set (drawn as torchmetrics'
               KernelInceptionDistance draws them: per subset one randperm of the real rows, then one of the
               generated rows); mean and (population) standard deviation over the subsets. Numbers equal
               torchmetrics' for the same random state (tests/test_metrics_personalization.py).
    mmd        the paper's MMD: the same estimate on all rows with the QUADRATIC kernel (degree 2).
    clip_i2i   CLIP image alignment (Gal et al. 2023, as Custom Diffusion reports it): 100 x the mean cosine
               similarity over all (real, generated) pairs.

The kernel of `mmd`. The paper says only "MMD is computed using a quadratic kernel function (Gretton et al.,
2012)" (App. E, Eq. 7); its code is not available to us. We read "quadratic kernel" as the degree-2
polynomial kernel, with KID's normalisation (gamma = 1/D, coef = 1): KID, reported beside it, is exactly
this estimate with degree 3, so the two differ only in the degree the paper names, and the estimate is
Gretton et al.'s unbiased MMD^2_u. (Gretton et al. also call MMD^2_u the "quadratic-time" statistic; a
Gaussian kernel read into "quadratic" would need a bandwidth the paper never gives.) The unbiased estimate
can be slightly negative when the two distributions are close. The paper's absolute values depend on the
kernel's gamma / coef and on the feature scaling, which it does not state: numbers from here are comparable
with each other, not necessarily with the paper's tables (PROTOCOLS.md, "Personalization metrics").

Continual summaries (Eq. 7-9; `continual_mmd`), with N tasks, X_{i,j} the images of concept j generated
after training task i, X_{D,j} concept j's real images (0-based rows here: row i = after task i):

    A_MMD   = (1/N)     sum_{j=1..N}   MMD(X_{D,j}, X_{N,j})                         lower is better
    F_MMD   = (1/(N-1)) sum_{j=1..N-1} MMD(X_{j,j}, X_{N,j})                         lower is better
    BWT_MMD = (1/(N-1)) sum_{j=1..N-1} MMD(X_{D,j}, X_{j,j}) - MMD(X_{D,j}, X_{N,j})  higher is better

Per task i the same formulas with N = i (tasks seen so far); F_MMD and BWT_MMD are undefined (None) after
the first task. N_param Train / Store (`nparam_percent`): 100 x the parameters trained for a task / stored
over the whole sequence, relative to the U-Net's parameter count (Store includes the U-Net itself: 100 +
the adapters, as the paper's tables report it).

Paper units (`PAPER_UNITS`, `to_paper_units`): KID x 1e5 and A_MMD x 1e3 (the tables' headers); BWT_MMD
x 1e3 as well (its header gives no factor, but its values are of A_MMD's magnitude and it is a difference of
the same MMD values: unscaled they could not be); F_MMD unscaled (no factor in the header, values 1e-4..0.6);
CLIP I2I is already x 100.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .._validation import FLOAT_DTYPES, check_choice, check_generator, check_nonnegative, check_positive
from .continual import _matrix
from .fid import ClassifierFeatures

CLIP_LABEL_PREFIX = "clip:"
FALLBACK_LABEL = "classifier-fallback"
MMD_KERNELS = {"quadratic": 2, "cubic": 3}   # polynomial degree; "quadratic" is the paper's MMD kernel
KID_DEGREE = 3
PAPER_UNITS = {"kid": 1e5, "a_mmd": 1e3, "bwt_mmd": 1e3, "f_mmd": 1.0, "clip_i2i": 1.0}


# --- validation -------------------------------------------------------------------------------------

def _features(name: str, f, min_rows: int = 2) -> torch.Tensor:
    """A finite real matrix [N, D] with N >= min_rows, D >= 1, as float64 on its own device."""
    if not isinstance(f, torch.Tensor):
        raise ValueError(f"{name}: expected a feature tensor [N, D], got {type(f).__name__}")
    if f.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating dtype (float16/bfloat16/float32/float64), got {f.dtype}")
    if f.dim() != 2:
        raise ValueError(f"{name}: expected a feature matrix [N, D], got shape {tuple(f.shape)}")
    if f.shape[0] < min_rows or f.shape[1] < 1:
        raise ValueError(f"{name}: expected at least {min_rows} rows of at least 1 feature, got shape "
                         f"{tuple(f.shape)}")
    f = f.detach().to(torch.float64)
    if not torch.isfinite(f).all():
        bad = torch.nonzero(~torch.isfinite(f).all(1)).flatten()[:5].tolist()
        raise ValueError(f"{name}: contains NaN or Inf (rows {bad})")
    return f


def _pair(real, fake, min_rows: int = 2) -> Tuple[torch.Tensor, torch.Tensor]:
    r, f = _features("real", real, min_rows), _features("fake", fake, min_rows)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real, fake: expected feature matrices with the same D, got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}")
    if r.device != f.device:
        raise ValueError(f"real, fake: expected both on one device, got real on {r.device}, fake on {f.device}")
    return r, f


def _kernel_args(gamma, coef) -> Tuple[Optional[float], float]:
    g = None if gamma is None else check_positive("gamma", gamma, finite=True)
    return g, check_nonnegative("coef", coef)


# --- MMD / KID --------------------------------------------------------------------------------------

def polynomial_kernel(a: torch.Tensor, b: torch.Tensor, degree: int, gamma: Optional[float] = None,
                      coef: float = 1.0) -> torch.Tensor:
    """k(a_i, b_j) = (gamma a_i . b_j + coef)^degree, [N_a, N_b]; gamma = 1/D when None."""
    g = 1.0 / a.shape[1] if gamma is None else gamma
    return (a @ b.T * g + coef) ** degree


def _mmd2_unbiased(kxx: torch.Tensor, kyy: torch.Tensor, kxy: torch.Tensor) -> torch.Tensor:
    """Gretton et al. (2012) MMD^2_u from the three kernel matrices (diagonals of kxx / kyy left out)."""
    m, n = kxx.shape[0], kyy.shape[0]
    xx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return xx + yy - 2 * kxy.sum() / (m * n)


def _poly_mmd2(x: torch.Tensor, y: torch.Tensor, degree: int, gamma, coef) -> torch.Tensor:
    return _mmd2_unbiased(polynomial_kernel(x, x, degree, gamma, coef), polynomial_kernel(y, y, degree, gamma, coef),
                          polynomial_kernel(x, y, degree, gamma, coef))


def mmd(real: torch.Tensor, fake: torch.Tensor, kernel: str = "quadratic", gamma: Optional[float] = None,
        coef: float = 1.0) -> float:
    """The paper's MMD between feature sets real [M, D] and fake [N, D] (M, N >= 2; may differ): the unbiased
    MMD^2_u of Gretton et al. (2012) over all rows, polynomial kernel (gamma x.y + coef)^degree with degree 2
    for kernel="quadratic" (the paper's "quadratic kernel"; module docstring says why), 3 for "cubic" (KID's
    kernel without subsets); gamma = 1/D when None. Raw value (the paper reports A_MMD x 1e3)."""
    check_choice("kernel", kernel, list(MMD_KERNELS))
    g, c = _kernel_args(gamma, coef)
    r, f = _pair(real, fake)
    return float(_poly_mmd2(r, f, MMD_KERNELS[kernel], g, c))


class KID(NamedTuple):
    mean: float
    std: float


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: Optional[int] = None,
        degree: int = KID_DEGREE, gamma: Optional[float] = None, coef: float = 1.0,
        generator: Optional[torch.Generator] = None) -> KID:
    """Kernel Inception Distance on feature sets real [M, D] and fake [N, D], as torchmetrics'
    `KernelInceptionDistance.compute` computes it: for each of `subsets` subsets, `subset_size` rows of real
    (the first of a randperm) and of fake (the first of a second randperm), the unbiased MMD^2 with the
    polynomial kernel (gamma x.y + coef)^degree (degree 3, gamma = 1/D, coef = 1: Binkowski et al. 2018);
    returns KID(mean, std) over the subsets (std: population, as torchmetrics). subset_size defaults to
    min(M, N) (torchmetrics' 1000 exceeds the paper's few real images per concept) and must be in
    [2, min(M, N)]. Permutations come from `generator` (a CPU generator unless it is on another device), else
    from the global generator, so torch.manual_seed(s) gives torchmetrics' numbers for the same s. Raw value
    (the paper reports x 1e5)."""
    if not isinstance(subsets, int) or isinstance(subsets, bool) or subsets < 1:
        raise ValueError(f"subsets: expected an integer >= 1, got {subsets!r}")
    if not isinstance(degree, int) or isinstance(degree, bool) or degree < 1:
        raise ValueError(f"degree: expected an integer >= 1, got {degree!r}")
    g, c = _kernel_args(gamma, coef)
    check_generator("generator", generator)
    r, f = _pair(real, fake)
    m, n = r.shape[0], f.shape[0]
    if subset_size is None:
        subset_size = min(m, n)
    if (not isinstance(subset_size, int) or isinstance(subset_size, bool) or not 2 <= subset_size <= min(m, n)):
        raise ValueError(f"subset_size: expected an integer in [2, {min(m, n)}] (at least 2 rows, at most the "
                         f"smaller of real's {m} and fake's {n} rows), got {subset_size!r}")
    dev = generator.device if generator is not None else torch.device("cpu")
    scores = []
    for _ in range(subsets):
        ir = torch.randperm(m, generator=generator, device=dev)[:subset_size].to(r.device)
        jf = torch.randperm(n, generator=generator, device=dev)[:subset_size].to(f.device)
        scores.append(_poly_mmd2(r[ir], f[jf], degree, g, c))
    s = torch.stack(scores)
    return KID(float(s.mean()), float(s.std(unbiased=False)))


def clip_i2i(real_feats: torch.Tensor, fake_feats: torch.Tensor) -> float:
    """CLIP image alignment x 100: the mean cosine similarity over all M x N pairs of real [M, D] and
    generated [N, D] image features (Gal et al. 2023; Custom Diffusion's image alignment). Rows of zero norm
    are refused (no direction)."""
    r = _features("real_feats", real_feats, min_rows=1)
    f = _features("fake_feats", fake_feats, min_rows=1)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real_feats, fake_feats: expected feature matrices with the same D, got "
                         f"{tuple(real_feats.shape)} and {tuple(fake_feats.shape)}")
    if r.device != f.device:
        raise ValueError(f"real_feats, fake_feats: expected both on one device, got {r.device} and {f.device}")
    for name, x in (("real_feats", r), ("fake_feats", f)):
        zero = torch.nonzero(x.norm(dim=1) == 0).flatten()
        if zero.numel():
            raise ValueError(f"{name}: rows {zero[:5].tolist()} have zero norm (no cosine similarity)")
    return float(100 * (F.normalize(r, dim=1) @ F.normalize(f, dim=1).T).mean())


# --- continual summaries ----------------------------------------------------------------------------

def continual_mmd(to_real, to_own=None) -> Dict[str, object]:
    """A_MMD, F_MMD and BWT_MMD (Eq. 7-9, module docstring) after every task and at the end, from

    * to_real [T, T]: to_real[i, j] = MMD(real_j, X_{i,j}), concept j's generations after task i against its
      real images (finite for j <= i; entries above the diagonal are ignored: NaN, or None in nested lists);
    * to_own [T, T] (optional; needed for F_MMD): to_own[i, j] = MMD(X_{j,j}, X_{i,j}), concept j's
      generations after task i against those right after learning it (finite for j < i; the diagonal and
      above are ignored).

    Returns {"a_mmd", "f_mmd", "bwt_mmd"} (at the end: after task T-1) and "per_task": {name: [value after
    task i for i in 0..T-1]}. BWT_MMD / F_MMD are None after the first task (no earlier concept) and F_MMD is
    None throughout without to_own. Raw values (PAPER_UNITS for the tables' scales)."""
    m = _matrix(to_real, "to_real", "MMD(real_j, X_ij)")
    t = m.shape[0]
    own = None
    if to_own is not None:
        own = _matrix(to_own, "to_own", "MMD(X_jj, X_ij)", diagonal=False)
        if own.shape != m.shape:
            raise ValueError(f"to_own: expected shape {tuple(m.shape)} like to_real, got {tuple(own.shape)}")
    a, bwt, fgt = [], [], []
    for i in range(t):
        a.append(float(m[i, :i + 1].mean()))
        if i == 0:
            bwt.append(None)
            fgt.append(None)
            continue
        bwt.append(float((torch.diagonal(m)[:i] - m[i, :i]).mean()))
        fgt.append(None if own is None else float(own[i, :i].mean()))
    return {"a_mmd": a[-1], "f_mmd": fgt[-1], "bwt_mmd": bwt[-1],
            "per_task": {"a_mmd": a, "f_mmd": fgt, "bwt_mmd": bwt}}


# --- parameter counts -------------------------------------------------------------------------------

Countable = Union[int, torch.nn.Module, Iterable[torch.Tensor]]


def count_parameters(x: Countable, name: str = "params") -> int:
    """Number of scalars: an int as given (>= 0), a module's parameters (each once), or an iterable of tensors
    (each tensor once, by identity)."""
    if isinstance(x, bool):
        raise ValueError(f"{name}: expected a count, a module or tensors, got a bool")
    if isinstance(x, int):
        if x < 0:
            raise ValueError(f"{name}: expected a count >= 0, got {x}")
        return x
    if isinstance(x, torch.nn.Module):
        x = x.parameters()
    if isinstance(x, torch.Tensor):
        return x.numel()
    try:
        items = list(x)
    except TypeError:
        raise ValueError(f"{name}: expected an int, a torch.nn.Module or an iterable of tensors, got "
                         f"{type(x).__name__}") from None
    seen, total = set(), 0
    for k, p in enumerate(items):
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"{name}: item {k} is a {type(p).__name__}, expected tensors")
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def nparam_percent(trained: Countable, stored: Countable, unet: Countable) -> Dict[str, float]:
    """{"nparam_train": 100 trained / unet, "nparam_store": 100 stored / unet} (the paper's N_param Train /
    Store, following C-LoRA). `trained`: the parameters trained for one task (LoRA factors, K/V weights...);
    `stored`: everything kept over the whole sequence, the U-Net included (LoRA methods: the U-Net + every
    task's adapter, 100.54 % in Table 1); `unet`: the base U-Net (count it before adapters are injected, or
    pass the count). Each is an int, a module or an iterable of tensors (`count_parameters`)."""
    u = count_parameters(unet, "unet")
    if u == 0:
        raise ValueError("unet: expected a U-Net with at least one parameter, got 0")
    return {"nparam_train": 100.0 * count_parameters(trained, "trained") / u,
            "nparam_store": 100.0 * count_parameters(stored, "stored") / u}


# --- feature extractors -----------------------------------------------------------------------------

_CLIP_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _clip_dir(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"clip: expected the path of a local CLIP directory, got {type(path).__name__}")
    p = Path(path).expanduser()
    need = "a directory saved with save_pretrained: config.json, model weights, preprocessor_config.json"
    if not p.is_dir():
        raise ValueError(f"clip: {p} is not a directory (expected {need}; nothing is downloaded)")
    missing = [f for f in ("config.json", "preprocessor_config.json") if not (p / f).is_file()]
    if not any((p / f).is_file() for f in _CLIP_WEIGHTS):
        missing.append(" or ".join(_CLIP_WEIGHTS))
    if missing:
        raise ValueError(f"clip: {p} is incomplete, missing {', '.join(missing)} (expected {need}; nothing is "
                         f"downloaded)")
    return p


class CLIPImageFeatures:
    """CLIP image embeddings (the projection output, not normalised) of a local CLIP checkpoint directory (a
    CLIPModel or CLIPVisionModelWithProjection saved with save_pretrained, with its preprocessor_config.json),
    loaded with local_files_only=True: nothing is downloaded. Images go in as [B, C, H, W] in [-1, 1] (grey
    ones repeated to 3 channels) and through the checkpoint's own image processor. Label "clip:<dir name>"."""

    def __init__(self, path: Union[str, os.PathLike], device=None):
        p = _clip_dir(path)
        try:
            from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
        except ImportError as exc:
            raise ImportError(f"clip: CLIP features need transformers (pip install 'cdgfast[text]'): {exc}") from exc
        try:
            self.model = CLIPVisionModelWithProjection.from_pretrained(str(p), local_files_only=True).eval()
            self.processor = CLIPImageProcessor.from_pretrained(str(p), local_files_only=True)
        except Exception as exc:  # any failure to read a user's checkpoint is a bad `clip` argument
            raise ValueError(f"clip: {p} could not be loaded as a CLIP vision model with its image processor "
                             f"({type(exc).__name__}: {exc})") from None
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model.to(self.device)
        self.path = p
        self.label = CLIP_LABEL_PREFIX + p.resolve().name

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"x: expected images [B, 1 or 3, H, W] in [-1, 1], got {getattr(x, 'shape', type(x))}")
        x = x.detach().float().cpu()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        inputs = self.processor(images=list((x.clamp(-1, 1) + 1) / 2), return_tensors="pt", do_rescale=False)
        out = self.model(pixel_values=inputs["pixel_values"].to(self.device))
        return out.image_embeds.float()


class FallbackFeatures(ClassifierFeatures):
    """The project's classifier features (SmallCNN penultimate layer) standing in for CLIP; label
    "classifier-fallback": values are NOT comparable with the paper's CLIP-feature metrics."""

    label = FALLBACK_LABEL


def resolve_personalization_features(clip: Optional[Union[str, os.PathLike]] = None,
                                     classifier: Optional[torch.nn.Module] = None, device=None):
    """(extractor, label) for the personalization metrics: CLIP image features from the local directory
    `clip` (refused with a ValueError naming `clip` when missing or incomplete; never downloaded), else the
    classifier fallback (label "classifier-fallback"), which needs `classifier` (a cdgfast SmallCNN)."""
    if clip is not None:
        ext = CLIPImageFeatures(clip, device=device)
        return ext, ext.label
    if classifier is None:
        raise ValueError("classifier: expected the fallback feature network (a cdgfast SmallCNN) when no clip "
                         "directory is given")
    ext = FallbackFeatures(classifier)
    return ext, ext.label


def _check_label(label) -> str:
    if not isinstance(label, str) or not (label == FALLBACK_LABEL or
                                          (label.startswith(CLIP_LABEL_PREFIX) and len(label) > len(CLIP_LABEL_PREFIX))):
        raise ValueError(f"label: expected {FALLBACK_LABEL!r} or 'clip:<name>' (the features' label from "
                         f"resolve_personalization_features), got {label!r}")
    return label


# --- everything at once -----------------------------------------------------------------------------

def personalization_metrics(real: Sequence[torch.Tensor], generated: Sequence[Sequence[torch.Tensor]], label: str,
                            *, kid_subsets: int = 100, kid_subset_size: Optional[int] = None,
                            generator: Optional[torch.Generator] = None,
                            nparam: Optional[Dict[str, float]] = None) -> Dict[str, object]:
    """Every metric of the paper's tables, per task and at the end, from features:

    * real[j]: concept j's real image features [M_j, D];
    * generated[i][j] (j <= i, so generated[i] has i + 1 entries): concept j's generated image features
      after training task i;
    * label: the features' label ("clip:<name>" or "classifier-fallback"), recorded in the result;
    * nparam: optional `nparam_percent` output, copied into the result.

    Per task i: KID, MMD and CLIP I2I averaged over the concepts seen (j <= i), A/F/BWT_MMD (`continual_mmd`);
    "final" is task T-1. "paper_units" holds the final values at the tables' scales (PAPER_UNITS). KID uses
    `kid_subsets` subsets of `kid_subset_size` rows (default: the smaller set's size) from `generator`."""
    label = _check_label(label)
    if not isinstance(real, (list, tuple)) or len(real) < 1:
        raise ValueError(f"real: expected a list of T >= 1 feature matrices (one per concept), got "
                         f"{type(real).__name__}")
    t = len(real)
    if not isinstance(generated, (list, tuple)) or len(generated) != t:
        raise ValueError(f"generated: expected a list of {t} rows (one per task, like real), got "
                         f"{len(generated) if isinstance(generated, (list, tuple)) else type(generated).__name__}")
    for i, row in enumerate(generated):
        if not isinstance(row, (list, tuple)) or len(row) != i + 1:
            raise ValueError(f"generated[{i}]: expected {i + 1} feature matrices (concepts 0..{i} after task {i}), "
                             f"got {len(row) if isinstance(row, (list, tuple)) else type(row).__name__}")
    nan = float("nan")
    to_real = [[nan] * t for _ in range(t)]
    to_own = [[nan] * t for _ in range(t)]
    kid_m = [[nan] * t for _ in range(t)]
    i2i = [[nan] * t for _ in range(t)]
    for i in range(t):
        for j in range(i + 1):
            x = generated[i][j]
            to_real[i][j] = mmd(real[j], x)
            if j < i:
                to_own[i][j] = mmd(generated[j][j], x)
            kid_m[i][j] = kid(real[j], x, subsets=kid_subsets, subset_size=kid_subset_size,
                              generator=generator).mean
            i2i[i][j] = clip_i2i(real[j], x)
    cont = continual_mmd(to_real, to_own)
    per_task = {"kid": [sum(kid_m[i][:i + 1]) / (i + 1) for i in range(t)],
                "clip_i2i": [sum(i2i[i][:i + 1]) / (i + 1) for i in range(t)], **cont["per_task"]}
    final = {k: v[-1] for k, v in per_task.items()}
    if nparam is not None:
        if not isinstance(nparam, dict) or set(nparam) != {"nparam_train", "nparam_store"}:
            raise ValueError(f"nparam: expected the dict nparam_percent returns, got {nparam!r}")
        final.update(nparam)
    return {"features": label, "per_task": per_task, "final": final,
            "paper_units": to_paper_units(final),
            "matrices": {"mmd_to_real": to_real, "mmd_to_own": to_own, "kid": kid_m, "clip_i2i": i2i}}


def to_paper_units(values: Dict[str, object]) -> Dict[str, object]:
    """The values of `values` whose names PAPER_UNITS knows, times their table scale (None stays None); other
    entries (nparam_*, already percentages) as given."""
    out = {}
    for k, v in values.items():
        scale = PAPER_UNITS.get(k)
        if scale is None or v is None:
            out[k] = v
        elif isinstance(v, list):
            out[k] = [None if e is None else e * scale for e in v]
        else:
            out[k] = v * scale
    return out


__all__ = ["CLIP_LABEL_PREFIX", "FALLBACK_LABEL", "MMD_KERNELS", "PAPER_UNITS", "KID", "CLIPImageFeatures",
           "FallbackFeatures", "clip_i2i", "continual_mmd", "count_parameters", "kid", "mmd", "nparam_percent",
           "personalization_metrics", "polynomial_kernel", "resolve_personalization_features", "to_paper_units"]
