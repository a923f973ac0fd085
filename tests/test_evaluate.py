"""Tests for condiff.evaluate: metrics against closed forms, the digits classifier, and its cache."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import scipy.linalg
import torch

from condiff import evaluate
from condiff.data import gaussian_mixture_dataset, load_digits_dataset, split_per_class
from condiff.evaluate import (
    Classifier,
    SampleEvaluation,
    class_frequency_intervals,
    dataset_fingerprint,
    default_cache_dir,
    evaluate_samples,
    extract_features,
    frechet_distance,
    load_or_train_classifier,
    predict_labels,
    total_variation,
    train_classifier,
)

GMM_MEANS = [[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]]


@pytest.fixture(scope="module")
def digits_split():
    return split_per_class(load_digits_dataset(), 30)


@pytest.fixture(scope="module")
def gmm_split():
    # Components 4 apart with scale 0.3 overlap with probability ~1e-11: labels are certain.
    return split_per_class(gaussian_mixture_dataset(GMM_MEANS, 0.3, [200, 200, 200], seed=1), 50)


@pytest.fixture(scope="module")
def digits_classifier(digits_split):
    return train_classifier(*digits_split, epochs=30)


def samples_with_moments(mean: np.ndarray, cov: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n samples whose sample mean and (unbiased) covariance are exactly `mean` and `cov`."""
    x = rng.standard_normal((n, len(mean)))
    x -= x.mean(axis=0)
    x = x @ np.linalg.inv(np.linalg.cholesky(np.atleast_2d(np.cov(x, rowvar=False)))).T
    return x @ np.linalg.cholesky(cov).T + mean


def random_covariance(dim: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


# Frechet distance

def test_frechet_distance_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    mu_a, mu_b = np.array([0.0, 1.0, -1.0, 2.0]), np.array([0.5, 1.0, 0.0, -1.0])
    var_a, var_b = np.array([1.0, 0.5, 2.0, 1.5]), np.array([2.0, 0.5, 0.25, 1.0])
    n = 100_000
    a = mu_a + np.sqrt(var_a) * rng.standard_normal((n, 4))
    b = mu_b + np.sqrt(var_b) * rng.standard_normal((n, 4))
    closed_form = np.sum((mu_a - mu_b) ** 2) + np.sum(var_a + var_b - 2 * np.sqrt(var_a * var_b))
    assert frechet_distance(a, b) == pytest.approx(closed_form, rel=0.02)


def test_frechet_distance_full_covariances_matches_symmetric_formula():
    # tr((Sa Sb)^1/2) = tr((Sa^1/2 Sb Sa^1/2)^1/2): an independent, symmetric route to the same value.
    rng = np.random.default_rng(1)
    dim = 6
    mu_a, mu_b = rng.standard_normal(dim), rng.standard_normal(dim)
    cov_a, cov_b = random_covariance(dim, rng), random_covariance(dim, rng)
    a = samples_with_moments(mu_a, cov_a, 500, rng)
    b = samples_with_moments(mu_b, cov_b, 700, rng)
    root_a = scipy.linalg.sqrtm(cov_a).real
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * cross
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_one_dimensional_known_value():
    rng = np.random.default_rng(2)
    a = samples_with_moments(np.array([0.0]), np.array([[1.0]]), 50, rng)
    b = samples_with_moments(np.array([2.0]), np.array([[4.0]]), 80, rng)
    # (0 - 2)^2 + 1 + 4 - 2 * sqrt(1 * 4) = 5
    assert frechet_distance(a, b) == pytest.approx(5.0, rel=1e-10)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(3).standard_normal((400, 16)) @ np.diag(np.linspace(0.1, 3, 16))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_survives_singular_covariances():
    # Fewer samples than dimensions and duplicated columns: both covariances are rank-deficient.
    rng = np.random.default_rng(4)
    base_a, base_b = rng.standard_normal((10, 8)), rng.standard_normal((12, 8)) + 1.0
    a, b = np.hstack([base_a, base_a]), np.hstack([base_b, base_b])
    distance = frechet_distance(a, b)
    assert np.isfinite(distance) and distance > 0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-5)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((1, 3)), np.zeros((10, 3)))


# Total variation and Wilson intervals

def test_total_variation_known_values():
    assert total_variation([1.0, 0.0], [0.0, 1.0]) == pytest.approx(1.0)
    assert total_variation([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert total_variation([0.2, 0.3, 0.5], [0.3, 0.3, 0.4]) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        total_variation([0.5, 0.5], [1.0])


def test_wilson_interval_hand_example():
    # 20 of 100 in class 1: the textbook 95% Wilson interval is (0.1334, 0.2888).
    labels = np.array([1] * 20 + [0] * 80)
    freq, low, high = class_frequency_intervals(labels, 3)
    np.testing.assert_allclose(freq, [0.8, 0.2, 0.0])
    assert low[1] == pytest.approx(0.133367, abs=1e-5)
    assert high[1] == pytest.approx(0.288829, abs=1e-5)
    # A class never seen: low is 0 and high is z^2 / (n + z^2).
    z2 = 1.959964**2
    assert low[2] == pytest.approx(0.0, abs=1e-12)
    assert high[2] == pytest.approx(z2 / (100 + z2), rel=1e-5)
    # Intervals symmetric under swapping the class with the rest.
    assert low[0] == pytest.approx(1 - high[1]) and high[0] == pytest.approx(1 - low[1])


def test_wilson_interval_covers_true_share():
    rng = np.random.default_rng(5)
    true_share, n, trials = 0.3, 60, 2000
    covered = 0
    for _ in range(trials):
        labels = (rng.random(n) < true_share).astype(np.int64)
        _, low, high = class_frequency_intervals(labels, 2, confidence=0.95)
        covered += low[1] <= true_share <= high[1]
    # Wilson coverage for these n, p is close to the nominal 95%.
    assert 0.92 <= covered / trials <= 0.98


def test_wilson_interval_widens_with_confidence():
    labels = np.array([0, 1, 1, 2, 2, 2])
    narrow, wide = class_frequency_intervals(labels, 3, 0.8), class_frequency_intervals(labels, 3, 0.99)
    assert np.all(wide.low <= narrow.low) and np.all(wide.high >= narrow.high)
    assert np.all(narrow.low <= narrow.freq) and np.all(narrow.freq <= narrow.high)


# Classifier

def test_classifier_shapes_for_images_and_vectors():
    image_classifier = Classifier((1, 8, 8), 10)
    images = torch.randn(5, 1, 8, 8)
    assert image_classifier(images).shape == (5, 10)
    assert image_classifier.features(images).shape == (5, 64)
    vector_classifier = Classifier((2,), 3)
    assert vector_classifier(torch.randn(7, 2)).shape == (7, 3)
    assert extract_features(vector_classifier, np.zeros((7, 2), np.float32)).dtype == np.float64
    assert Classifier(**json.loads(json.dumps(image_classifier.config()))).config() == image_classifier.config()
    with pytest.raises(ValueError):
        Classifier((4, 4), 2)


def test_random_shifts_move_images_by_at_most_one_pixel():
    images = torch.randn(64, 1, 8, 8)
    shifted = evaluate._random_shifts(images, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate")
    candidates = torch.stack([padded[:, :, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)])
    matches = (candidates == shifted).flatten(2).all(dim=2)  # (9 shifts, 64 images)
    assert matches.any(dim=0).all()
    assert not matches[4].all()  # not every image left unshifted


def test_digits_classifier_accuracy(digits_split, digits_classifier):
    classifier, accuracy = digits_classifier
    _, held_out = digits_split
    assert not classifier.training
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(np.mean(predict_labels(classifier, held_out.data) == held_out.labels.numpy()))


def test_training_is_deterministic_given_seed(gmm_split):
    first, _ = train_classifier(*gmm_split, epochs=2, seed=3)
    torch.manual_seed(123)  # the global seed must not matter
    second, _ = train_classifier(*gmm_split, epochs=2, seed=3)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_predict_labels_batches_and_empty_input(gmm_split):
    classifier, _ = train_classifier(*gmm_split, epochs=5)
    x = gmm_split[1].data
    np.testing.assert_array_equal(predict_labels(classifier, x, batch_size=7), predict_labels(classifier, x))
    assert predict_labels(classifier, x[:0]).shape == (0,)


# Cache

@pytest.fixture
def count_training(monkeypatch):
    calls = []

    def counting_train(*args, **kwargs):
        calls.append(kwargs)
        return train_classifier(*args, **kwargs)

    monkeypatch.setattr(evaluate, "train_classifier", counting_train)
    return calls


def test_cache_round_trip_does_not_retrain(tmp_path, digits_split, count_training):
    train, held_out = digits_split
    trained, accuracy = load_or_train_classifier("digits", train, held_out, cache_dir=tmp_path, epochs=2)
    weights = tmp_path / "classifiers" / "digits.safetensors"
    meta = json.loads((tmp_path / "classifiers" / "digits.json").read_text())
    assert meta["config"] == {"sample_shape": [1, 8, 8], "num_classes": 10}
    assert meta["held_out_accuracy"] == accuracy
    modified = weights.stat().st_mtime_ns

    loaded, loaded_accuracy = load_or_train_classifier("digits", train, held_out, cache_dir=tmp_path, epochs=2)
    assert len(count_training) == 1
    assert weights.stat().st_mtime_ns == modified
    assert loaded_accuracy == accuracy and not loaded.training
    np.testing.assert_array_equal(predict_labels(loaded, held_out.data), predict_labels(trained, held_out.data))
    np.testing.assert_array_equal(extract_features(loaded, held_out.data), extract_features(trained, held_out.data))
    assert sorted(p.name for p in weights.parent.iterdir()) == ["digits.json", "digits.safetensors"]


def test_changed_data_or_arguments_retrain(tmp_path, gmm_split, count_training):
    train, held_out = gmm_split
    load_or_train_classifier("gmm", train, held_out, cache_dir=tmp_path, epochs=2)
    changed = train.subset(torch.arange(len(train) - 1))
    assert dataset_fingerprint(changed) != dataset_fingerprint(train)
    load_or_train_classifier("gmm", changed, held_out, cache_dir=tmp_path, epochs=2)
    assert len(count_training) == 2
    load_or_train_classifier("gmm", changed, held_out, cache_dir=tmp_path, epochs=3)
    assert len(count_training) == 3
    load_or_train_classifier("gmm", changed, held_out, cache_dir=tmp_path, epochs=3)
    assert len(count_training) == 3


def test_weights_and_metadata_from_different_runs_retrain(tmp_path, gmm_split, count_training):
    # As if a crash fell between replacing the weights and replacing the JSON of the next run.
    train, held_out = gmm_split
    load_or_train_classifier("gmm", train, held_out, cache_dir=tmp_path, epochs=2)
    meta_path = tmp_path / "classifiers" / "gmm.json"
    stale_meta = meta_path.read_text()
    load_or_train_classifier("gmm", train, held_out, cache_dir=tmp_path, epochs=3)
    meta_path.write_text(stale_meta)
    load_or_train_classifier("gmm", train, held_out, cache_dir=tmp_path, epochs=2)
    assert len(count_training) == 3


def test_default_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("CONDIFF_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "condiff")


# Evaluating samples

def test_evaluate_samples_counts_and_distances(gmm_split):
    train, held_out = gmm_split
    classifier, accuracy = train_classifier(train, held_out, epochs=20)
    assert accuracy == 1.0
    reference = extract_features(classifier, train.data)
    # 50 of class 0, 25 of class 1, none of class 2, against equal target shares.
    samples = torch.cat([held_out.of_class(0).data, held_out.of_class(1).data[:25]])
    result = evaluate_samples(samples, classifier, accuracy, reference, np.full(3, 1 / 3), 3)
    assert isinstance(result, SampleEvaluation)
    assert result.class_counts == [50, 25, 0]
    assert result.class_frequencies == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert result.tv_to_target == pytest.approx(1 / 3)
    assert result.num_samples == 75 and result.classifier_accuracy == 1.0

    matched = evaluate_samples(held_out.data, classifier, accuracy, reference, np.full(3, 1 / 3), 3)
    assert matched.tv_to_target == pytest.approx(0.0)
    assert matched.frechet_distance < result.frechet_distance
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()
    with pytest.raises(ValueError):
        evaluate_samples(samples, classifier, accuracy, reference, np.full(2, 0.5), 3)


def test_evaluate_samples_on_digits(digits_split, digits_classifier):
    train, held_out = digits_split
    classifier, accuracy = digits_classifier
    reference = extract_features(classifier, train.data)
    real = evaluate_samples(held_out.data, classifier, accuracy, reference, np.full(10, 0.1), 10)
    noise = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fake = evaluate_samples(noise, classifier, accuracy, reference, np.full(10, 0.1), 10)
    assert real.tv_to_target <= 1 - accuracy + 1e-9  # each mistake moves at most 1/N of mass
    assert real.frechet_distance < 0.2 * fake.frechet_distance
