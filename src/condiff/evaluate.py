"""Learned classifiers for judging samples, and the metrics computed from them.

A small classifier trained on the real data labels generated samples (class frequencies, their
total-variation distance to the target shares) and supplies the feature space for a Frechet
distance. It is called FD rather than FID: the features come from this small classifier, not from
Inception, so values are comparable only under the same classifier. Precision and recall
(Kynkaanniemi et al., 2019) are computed in the same feature space. Trained classifiers are cached
as safetensors plus a JSON sidecar keyed by a fingerprint of the data they were trained on.
(The exact posterior classifier for Gaussian mixtures lives in `condiff.gmm`.)

Real Inception FID, comparable with published numbers, is `inception_fid`: it needs the optional
extra `condiff[fid]` (torch-fidelity) and a local copy of the FID Inception weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
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
from condiff.rundir import write_atomic
from condiff.runtime import resolve_device

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
                     batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                     device: str | torch.device | None = None) -> tuple[Classifier, float]:
    """Train a Classifier with AdamW and cosine learning-rate decay; return it (eval mode) and its
    accuracy on `held_out`. Images get random 1-pixel shifts. Deterministic given `seed`."""
    if train.sample_shape != held_out.sample_shape or train.num_classes != held_out.num_classes:
        raise ValueError(f"{train.name} and {held_out.name} differ in sample shape or number of classes")
    # Initialise from a seeded copy of the global RNG, so that the result does not depend on (and
    # does not disturb) whatever the caller did with torch's global seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = Classifier(train.sample_shape, train.num_classes)
    device = resolve_device(device)
    classifier.to(device)
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
            loss = F.cross_entropy(classifier(x.to(device)), train.labels[indices].to(device))
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


def load_or_train_classifier(key: str, train: LabelledDataset, held_out: LabelledDataset, *,
                             cache_dir: Path | None = None, device: str | torch.device | None = None,
                             **train_kwargs) -> tuple[Classifier, float]:
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
                return classifier.to(resolve_device(device)).eval(), float(meta["held_out_accuracy"])

    classifier, accuracy = train_classifier(train, held_out, device=device, **train_kwargs)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.cpu().contiguous() for name, tensor in classifier.state_dict().items()}
    write_atomic(weights_path, lambda p: save_file(state, p, metadata={"fingerprint": fingerprint}))
    meta = {"config": classifier.config(), "held_out_accuracy": accuracy, "fingerprint": fingerprint,
            "train_name": train.name, "held_out_name": held_out.name, "train_kwargs": train_kwargs}
    write_atomic(meta_path, lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
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


# Inception FID (optional: torch-fidelity and a local weights file)

INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URLS = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
)


class InceptionFIDUnavailable(ValueError):
    """Inception FID cannot be computed here: torch-fidelity or the Inception weights are missing."""


def _weights_problem(weights_path: str | os.PathLike | None) -> str | None:
    if weights_path is None or not str(weights_path):
        where = "no weights file given"
    elif not Path(weights_path).expanduser().is_file():
        where = f"Inception weights not found at {Path(weights_path).expanduser()}"
    else:
        return None
    return (f"{where}: download the FID Inception weights ({INCEPTION_WEIGHTS_NAME}, the TensorFlow FID "
            f"network converted to PyTorch, which torch-fidelity publishes as "
            f"weights-inception-2015-12-05-6726825d.pth) from {INCEPTION_WEIGHTS_URLS[0]} and pass its path "
            f"(evaluate.inception_weights in a config)")


def check_inception_fid(weights_path: str | os.PathLike | None) -> None:
    """Raise InceptionFIDUnavailable unless torch-fidelity imports and `weights_path` is a file: cheap,
    so that a caller can fail before hours of sampling rather than after."""
    _inception_class(weights_path)


def _inception_class(weights_path: str | os.PathLike | None):
    problems = []
    weights_problem = _weights_problem(weights_path)
    if importlib.util.find_spec("torch_fidelity") is None:
        problems.append("the torch-fidelity package is not installed: pip install 'condiff[fid]' "
                        "(or pip install torch-fidelity)")
    if weights_problem:
        problems.append(weights_problem)
    if problems:
        raise InceptionFIDUnavailable("Inception FID unavailable: " + "; ".join(problems))
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as err:  # e.g. a torchvision built for another torch: RuntimeError, not ImportError
        raise InceptionFIDUnavailable(
            f"Inception FID unavailable: torch-fidelity is installed but does not import ({type(err).__name__}: "
            f"{err}); it needs a torchvision built for the installed torch {torch.__version__} (for a CPU-only "
            f"torch, the matching CPU torchvision wheel)") from err
    return FeatureExtractorInceptionV3


def _load_inception(weights_path: str | os.PathLike | None):
    """torch-fidelity's FID Inception network with the weights at `weights_path`."""
    inception_class = _inception_class(weights_path)
    weights_path = Path(weights_path).expanduser()
    try:
        network = inception_class("inception-v3-compat", ["2048"], str(weights_path))
    except Exception as err:
        raise InceptionFIDUnavailable(f"Inception FID unavailable: could not load Inception weights from "
                                      f"{weights_path} ({type(err).__name__}: {err}); expected "
                                      f"{INCEPTION_WEIGHTS_NAME}") from err
    return network.eval().requires_grad_(False)


def _to_inception_input(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (N, 1 or 3, H, W) as the uint8 RGB (N, 3, H, W) that the FID network takes
    (as if saved to 8-bit PNG: clipped, scaled to [0, 255] and rounded). The network resizes to 299."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"Inception FID needs images (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.repeat(1, 3, 1, 1) if pixels.shape[1] == 1 else pixels


@torch.inference_mode()
def _inception_features(network, images: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    features = [network(_to_inception_input(batch).to(device))[0].double().cpu() for batch in images.split(batch_size)]
    return torch.cat(features).numpy()


def inception_fid(samples: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray,
                  weights_path: str | os.PathLike | None, *, batch_size: int = 100,
                  device: str | torch.device | None = None) -> float:
    """Frechet Inception Distance between generated `samples` and `reference` images, both in
    [-1, 1] with shape (N, 1 or 3, H, W), using torch-fidelity's port of the TensorFlow FID network
    (2048-d pool features; grayscale repeated to RGB; quantised to uint8; resized to 299 x 299 by
    the network as in the original TensorFlow code) and `frechet_distance` in float64.

    Raises InceptionFIDUnavailable (a ValueError) naming what is missing: the package (pip install
    'condiff[fid]') or the weights file at `weights_path` (nothing is downloaded). torch-fidelity
    unpickles the weights file: point it only at a trusted copy. Slow on a CPU (of the order of a
    second per image on two cores): use a GPU (`device`) for thousands of images.
    """
    samples, reference = torch.as_tensor(samples), torch.as_tensor(reference)
    for images in (samples, reference):
        _to_inception_input(images[:1])  # check shapes before the (slow) network is built
    if len(samples) < 2 or len(reference) < 2:
        raise ValueError("Inception FID needs at least two samples and two reference images")
    network = _load_inception(weights_path)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    network = network.to(device)
    return frechet_distance(_inception_features(network, samples, batch_size, device),
                            _inception_features(network, reference, batch_size, device))


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
    class_frequencies_low: list[float]     # Wilson interval of each frequency at `confidence`
    class_frequencies_high: list[float]
    class_counts: list[int]
    tv_to_target: float
    frechet_distance: float                # FD in the classifier's feature space (not Inception FID)
    precision: float                       # k-NN manifold precision and recall in the same space
    recall: float
    nearest_neighbours: int                # the k of precision and recall
    classifier_accuracy: float
    num_samples: int
    num_reference: int
    confidence: float

    def to_dict(self) -> dict:
        return asdict(self)


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
