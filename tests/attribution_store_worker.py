"""Run by test_attribution_store.py under torchrun: every process stores the training features of a fixed
tiny class-conditional model into one file (argv: the features path, `fresh` or `resume`) and saves the
array it gets back beside it (`returned-rank{R}.npy`), with the first example index of every batch it
featurized (`starts-rank{R}.npy`)."""

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


def stored_tiny_features(path: Path, *, resume: bool) -> np.ndarray:
    torch.manual_seed(0)
    model = build_model("mlp", (2,), hidden=16, layers=1, num_class_embeds=3)
    data, labels = torch.randn(37, 2, generator=torch.Generator().manual_seed(1)), torch.arange(37) % 3
    featurizer = GradientFeaturizer(model, torch.linspace(0.99, 0.01, 1000), SparseProjector(
        sum(p.numel() for p in model.parameters()), 16, seed=2), batch_size=BATCH_SIZE)
    return stored_train_features(featurizer, data, path, timestep_grid(3), seed=4, dimension=16,
                                 batch_size=BATCH_SIZE, class_labels=labels, resume=resume, progress=False)


if __name__ == "__main__":
    features_path = Path(sys.argv[1])
    torch.set_num_threads(1)
    starts, featurize = [], GradientFeaturizer.train_features
    GradientFeaturizer.train_features = lambda self, data, timesteps, **options: starts.append(
        options["first_index"]) or featurize(self, data, timesteps, **options)
    returned = stored_tiny_features(features_path, resume=sys.argv[2] == "resume")
    rank = process_state().process_index
    np.save(features_path.with_name(f"returned-rank{rank}.npy"), returned)
    np.save(features_path.with_name(f"starts-rank{rank}.npy"), np.array(starts, dtype=int))
    end_processes()
