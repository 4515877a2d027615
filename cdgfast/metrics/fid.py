"""Fréchet distance between Gaussian fits of feature sets, and the feature extractors FID uses.

    FID = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1^{1/2} S_2 S_1^{1/2})^{1/2})

The matrix square root term is computed in float64 from symmetric eigen-decompositions
(S_1^{1/2} = V diag(sqrt(max(l, 0))) V^T, then the eigenvalues of the symmetric PSD matrix
S_1^{1/2} S_2 S_1^{1/2}), which stays real and well defined for the rank-deficient covariances that
small sample sets give; tr((S_1 S_2)^{1/2}) equals the same trace since S_1 S_2 is similar to it.

Two feature sources:
  * `InceptionFeatures(path)`: the standard Inception-v3 pool features (2048-d) from a LOCAL weights
    file, either a TorchScript module or a torchvision `inception_v3` state dict. Reported as
    "Inception-FID".
  * `ClassifierFeatures(classifier)`: the penultimate features of the small CNN classifier that
    `cdgfast.metrics.classifier` trains on the same data set. Reported as "classifier-FID"; its
    values are NOT comparable with published Inception FIDs.
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


def feature_statistics(features: torch.Tensor, name: str = "features", *, _stacklevel: int = 2) -> Tuple[torch.Tensor, torch.Tensor]:
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
    """Inception-v3 pool features (metric label "Inception-FID") from a local weights file.

    `path` is either a TorchScript module (torch.jit.save) that maps images [B, 3, 299, 299] in [-1, 1]
    to features [B, D] (or [B, D, 1, 1]), or a torchvision `inception_v3` state dict (needs torchvision;
    the classifier head is dropped, giving the 2048-d pool features). Grey images are repeated to 3
    channels and everything is resized bilinearly to 299 x 299.
    """

    label = INCEPTION_LABEL

    def __init__(self, path: Union[str, os.PathLike], device=None):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"inception weights: {path} does not exist. Pass a local file: a TorchScript Inception "
                f"feature extractor (e.g. the pytorch-fid / clean-fid 'pt_inception-2015-12-05' model saved "
                f"with torch.jit.save) or torchvision's inception_v3 state dict (inception_v3_google-*.pth "
                f"from https://download.pytorch.org/models/). Without --inception, cdgfast reports "
                f"classifier-FID instead.")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        net = None
        try:
            net = torch.jit.load(str(path), map_location=self.device)
        except Exception:
            net = None
        if net is None:
            try:
                from torchvision.models import inception_v3
            except ImportError as exc:
                raise ImportError(f"inception weights: {path} is not a TorchScript module, and loading a "
                                  f"state dict needs torchvision (pip install torchvision)") from exc
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
            missing, unexpected = net.load_state_dict(state, strict=False)
            if [k for k in missing if not k.startswith("AuxLogits")]:
                raise ValueError(f"inception weights: {path} is not an inception_v3 state dict "
                                 f"(missing {missing[:5]}...)")
            net.fc = torch.nn.Identity()
            net = net.to(self.device)
        self.net = net.eval()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[-1] != 299 or x.shape[-2] != 299:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        out = self.net(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.flatten(1)
