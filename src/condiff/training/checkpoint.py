"""Checkpoints: written atomically, loaded without unpickling anything, skipped when damaged.

A checkpoint is a folder `checkpoints/step-XXXXXXX/` holding the model in diffusers format, the
tensors of the optimizer, EMA and samplers in safetensors, and every scalar in `trainer_state.json`.
It is assembled under a unique temporary name and renamed into place, so a run killed mid-write leaves
the previous checkpoint intact; `checkpoints/latest` names the newest complete one. Loading falls back,
with a warning, from a damaged checkpoint to the newest one that reads back whole.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from condiff.rundir import RunDirectoryError, write_atomic, write_text_atomic

MODEL_WEIGHTS = "model/diffusion_pytorch_model.safetensors"


def flatten_tensors(prefix: str, tree, tensors: dict[str, torch.Tensor]):
    """Move the tensors of a nested dict/list into `tensors` (keys joined by '.'), returning the rest
    of the tree as JSON with {"__tensor__": key} placeholders."""
    if torch.is_tensor(tree):
        tensors[prefix] = tree.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(tree, dict):
        return {str(k): flatten_tensors(f"{prefix}.{k}", v, tensors) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [flatten_tensors(f"{prefix}.{i}", v, tensors) for i, v in enumerate(tree)]
    return tree


def restore_tensors(tree, tensors: dict[str, torch.Tensor]):
    """Inverse of flatten_tensors."""
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        return {k: restore_tensors(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [restore_tensors(v, tensors) for v in tree]
    return tree


def optimizer_state_from_json(state: dict) -> dict:
    """JSON turned the optimizer's integer parameter ids into strings; torch needs them back."""
    return {"state": {int(k): v for k, v in state["state"].items()}, "param_groups": state["param_groups"]}


def save_checkpoint(checkpoints_dir: Path, step: int, model, state: dict, keep: int) -> Path:
    """Write model weights (save_pretrained) and `state` (nested dicts of tensors and JSON scalars); keep
    the newest `keep` checkpoints."""
    def write(folder: Path) -> None:
        model.save_pretrained(folder / "model", safe_serialization=True)
        tensors: dict[str, torch.Tensor] = {}
        skeleton = flatten_tensors("state", state, tensors)
        save_file(tensors, folder / "state.safetensors")
        (folder / "trainer_state.json").write_text(json.dumps(skeleton, indent=1))

    for leftover in checkpoints_dir.glob(".step-*"):   # temporary folders of a process killed mid-write
        shutil.rmtree(leftover, ignore_errors=True)
    final = write_atomic(checkpoints_dir / f"step-{step:07d}", write, directory=True)
    write_text_atomic(checkpoints_dir / "latest", final.name)
    for old in sorted(checkpoints_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(model weights, state tree with its tensors restored) of one checkpoint folder."""
    skeleton = json.loads((folder / "trainer_state.json").read_text())
    return load_file(folder / MODEL_WEIGHTS), restore_tensors(skeleton, load_file(folder / "state.safetensors"))


def load_checkpoint(checkpoints_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The newest checkpoint that reads back whole: (model weights, state tree). A damaged one (a
    truncated file, a missing part) is skipped for the previous one, with a warning."""
    named = (checkpoints_dir / "latest").read_text().strip() if (checkpoints_dir / "latest").is_file() else None
    folders = sorted(checkpoints_dir.glob("step-*"), reverse=True)
    if named is not None and checkpoints_dir / named in folders:   # `latest` first, then newest to oldest
        folders.remove(checkpoints_dir / named)
        folders.insert(0, checkpoints_dir / named)
    for folder in folders:
        try:
            return read_checkpoint(folder)
        except (OSError, ValueError, KeyError, SafetensorError) as err:
            warnings.warn(f"{folder}: damaged checkpoint skipped ({type(err).__name__}: {err})", stacklevel=2)
    raise RunDirectoryError(f"{checkpoints_dir}: no complete checkpoint to resume from")
