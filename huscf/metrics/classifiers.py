"""Domain classifiers: one small CNN per domain, trained on its real training split and cached on disk.

The classifier is the yardstick of the evaluation suite: its softmax gives the generation score, its
penultimate features give the classifier-feature FID, and the same architecture (fresh weights) is the
TSTR learner. A trained classifier is stored under ``$HUSCF_CACHE`` (else ``~/.cache/huscf``) in
``classifiers/<domain>-<key>.pt``, with ``<domain>-<key>.json`` beside it holding its real test accuracy.
The key hashes the domain's train and test arrays and the training recipe, so new data or a new recipe
trains a new classifier; an unreadable cache file is retrained.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from huscf.data import load_domain, to_tensor
from huscf.errors import HuscfError

RECIPE_VERSION = "cnn-s2x2-pool7-v1"  # bump when the architecture or training loop changes


@dataclass(frozen=True)
class Recipe:
    """How a domain classifier is trained (Adam, one-cycle learning rate, batch 128)."""

    epochs: int = 2
    min_steps: int = 600  # small training sets get more passes, so every domain sees >= 600 batches
    shift: int = 1  # random +-shift pixel translations; 0 turns augmentation off
    lr: float = 3e-3
    batch_size: int = 128
    seed: int = 0


DEFAULT_RECIPE = Recipe()
# Shifts cost Fashion-MNIST ~1 point at this budget; a third epoch without them gives ~91%.
# The 1.4k-image digits domains reach ~99% in 300 steps.
RECIPES: dict[str, Recipe] = {"fashion_mnist": Recipe(epochs=3, shift=0),
                              **{d: Recipe(min_steps=300) for d in ("digits", "digits_inverted", "digits_rotated")}}


class DomainClassifier(nn.Module):
    """Two stride-2 conv blocks (BatchNorm, ReLU), adaptive 7x7 pooling, a 128-unit hidden layer.

    Takes images in [-1, 1] of any (C, H, W) with H, W >= 4; ``features`` is the 128-d hidden layer.
    """

    FEATURE_DIM = 128

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.in_channels, self.num_classes = int(in_channels), int(num_classes)

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(*block(in_channels, width), *block(width, 2 * width),
                                  nn.AdaptiveAvgPool2d(7), nn.Flatten(),
                                  nn.Linear(49 * 2 * width, self.FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(self.FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _check_images(x: torch.Tensor, what: str) -> None:
    if x.ndim != 4 or x.shape[2] < 4 or x.shape[3] < 4:
        raise HuscfError(f"{what}: expected images (N, C, H, W) with H, W >= 4, got shape {tuple(x.shape)}")


def _random_shift(x: torch.Tensor, s: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random (dy, dx) in [-s, s], filling with background (-1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (s, s, s, s), value=-1.0)
    dy, dx = (torch.randint(0, 2 * s + 1, (n,), generator=gen) for _ in range(2))
    rows, cols = dy[:, None] + torch.arange(h), dx[:, None] + torch.arange(w)
    out = padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2)


def train_classifier(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, epochs: int = DEFAULT_RECIPE.epochs,
                     seed: int = 0, min_steps: int = DEFAULT_RECIPE.min_steps, shift: int = DEFAULT_RECIPE.shift,
                     lr: float = DEFAULT_RECIPE.lr, batch_size: int = DEFAULT_RECIPE.batch_size,
                     progress: bool = False) -> DomainClassifier:
    """Train a fresh ``DomainClassifier`` on images ``x`` in [-1, 1] and labels ``y``; returned in eval mode.

    Runs ``max(epochs * batches_per_epoch, min_steps)`` Adam steps under a one-cycle schedule. The global
    torch RNG is left untouched: ``seed`` fixes the initial weights, the batch order and the shifts.
    """
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
    _check_images(x, "classifier training images")
    if len(x) != len(y) or len(y) == 0:
        raise HuscfError(f"classifier training: {len(x)} images but {len(y)} labels")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise HuscfError(f"classifier training: labels must be in 0..{num_classes - 1}, "
                         f"got {int(y.min())}..{int(y.max())}")
    batch = min(batch_size, len(y))
    per_epoch = len(y) // batch
    steps = max(epochs * per_epoch, min_steps)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DomainClassifier(x.shape[1], num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    step = 0
    while step < steps:
        order = torch.randperm(len(y), generator=gen)
        for i in range(per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            xb = _random_shift(x[idx], shift, gen) if shift else x[idx]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), y[idx]).backward()
            opt.step()
            sched.step()
            step += 1
            if step >= steps:
                break
        if progress:
            print(f"  classifier: {step}/{steps} steps", file=sys.stderr)
    return model.eval()


@torch.no_grad()
def predict(model: DomainClassifier, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """The predicted class of every image of ``x`` (eval mode, in batches)."""
    model.eval()
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def accuracy(model: DomainClassifier, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Fraction of ``x`` that ``model`` labels as ``y``."""
    return float((predict(model, x, batch) == torch.as_tensor(y)).double().mean())


def data_hash(*arrays: np.ndarray) -> str:
    """SHA-256 over the arrays' shapes, dtypes and bytes (order matters)."""
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Classifier cache folder: ``<cache_dir or $HUSCF_CACHE or ~/.cache/huscf>/classifiers``."""
    base = cache_dir if cache_dir not in (None, "") else os.environ.get("HUSCF_CACHE") or None
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "huscf") / "classifiers"


def _load_cached(weights: Path, meta: Path, key: str) -> tuple[DomainClassifier, dict] | None:
    """The cached classifier, or None when it is missing or unreadable (then it is retrained)."""
    if not (weights.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text())
        if info.get("key") != key:
            return None
        model = DomainClassifier(info["in_channels"], info["num_classes"])
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except Exception:  # corrupted or stale file: any failure means "train again"
        return None
    return model.eval(), info


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_or_train(domain_name: str, data_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                  progress: bool = False) -> tuple[DomainClassifier, dict]:
    """The domain's classifier (eval mode) and its info, from the cache or freshly trained and cached.

    info: ``domain``, ``test_accuracy`` (real test split), ``data_hash``, ``path``, ``trained_seconds``
    (of the original training), ``cached`` (True when loaded), ``recipe`` and ``recipe_version``.
    """
    train, test = load_domain(domain_name, "train", data_dir), load_domain(domain_name, "test", data_dir)
    recipe = RECIPES.get(domain_name, DEFAULT_RECIPE)
    dhash = data_hash(train.images, train.labels, test.images, test.labels)
    key = hashlib.sha256(f"{dhash}|{RECIPE_VERSION}|{json.dumps(asdict(recipe), sort_keys=True)}".encode()).hexdigest()
    root = cache_root(cache_dir)
    weights, meta = root / f"{domain_name}-{key[:16]}.pt", root / f"{domain_name}-{key[:16]}.json"
    cached = _load_cached(weights, meta, key)
    if cached is not None:
        model, info = cached
        return model, {**info, "path": str(weights), "cached": True}

    if progress:
        print(f"training the {domain_name} classifier ({len(train)} images, recipe {RECIPE_VERSION})", file=sys.stderr)
    start = time.perf_counter()
    model = train_classifier(to_tensor(train.images), torch.from_numpy(train.labels.copy()), train.num_classes,
                             epochs=recipe.epochs, seed=recipe.seed, min_steps=recipe.min_steps, shift=recipe.shift,
                             lr=recipe.lr, batch_size=recipe.batch_size, progress=progress)
    seconds = time.perf_counter() - start
    acc = accuracy(model, to_tensor(test.images), torch.from_numpy(test.labels.copy()))
    info = {"domain": domain_name, "test_accuracy": acc, "test_size": len(test), "train_size": len(train),
            "data_hash": dhash, "key": key, "trained_seconds": round(seconds, 2),
            "recipe_version": RECIPE_VERSION, "recipe": asdict(recipe),
            "in_channels": model.in_channels, "num_classes": model.num_classes,
            "torch_threads": torch.get_num_threads()}
    if progress:
        print(f"{domain_name} classifier: test accuracy {acc:.4f} in {seconds:.1f} s", file=sys.stderr)
    try:
        root.mkdir(parents=True, exist_ok=True)
        _write_atomic(weights, lambda p: torch.save(model.state_dict(), p))
        _write_atomic(meta, lambda p: p.write_text(json.dumps(info, indent=2) + "\n"))
    except OSError as exc:
        raise HuscfError(f"cannot write the classifier cache in {root}: {exc.strerror or exc} "
                         "(set HUSCF_CACHE)") from exc
    return model, {**info, "path": str(weights), "cached": False}


__all__ = ["DEFAULT_RECIPE", "RECIPES", "RECIPE_VERSION", "DomainClassifier", "Recipe", "accuracy", "cache_root",
           "data_hash", "load_or_train", "train_classifier"]
