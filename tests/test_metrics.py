"""Tests for huscf.metrics' evaluation suite: domain classifiers and their cache, generation score, FIDs, TSTR.

Classifiers are trained once per session into a temporary cache (about a minute on 2 CPU cores).
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from huscf.data import load_domain, to_tensor, write_idx
from huscf.errors import HuscfError
from huscf.metrics import (
    DomainClassifier,
    classification_report_dict,
    classifier_fid,
    classifier_probs,
    classifiers,
    frechet_distance,
    generation_score,
    inception_fid,
    inception_fid_available,
    load_or_train,
    real_ceiling,
    train_classifier,
    tstr,
)

TARGETS = {"mnist": 0.985, "fashion_mnist": 0.90, "kmnist": 0.90, "notmnist": 0.90, "digits": 0.90}


@pytest.fixture(scope="session")
def classifier_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("huscf-cache")


@pytest.fixture(scope="session")
def trained(classifier_cache):
    """get(domain, data_dir) -> (classifier, info), trained once per session."""
    memo = {}

    def get(domain, data_dir=None):
        if domain not in memo:
            memo[domain] = load_or_train(domain, data_dir, classifier_cache)
        return memo[domain]

    return get


def _data_dir(domain, request):
    return None if domain.startswith("digits") else request.getfixturevalue("shared_data_dir")


@pytest.fixture
def fast_training(monkeypatch):
    """Make load_or_train train a 20-step classifier, and count its trainings."""
    calls = []
    real = classifiers.train_classifier

    def quick(x, y, num_classes, *, recipe=classifiers.DEFAULT_RECIPE, **kwargs):
        calls.append(len(x))
        return real(x, y, num_classes, recipe=dataclasses.replace(recipe, epochs=1, min_steps=20))

    monkeypatch.setattr(classifiers, "train_classifier", quick)
    return calls


def _fake_notmnist(root, images, labels):
    """A tiny t10k-only 'notmnist' domain in ``root`` (carved 80/20 by load_domain)."""
    (root / "notmnist").mkdir(parents=True, exist_ok=True)
    write_idx(root / "notmnist" / "t10k-images-idx3-ubyte.gz", images)
    write_idx(root / "notmnist" / "t10k-labels-idx1-ubyte.gz", labels)


# ---- domain classifiers -----------------------------------------------------------------------

@pytest.mark.parametrize("domain", list(TARGETS))
def test_classifier_meets_accuracy_target(domain, trained, request):
    data_dir = _data_dir(domain, request)
    model, info = trained(domain, data_dir)
    assert not model.training
    assert info["test_accuracy"] >= TARGETS[domain], info
    test = load_domain(domain, "test", data_dir)
    assert info["test_accuracy"] == pytest.approx(classifiers.accuracy(model, to_tensor(test.images),
                                                                       torch.from_numpy(test.labels.copy())))
    stored = json.loads(Path(info["path"]).with_suffix(".json").read_text())
    assert stored["test_accuracy"] == info["test_accuracy"] and stored["data_hash"] == info["data_hash"]
    assert info["trained_seconds"] > 0 and len(info["data_hash"]) == 64


def test_second_call_loads_from_cache(trained, classifier_cache, monkeypatch):
    model, info = trained("digits")
    monkeypatch.setattr(classifiers, "train_classifier", lambda *a, **k: pytest.fail("retrained a cached classifier"))
    again, info2 = load_or_train("digits", None, classifier_cache)
    assert info2["cached"] and not again.training
    assert info2["path"] == info["path"] and info2["test_accuracy"] == info["test_accuracy"]
    x = to_tensor(load_domain("digits", "test").images[:50])
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HUSCF_CACHE", str(tmp_path))
    assert classifiers.cache_root() == tmp_path / "classifiers"
    assert classifiers.cache_root(tmp_path / "x") == tmp_path / "x" / "classifiers"


def test_corrupted_cache_file_is_retrained(tmp_path, fast_training):
    _, info = load_or_train("digits_inverted", cache_dir=tmp_path)
    assert not info["cached"] and fast_training == [1437]
    with open(info["path"], "wb") as f:
        f.write(b"not a checkpoint")
    model, info2 = load_or_train("digits_inverted", cache_dir=tmp_path)
    assert not info2["cached"] and len(fast_training) == 2 and not model.training
    _, info3 = load_or_train("digits_inverted", cache_dir=tmp_path)  # the rewritten file loads again
    assert info3["cached"] and len(fast_training) == 2


def test_data_change_gives_new_hash_and_new_classifier(tmp_path, fast_training):
    digits = load_domain("digits", "train")
    images, labels = digits.images[:, 0].copy(), digits.labels.astype(np.uint8)
    _fake_notmnist(tmp_path / "a", images, labels)
    images[0, 10, 10] ^= 0xFF
    _fake_notmnist(tmp_path / "b", images, labels)
    _, info_a = load_or_train("notmnist", tmp_path / "a", tmp_path / "cache")
    _, info_b = load_or_train("notmnist", tmp_path / "b", tmp_path / "cache")
    assert info_a["data_hash"] != info_b["data_hash"] and info_a["path"] != info_b["path"]
    assert not info_b["cached"] and len(fast_training) == 2
    assert load_or_train("notmnist", tmp_path / "a", tmp_path / "cache")[1]["cached"]


def test_missing_data_raises_one_line_error(tmp_path):
    with pytest.raises(HuscfError) as err:
        load_or_train("mnist", tmp_path, tmp_path)
    assert "not found" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(HuscfError, match="unknown domain"):
        load_or_train("no_such_domain", tmp_path, tmp_path)


@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (2, 3, 32, 32), (2, 1, 8, 8), (2, 2, 20, 36)])
def test_classifier_adapts_to_any_image_shape(shape):
    model = DomainClassifier(shape[1], 7).eval()
    x = torch.zeros(shape)
    assert model(x).shape == (2, 7) and model.features(x).shape == (2, DomainClassifier.FEATURE_DIM)


def test_train_classifier_rejects_bad_input():
    with pytest.raises(HuscfError, match="H, W >= 4"):
        train_classifier(torch.zeros(8, 1, 2, 2), torch.zeros(8, dtype=torch.long), 2)
    with pytest.raises(HuscfError, match="labels must be in 0..1"):
        train_classifier(torch.zeros(8, 1, 8, 8), torch.full((8,), 2), 2)


def test_classifier_options_round_trip_through_cache_info(tmp_path):
    """A non-default network (arch, width, depth) is rebuilt from its cache json; old json rebuilds the default."""
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    for kwargs in ({"arch": "vgg", "width": 8, "depth": 2}, {"width": 8}, {}):
        torch.manual_seed(0)
        model = DomainClassifier(3, 10, **kwargs).eval()
        weights, meta = tmp_path / "m.pt", tmp_path / "m.json"
        torch.save(model.state_dict(), weights)
        info = {"key": "k", "in_channels": 3, "num_classes": 10, "model": model.config()}
        if not kwargs:
            del info["model"]  # a cache json written before the options existed
        meta.write_text(json.dumps(info))
        loaded, _ = classifiers._load_cached(weights, meta, "k")
        assert loaded.config() == {**{"arch": "s2x2", "width": 32, "depth": 1}, **kwargs}
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x)) and loaded.features(x).shape == (4, DomainClassifier.FEATURE_DIM)
    with pytest.raises(HuscfError, match="unknown arch"):
        DomainClassifier(3, 10, arch="resnet")


def test_recipe_options_keep_old_cache_keys_and_train_deterministically():
    old_fields = {"epochs", "min_steps", "shift", "lr", "batch_size", "seed"}
    for name, recipe in classifiers.RECIPES.items():
        if name not in ("cifar10", "pneumoniamnist"):  # recipes older than the options hash as they did
            assert set(classifiers.recipe_key_dict(recipe)) == old_fields
    assert {"arch", "flip"} <= set(classifiers.recipe_key_dict(classifiers.RECIPES["cifar10"]))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 3, 8, 8, generator=g) * 2 - 1, torch.arange(64) % 2
    recipe = classifiers.Recipe(min_steps=3, batch_size=16, arch="vgg", width=4, flip=True, shift=2,
                                weight_decay=1e-3, label_smoothing=0.1, class_weight="balanced")
    a, b = train_classifier(x, y, 2, recipe=recipe), train_classifier(x, y, 2, recipe=recipe)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))

# ---- generation score -------------------------------------------------------------------------

def test_generation_score_formula():
    assert generation_score(np.eye(4)) == pytest.approx(4.0)  # confident and spread evenly: K
    assert generation_score(np.tile([[0.7, 0.2, 0.1]], (5, 1))) == pytest.approx(1.0)  # one distribution: 1
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    marginal = p.mean(0)
    expected = np.exp(np.mean([np.sum(r * np.log(r / marginal)) for r in p]))
    assert generation_score(torch.tensor(p)) == pytest.approx(expected)
    with pytest.raises(HuscfError, match="sum to 1"):
        generation_score(np.array([[0.5, 0.6]]))
    with pytest.raises(HuscfError, match="expected probabilities"):
        generation_score(np.ones(3) / 3)


@pytest.fixture(scope="session")
def mnist(trained, shared_data_dir):
    model, _ = trained("mnist", shared_data_dir)
    test = load_domain("mnist", "test", shared_data_dir)
    return model, to_tensor(test.images), test.labels


def test_generation_score_of_real_noise_and_one_class(mnist):
    model, x, labels = mnist
    real = generation_score(classifier_probs(model, x[:4000]))
    uniform = torch.rand(1000, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = generation_score(classifier_probs(model, uniform))
    one_class = generation_score(classifier_probs(model, x[torch.from_numpy(labels == 3)]))
    assert real > 9.0 and noise < 1.5 and one_class < 1.5, (real, noise, one_class)


def test_classifier_probs_accepts_uint8_and_rejects_nan(trained):
    model, _ = trained("digits")
    images = load_domain("digits", "test").images[:20]
    probs = classifier_probs(model, images)
    assert probs.shape == (20, 10) and np.allclose(probs.sum(1), 1.0)
    assert np.allclose(probs, classifier_probs(model, to_tensor(images)), atol=1e-6)
    bad = to_tensor(images)
    bad[3, 0, 5, 5] = float("nan")
    with pytest.raises(HuscfError, match="generator emitted non-finite values: 1 of 20"):
        classifier_probs(model, bad)


# ---- Frechet distances ------------------------------------------------------------------------

def _exact_gaussian(n, mean, std, seed):
    """Samples whose empirical mean and (diagonal) covariance are exactly ``mean`` and ``std**2``."""
    z = np.random.default_rng(seed).standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whitened: covariance exactly I
    return z * std + mean


def test_frechet_distance_closed_form():
    a = _exact_gaussian(500, np.array([0.0, 1.0, -2.0]), np.array([1.0, 2.0, 0.5]), seed=0)
    b = _exact_gaussian(700, np.array([1.0, 1.0, 0.0]), np.array([3.0, 1.0, 0.5]), seed=1)
    # |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2 for diagonal covariances
    assert frechet_distance(a, b) == pytest.approx((1 + 0 + 4) + (4 + 1 + 0), rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # a full (non-commuting) pair against the general closed form
    rng = np.random.default_rng(2)
    c, d = rng.standard_normal((400, 4)) @ rng.standard_normal((4, 4)), rng.standard_normal((300, 4)) + 1
    s_c, s_d = np.cov(c, rowvar=False), np.cov(d, rowvar=False)
    root = scipy.linalg.sqrtm(s_c)
    expected = (np.sum((c.mean(0) - d.mean(0)) ** 2) + np.trace(s_c) + np.trace(s_d)
                - 2 * np.trace(scipy.linalg.sqrtm(root @ s_d @ root).real))
    assert frechet_distance(c, d) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_survives_singular_covariances():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((50, 8)), rng.standard_normal((50, 8))
    a[:, :3] = 0.0  # dead features, as ReLU units on noise
    value = frechet_distance(a, b)
    assert np.isfinite(value) and value > 1.0
    with pytest.raises(HuscfError, match="equal D"):
        frechet_distance(a, b[:, :4])


def test_classifier_fid_orders_real_shifted_noise(mnist):
    model, x, _ = mnist
    real, other = x[:2000], x[5000:7000]
    same = classifier_fid(model, real, other)
    shifted = classifier_fid(model, real, torch.roll(other, shifts=3, dims=3))
    noise = classifier_fid(model, real, torch.rand(2000, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    assert 2 * same < shifted and 5 * shifted < noise, (same, shifted, noise)


def test_inception_fid_available_or_clear_error():
    ok, reason = inception_fid_available()
    images = torch.zeros(4, 1, 28, 28)
    if not ok:
        assert reason and "\n" not in reason
        with pytest.raises(HuscfError) as err:
            inception_fid(images, images)
        message = str(err.value)
        assert "\n" not in message and "torchmetrics[image]" in message
        assert "classifier-feature FID is always available" in message
    else:
        assert reason == ""
        value = inception_fid(images - 0.5, torch.rand(4, 1, 28, 28) * 2 - 1)
        assert np.isfinite(value)


# ---- TSTR -------------------------------------------------------------------------------------

def test_classification_report_matches_sklearn_and_hand_counts():
    y_true = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 0, 1, 2, 1, 1, 2, 2, 0, 2]
    r = classification_report_dict(y_true, y_pred, 3)
    assert r["confusion_matrix"] == [[2, 1, 1], [0, 2, 0], [1, 0, 3]]
    assert r["accuracy"] == pytest.approx(0.7) == accuracy_score(y_true, y_pred)
    p, rec, f1, _ = precision_recall_fscore_support(y_true, y_pred, average="macro")
    assert (r["precision"], r["recall"], r["f1"]) == pytest.approx((p, rec, f1))
    assert r["precision"] == pytest.approx((2 / 3 + 2 / 3 + 3 / 4) / 3)
    assert r["recall"] == pytest.approx((2 / 4 + 2 / 2 + 3 / 4) / 3)
    # FP per class = column sum - diagonal = 1, 1, 1; negatives = 10 - row sum = 6, 8, 6
    assert r["fpr"] == pytest.approx((1 / 6 + 1 / 8 + 1 / 6) / 3)
    assert r["per_class_accuracy"] == pytest.approx([0.5, 1.0, 0.75])
    # a class that never occurs counts as 0, like sklearn's zero_division=0
    r4 = classification_report_dict(y_true, y_pred, 4)
    p4, rec4, f14, _ = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2, 3], average="macro",
                                                       zero_division=0)
    assert (r4["precision"], r4["recall"], r4["f1"]) == pytest.approx((p4, rec4, f14))
    assert r4["fpr"] == pytest.approx((1 / 6 + 1 / 8 + 1 / 6 + 0) / 4)
    json.dumps(r4)


@pytest.fixture(scope="module")
def digits_split():
    train, test = load_domain("digits", "train"), load_domain("digits", "test")
    return train.images, train.labels, test.images, test.labels


def test_tstr_on_real_images_is_high(digits_split):
    x, y, xt, yt = digits_split
    result = tstr(x, y, xt, yt, 10, epochs=1, min_steps=200, seed=0)
    assert result["accuracy"] > 0.9 and result["f1"] > 0.9 and result["fpr"] < 0.02, result
    assert result["n_train"] == len(x) and result["n_test"] == len(xt)
    assert np.sum(result["confusion_matrix"]) == len(xt) and len(result["per_class_accuracy"]) == 10
    json.dumps(result)


def test_tstr_with_shuffled_labels_is_about_chance(digits_split):
    x, y, xt, yt = digits_split
    shuffled = np.random.default_rng(0).permutation(y)
    result = tstr(x, shuffled, xt, yt, 10, epochs=1, min_steps=200, seed=0)
    assert result["accuracy"] < 0.25, result["accuracy"]


def test_tstr_rejects_non_finite_images_and_bad_labels(digits_split):
    x, y, xt, yt = digits_split
    fake = to_tensor(x[:64])
    fake[5] = float("inf")
    with pytest.raises(HuscfError, match="generator emitted non-finite values"):
        tstr(fake, y[:64], xt, yt, 10)
    with pytest.raises(HuscfError, match="labels must be in 0..9"):
        tstr(x[:64], np.full(64, 10), xt, yt, 10)
    with pytest.raises(HuscfError, match="64 training images but 63 labels"):
        tstr(x[:64], y[:63], xt, yt, 10)


def test_real_ceiling_trains_on_n_real_images():
    result = real_ceiling("digits", 300, epochs=1, min_steps=100, seed=1)
    assert result["n_train"] == 300 and result["n_test"] == 360 and result["accuracy"] > 0.7, result["accuracy"]
    with pytest.raises(HuscfError, match="n must be in 1..1437"):
        real_ceiling("digits", 5000)
