"""A cheap per-round measure of a conditional generator: label fidelity under a real-data probe.

For each domain a logistic-regression probe (scikit-learn) is fitted on real training images
(2x average-pooled to 14x14, at most ``max_train`` images). A generator's *label accuracy* is the
fraction of its samples, generated for uniformly drawn labels, that the probe assigns to the label
they were generated for: about 1/num_classes for an untrained generator, high for a good one. It
is a progress signal, not the paper's generation score or FID (see the evaluation suite).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits


def _features(x: torch.Tensor) -> np.ndarray:
    return F.avg_pool2d(x.float(), 2).flatten(1).numpy()


@dataclass
class LabelProbe:
    """A fitted probe for one domain and its accuracy on real held-out images."""

    clf: LogisticRegression
    real_test_accuracy: float
    num_classes: int

    @classmethod
    def fit(cls, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
            max_train: int = 5000, seed: int = 0) -> "LabelProbe":
        idx = np.random.default_rng(seed).permutation(len(y_train))[:max_train]
        clf = LogisticRegression(max_iter=300, C=0.5)
        # a probe a little short of convergence is fine (its accuracy is reported); one BLAS thread:
        # the fit is small, and threads spinning beside torch's only slow it down
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(_features(x_train[idx]), y_train[idx].numpy())
        acc = float((clf.predict(_features(x_test)) == y_test.numpy()).mean())
        return cls(clf, acc, int(y_train.max()) + 1)

    def label_accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.clf.predict(_features(images)) == labels.numpy()).mean())
