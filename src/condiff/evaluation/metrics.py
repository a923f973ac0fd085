"""Metrics of generated samples in a classifier's feature space: class frequencies with Wilson
intervals, total variation, Frechet distance (FD: the features come from condiff's small classifier,
not Inception, so values compare only under the same classifier), and k-NN precision and recall
(Kynkaanniemi et al., 2019).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.stats
import torch

from condiff.data.datasets import class_shares
from condiff.evaluation.classifier import Classifier, features_and_labels


def total_variation(p: np.ndarray | list[float], q: np.ndarray | list[float]) -> float:
    """Total-variation distance 0.5 * sum |p - q| between two distributions over the same classes."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"distributions of shapes {p.shape} and {q.shape}")
    return float(0.5 * np.abs(p - q).sum())


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D):
    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), computed in float64.

    As in pytorch-fid: if the matrix square root is not finite (near-singular covariances), eps * I is
    added to both covariances; small imaginary parts from round-off are dropped.
    """
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with equal D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("each feature set needs at least two samples for a covariance")
    mean_diff = a.mean(axis=0) - b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    cov_sqrt = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(cov_sqrt).all():
        offset = eps * np.eye(len(cov_a))
        cov_sqrt = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    if np.iscomplexobj(cov_sqrt):
        largest_imaginary = np.abs(np.diagonal(cov_sqrt).imag).max()
        if largest_imaginary > 1e-3:
            raise ValueError(f"covariance product has a matrix square root with imaginary part {largest_imaginary:g}")
        cov_sqrt = cov_sqrt.real
    distance = mean_diff @ mean_diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(cov_sqrt)
    # The true value is >= 0; sqrtm round-off on near-singular covariances can dip just below.
    return max(float(distance), 0.0)


# Precision and recall with k-nearest-neighbour manifolds

# Largest distance matrix block (elements) held at once: 2**24 float64 values are 128 MiB, so that
# 15,000 x 15,000 comparisons run in blocks of ~1,100 rows on a CPU.
_BLOCK_ELEMENTS = 2**24


class PrecisionRecall(NamedTuple):
    """Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019)."""

    precision: float  # fraction of generated samples inside the manifold of the real ones
    recall: float     # fraction of real samples inside the manifold of the generated ones


def _feature_tensor(features: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(features, dtype=np.float64))
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) feature array, got shape {tuple(x.shape)}")
    return x


def _block_rows(columns: int, block_rows: int | None) -> int:
    if block_rows is not None:
        if block_rows < 1:
            raise ValueError(f"block_rows must be positive, got {block_rows}")
        return block_rows
    return max(1, _BLOCK_ELEMENTS // max(columns, 1))


def knn_radii(features: np.ndarray | torch.Tensor, k: int = 3, *, block_rows: int | None = None) -> np.ndarray:
    """Distance from every sample to its k-th nearest neighbour in the same set (itself excluded;
    duplicates count as neighbours), as float64 (N,). Computed in blocks of rows."""
    x = _feature_tensor(features, "features")
    if not 1 <= k < len(x):
        raise ValueError(f"k = {k} nearest neighbours needs 1 <= k < number of samples ({len(x)})")
    radii = torch.empty(len(x), dtype=torch.float64)
    step = _block_rows(len(x), block_rows)
    for start in range(0, len(x), step):
        rows = torch.arange(start, min(start + step, len(x)))
        distances = torch.cdist(x[rows], x)
        distances[torch.arange(len(rows)), rows] = 0.0  # exact self-distance despite matmul round-off
        radii[rows] = distances.kthvalue(k + 1, dim=1).values  # the smallest is the point itself
    return radii.numpy()


def in_manifold(points: np.ndarray | torch.Tensor, manifold: np.ndarray | torch.Tensor,
                radii: np.ndarray | torch.Tensor, *, block_rows: int | None = None) -> np.ndarray:
    """Whether each point lies in the union of the closed balls around `manifold`'s samples with the
    given radii: a boolean (N,)."""
    p, m = _feature_tensor(points, "points"), _feature_tensor(manifold, "manifold")
    r = torch.as_tensor(np.asarray(radii, dtype=np.float64))
    if p.shape[1] != m.shape[1] or r.shape != (len(m),):
        raise ValueError(f"points {tuple(p.shape)}, manifold {tuple(m.shape)} and radii {tuple(r.shape)} "
                         "do not fit together")
    inside = torch.empty(len(p), dtype=torch.bool)
    step = _block_rows(len(m), block_rows)
    for start in range(0, len(p), step):
        # Inside iff some ball reaches the point: min_j (d(p, m_j) - r_j) <= 0.
        inside[start:start + step] = torch.cdist(p[start:start + step], m).sub_(r).amin(dim=1) <= 0
    return inside.numpy()


def precision_recall(real_features: np.ndarray | torch.Tensor, generated_features: np.ndarray | torch.Tensor,
                     k: int = 3, *, block_rows: int | None = None) -> PrecisionRecall:
    """Improved precision and recall of generated samples against real ones (Kynkaanniemi et al., 2019).

    Each set's manifold is the union of balls around its samples reaching to their k-th nearest
    neighbour in the same set. Precision is the fraction of generated samples inside the real
    manifold (quality), recall the fraction of real samples inside the generated manifold (coverage).
    Distances are float64, computed blockwise (`block_rows` rows of the distance matrix at a time;
    default: about 128 MiB per block), so that 15,000 x 15,000 fits in CPU memory.
    """
    real = _feature_tensor(real_features, "real_features")
    generated = _feature_tensor(generated_features, "generated_features")
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"real and generated features differ in dimension: {real.shape[1]} and {generated.shape[1]}")
    real_radii = knn_radii(real, k, block_rows=block_rows)
    generated_radii = knn_radii(generated, k, block_rows=block_rows)
    precision = in_manifold(generated, real, real_radii, block_rows=block_rows).mean()
    recall = in_manifold(real, generated, generated_radii, block_rows=block_rows).mean()
    return PrecisionRecall(float(precision), float(recall))


class FrequencyIntervals(NamedTuple):
    """Per-class frequency with the low and high ends of its Wilson score interval."""

    freq: np.ndarray
    low: np.ndarray
    high: np.ndarray


def class_frequency_intervals(labels: np.ndarray | torch.Tensor, num_classes: int,
                              confidence: float = 0.95) -> FrequencyIntervals:
    """Class frequencies of `labels` with two-sided Wilson score intervals at `confidence`.

    Wilson rather than normal-approximation intervals: they stay inside [0, 1] and keep their
    coverage for the rare classes (frequencies near 0) that imbalanced targets produce.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if n == 0:
        raise ValueError("no labels")
    freq = class_shares(labels, num_classes)
    z = scipy.stats.norm.ppf(0.5 + confidence / 2)
    denominator = 1 + z**2 / n
    centre = (freq + z**2 / (2 * n)) / denominator
    half_width = z / denominator * np.sqrt(freq * (1 - freq) / n + z**2 / (4 * n**2))
    return FrequencyIntervals(freq, np.clip(centre - half_width, 0, 1), np.clip(centre + half_width, 0, 1))


@dataclass
class SampleMeasures:
    """What a classifier says of generated samples against a reference, in its feature space: the measures that
    a set of samples' evaluation and a run's evaluation (condiff.lifecycle.evaluation.RunEvaluation) share."""

    class_frequencies: list[float]
    class_frequencies_low: list[float]     # Wilson interval of each frequency (95% in a run's evaluation)
    class_frequencies_high: list[float]
    frechet_distance: float                # FD in the classifier's feature space (not Inception FID)
    precision: float                       # k-NN manifold precision and recall (Kynkaanniemi et al. 2019)
    recall: float
    nearest_neighbours: int                # the k of precision and recall
    classifier_accuracy: float             # the classifier's held-out accuracy on real data
    num_samples: int
    num_reference: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SampleEvaluation(SampleMeasures):
    """What a learned classifier says about a set of generated samples."""

    class_counts: list[int]
    tv_to_target: float
    confidence: float                      # of the frequencies' intervals


def evaluate_samples(samples: torch.Tensor, classifier: Classifier, classifier_accuracy: float,
                     reference_features: np.ndarray, target_shares: np.ndarray, num_classes: int, *,
                     nearest_neighbours: int = 3, confidence: float = 0.95,
                     block_rows: int | None = None) -> SampleEvaluation:
    """Classify `samples`, compare their class shares with `target_shares` (total variation, Wilson
    intervals at `confidence`) and their features with `reference_features` (Frechet distance, and
    precision and recall with `nearest_neighbours`-NN manifolds), all in float64."""
    target_shares = np.asarray(target_shares, dtype=np.float64)
    if target_shares.shape != (num_classes,):
        raise ValueError(f"target_shares has shape {target_shares.shape}, expected ({num_classes},)")
    reference_features = np.asarray(reference_features, dtype=np.float64)
    features, labels = features_and_labels(classifier, samples, batch_size=512)
    counts = np.bincount(labels, minlength=num_classes)
    intervals = class_frequency_intervals(labels, num_classes, confidence)
    quality = precision_recall(reference_features, features, nearest_neighbours, block_rows=block_rows)
    return SampleEvaluation(
        class_frequencies=intervals.freq.tolist(),
        class_frequencies_low=intervals.low.tolist(),
        class_frequencies_high=intervals.high.tolist(),
        class_counts=counts.tolist(),
        tv_to_target=total_variation(intervals.freq, target_shares),
        frechet_distance=frechet_distance(features, reference_features),
        precision=quality.precision,
        recall=quality.recall,
        nearest_neighbours=int(nearest_neighbours),
        classifier_accuracy=float(classifier_accuracy),
        num_samples=len(labels),
        num_reference=len(reference_features),
        confidence=float(confidence),
    )
