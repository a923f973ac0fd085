"""Training-side features on disk: one memory-mapped float32 array per (model, featurization settings),
filled batch by batch with a `done-*.npy` mark per finished batch, so that a killed featurization resumes
where it stopped."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from condiff.attribution.features import GradientFeaturizer
from condiff.runtime import progress_bar


def stored_train_features(featurizer: GradientFeaturizer, data: torch.Tensor, path: Path, timesteps: Sequence[int], *,
                          seed: int, dimension: int, batch_size: int, class_labels: torch.Tensor | None = None,
                          resume: bool, progress: bool, desc: str = "features") -> np.ndarray:
    """(N, dimension): the projected training features of `data` in `path` (with `done-` + its name beside
    it); with `resume`, batches a killed run finished are kept."""
    done_path = path.with_name("done-" + path.name.removeprefix("features-"))
    batches = range(0, len(data), batch_size)
    if resume and path.is_file() and done_path.is_file():
        features = np.lib.format.open_memmap(path, mode="r+")
        done = np.lib.format.open_memmap(done_path, mode="r+")
    else:
        features = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(data), dimension))
        done = np.lib.format.open_memmap(done_path, mode="w+", dtype=bool, shape=(len(batches),))
    bar = progress_bar(total=len(data), desc=desc, enabled=progress, unit="img")
    for index, start in enumerate(batches):
        stop = min(start + batch_size, len(data))
        if not done[index]:
            labels = None if class_labels is None else class_labels[start:stop]
            features[start:stop] = featurizer.train_features(data[start:stop], timesteps, seed=seed,
                                                             first_index=start, class_labels=labels).numpy()
            features.flush()
            done[index] = True
            done.flush()
        bar.update(stop - start)
    bar.close()
    return np.asarray(features)
