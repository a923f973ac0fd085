"""condiff's feature classifier: a small network trained on the real data, whose labels give the class
frequencies of generated samples and whose penultimate layer is the feature space of FD, precision and
recall. Trained classifiers are cached as safetensors keyed by a fingerprint of the data they saw.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from condiff.data.datasets import EpochSampler, LabelledDataset
from condiff.fit import fit, seeded_model
from condiff.gmm.mixture import GaussianMixture
from condiff.rundir import write_atomic
from condiff.runtime import resolve_device

FEATURE_WIDTH = 64
TRAINING_RECORD = "training.json"     # beside a cached classifier: what it was trained on, its accuracy


class Classifier(ModelMixin, ConfigMixin):
    """A small CNN for images (C, H, W) or an MLP for vectors (D,), with a width-64 feature layer.

    `features(x)` is the penultimate layer (the space of the Frechet distance); `forward(x)` gives
    logits. A diffusers model: `save_pretrained` / `Classifier.from_pretrained` (safetensors).
    """

    @register_to_config
    def __init__(self, sample_shape: tuple[int, ...] = (1, 8, 8), num_classes: int = 10):
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
                     device: str | torch.device | None = None, progress: bool = False) -> tuple[Classifier, float]:
    """Train a Classifier with AdamW and cosine learning-rate decay; return it (eval mode) and its
    accuracy on `held_out`. Images get random 1-pixel shifts. Deterministic given `seed`."""
    if train.sample_shape != held_out.sample_shape or train.num_classes != held_out.num_classes:
        raise ValueError(f"{train.name} and {held_out.name} differ in sample shape or number of classes")
    classifier, device = seeded_model(lambda: Classifier(train.sample_shape, train.num_classes), seed, device)
    generator = torch.Generator().manual_seed(seed)
    sampler = EpochSampler(len(train))
    is_image = len(train.sample_shape) == 3

    def step_loss():
        indices = sampler.draw(batch_size, generator)
        x = _random_shifts(train.data[indices], generator) if is_image else train.data[indices]
        loss = F.cross_entropy(classifier(x.to(device)), train.labels[indices].to(device))
        return loss, {"loss": loss.detach()}

    fit(classifier, step_loss, steps=epochs * math.ceil(len(train) / batch_size), lr=lr, weight_decay=1e-4,
        desc="evaluation classifier", progress=progress)
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

    An entry is a `save_pretrained` folder holding `training.json` (the data fingerprint and held-out
    accuracy), written as one atomic folder; it is reused only if it was made from the same train and
    held-out data with the same training arguments, else retrained and replaced.
    """
    cache = Path(cache_dir if cache_dir is not None else default_cache_dir())
    folder = cache / "classifiers" / key
    fingerprint = hashlib.sha256(json.dumps({
        "train": dataset_fingerprint(train),
        "held_out": dataset_fingerprint(held_out),
        "train_kwargs": train_kwargs,
    }, sort_keys=True).encode()).hexdigest()
    record = folder / TRAINING_RECORD
    (cache / "locks").mkdir(parents=True, exist_ok=True)
    # Runs started side by side share the cache: one trains an entry while the others wait, then read it.
    with FileLock(cache / "locks" / f"classifier-{key}.lock"):
        if record.is_file() and json.loads(record.read_text()).get("fingerprint") == fingerprint:
            classifier = Classifier.from_pretrained(folder, use_safetensors=True)
            accuracy = float(json.loads(record.read_text())["held_out_accuracy"])
            return classifier.to(resolve_device(device)).eval(), accuracy

        classifier, accuracy = train_classifier(train, held_out, device=device, **train_kwargs)
        meta = {"fingerprint": fingerprint, "held_out_accuracy": accuracy, "train_name": train.name,
                "held_out_name": held_out.name, "train_kwargs": train_kwargs}

        def save(temporary: Path) -> None:
            classifier.save_pretrained(temporary, safe_serialization=True)
            (temporary / TRAINING_RECORD).write_text(json.dumps(meta, indent=2))
        write_atomic(folder, save, directory=True)
    return classifier, accuracy


class MixtureBayesClassifier(torch.nn.Module):
    """The exact Bayes classifier of a Gaussian mixture behind the learned classifiers' interface:
    features are the raw coordinates, logits the exact log posterior."""

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.mixture = mixture
        self.register_buffer("anchor", torch.zeros(0))  # gives the module a device

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).double()

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.mixture.log_posterior(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
