"""Learned classifiers for judging samples, and the metrics computed from them.

A small classifier trained on the real data labels generated samples (class frequencies, their
total-variation distance to the target shares) and supplies the feature space for a Frechet
distance. It is called FD rather than FID: the features come from this small classifier, not from
Inception, so values are comparable only under the same classifier. Trained classifiers are cached
as safetensors plus a JSON sidecar keyed by a fingerprint of the data they were trained on.
(The exact posterior classifier for Gaussian mixtures lives in `condiff.gmm`.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.stats
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from condiff.data import LabelledDataset, class_shares

FEATURE_WIDTH = 64


class Classifier(nn.Module):
    """A small CNN for images (C, H, W) or an MLP for vectors (D,), with a width-64 feature layer.

    `features(x)` is the penultimate layer (the space of the Frechet distance); `forward(x)` gives
    logits. The constructor takes only plain values so that it can be rebuilt from a JSON config.
    """

    def __init__(self, sample_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.num_classes = int(num_classes)
        if len(self.sample_shape) == 3:
            channels = self.sample_shape[0]
            # Pooling to a fixed 4x4 grid keeps coarse layout (which distinguishes digits) while
            # making the head independent of the image size; GroupNorm avoids batch statistics.
            self.body = nn.Sequential(
                nn.Conv2d(channels, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
                nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
                nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                nn.Linear(64 * 4 * 4, FEATURE_WIDTH), nn.SiLU(),
            )
        elif len(self.sample_shape) == 1:
            self.body = nn.Sequential(
                nn.Linear(self.sample_shape[0], 64), nn.SiLU(),
                nn.Linear(64, FEATURE_WIDTH), nn.SiLU(),
            )
        else:
            raise ValueError(f"expected image (C, H, W) or vector (D,) samples, not shape {sample_shape}")
        self.head = nn.Linear(FEATURE_WIDTH, self.num_classes)

    def config(self) -> dict:
        return {"sample_shape": list(self.sample_shape), "num_classes": self.num_classes}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _random_shifts(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift every image by an independent random offset in {-1, 0, 1}^2 pixels (edges replicated)."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    offsets = torch.randint(0, 3, (len(images), 2), generator=generator)
    shifted = torch.empty_like(images)
    for dy in range(3):
        for dx in range(3):
            chosen = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
            shifted[chosen] = padded[chosen, :, dy:dy + height, dx:dx + width]
    return shifted


@torch.inference_mode()
def features_and_labels(classifier: Classifier, x: torch.Tensor | np.ndarray, batch_size: int = 512
                         ) -> tuple[np.ndarray, np.ndarray]:
    classifier.eval()
    device = next(iter(classifier.state_dict().values())).device
    x = torch.as_tensor(x, dtype=torch.float32)
    features, labels = [], []
    for batch in x.split(batch_size):
        batch_features = classifier.features(batch.to(device))
        features.append(batch_features.double().cpu())
        labels.append(classifier.head(batch_features).argmax(dim=1).cpu())
    if not features:
        return np.empty((0, FEATURE_WIDTH)), np.empty(0, dtype=np.int64)
    return torch.cat(features).numpy(), torch.cat(labels).numpy()


def predict_labels(classifier: Classifier, x: torch.Tensor | np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Most likely class of every sample, as int64."""
    return features_and_labels(classifier, x, batch_size)[1]


def extract_features(classifier: Classifier, x: torch.Tensor | np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Penultimate-layer features of every sample, as float64 (N, 64)."""
    return features_and_labels(classifier, x, batch_size)[0]


def train_classifier(train: LabelledDataset, held_out: LabelledDataset, *, epochs: int,
                     batch_size: int = 128, lr: float = 1e-3, seed: int = 0) -> tuple[Classifier, float]:
    """Train a Classifier with AdamW and cosine learning-rate decay; return it (eval mode) and its
    accuracy on `held_out`. Images get random 1-pixel shifts. Deterministic given `seed`."""
    if train.sample_shape != held_out.sample_shape or train.num_classes != held_out.num_classes:
        raise ValueError(f"{train.name} and {held_out.name} differ in sample shape or number of classes")
    # Initialise from a seeded copy of the global RNG, so that the result does not depend on (and
    # does not disturb) whatever the caller did with torch's global seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = Classifier(train.sample_shape, train.num_classes)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    is_image = len(train.sample_shape) == 3
    classifier.train()
    for _ in range(epochs):
        for indices in torch.randperm(len(train), generator=generator).split(batch_size):
            x = train.data[indices]
            if is_image:
                x = _random_shifts(x, generator)
            loss = F.cross_entropy(classifier(x), train.labels[indices])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    classifier.eval()
    accuracy = float((predict_labels(classifier, held_out.data) == held_out.labels.numpy()).mean())
    return classifier, accuracy


def dataset_fingerprint(dataset: LabelledDataset) -> str:
    """sha256 over the data and labels (values, dtypes and shapes) and the number of classes."""
    digest = hashlib.sha256()
    for tensor in (dataset.data, dataset.labels):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    digest.update(str(dataset.num_classes).encode())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("CONDIFF_CACHE", Path.home() / ".cache" / "condiff"))


def _write_atomically(path: Path, write: Callable[[str], object]) -> None:
    """Call write(temporary_path) in path's directory, then rename onto path, so that readers only
    ever see a complete file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_or_train_classifier(key: str, train: LabelledDataset, held_out: LabelledDataset, *,
                             cache_dir: Path | None = None, **train_kwargs) -> tuple[Classifier, float]:
    """The classifier cached under `key`, or a freshly trained (and then cached) one.

    The cache entry is reused only if it was made from the same train and held-out data with the
    same training arguments; otherwise it is retrained and overwritten.
    """
    directory = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "classifiers"
    weights_path, meta_path = directory / f"{key}.safetensors", directory / f"{key}.json"
    fingerprint = hashlib.sha256(json.dumps({
        "train": dataset_fingerprint(train),
        "held_out": dataset_fingerprint(held_out),
        "train_kwargs": train_kwargs,
    }, sort_keys=True).encode()).hexdigest()

    if weights_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        with safe_open(weights_path, framework="pt") as weights:
            # The fingerprint is stored in both files: the two renames are not one atomic step, and
            # a crash between them must not pair new weights with old metadata.
            weights_fingerprint = (weights.metadata() or {}).get("fingerprint")
            if meta.get("fingerprint") == fingerprint == weights_fingerprint:
                classifier = Classifier(**meta["config"])
                classifier.load_state_dict({name: weights.get_tensor(name) for name in weights.keys()})
                return classifier.eval(), float(meta["held_out_accuracy"])

    classifier, accuracy = train_classifier(train, held_out, **train_kwargs)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous() for name, tensor in classifier.state_dict().items()}
    _write_atomically(weights_path, lambda p: save_file(state, p, metadata={"fingerprint": fingerprint}))
    meta = {"config": classifier.config(), "held_out_accuracy": accuracy, "fingerprint": fingerprint,
            "train_name": train.name, "held_out_name": held_out.name, "train_kwargs": train_kwargs}
    _write_atomically(meta_path, lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
    return classifier, accuracy


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
class SampleEvaluation:
    """What a learned classifier says about a set of generated samples."""

    class_frequencies: list[float]
    class_counts: list[int]
    tv_to_target: float
    frechet_distance: float
    classifier_accuracy: float
    num_samples: int

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_samples(samples: torch.Tensor, classifier: Classifier, classifier_accuracy: float,
                     reference_features: np.ndarray, target_shares: np.ndarray, num_classes: int
                     ) -> SampleEvaluation:
    """Classify `samples`, compare their class shares with `target_shares` (total variation) and
    their features with `reference_features` (Frechet distance)."""
    target_shares = np.asarray(target_shares, dtype=np.float64)
    if target_shares.shape != (num_classes,):
        raise ValueError(f"target_shares has shape {target_shares.shape}, expected ({num_classes},)")
    features, labels = features_and_labels(classifier, samples, batch_size=512)
    counts = np.bincount(labels, minlength=num_classes)
    frequencies = class_shares(labels, num_classes)
    return SampleEvaluation(
        class_frequencies=frequencies.tolist(),
        class_counts=counts.tolist(),
        tv_to_target=total_variation(frequencies, target_shares),
        frechet_distance=frechet_distance(features, reference_features),
        classifier_accuracy=float(classifier_accuracy),
        num_samples=len(labels),
    )
