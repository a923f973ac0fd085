"""Run directories and checkpoints: written atomically, loaded without unpickling anything.

A checkpoint is a folder `checkpoints/step-XXXXXXX/` holding the model in diffusers format, the
tensors of the optimizer, EMA and samplers in safetensors, and every scalar in `trainer_state.json`.
It is assembled under a temporary name and renamed into place, so a run killed mid-write leaves the
previous checkpoint intact; `checkpoints/latest` names the newest complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class RunDirectoryError(RuntimeError):
    """A run directory is missing, or exists where a new run would overwrite it."""


def check_run_directory(path: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is written, to resume without a checkpoint or to clobber a run."""
    if resume:
        if not (path / "checkpoints" / "latest").is_file():
            raise RunDirectoryError(f"{path}: no checkpoint to resume from")
    elif path.exists() and any(path.iterdir()) and not overwrite:
        raise RunDirectoryError(f"{path}: run directory exists; pass --resume to continue it "
                                "or --overwrite to replace it")


def prepare_run_directory(path: Path, *, resume: bool, overwrite: bool) -> None:
    """Create a run directory, refusing to clobber an existing one unless told to."""
    check_run_directory(path, resume=resume, overwrite=overwrite)
    if resume:
        return
    if path.exists() and any(path.iterdir()):
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_pretrained_atomic(model, path: str | os.PathLike) -> Path:
    """`model.save_pretrained(path)` (safetensors), atomically: a reader never sees a half-written folder,
    and an existing model there is replaced only once the new one is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    model.save_pretrained(tmp, safe_serialization=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)
    return path


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
    """Write model weights (save_pretrained) and `state` (nested dicts of tensors and JSON scalars)."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step-{step:07d}"
    tmp = checkpoints_dir / f".tmp-step-{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp / "model", safe_serialization=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten_tensors("state", state, tensors)
    save_file(tensors, tmp / "state.safetensors")
    (tmp / "trainer_state.json").write_text(json.dumps(skeleton, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(checkpoints_dir / "latest", final.name)
    for old in sorted(checkpoints_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(checkpoints_dir: Path) -> tuple[Path, dict]:
    """The newest complete checkpoint's folder and its state tree (tensors restored)."""
    folder = checkpoints_dir / (checkpoints_dir / "latest").read_text().strip()
    skeleton = json.loads((folder / "trainer_state.json").read_text())
    return folder, restore_tensors(skeleton, load_file(folder / "state.safetensors"))
