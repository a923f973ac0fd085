"""Training-side features on disk: one memory-mapped float32 array per (model, featurization settings),
filled batch by batch with a `done-*.npy` mark per finished batch, so that a killed featurization resumes
where it stopped. Under several processes (torchrun, `accelerate launch`) the processes share the batches
out and write into the same files, on a file system they all see."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from condiff.attribution.features import GradientFeaturizer
from condiff.runtime import process_state, progress_bar


def stored_train_features(featurizer: GradientFeaturizer, data: torch.Tensor, path: Path, timesteps: Sequence[int], *,
                          seed: int, dimension: int, batch_size: int, class_labels: torch.Tensor | None = None,
                          resume: bool, progress: bool, desc: str = "features") -> np.ndarray:
    """(N, dimension): the projected training features of `data` in `path` (with `done-` + its name beside
    it); with `resume`, batches a killed run finished are kept. Every process calls it: the main process
    creates the files, each computes its share of the unfinished batches, and each returns the whole array."""
    state = process_state()
    done_path = path.with_name("done-" + path.name.removeprefix("features-"))
    starts = range(0, len(data), batch_size)
    if state.is_main_process and not (resume and path.is_file() and done_path.is_file()):
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(data), dimension)).flush()
        np.lib.format.open_memmap(done_path, mode="w+", dtype=bool, shape=(len(starts),)).flush()
    state.wait_for_everyone()
    features = np.lib.format.open_memmap(path, mode="r+")
    done = np.lib.format.open_memmap(done_path, mode="r+")
    unfinished = [index for index in range(len(starts)) if not done[index]]
    state.wait_for_everyone()   # every process has read the same marks before any is written
    mine = unfinished[state.process_index::state.num_processes]
    bar = progress_bar(total=sum(min(batch_size, len(data) - starts[i]) for i in mine), desc=desc,
                       enabled=progress and state.is_main_process, unit="img")
    for index in mine:
        start, stop = starts[index], min(starts[index] + batch_size, len(data))
        labels = None if class_labels is None else class_labels[start:stop]
        features[start:stop] = featurizer.train_features(data[start:stop], timesteps, seed=seed, first_index=start,
                                                         class_labels=labels).numpy()
        features.flush()
        done[index] = True
        done.flush()
        bar.update(stop - start)
    bar.close()
    state.wait_for_everyone()   # the other processes' batches are in the file
    return np.asarray(features)
