"""The data evaluation compares a run's samples with, kept inside the run (RUN/evaluation_data.safetensors) so
that the run evaluates without the data it was trained from: the balanced reference set, and the training
and held-out sets of the evaluation classifier."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from condiff.data.datasets import LabelledDataset
from condiff.rundir import RunDirectoryError, write_atomic

EVALUATION_SETS = ("reference", "classifier_train", "held_out")


def save_evaluation_sets(path: Path, sets: dict[str, LabelledDataset]) -> None:
    """The `EVALUATION_SETS` of `sets` in one safetensors file, written atomically."""
    tensors = {f"{name}.{part}": getattr(sets[name], part).contiguous() for name in EVALUATION_SETS
               for part in ("data", "labels")}
    metadata = {"num_classes": str(sets["reference"].num_classes),
                **{f"{name}.name": sets[name].name for name in EVALUATION_SETS}}
    write_atomic(path, lambda p: save_file(tensors, p, metadata=metadata))


def load_evaluation_sets(path: Path) -> dict[str, LabelledDataset]:
    """The `EVALUATION_SETS` of a file `save_evaluation_sets` wrote; a damaged one is refused, naming it."""
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata()
            return {name: LabelledDataset(file.get_tensor(f"{name}.data"), file.get_tensor(f"{name}.labels"),
                                          int(metadata["num_classes"]), metadata[f"{name}.name"])
                    for name in EVALUATION_SETS}
    except (OSError, KeyError, ValueError, SafetensorError) as err:
        raise RunDirectoryError(f"{path}: unreadable ({err})") from None
