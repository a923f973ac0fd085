"""Tests for condiff.evaluation.metrics: metrics against closed forms, the digits classifier, and its cache."""

import importlib.util
import json
import os
import sys
import types

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import scipy.linalg
import torch

import condiff
from condiff.config import ConfigError, EvaluateConfig, config_from_dict
from condiff.data.datasets import gaussian_mixture_dataset, load_digits_dataset, split_per_class
from condiff.evaluation import classifier as classifier_module
from condiff.evaluation import metrics as metrics_module
from condiff.evaluation.classifier import (
    Classifier,
    dataset_fingerprint,
    default_cache_dir,
    extract_features,
    load_or_train_classifier,
    predict_labels,
    train_classifier,
)
from condiff.evaluation.inception import (
    INCEPTION_WEIGHTS_NAME,
    InceptionFIDUnavailable,
    check_inception_fid,
    inception_fid,
)
from condiff.evaluation.metrics import (
    PrecisionRecall,
    SampleEvaluation,
    class_frequency_intervals,
    evaluate_samples,
    frechet_distance,
    in_manifold,
    knn_radii,
    precision_recall,
    total_variation,
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
    config = json.loads(json.dumps(dict(image_classifier.config)))   # what save_pretrained stores
    assert config["sample_shape"] == [1, 8, 8] and config["num_classes"] == 10
    rebuilt = Classifier.from_config(config)
    assert rebuilt.sample_shape == (1, 8, 8) and rebuilt.num_classes == 10
    with pytest.raises(ValueError):
        Classifier((4, 4), 2)


def test_random_shifts_move_images_by_at_most_one_pixel():
    images = torch.randn(64, 1, 8, 8)
    shifted = classifier_module._random_shifts(images, torch.Generator().manual_seed(0))
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

    monkeypatch.setattr(classifier_module, "train_classifier", counting_train)
    return calls


def test_cache_round_trip_does_not_retrain(tmp_path, digits_split, count_training):
    train, held_out = digits_split
    trained, accuracy = load_or_train_classifier("digits", train, held_out, cache_dir=tmp_path, epochs=2)
    entry = tmp_path / "classifiers" / "digits"          # a save_pretrained folder
    weights = entry / "diffusion_pytorch_model.safetensors"
    meta = json.loads((entry / "training.json").read_text())
    config = json.loads((entry / "config.json").read_text())
    assert config["sample_shape"] == [1, 8, 8] and config["num_classes"] == 10
    assert meta["held_out_accuracy"] == accuracy
    modified = weights.stat().st_mtime_ns

    loaded, loaded_accuracy = load_or_train_classifier("digits", train, held_out, cache_dir=tmp_path, epochs=2)
    assert len(count_training) == 1
    assert weights.stat().st_mtime_ns == modified
    assert loaded_accuracy == accuracy and not loaded.training
    np.testing.assert_array_equal(predict_labels(loaded, held_out.data), predict_labels(trained, held_out.data))
    np.testing.assert_array_equal(extract_features(loaded, held_out.data), extract_features(trained, held_out.data))
    # The entry is a diffusers folder in safetensors (nothing to unpickle), and no temporary is left beside it.
    reopened = Classifier.from_pretrained(entry, use_safetensors=True).eval()
    np.testing.assert_array_equal(predict_labels(reopened, held_out.data), predict_labels(trained, held_out.data))
    assert not [p for p in entry.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert [p.name for p in entry.parent.iterdir()] == ["digits"]


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


def test_runs_started_side_by_side_train_a_cache_entry_once(tmp_path, gmm_split, count_training):
    """Two loaders at once (two runs, or two test workers): one trains, the other waits and reads its entry."""
    from concurrent.futures import ThreadPoolExecutor

    train, held_out = gmm_split
    with ThreadPoolExecutor(2) as pool:
        loaded = list(pool.map(lambda _: load_or_train_classifier("gmm", train, held_out, cache_dir=tmp_path,
                                                                  epochs=2), range(2)))
    assert len(count_training) == 1
    assert all(torch.equal(a, b) for a, b in zip(loaded[0][0].state_dict().values(), loaded[1][0].state_dict().values()))


def test_a_retrained_entry_replaces_the_old_one_whole(tmp_path, gmm_split, count_training):
    """Weights and their record are one folder, renamed into place: they cannot come from two runs."""
    train, held_out = gmm_split
    first, _ = load_or_train_classifier("gmm", train, held_out, cache_dir=tmp_path, epochs=2)
    second, _ = load_or_train_classifier("gmm", train, held_out, cache_dir=tmp_path, epochs=3)
    entry = tmp_path / "classifiers" / "gmm"
    assert json.loads((entry / "training.json").read_text())["train_kwargs"] == {"epochs": 3}
    reloaded, _ = load_or_train_classifier("gmm", train, held_out, cache_dir=tmp_path, epochs=3)
    assert len(count_training) == 2
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), second.state_dict().values()))
    assert [p.name for p in entry.parent.iterdir()] == ["gmm"]


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
    assert result.num_reference == len(train) and result.nearest_neighbours == 3 and result.confidence == 0.95
    intervals = class_frequency_intervals(np.array([0] * 50 + [1] * 25), 3)
    assert result.class_frequencies_low == pytest.approx(intervals.low.tolist())
    assert result.class_frequencies_high == pytest.approx(intervals.high.tolist())
    # Samples from two of three classes: good samples (precision) that miss a third of the data (recall).
    assert result.precision > 0.9
    assert result.recall < 0.7

    matched = evaluate_samples(held_out.data, classifier, accuracy, reference, np.full(3, 1 / 3), 3)
    assert matched.tv_to_target == pytest.approx(0.0)
    assert matched.frechet_distance < result.frechet_distance
    assert matched.recall > result.recall + 0.2 and matched.precision > 0.9
    assert (matched.precision, matched.recall) == pytest.approx(
        precision_recall(reference, extract_features(classifier, held_out.data), 3))
    wider = evaluate_samples(held_out.data, classifier, accuracy, reference, np.full(3, 1 / 3), 3,
                             nearest_neighbours=10, confidence=0.99, block_rows=16)
    assert wider.nearest_neighbours == 10 and wider.recall >= matched.recall
    assert all(w <= m for w, m in zip(wider.class_frequencies_low, matched.class_frequencies_low))
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
    assert real.precision > 0.8 and real.recall > 0.5
    assert fake.precision < 0.2 and fake.recall < 0.2


# Precision and recall (Kynkaanniemi et al., 2019)

def brute_force_precision_recall(real: np.ndarray, generated: np.ndarray, k: int):
    """The definition, with full distance matrices in numpy."""
    def distances(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))

    real_radii = np.sort(distances(real, real), axis=1)[:, k]  # column 0 is the point itself
    generated_radii = np.sort(distances(generated, generated), axis=1)[:, k]
    precision_mask = (distances(generated, real) <= real_radii[None, :]).any(axis=1)
    recall_mask = (distances(real, generated) <= generated_radii[None, :]).any(axis=1)
    return real_radii, generated_radii, precision_mask, recall_mask


def test_knn_radii_and_precision_recall_hand_example():
    real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    generated = np.array([[-0.5], [5.0], [2.5], [20.0]])
    np.testing.assert_allclose(knn_radii(real, k=1), [1, 1, 1, 1, 7])
    np.testing.assert_allclose(knn_radii(real, k=2), [2, 1, 1, 2, 8])
    # -0.5 and 2.5 lie within 1 of a real point, 5 within the outlier 10's radius 7; 20 nowhere.
    np.testing.assert_array_equal(in_manifold(generated, real, knn_radii(real, k=1)), [True, True, True, False])
    # Generated radii (k=1): 3, 2.5, 2.5, 15; the generated outlier 20 covers the real outlier 10.
    assert precision_recall(real, generated, k=1) == PrecisionRecall(0.75, 1.0)


def test_precision_recall_of_identical_sets_is_one():
    features = np.random.default_rng(6).standard_normal((300, 8))
    assert precision_recall(features, features) == (1.0, 1.0)
    assert precision_recall(features, features[::-1].copy(), k=1) == (1.0, 1.0)


def two_clusters(n: int, rng: np.random.Generator, dim: int = 4) -> tuple[np.ndarray, np.ndarray]:
    # Unit-scale clusters 100 apart: no ball of one cluster's k-NN manifold reaches the other.
    return rng.standard_normal((n, dim)), rng.standard_normal((n, dim)) + 100.0


def test_precision_recall_of_half_the_modes():
    rng = np.random.default_rng(7)
    cluster_a, cluster_b = two_clusters(400, rng)
    real = np.vstack([cluster_a, cluster_b])
    # A copy of one cluster: every generated point is a real point (precision exactly 1) and covers
    # exactly the real points of its own cluster (recall exactly 1/2).
    assert precision_recall(real, cluster_a.copy()) == (1.0, 0.5)
    # Fresh samples of one cluster: precision near 1 (only tail points fall outside), recall near 1/2.
    fresh = rng.standard_normal((400, 4))
    precision, recall = precision_recall(real, fresh)
    assert precision > 0.85
    assert 0.4 < recall <= 0.5


def test_precision_recall_of_a_distant_set_is_zero():
    real = np.random.default_rng(8).standard_normal((200, 3))
    assert precision_recall(real, real + 50.0) == (0.0, 0.0)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("block_rows", [None, 1, 7])
def test_precision_recall_matches_brute_force(k, block_rows):
    rng = np.random.default_rng(k)
    # Overlapping but shifted distributions, so that both metrics are strictly between 0 and 1.
    real = rng.standard_normal((57, 5))
    generated = rng.standard_normal((43, 5)) + np.array([2.0, 0, 0, 0, 0])
    real_radii, generated_radii, precision_mask, recall_mask = brute_force_precision_recall(real, generated, k)
    np.testing.assert_allclose(knn_radii(real, k, block_rows=block_rows), real_radii, rtol=1e-10)
    np.testing.assert_allclose(knn_radii(generated, k, block_rows=block_rows), generated_radii, rtol=1e-10)
    np.testing.assert_array_equal(in_manifold(generated, real, real_radii, block_rows=block_rows), precision_mask)
    np.testing.assert_array_equal(in_manifold(real, generated, generated_radii, block_rows=block_rows), recall_mask)
    precision, recall = precision_recall(real, generated, k, block_rows=block_rows)
    assert precision == precision_mask.mean() and recall == recall_mask.mean()
    assert 0 < precision < 1 and 0 < recall < 1


def test_precision_recall_duplicates_count_as_neighbours():
    # Three copies of each point: with k=2 every radius is 0 and a set still covers itself.
    base = np.random.default_rng(9).standard_normal((20, 3))
    real = np.repeat(base, 3, axis=0)
    np.testing.assert_array_equal(knn_radii(real, k=2), 0.0)
    assert precision_recall(real, real, k=2) == (1.0, 1.0)
    assert precision_recall(real, real + 1e-3, k=2) == (0.0, 0.0)


def test_precision_recall_rejects_bad_input():
    features = np.zeros((5, 2))
    with pytest.raises(ValueError, match="k = 5"):
        precision_recall(features, features, k=5)
    with pytest.raises(ValueError, match="k = 0"):
        knn_radii(features, k=0)
    with pytest.raises(ValueError, match="dimension"):
        precision_recall(features, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="non-empty"):
        precision_recall(np.zeros((0, 2)), features)
    with pytest.raises(ValueError, match="block_rows"):
        knn_radii(np.random.default_rng(0).standard_normal((5, 2)), k=1, block_rows=0)
    with pytest.raises(ValueError, match="fit together"):
        in_manifold(features, features, np.zeros(4))


def test_default_blocks_bound_memory_at_paper_scale(monkeypatch):
    """Points against a 15,000-sample manifold (the paper's sample count): no distance matrix of more than 2**24
    float64 entries (128 MiB) is ever held, and the answer is that of smaller blocks."""
    largest, cdist = [0], torch.cdist

    def recording_cdist(a, b, *args, **kwargs):
        out = cdist(a, b, *args, **kwargs)
        largest[0] = max(largest[0], out.numel())
        return out

    points, manifold = np.random.default_rng(0).normal(size=(2, 15_000, 2))
    radii = np.full(15_000, 0.01)
    monkeypatch.setattr(torch, "cdist", recording_cdist)
    inside = metrics_module.in_manifold(points[:3000], manifold, radii)
    assert 0 < largest[0] <= 2**24 and 0 < inside.mean() < 1
    assert np.array_equal(inside[:500], metrics_module.in_manifold(points[:500], manifold, radii, block_rows=500))


# Inception FID: error paths, the wiring (with a stand-in network) and, given weights, the real thing

def pretend_torch_fidelity_installed(monkeypatch, installed: bool) -> None:
    """Make importlib.util.find_spec report torch-fidelity (only it) as installed or not."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        if name.split(".")[0] == "torch_fidelity":
            return object() if installed else None
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.fixture
def without_torch_fidelity(monkeypatch):
    pretend_torch_fidelity_installed(monkeypatch, False)


@pytest.fixture
def weights_file(tmp_path):
    path = tmp_path / INCEPTION_WEIGHTS_NAME
    path.write_bytes(b"stand-in weights")
    return path


def images(n: int, channels: int = 1, seed: int = 0, size: int = 8) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_inception_fid_without_package_and_weights_says_what_to_do(tmp_path, without_torch_fidelity):
    missing = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(InceptionFIDUnavailable) as info:
        inception_fid(images(4), images(4), missing)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "pip install 'condiff[fid]'" in message and "torch-fidelity" in message
    assert str(missing) in message and INCEPTION_WEIGHTS_NAME in message and "https://" in message
    with pytest.raises(InceptionFIDUnavailable, match="condiff\\[fid\\].*nowhere"):
        check_inception_fid(missing)  # the same check, without images


def test_inception_fid_without_package(weights_file, without_torch_fidelity):
    with pytest.raises(InceptionFIDUnavailable, match=r"pip install 'condiff\[fid\]'") as info:
        inception_fid(images(4), images(4), weights_file)
    assert "weights" not in str(info.value)


def test_inception_fid_without_weights(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    pretend_torch_fidelity_installed(monkeypatch, True)
    for path in (tmp_path / "missing.pth", None, tmp_path):  # absent, not given, a directory
        with pytest.raises(InceptionFIDUnavailable, match=INCEPTION_WEIGHTS_NAME) as info:
            inception_fid(images(4), images(4), path)
        assert "pip install" not in str(info.value)


def test_inception_fid_with_a_broken_install(weights_file, monkeypatch):
    # Installed but not importable (as with a torchvision built for another torch).
    pretend_torch_fidelity_installed(monkeypatch, True)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(InceptionFIDUnavailable, match="does not import.*torchvision"):
        inception_fid(images(4), images(4), weights_file)


class StandInInception(torch.nn.Module):
    """Takes what torch-fidelity's FeatureExtractorInceptionV3 takes (uint8 RGB), returns (features,)."""

    seen: list[torch.Tensor] = []

    def __init__(self, name, features_list, weights_path):
        super().__init__()
        assert (name, features_list) == ("inception-v3-compat", ["2048"])
        if torch.load(weights_path, weights_only=True) != {"ok": torch.ones(1)}:
            raise RuntimeError("unexpected keys in state_dict")

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] == 3
        StandInInception.seen.append(x)
        return (x.float().flatten(1)[:, :6] / 255,)


@pytest.fixture
def stand_in_torch_fidelity(monkeypatch):
    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.FeatureExtractorInceptionV3 = StandInInception
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)
    pretend_torch_fidelity_installed(monkeypatch, True)
    StandInInception.seen = []


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # identical images: singular covariance
def test_inception_fid_feeds_the_network_uint8_rgb(tmp_path, stand_in_torch_fidelity):
    weights = tmp_path / "w.pth"
    torch.save({"ok": torch.ones(1)}, weights)
    gray = torch.tensor([-1.0, -0.5, 0.0, 1.0, 1.5, -3.0]).reshape(1, 1, 1, 6).repeat(3, 1, 6, 1)
    assert inception_fid(gray, gray, weights, batch_size=2) == pytest.approx(0.0, abs=1e-12)
    first = StandInInception.seen[0]
    assert first.shape == (2, 3, 6, 6)
    # [-1, 1] -> [0, 255], rounded, clipped; the gray channel repeated three times.
    assert first[0, :, 0].tolist() == [[0, 64, 128, 255, 255, 0]] * 3

    a, b = images(30, channels=3, seed=1), images(20, channels=3, seed=2) * 0.5
    to_features = lambda x: (((x.clamp(-1, 1) + 1) * 127.5).round().flatten(1)[:, :6] / 255).double().numpy()
    assert inception_fid(a, b, weights) == pytest.approx(frechet_distance(to_features(a), to_features(b)), rel=1e-12)
    assert inception_fid(a.numpy(), b.numpy(), str(weights), device="cpu") == inception_fid(a, b, weights)


def test_inception_fid_with_unloadable_weights(weights_file, stand_in_torch_fidelity):
    check_inception_fid(weights_file)  # package and file present: only loading can tell
    with pytest.raises(InceptionFIDUnavailable, match="could not load Inception weights"):
        inception_fid(images(4), images(4), weights_file)


def test_inception_fid_rejects_bad_images(weights_file):
    with pytest.raises(ValueError, match="1 or 3"):
        inception_fid(images(4, channels=2), images(4), weights_file)
    with pytest.raises(ValueError, match="1 or 3"):
        inception_fid(torch.zeros(4, 8), images(4), weights_file)
    with pytest.raises(ValueError, match="two"):
        inception_fid(images(1), images(4), weights_file)


def torch_fidelity_works() -> bool:
    try:
        import torch_fidelity.feature_extractor_inceptionv3  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not os.environ.get("CONDIFF_INCEPTION_WEIGHTS") or not torch_fidelity_works(),
                    reason="needs CONDIFF_INCEPTION_WEIGHTS=path/to/pt_inception-2015-12-05-6726825d.pth "
                           "and a working torch-fidelity (pip install 'condiff[fid]')")
def test_inception_fid_with_real_weights(digits_split):
    train, held_out = digits_split
    weights = os.environ["CONDIFF_INCEPTION_WEIGHTS"]
    real, other_real = train.data[::20][:40], held_out.data[:40]
    noise = images(40, seed=3)
    assert inception_fid(real, real, weights) == pytest.approx(0.0, abs=1e-3)
    assert inception_fid(real, other_real, weights) < 0.5 * inception_fid(real, noise, weights)


# Config

def test_evaluate_config_defaults_and_round_trip():
    config = config_from_dict({"evaluate": {"num_samples": 15000, "reference_samples": 5000,
                                            "nearest_neighbours": 5, "inception_weights": "w.pth"}})
    assert config.evaluate == EvaluateConfig(30, 15000, 5000, 5, os.path.abspath("w.pth"))   # stored resolved
    assert config_from_dict(config.to_dict()).evaluate == config.evaluate
    default = config_from_dict({}).evaluate
    assert (default.num_samples, default.reference_samples, default.inception_weights) == (None, None, None)
    assert default.nearest_neighbours == 3
    assert config_from_dict(config_from_dict({}).to_dict()).evaluate == default


@pytest.mark.parametrize("field", ["num_samples", "reference_samples", "nearest_neighbours", "classifier_epochs"])
@pytest.mark.parametrize("value", [0, -3])
def test_evaluate_config_refuses_non_positive_counts(field, value):
    with pytest.raises(ConfigError, match=rf"evaluate\.{field}: must be positive, got {value}"):
        config_from_dict({"evaluate": {field: value}}, "my.toml")


def test_evaluate_config_refuses_bad_types_and_empty_paths():
    with pytest.raises(ConfigError, match=r"evaluate\.nearest_neighbours: expected int"):
        config_from_dict({"evaluate": {"nearest_neighbours": 2.5}})
    with pytest.raises(ConfigError, match=r"evaluate\.inception_weights: empty path"):
        config_from_dict({"evaluate": {"inception_weights": " "}})


def test_evaluate_replaces_other_samples_only_when_asked(tmp_path, tiny_config):
    """`Run.evaluate` never replaces RUN/samples.npz behind a caller's back: another drawing is refused, naming
    the argument that allows it, and stays byte for byte; with resample=True it is drawn anew."""
    import condiff
    from condiff.config import ArgumentError

    run = condiff.train(tiny_config(tmp_path / "run"))
    samples = run.sample(num_samples=60, steps=5)
    before = samples.path.read_bytes()
    with pytest.raises(ArgumentError, match=r"^resample: .*samples.npz holds other samples"):
        run.evaluate(num_samples=60)
    assert samples.path.read_bytes() == before and not (run.path / "evaluation.json").exists()
    result = run.evaluate(num_samples=60, resample=True)
    assert result.num_samples == 60 and samples.path.read_bytes() != before
