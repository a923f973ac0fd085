"""Run by test_attribution_store.py under torchrun: every process stores the training features of a fixed
tiny class-conditional model into one file (argv: the features path) and saves the array it gets back beside
it (`returned-fresh-rank{R}.npy`), with the first example index of every batch it featurized
(`starts-fresh-rank{R}.npy`); the main process keeps a copy of the file (`after-fresh.npy`, `done-after-fresh.npy`)
and leaves it as a killed run would (`damage`); every process resumes it (`...-resume-...`)."""

import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from condiff.attribution.features import GradientFeaturizer, timestep_grid
from condiff.attribution.projector import SparseProjector
from condiff.attribution.store import stored_train_features
from condiff.models import build_model
from condiff.runtime import end_processes, process_state

BATCH_SIZE = 5   # 37 examples: 8 batches, the last one short
FINISHED = [0, 3, 4]   # the batches a killed run had done
DAMAGED = 7.0          # their rows' value, which no featurization gives


def stored_tiny_features(path: Path, *, resume: bool) -> np.ndarray:
    torch.manual_seed(0)
    model = build_model("mlp", (2,), hidden=16, layers=1, num_class_embeds=3)
    data, labels = torch.randn(37, 2, generator=torch.Generator().manual_seed(1)), torch.arange(37) % 3
    featurizer = GradientFeaturizer(model, torch.linspace(0.99, 0.01, 1000), SparseProjector(
        sum(p.numel() for p in model.parameters()), 16, seed=2), batch_size=BATCH_SIZE)
    return stored_train_features(featurizer, data, path, timestep_grid(3), seed=4, dimension=16,
                                 batch_size=BATCH_SIZE, class_labels=labels, resume=resume, progress=False)


def damage(path: Path) -> None:
    """The features file as a run killed mid-way leaves it: FINISHED batches done (rows DAMAGED), the rest not."""
    features, done = np.load(path), np.zeros(8, dtype=bool)
    done[FINISHED] = True
    for index in range(8):
        features[index * BATCH_SIZE:(index + 1) * BATCH_SIZE] = DAMAGED if done[index] else 0.0
    np.save(path, features)
    np.save(path.with_name("done-tiny.npy"), done)


if __name__ == "__main__":
    features_path = Path(sys.argv[1])
    torch.set_num_threads(1)
    starts, featurize = [], GradientFeaturizer.train_features
    GradientFeaturizer.train_features = lambda self, data, timesteps, **options: starts.append(
        options["first_index"]) or featurize(self, data, timesteps, **options)
    state = process_state()
    for mode in ("fresh", "resume"):
        starts.clear()
        returned = stored_tiny_features(features_path, resume=mode == "resume")
        np.save(features_path.with_name(f"returned-{mode}-rank{state.process_index}.npy"), returned)
        np.save(features_path.with_name(f"starts-{mode}-rank{state.process_index}.npy"), np.array(starts, dtype=int))
        state.wait_for_everyone()
        if mode == "fresh" and state.is_main_process:
            shutil.copy(features_path, features_path.with_name("after-fresh.npy"))
            shutil.copy(features_path.with_name("done-tiny.npy"), features_path.with_name("done-after-fresh.npy"))
            damage(features_path)
        state.wait_for_everyone()
    end_processes()
