"""Labelled datasets as tensors, class-imbalanced training sets and epoch-reshuffling samplers.

Everything here lives in memory: the datasets condiff trains on at this scale (digits, MNIST-sized
sets, Gaussian mixtures) are a few MB, and in-memory tensors make per-rank sampling and exact resume
trivial (a sampler's whole state is a permutation, a position and a generator state).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LabelledDataset:
    """Images (N, C, H, W) or vectors (N, D) with integer class labels (N,)."""

    data: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if len(self.data) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.data)} samples but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.data)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def subset(self, indices: torch.Tensor, name: str | None = None) -> "LabelledDataset":
        return LabelledDataset(self.data[indices], self.labels[indices], self.num_classes, name or self.name)

    def of_class(self, label: int) -> "LabelledDataset":
        return self.subset(torch.nonzero(self.labels == label).flatten(), f"{self.name}[class {label}]")


def load_digits_dataset() -> LabelledDataset:
    """scikit-learn's 8x8 digits (1,797 images, shipped in the wheel), scaled from 0..16 to [-1, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return LabelledDataset(images, torch.tensor(digits.target, dtype=torch.long), 10, "digits")


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
