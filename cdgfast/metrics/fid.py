"""Fréchet distance between Gaussian fits of feature sets, and the feature extractors FID uses.

    FID = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1^{1/2} S_2 S_1^{1/2})^{1/2})

The matrix square root term is computed in float64 from symmetric eigen-decompositions
(S_1^{1/2} = V diag(sqrt(max(l, 0))) V^T, then the eigenvalues of the symmetric PSD matrix
S_1^{1/2} S_2 S_1^{1/2}), which stays real and well defined for the rank-deficient covariances that
small sample sets give; tr((S_1 S_2)^{1/2}) equals the same trace since S_1 S_2 is similar to it.

Two feature sources:
  * `InceptionFeatures(path)`: the FID Inception-v3 pool features (2048-d) from a LOCAL weights file:
    the TF-ported FID Inception that torch-fidelity and torchmetrics' FID load
    (`weights-inception-2015-12-05-6726825d.pth`, run through torch-fidelity's
    `FeatureExtractorInceptionV3`, the network behind `torchmetrics.image.fid`), or a TorchScript
    module of the same network (pytorch-fid / clean-fid). torchvision's `inception_v3` ImageNet weights
    are refused: they are not the network the papers' FIDs were measured with. Reported as
    "Inception-FID".
  * `ClassifierFeatures(classifier)`: the penultimate features of the small CNN classifier that
    `cdgfast.metrics.classifier` trains on the same data set. Reported as "classifier-FID"; its
    values are NOT comparable with published Inception FIDs.

`resolve_fid_backbone(fid, inception, scale)` decides which one a run uses (`--fid inception|classifier|
auto`) without downloading anything: the weights are looked for at `--inception PATH`, else in the
torch hub cache where torch-fidelity / torchmetrics keep them (`fid_inception_cache_path()`).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F

INCEPTION_LABEL = "Inception-FID"
CLASSIFIER_LABEL = "classifier-FID"
FID_BACKBONES = ("auto", "inception", "classifier")
# torch-fidelity's FID Inception weights (TF Inception 2015-12-05, ported), as torch.hub names them
FID_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
_FID_INCEPTION_CLASSES = 1008  # the TF graph's 1008-way head; torchvision's ImageNet Inception has 1000


def fid_inception_cache_path() -> Path:
    """Where torch-fidelity and torchmetrics' FID keep the FID Inception weights once downloaded
    (torch.hub's checkpoint folder: $TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints).
    Only a path: nothing is downloaded or created."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_INCEPTION_FILE


class FidBackboneUnavailable(ValueError):
    """The requested FID backbone cannot be used (missing weights, a paper-scale run without them)."""


def resolve_fid_backbone(fid: str = "auto", inception: Optional[Union[str, os.PathLike]] = None,
                         scale: Optional[str] = None) -> Tuple[str, Optional[Path]]:
    """("inception", weights path) or ("classifier", None) for `--fid` = fid, `--inception` = inception.

    * "classifier": classifier-FID; giving `inception` as well is a contradiction (ValueError).
    * "inception": the weights at `inception`, else the torch hub cache (`fid_inception_cache_path`);
      neither present: FidBackboneUnavailable naming both.
    * "auto" (default): "inception" when those weights are present, else "classifier" - except at
      scale "paper", where classifier-FID would be mistaken for the papers' numbers: there it raises
      FidBackboneUnavailable unless fid="classifier" is asked for explicitly.
    Checks only that files exist (no import, no download, no loading)."""
    if fid not in FID_BACKBONES:
        raise ValueError(f"fid: expected one of {list(FID_BACKBONES)}, got {fid!r}")
    if fid == "classifier":
        if inception is not None:
            raise ValueError("fid: 'classifier' contradicts --inception PATH (Inception weights given); pass one of "
                             "them")
        return "classifier", None
    if inception is not None:
        path = Path(inception).expanduser()
        if not path.is_file():
            raise FidBackboneUnavailable(f"inception weights: {path} does not exist. {_WEIGHTS_HINT}")
        return "inception", path
    cached = fid_inception_cache_path()
    if cached.is_file():
        return "inception", cached
    if fid == "inception" or scale == "paper":
        why = ("--fid inception" if fid == "inception" else
               "--scale paper reports the papers' Inception FID, and classifier-FID numbers must not be mistaken "
               "for them")
        raise FidBackboneUnavailable(
            f"FID Inception weights not found ({why}): expected {cached} (where torch-fidelity and torchmetrics' "
            f"FID keep {FID_INCEPTION_FILE}; on a machine with internet they download it there on first use, "
            f"from where it can be copied) or pass --inception PATH. To run with classifier-FID instead, pass "
            f"--fid classifier.")
    return "classifier", None


_WEIGHTS_HINT = (f"Pass the FID Inception weights: torch-fidelity's {FID_INCEPTION_FILE} (the file torchmetrics' "
                 f"FID downloads; needs `pip install cdgfast[fid]`) or a TorchScript FID Inception (pytorch-fid / "
                 f"clean-fid). Without them, --fid classifier (or auto below --scale paper) reports classifier-FID.")


def feature_statistics(features: torch.Tensor, name: str = "features", *,
                       _stacklevel: int = 2) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and unbiased covariance [D, D] (float64) of finite features [N, D], N >= 2.

    With N <= D the covariance is singular (rank N - 1 < D): a FID from it is still defined (module
    docstring) but biased and not comparable with FIDs from more samples, so a RuntimeWarning says so."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.dtype.is_complex:
        raise ValueError(f"{name}: expected a real tensor [N, D], got {getattr(features, 'shape', type(features))}")
    if features.shape[0] < 2 or features.shape[1] < 1:
        raise ValueError(f"{name}: expected at least 2 rows (to estimate a covariance) of at least 1 feature, "
                         f"got shape {tuple(features.shape)}")
    f = features.detach().to(torch.float64)
    if not torch.isfinite(f).all():
        raise ValueError(f"{name}: contains NaN or Inf (rows {torch.nonzero(~torch.isfinite(f).all(1)).flatten()[:5].tolist()})")
    n, d = f.shape
    if n <= d:
        warnings.warn(f"{name}: {n} samples of {d} features give a singular covariance (rank {n - 1} < {d}); "
                      f"the FID is biased and not comparable with FIDs from more than {d} samples",
                      RuntimeWarning, stacklevel=_stacklevel)
    mu = f.mean(0)
    c = f - mu
    sigma = c.T @ c / (f.shape[0] - 1)
    return mu, sigma


def _sym_sqrt(s: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(s)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64 (module docstring)."""
    mu1, mu2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    s1, s2 = torch.as_tensor(sigma1, dtype=torch.float64), torch.as_tensor(sigma2, dtype=torch.float64)
    if mu1.dim() != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1, mu2: expected two vectors [D] of equal length, got {tuple(mu1.shape)} and {tuple(mu2.shape)}")
    d = mu1.shape[0]
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if s.shape != (d, d):
            raise ValueError(f"{name}: expected a [{d}, {d}] covariance, got {tuple(s.shape)}")
        if not torch.isfinite(s).all():
            raise ValueError(f"{name}: contains NaN or Inf")
    if not (torch.isfinite(mu1).all() and torch.isfinite(mu2).all()):
        raise ValueError("mu1, mu2: contain NaN or Inf")
    # Symmetrise against round-off so eigh sees an exactly symmetric matrix.
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    r1 = _sym_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    out = diff.dot(diff) + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt
    return float(out.clamp_min(0))


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets [N1, D] and [N2, D].

    Fewer samples than feature dimensions give a singular covariance: `feature_statistics` warns."""
    for name, f in (("real", real), ("fake", fake)):
        if not isinstance(f, torch.Tensor) or f.dim() != 2:
            raise ValueError(f"{name}: expected a feature tensor [N, D], got {getattr(f, 'shape', type(f))}")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real, fake: expected feature tensors [N, D] with the same D, got "
                         f"{tuple(real.shape)} and {tuple(fake.shape)}")
    return frechet_distance(*feature_statistics(real, "real", _stacklevel=3), *feature_statistics(fake, "fake", _stacklevel=3))


@torch.no_grad()
def extract_features(extractor: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     batch_size: int = 256, device=None) -> torch.Tensor:
    """Run `extractor` over images x [N, C, H, W] in [-1, 1] in chunks; returns float32 [N, D] on CPU."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x: expected images [N, C, H, W], got {getattr(x, 'shape', type(x))}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size]
        if device is not None:
            xb = xb.to(device)
        f = extractor(xb)
        if not isinstance(f, torch.Tensor) or f.dim() < 1 or f.shape[0] != xb.shape[0]:
            raise ValueError(f"extractor: expected one feature row per image ({xb.shape[0]} rows), got "
                             f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
        out.append(f.float().flatten(1).cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


class ClassifierFeatures:
    """Penultimate features of a cdgfast SmallCNN classifier (metric label: "classifier-FID")."""

    label = CLASSIFIER_LABEL

    def __init__(self, classifier: torch.nn.Module):
        if not hasattr(classifier, "features"):
            raise ValueError("classifier: expected a module with a .features(x) method (cdgfast SmallCNN)")
        self.classifier = classifier.eval()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = next(self.classifier.parameters())
        return self.classifier.features(x.to(p.device, p.dtype))


class InceptionFeatures:
    """FID Inception-v3 pool features (metric label "Inception-FID", 2048-d) from a local weights file.

    `path` is either torch-fidelity's FID Inception state dict (`weights-inception-2015-12-05-6726825d.pth`:
    first loaded with `weights_only=True`, so a file holding anything but tensors is refused before
    torch-fidelity reads it; needs the `fid` extra), run through torch-fidelity's
    `FeatureExtractorInceptionV3` (its TF-compatible resize to 299 and normalisation; images go in as
    uint8, as torchmetrics' FID hands them), or a TorchScript module that maps images [B, 3, 299, 299]
    in [-1, 1] to features [B, D] (or [B, D, 1, 1]). Grey images are repeated to 3 channels.
    """

    label = INCEPTION_LABEL

    def __init__(self, path: Union[str, os.PathLike], device=None):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"inception weights: {path} does not exist. {_WEIGHTS_HINT}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.path = path
        net = None
        try:
            net = torch.jit.load(str(path), map_location=self.device)
        except Exception:
            net = None
        self.kind = "torchscript" if net is not None else "torch-fidelity"
        if net is None:
            net = self._fidelity_net(path)
        self.net = net.eval()

    def _fidelity_net(self, path: Path):
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"inception weights: {path} is neither a TorchScript module nor a state dict of "
                             f"tensors ({type(exc).__name__}: {exc})") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        fc = state.get("fc.weight") if isinstance(state, dict) else None
        if not isinstance(fc, torch.Tensor) or fc.shape[0] != _FID_INCEPTION_CLASSES:
            got = "no fc.weight" if not isinstance(fc, torch.Tensor) else f"a {fc.shape[0]}-way head"
            raise ValueError(f"inception weights: {path} is not the FID Inception ({got}; the TF-ported FID "
                             f"Inception has a {_FID_INCEPTION_CLASSES}-way head - torchvision's ImageNet "
                             f"inception_v3 weights give other FIDs than the papers'). {_WEIGHTS_HINT}")
        del state
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as exc:
            raise ImportError(f"inception weights: {path} is torch-fidelity's FID Inception; running it needs "
                              f"torch-fidelity (pip install 'cdgfast[fid]'): {exc}") from exc
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
        return net.to(self.device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if self.kind == "torch-fidelity":
            # [-1, 1] -> uint8 [0, 255], what torch-fidelity's extractor takes (it resizes and normalises)
            u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            out = self.net(u8)
        else:
            if x.shape[-1] != 299 or x.shape[-2] != 299:
                x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            out = self.net(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.flatten(1)
