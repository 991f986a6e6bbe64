"""Measurements of generators: the cheap in-training label probe (label_probe.py), sample grids
(grids.py), and the evaluation suite: per-domain classifiers (classifiers.py), generation score
and FIDs (scores.py), TSTR (tstr.py), ``huscf evaluate`` (evaluate.py)."""

from huscf.metrics.classifiers import DomainClassifier, load_or_train, train_classifier
from huscf.metrics.scores import (
    classifier_features,
    classifier_fid,
    classifier_probs,
    frechet_distance,
    generation_score,
    inception_fid,
    inception_fid_available,
)
from huscf.metrics.tstr import classification_report_dict, real_ceiling, tstr

__all__ = [
    "DomainClassifier", "classification_report_dict", "classifier_features", "classifier_fid", "classifier_probs",
    "frechet_distance", "generation_score", "inception_fid", "inception_fid_available", "load_or_train",
    "real_ceiling", "train_classifier", "tstr",
]
