"""What `condiff attribute` attributes, for every kind of run condiff trains (condiff.audit.attribute):

- the training set as the run trained on it: its config's training set (for a fine-tuned run, the data it
  was fine-tuned on), encoded by the run's own autoencoder for a latent run (as training encodes it), only
  the kept examples of a retrained subset, and each example's own label for a class-conditional model;
- the models whose TRAK scores are averaged: the run's final model, its newest checkpoints, and other runs
  trained independently on the same data with the same architecture (other seeds), refused otherwise;
- the targets: generated (of a chosen class, for a class-conditional model) or the first samples of a
  `condiff sample --record-x0` file, whose provenance gives the class they were drawn as.
Errors name the AttributionSettings field (ArgumentError), which the command line spells as its option.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from condiff.config import ArgumentError, ExperimentConfig
from condiff.data.latent import encode_dataset
from condiff.models import null_class_label
from condiff.rundir import RunDirectory, RunDirectoryError
from condiff.lifecycle.build import ExperimentData, build_data, load_latent_autoencoder, load_pipeline, load_run_config
from condiff.lifecycle.sampling import model_provenance
from condiff.lifecycle.training import differing_fields
from condiff.sampling.generate import SampleOutput, generate, sampling_scheduler
from condiff.training.checkpoint import MODEL_WEIGHTS

COMPARED_SECTIONS = ("data", "model", "diffusion")   # what ensembled runs must share (besides the training set)


@dataclass
class TrainingSet:
    """A run's training set as its model saw it."""
    data: ExperimentData                # the config's data; data.train in data space (images or vectors)
    inputs: torch.Tensor                # (n, *model's sample shape): what the model was trained on (latents for
                                        # a latent run)
    indices: torch.Tensor               # (n,): each row's index in data.train (all of them but for a subset run)
    class_labels: torch.Tensor | None   # (n,): the labels the model was given (class-conditional), else None
    description: str                    # what the training set is, in a sentence of the report

    @property
    def labels(self) -> torch.Tensor:
        return self.data.train.labels[self.indices]

    @property
    def subset(self) -> bool:
        return len(self.indices) < len(self.data.train)


def kept_examples(run_dir: Path, num_train: int) -> torch.Tensor | None:
    """The examples a retrained subset run kept (RUN/train_subset.json), None for a run on the whole set."""
    run = RunDirectory(run_dir)
    if not run.train_subset.is_file():
        return None
    record = run.read_json(run.train_subset)
    if record.get("num_train") != num_train:
        raise RunDirectoryError(f"{run.train_subset}: a subset of {record.get('num_train')} training examples, "
                                f"the config's training set has {num_train}")
    return torch.tensor(record["kept"], dtype=torch.long)


def training_set(config: ExperimentConfig, run_dir: Path, autoencoder, conditional: bool) -> TrainingSet:
    """The run's training set: `autoencoder` (a latent run's, on its device) encodes it as training does."""
    data = build_data(config)
    kept = kept_examples(run_dir, len(data.train))
    indices = torch.arange(len(data.train)) if kept is None else kept
    train = data.train.subset(indices)
    inputs = train.data if autoencoder is None else encode_dataset(autoencoder, train).data.cpu()
    return TrainingSet(data, inputs, indices, train.labels if conditional else None,
                       describe_training_set(config, run_dir, len(train), len(data.train), tuple(inputs.shape[1:]),
                                             conditional))


def describe_training_set(config: ExperimentConfig, run_dir: Path, count: int, total: int,
                          model_shape: tuple[int, ...], conditional: bool) -> str:
    parts = [f"{count} examples of `{config.data.dataset}`, the run's training set (`[data]` of its config.toml)"]
    if count < total:
        parts.append(f"the {count} of the config's {total} training examples that `train_subset.json` keeps "
                     "(a retrained subset; indices are those of the whole training set)")
    if config.finetune.pretrained:
        constraint = " and the constraint to stay close to it" if config.finetune.threshold is not None else ""
        parts.append(f"the run was fine-tuned from `{config.finetune.pretrained}` on these data: the pretrained "
                     f"run's own training data are not attributed, they reach this model only through its starting "
                     f"weights{constraint}")
    if config.latent.autoencoder is not None:
        parts.append(f"encoded by the run's autoencoder (`{RunDirectory(run_dir).autoencoder.name}/`) to latents of "
                     f"shape {model_shape}, as training encodes them: attributed in latent space, pictured as "
                     "images (x0_hat(t) decoded, the training images in pixel space)")
    if conditional:
        parts.append("class-conditional: each training example's gradients take its own label")
    return "; ".join(parts) + "."


def checkpoint_models(run_dir: Path, final_model: torch.nn.Module, count: int) -> list[tuple[int, torch.nn.Module]]:
    """(step, model) of the `count` newest checkpoints whose weights are not the final model's: without an
    EMA, the last checkpoint is the final model itself and would count twice. Checkpoints hold the trained
    (not the EMA) weights."""
    if count == 0:
        return []
    folder = RunDirectory(run_dir).checkpoints
    final_weights = final_model.state_dict()
    models = []
    for checkpoint in sorted(folder.glob("step-*"), reverse=True):
        try:
            weights = load_file(checkpoint / MODEL_WEIGHTS)
        except (OSError, SafetensorError) as err:
            raise RunDirectoryError(f"{checkpoint}: unreadable checkpoint weights ({err})") from None
        if weights.keys() == final_weights.keys() and all(torch.equal(weights[k], final_weights[k]) for k in weights):
            continue
        model = type(final_model).from_config(final_model.config)
        try:
            model.load_state_dict(weights)
        except RuntimeError:
            raise RunDirectoryError(f"{checkpoint}: its weights are not those of the run's model") from None
        models.append((int(checkpoint.name.removeprefix("step-")), model.eval()))
        if len(models) == count:
            return models
    raise ArgumentError("checkpoints", f"{count + 1}: {folder} holds {len(models)} checkpoint(s) besides the "
                      f"final model, {count} needed (train.keep_checkpoints sets how many training keeps)")


@dataclass
class EnsembleModel:
    model: torch.nn.Module
    run: Path
    checkpoint_step: int | None         # None: the run's final model
    tag: str                            # its run's in features files' names ("" for the attributed run)

    @property
    def name(self) -> str:
        return str(self.run) + ("" if self.checkpoint_step is None else f" (step {self.checkpoint_step})")


def run_models(run_dir: Path, final_model: torch.nn.Module, checkpoints: int, tag: str) -> list[EnsembleModel]:
    """A run's final model and its `checkpoints - 1` newest checkpoints."""
    checkpointed = checkpoint_models(run_dir, final_model, checkpoints - 1)
    return [EnsembleModel(final_model, run_dir, None, tag)] + [EnsembleModel(model, run_dir, step, tag)
                                                               for step, model in checkpointed]


def public_config(model: torch.nn.Module) -> dict:
    return {"class": type(model).__name__, **{k: v for k, v in model.config.items() if not k.startswith("_")}}


def same_training(other: Path, run_dir: Path, config: ExperimentConfig, model: torch.nn.Module,
                  training: TrainingSet, device) -> torch.nn.Module:
    """The final model of `other`, refused unless it was trained on the same data (config and training set)
    with the same architecture and noise schedule as the attributed run."""
    other_config = load_run_config(other)
    mine, theirs = config.to_dict(), other_config.to_dict()
    changed = differing_fields({k: mine.get(k, {}) for k in COMPARED_SECTIONS},
                               {k: theirs.get(k, {}) for k in COMPARED_SECTIONS})
    if changed:
        raise ArgumentError("models", f"{other}: trained under another config than {run_dir} "
                          f"({', '.join(changed)} differ); an ensemble needs the same data and architecture")
    other_model = load_pipeline(other).unet
    changed = differing_fields(public_config(model), public_config(other_model))
    if changed:
        raise ArgumentError("models", f"{other}: its model's architecture differs from {run_dir}'s "
                          f"({', '.join(changed)})")
    autoencoder = load_latent_autoencoder(other_config, other)
    theirs = training_set(other_config, other, None if autoencoder is None else autoencoder.to(device),
                          training.class_labels is not None)
    if not (torch.equal(theirs.indices, training.indices) and torch.equal(theirs.labels, training.labels)
            and torch.allclose(theirs.inputs, training.inputs, atol=1e-5)):
        raise ArgumentError("models", f"{other}: trained on another training set than {run_dir} (other examples, "
                          "or another autoencoder's latents)")
    return other_model


def ensemble_models(run_dir: Path, config: ExperimentConfig, model: torch.nn.Module, training: TrainingSet,
                    others: tuple, checkpoints: int, device) -> list[EnsembleModel]:
    """Every model whose scores are averaged: the run's and each of `others`' final model and newest
    checkpoints; each other run's features file is tagged by its weights' digest."""
    models = run_models(run_dir, model, checkpoints, "")
    seen = {model_provenance(run_dir)["model_sha256"]: run_dir}
    for other in map(Path, others):
        other_model = same_training(other, run_dir, config, model, training, device)
        digest = model_provenance(other)["model_sha256"]
        if digest in seen:
            raise ArgumentError("models", f"{other}: the same model as {seen[digest]}; an ensemble needs "
                              "independently trained runs (e.g. other train.seed)")
        seen[digest] = other
        models += run_models(other, other_model, checkpoints, f"-run{digest}")
    return models


def saved_targets(path: Path, run_dir: Path, num_targets: int, sample_shape: tuple[int, ...]) -> SampleOutput:
    """The first `num_targets` samples of a `condiff sample --record-x0` file with their x0 predictions at
    every step; refused when the file lacks them, holds too few samples, or was drawn by another model."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            stored = {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ArgumentError("samples_file", f"{path}: unreadable as a samples .npz ({err})") from None
    missing = [name for name in ("samples", "timesteps", "x0_predictions") if name not in stored]
    if missing:
        raise ArgumentError("samples_file", f"{path}: no {' or '.join(missing)} in it; attribution needs every step's "
                          "x0 prediction and timestep: draw the samples with `condiff sample RUN --record-x0`")
    samples, x0_predictions, timesteps = stored["samples"], stored["x0_predictions"], stored["timesteps"]
    if x0_predictions.shape[:1] + x0_predictions.shape[2:] != (len(timesteps), *sample_shape):
        raise ArgumentError("samples_file", f"{path}: x0 predictions of shape {x0_predictions.shape}, expected "
                          f"({len(timesteps)} steps, samples, {', '.join(map(str, sample_shape))}) for this run")
    drawn = stored.get("latents", samples)   # a latent run's samples are decodes: its latents are the model's
    if len(samples) != x0_predictions.shape[1] or drawn.shape != (x0_predictions.shape[1], *sample_shape):
        raise ArgumentError("samples_file", f"{path}: samples of shape {drawn.shape}, expected ({x0_predictions.shape[1]} "
                          f"samples, {', '.join(map(str, sample_shape))}) for this run")
    if any(array.dtype.kind not in "biuf" or not np.isfinite(array).all() for array in (samples, x0_predictions)):
        raise ArgumentError("samples_file", f"{path}: samples or x0 predictions that are not all finite numbers")
    if x0_predictions.shape[1] < num_targets:
        raise ArgumentError("num_targets", f"{num_targets} targets asked, {path} holds "
                          f"{x0_predictions.shape[1]} samples")
    try:
        provenance = json.loads(str(stored["provenance"])) if "provenance" in stored else {}
    except ValueError:
        provenance = None
    if not isinstance(provenance, dict):
        raise ArgumentError("samples_file", f"{path}: its provenance is not a JSON object")
    drawn_by, attributed = provenance.get("model_sha256"), model_provenance(run_dir)["model_sha256"]
    if drawn_by is not None and drawn_by != attributed:
        raise ArgumentError("samples_file", f"{path}: drawn by another model (weights {drawn_by}, step "
                          f"{provenance.get('model_step')}) than {run_dir}'s ({attributed}); a journey is of "
                          "the attributed model's own x0 predictions")
    return SampleOutput(torch.from_numpy(samples[:num_targets]).float(), torch.from_numpy(timesteps).long(),
                        torch.from_numpy(x0_predictions[:, :num_targets]).float(), provenance=provenance)


def target_class(run_dir: Path, model: torch.nn.Module, chosen: int | None, saved: SampleOutput | None) -> int | None:
    """The class the targets are (or were) drawn as, None for unconditional ones: a samples file's own
    (its provenance), else `chosen`, which only a class-conditional model can generate."""
    if saved is not None:
        drawn = (saved.provenance or {}).get("class_label")
        if chosen is not None and chosen != drawn:
            raise ArgumentError("target_class", f"{chosen}: the samples file's samples were drawn as "
                              f"{'no class' if drawn is None else f'class {drawn}'}; leave it out to take theirs")
        return drawn
    if chosen is None:
        return None
    null = null_class_label(model)
    if null is None:
        raise ArgumentError("target_class", f"{chosen}: the model of {run_dir} is not class-conditional; draw "
                          "class samples with classifier guidance (`condiff sample RUN --class C --guidance-kind "
                          f"classifier --record-x0`) and attribute them with {{samples_file}}")
    if not 0 <= chosen < null:
        raise ArgumentError("target_class", f"{run_dir} has classes 0-{null - 1}, not {chosen}")
    return chosen


@dataclass
class Targets:
    output: SampleOutput                # samples, the visited timesteps, x0 predictions in the model's space
    class_label: int | None             # the class they were drawn as (None: unconditional)
    model_labels: torch.Tensor | None   # (M,): the labels their features take (a class-conditional model)
    noisy_inputs: dict[int, torch.Tensor] | None   # x_t per timestep, for generated targets


def draw_targets(pipeline, count: int, class_label: int | None, saved: SampleOutput | None, *, steps: int,
                 seed: int, device) -> Targets:
    """`count` DDIM-`steps` samples of `class_label` with every step's x0 prediction and x_t, or `saved`."""
    null = null_class_label(pipeline.unet)
    labels = None if null is None else torch.full((count,), null if class_label is None else class_label)
    if saved is not None:
        return Targets(saved, class_label, labels, None)
    noisy: dict[int, torch.Tensor] = {}
    output = generate(pipeline.unet, sampling_scheduler(pipeline.scheduler, "ddim"), count, num_inference_steps=steps,
                      seed=seed, record_x0=True, class_labels=labels, device=device, progress=False,
                      on_step=lambda first, t, x: noisy.setdefault(t, x.detach().cpu()))
    return Targets(output, class_label, labels, noisy)
