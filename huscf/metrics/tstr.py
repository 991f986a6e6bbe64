"""Train-on-synthetic, test-on-real (TSTR) and its real-data ceiling.

A fresh ``DomainClassifier`` (same architecture as the domain classifier, new weights) is trained only
on generated images with the labels they were generated for, then scored on the domain's real test
split. Training the same learner on the same number of *real* training images gives the ceiling the
synthetic score is read against (``real_ceiling``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from huscf.data import load_domain
from huscf.errors import HuscfError
from huscf.metrics.classifiers import DEFAULT_RECIPE, predict, train_classifier
from huscf.metrics.scores import as_images


def classification_report_dict(y_true, y_pred, num_classes: int) -> dict:
    """Accuracy and macro precision / recall / F1 / false-positive rate, per-class accuracy, confusion matrix.

    Classes are ``0..num_classes-1``; an undefined ratio (no predictions or no samples of a class)
    counts as 0, as sklearn's ``zero_division=0``. Per-class accuracy of class c is the fraction of its
    true samples predicted as c (its recall); the FPR of c is FP / (FP + TN). All values are JSON-able.
    """
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if len(y_true) != len(y_pred) or len(y_true) == 0:
        raise HuscfError(f"classification report: {len(y_true)} true labels but {len(y_pred)} predictions")
    labels = np.arange(num_classes)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro",
                                                               zero_division=0)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    tn = cm.sum() - cm.sum(axis=1) - fp  # everything outside row c and column c
    fpr = np.divide(fp, fp + tn, out=np.zeros(num_classes), where=(fp + tn) > 0)
    per_class = np.divide(tp, cm.sum(axis=1), out=np.zeros(num_classes), where=cm.sum(axis=1) > 0)
    return {"accuracy": float(accuracy_score(y_true, y_pred)), "precision": float(precision), "recall": float(recall),
            "f1": float(f1), "fpr": float(fpr.mean()), "per_class_accuracy": per_class.tolist(),
            "confusion_matrix": cm.tolist()}


def _labels(y, n: int, num_classes: int, what: str) -> torch.Tensor:
    y = (y if isinstance(y, torch.Tensor) else torch.from_numpy(np.array(y, dtype=np.int64))).long().ravel()
    if len(y) != n:
        raise HuscfError(f"TSTR: {n} {what} images but {len(y)} labels")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise HuscfError(f"TSTR: {what} labels must be in 0..{num_classes - 1}, got {int(y.min())}..{int(y.max())}")
    return y


def tstr(train_x, train_y, test_x, test_y, num_classes: int, *, epochs: int = DEFAULT_RECIPE.epochs,
         seed: int = 0, min_steps: int = DEFAULT_RECIPE.min_steps, shift: int = 0) -> dict:
    """Train a fresh classifier on (train_x, train_y), report ``classification_report_dict`` on the test set.

    Images are (N, C, H, W) uint8 or float in [-1, 1]; NaN/inf in ``train_x`` raise ``HuscfError``.
    ``shift`` (pixel translations) is off by default so the learner sees exactly the given images.
    """
    x = as_images(train_x, "training images")
    xt = as_images(test_x, "test images", generated=False)
    y, yt = _labels(train_y, len(x), num_classes, "training"), _labels(test_y, len(xt), num_classes, "test")
    start = time.perf_counter()
    recipe = replace(DEFAULT_RECIPE, epochs=epochs, seed=seed, min_steps=min_steps, shift=shift)
    model = train_classifier(x, y, num_classes, recipe=recipe)
    seconds = time.perf_counter() - start
    report = classification_report_dict(yt.numpy(), predict(model, xt).numpy(), num_classes)
    return {**report, "n_train": len(x), "n_test": len(xt), "num_classes": num_classes, "epochs": epochs,
            "min_steps": min_steps, "seed": seed, "trained_seconds": round(seconds, 2)}


def real_ceiling(domain_name: str, n: int, *, data_dir: str | Path | None = None,
                 epochs: int = DEFAULT_RECIPE.epochs, seed: int = 0, min_steps: int = DEFAULT_RECIPE.min_steps) -> dict:
    """TSTR with ``n`` real training images (drawn with ``seed``) in place of synthetic ones: the ceiling."""
    train, test = load_domain(domain_name, "train", data_dir), load_domain(domain_name, "test", data_dir)
    if not 0 < n <= len(train):
        raise HuscfError(f"real ceiling: n must be in 1..{len(train)} for {domain_name}, got {n}")
    idx = np.sort(np.random.default_rng(seed).choice(len(train), size=n, replace=False))
    return tstr(train.images[idx], train.labels[idx], test.images, test.labels, train.num_classes,
                epochs=epochs, seed=seed, min_steps=min_steps)


__all__ = ["classification_report_dict", "real_ceiling", "tstr"]
