"""Sample-quality scores: the generation score and the Frechet distances (classifier features, Inception).

``generation_score`` is the paper's inception-like score computed with the domain classifier,
``exp(E_x KL(p(y|x) || p(y)))``: 1 for samples the classifier cannot tell apart or that all fall in one
class, up to ``num_classes`` for confidently classified samples spread evenly over the classes.
``classifier_fid`` is the Frechet distance between real and generated images in the classifier's
penultimate feature space (offline, always available); ``inception_fid`` is the usual FID through
torchmetrics and its InceptionV3 weights, when both can be loaded.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import scipy.linalg
import scipy.special
import torch

from huscf.data import to_tensor
from huscf.errors import HuscfError
from huscf.metrics.classifiers import DomainClassifier, batched


def as_images(images: np.ndarray | torch.Tensor, what: str = "images", generated: bool = True) -> torch.Tensor:
    """(N, C, H, W) uint8 in 0..255 or float in [-1, 1] (array or tensor) -> finite float32 tensor in [-1, 1].

    NaN or inf raise ``HuscfError``, worded as a generator fault when ``generated``.
    """
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        x = to_tensor(images)
    elif isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
        x = images.float() / 127.5 - 1.0
    else:
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images, dtype=np.float32))
        x = x.detach().float().cpu()
    if x.ndim != 4 or len(x) == 0:
        raise HuscfError(f"{what}: expected a non-empty batch (N, C, H, W), got shape {tuple(x.shape)}")
    bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
    if bad:
        raise HuscfError(f"generator emitted non-finite values: {bad} of {len(x)} {what} contain NaN or inf"
                         if generated else f"{what}: {bad} of {len(x)} images contain NaN or inf")
    return x


def classifier_probs(classifier: DomainClassifier, images: np.ndarray | torch.Tensor, batch: int = 500) -> np.ndarray:
    """Softmax class probabilities (N, K) of ``classifier`` (which must be in eval mode) on ``images``."""
    return batched(lambda b: torch.softmax(classifier(b), dim=1), as_images(images), batch).double().numpy()


def classifier_features(classifier: DomainClassifier, images: np.ndarray | torch.Tensor, batch: int = 500,
                        generated: bool = True) -> np.ndarray:
    """Penultimate-layer features (N, D) of ``classifier`` on ``images``."""
    return batched(classifier.features, as_images(images, generated=generated), batch).double().numpy()


def generation_score(probs: np.ndarray | torch.Tensor) -> float:
    """exp(mean over samples of KL(p(y|x) || p(y))), with p(y) the mean of the rows of ``probs`` (N, K)."""
    p = probs.detach().cpu().double().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs, float)
    if p.ndim != 2 or len(p) == 0:
        raise HuscfError(f"generation score: expected probabilities (N, K), got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-4):
        raise HuscfError("generation score: every row of probs must be finite, non-negative and sum to 1")
    marginal = p.mean(axis=0, keepdims=True)
    return float(np.exp(scipy.special.rel_entr(p, marginal).sum(axis=1).mean()))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D):
    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``.

    As in the reference FID code, a singular (or non-finite) product is recomputed with ``eps`` added to
    both diagonals, and the numerically tiny imaginary part that ``sqrtm`` can return is dropped.
    """
    a, b = (np.asarray(f, dtype=np.float64) for f in (feats_a, feats_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise HuscfError(f"Frechet distance: need two feature sets (N >= 2, D) of equal D, got {a.shape} and {b.shape}")
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    singular = any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught)
    if singular or not np.isfinite(covmean).all() or np.abs(np.imag(np.diagonal(covmean))).max() > 1e-3:
        offset = np.eye(len(cov_a)) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            covmean = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    diff = a.mean(0) - b.mean(0)
    value = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(np.real(covmean))
    return float(max(value, 0.0))  # rounding can leave -1e-12 for identical sets


def classifier_fid(classifier: DomainClassifier, real_images: np.ndarray | torch.Tensor,
                   fake_images: np.ndarray | torch.Tensor, batch: int = 500) -> float:
    """Frechet distance between real and generated images in the classifier's penultimate features."""
    return frechet_distance(classifier_features(classifier, real_images, batch, generated=False),
                            classifier_features(classifier, fake_images, batch))


# ---- Inception FID (optional: torchmetrics[image] and its InceptionV3 weights) ----------------

@functools.lru_cache(maxsize=1)
def _inception_metric():
    """(FrechetInceptionDistance, "") when it can be built, else (None, why not) - tried once per process."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        return FrechetInceptionDistance(feature=2048, normalize=False), ""
    except Exception as exc:  # ImportError, a torchvision that fails to load, a failed weights download, ...
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        return None, reason[:300]


def inception_fid_available() -> tuple[bool, str]:
    """Whether ``inception_fid`` can run here, and if not, why (one line)."""
    metric, reason = _inception_metric()
    return metric is not None, reason


def inception_fid(real_images: np.ndarray | torch.Tensor, fake_images: np.ndarray | torch.Tensor,
                  batch: int = 100) -> float:
    """The standard FID (InceptionV3 pool features, via torchmetrics); grayscale images are repeated to RGB."""
    metric, reason = _inception_metric()
    if metric is None:
        raise HuscfError("Inception FID needs torchmetrics[image] and its InceptionV3 weights, which could not "
                         f"be loaded: {reason}; the classifier-feature FID is always available")
    real, fake = as_images(real_images, "real images", generated=False), as_images(fake_images, "generated images")
    if real.shape[1] not in (1, 3) or fake.shape[1] not in (1, 3):
        raise HuscfError(f"Inception FID needs 1- or 3-channel images, got {real.shape[1]} and {fake.shape[1]}")
    metric.reset()
    with torch.no_grad():
        for images, is_real in ((real, True), (fake, False)):
            for chunk in images.split(batch):
                chunk = ((chunk.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                metric.update(chunk.expand(-1, 3, -1, -1) if chunk.shape[1] == 1 else chunk, real=is_real)
        return float(metric.compute())


__all__ = ["as_images", "classifier_features", "classifier_fid", "classifier_probs", "frechet_distance",
           "generation_score", "inception_fid", "inception_fid_available"]
