"""`condiff attribute RUN`: which training examples guided each chosen step of a run's generations.

Targets are generated with their x0 predictions at every step (or read from a `condiff sample --record-x0`
file); at each chosen step t, a target's features are the gradients of the output function at its x0
prediction re-noised to t (R times), and every training example is scored by TRAK (condiff.attribution),
averaged over the final model and, with `checkpoints` > 1, the newest saved checkpoints. Everything lands
in RUN/attribution/:
- `features-OUTPUT-K*-k*-PROJECTION[-stepSTEP].npy`: the training features of the final model (and of each
  checkpoint, by its step), memory-mapped and filled batch by batch; a killed run resumes where it stopped
  (`resume=True`), `done-*.npy` marking the finished batches;
- `scores.npy`: (training examples x targets x steps), memory-mapped;
- `attribution.json`: the settings and, per step and target, the top-K helpful and harmful examples and
  the scores summed over each class (and over the constraint set and the rest);
- `journey-TARGET.png`, `classes.png` and `report.md` (condiff.experiments.attribution_report).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from condiff.attribution.features import OUTPUT_FUNCTIONS, GradientFeaturizer, timestep_grid
from condiff.attribution.projector import PROJECTORS
from condiff.attribution.store import stored_train_features
from condiff.attribution.trak import ensemble_scores
from condiff.config import ConfigError
from condiff.experiments.attribution_report import plot_class_shares, plot_journey, write_attribution_report
from condiff.experiments.build import build_data, load_pipeline, load_run_config
from condiff.experiments.sampling import model_provenance
from condiff.models import sample_shape_of
from condiff.rundir import RunDirectory, RunDirectoryError, create_output_directory, write_json_atomic
from condiff.runtime import progress_bar, resolve_device
from condiff.sampling.generate import SampleOutput, generate, sampling_scheduler
from condiff.training.checkpoint import MODEL_WEIGHTS


@dataclass
class AttributionSettings:
    output: str = "dtrak"                       # dtrak (D-TRAK's ||eps||^2 / d) | loss (Journey-TRAK's)
    steps: tuple[int, ...] = (900, 700, 500, 300, 100)   # sampling timesteps to attribute (nearest taken)
    num_targets: int = 4                        # samples generated (or taken from samples_file) to be explained
    seed: int = 0                               # of the targets and of every noise
    top: int = 6                                # helpful and harmful examples shown per step
    train_timesteps: int = 10                   # K: training-side timesteps, evenly spread
    resamplings: int = 20                       # R: re-noisings of x0_hat(t) per target
    projection: str = "sparse"                  # sparse | gaussian
    dimension: int = 2048                       # k
    ridge: float = 0.1                          # c of lambda = c trace(Phi^T Phi) / k
    sampling_steps: int = 50                    # DDIM steps of the targets
    batch_size: int = 32
    samples_file: str | None = None             # targets from a `condiff sample --record-x0` file instead
    checkpoints: int = 1                        # models averaged: the final one and the newest checkpoints - 1

    def validate(self) -> AttributionSettings:
        checks = {"output": self.output in OUTPUT_FUNCTIONS, "projection": self.projection in PROJECTORS,
                  "steps": bool(self.steps) and all(0 <= t < 1000 for t in self.steps)}
        checks.update({name: getattr(self, name) > 0 for name in (
            "num_targets", "top", "train_timesteps", "resamplings", "dimension", "ridge", "sampling_steps",
            "batch_size", "checkpoints")})
        flags = {"num_targets": "samples"}   # the command line's name where it differs
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"--{flags.get(name, name).replace('_', '-')}: {getattr(self, name)!r} is not allowed")
        return self


@dataclass
class StepAttribution:
    timestep: int
    helpful: list[list[int]] = field(default_factory=list)        # per target: top-K training indices
    helpful_scores: list[list[float]] = field(default_factory=list)
    harmful: list[list[int]] = field(default_factory=list)        # per target: bottom-K
    harmful_scores: list[list[float]] = field(default_factory=list)
    class_sums: list[list[float]] = field(default_factory=list)   # per target: per class, the summed scores
    class_positive_shares: list[list[float]] = field(default_factory=list)   # per target: per class, its
                                                                  # share of the target's positive scores
    constraint_set: list[dict[str, float]] | None = None          # per target (constrained runs): sum,
                                                                  # rest_sum, positive_share of the set


@dataclass
class AttributionResult:
    settings: AttributionSettings
    steps: list[StepAttribution]
    target_classes: list[int] | None            # for Gaussian mixtures: each target's exact component
    directory: Path
    class_names: list[str]
    training_class_shares: list[float]          # each class's share of the training set, to compare with
    constraint_classes: list[int]               # the run's constrained classes (empty: unconstrained)
    checkpoint_steps: list[int]                 # the checkpoints averaged with the final model
    targets_provenance: dict | None             # how the targets of a samples file were drawn

    def to_dict(self) -> dict:
        values = asdict(self)
        del values["directory"]
        if self.settings.samples_file is not None:   # a Path given from Python: JSON takes its text
            values["settings"]["samples_file"] = str(self.settings.samples_file)
        return values


def train_features(featurizer: GradientFeaturizer, data: torch.Tensor, settings: AttributionSettings,
                   folder: Path, *, checkpoint_step: int | None = None, resume: bool,
                   progress: bool) -> np.ndarray:
    """The training set's projected features, memory-mapped in `folder` (one file per checkpoint, named by
    its step; unsuffixed for the final model); with `resume`, batches a killed run finished are kept."""
    name = f"{settings.output}-K{settings.train_timesteps}-k{settings.dimension}-{settings.projection}"
    if checkpoint_step is not None:
        name += f"-step{checkpoint_step:07d}"
    return stored_train_features(featurizer, data, folder / f"features-{name}.npy",
                                 timestep_grid(settings.train_timesteps), seed=settings.seed,
                                 dimension=settings.dimension, batch_size=settings.batch_size, resume=resume,
                                 progress=progress, desc="features" if checkpoint_step is None
                                 else f"features (step {checkpoint_step})")


def saved_targets(path: Path, run_dir: Path, num_targets: int, sample_shape: tuple[int, ...]) -> SampleOutput:
    """The first `num_targets` samples of a `condiff sample --record-x0` file with their x0 predictions at
    every step; refused when the file lacks them, holds too few samples, or was drawn by another model."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            stored = {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ConfigError(f"--samples-file {path}: unreadable as a samples .npz ({err})") from None
    missing = [name for name in ("samples", "timesteps", "x0_predictions") if name not in stored]
    if missing:
        raise ConfigError(f"--samples-file {path}: no {' or '.join(missing)} in it; attribution needs every step's "
                          "x0 prediction and timestep: draw the samples with `condiff sample RUN --record-x0`")
    x0_predictions, timesteps = stored["x0_predictions"], stored["timesteps"]
    if x0_predictions.shape[:1] + x0_predictions.shape[2:] != (len(timesteps), *sample_shape):
        raise ConfigError(f"--samples-file {path}: x0 predictions of shape {x0_predictions.shape}, expected "
                          f"({len(timesteps)} steps, samples, {', '.join(map(str, sample_shape))}) for this run")
    if x0_predictions.shape[1] < num_targets:
        raise ConfigError(f"--samples: {num_targets} targets asked, {path} holds {x0_predictions.shape[1]} samples")
    provenance = json.loads(str(stored["provenance"])) if "provenance" in stored else {}
    drawn_by, attributed = provenance.get("model_sha256"), model_provenance(run_dir)["model_sha256"]
    if drawn_by is not None and drawn_by != attributed:
        raise ConfigError(f"--samples-file {path}: drawn by another model (weights {drawn_by}, step "
                          f"{provenance.get('model_step')}) than {run_dir}'s ({attributed}); a journey is of "
                          "the attributed model's own x0 predictions")
    return SampleOutput(torch.from_numpy(stored["samples"][:num_targets]).float(), torch.from_numpy(timesteps).long(),
                        torch.from_numpy(x0_predictions[:, :num_targets]).float(), provenance=provenance)


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
    raise ConfigError(f"--checkpoints {count + 1}: {folder} holds {len(models)} checkpoint(s) besides the final "
                      f"model, {count} needed (train.keep_checkpoints sets how many training keeps)")


def class_sums(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(targets x classes) twice: the scores (examples x targets) summed over each class's examples, and
    each class's share of the target's total positive score (0 for a target without positive scores)."""
    members = np.eye(num_classes)[labels]
    per_target = scores.T.astype(np.float64)
    positive = np.clip(per_target, 0, None) @ members
    total = positive.sum(1, keepdims=True)
    return per_target @ members, np.divide(positive, total, out=np.zeros_like(positive), where=total > 0)


def constraint_set_sums(sums: np.ndarray, shares: np.ndarray, classes: list[int]) -> list[dict[str, float]]:
    """Per target: the summed scores of the constraint classes and of the rest, and the constraint classes'
    share of the positive score."""
    inside = sums[:, classes].sum(1)
    return [{"sum": float(own), "rest_sum": float(total - own), "positive_share": float(share)}
            for own, total, share in zip(inside, sums.sum(1), shares[:, classes].sum(1))]


def attribute_run(run_dir: Path, settings: AttributionSettings | None = None, *, resume: bool = False,
                  overwrite: bool = False, device: str | torch.device | None = None,
                  progress: bool = True) -> AttributionResult:
    """Attribute each chosen step of `settings.num_targets` samples of the run (generated, or the first of
    `settings.samples_file`) to the training set, TRAK scores averaged over the final model and the
    `settings.checkpoints - 1` newest checkpoints; writes RUN/attribution/ (see the module docstring).
    Bad input is refused before anything is written."""
    settings = (settings or AttributionSettings()).validate()
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    if config.latent.autoencoder is not None:
        raise ConfigError(f"{run_dir}: attribution of latent-diffusion runs is not supported yet")
    pipeline = load_pipeline(run_dir)
    models = [(None, pipeline.unet)] + checkpoint_models(run_dir, pipeline.unet, settings.checkpoints - 1)
    saved = (None if settings.samples_file is None else
             saved_targets(Path(settings.samples_file), run_dir, settings.num_targets, sample_shape_of(pipeline.unet)))
    data = build_data(config)
    folder = RunDirectory(run_dir).path / "attribution"
    if not (resume and folder.is_dir()):
        create_output_directory(folder, "attribution", overwrite=overwrite, resumable=True)
    device = resolve_device(device)
    projector = PROJECTORS[settings.projection](sum(p.numel() for p in pipeline.unet.parameters()),
                                                settings.dimension, seed=settings.seed, device=device)
    featurizers = [GradientFeaturizer(model.to(device), pipeline.scheduler.alphas_cumprod, projector,
                                      output=settings.output, batch_size=settings.batch_size) for _, model in models]
    features = [torch.from_numpy(train_features(featurizer, data.train.data, settings, folder, checkpoint_step=step,
                                                resume=resume, progress=progress))
                for featurizer, (step, _) in zip(featurizers, models)]

    if saved is None:
        noisy_inputs: dict[int, torch.Tensor] | None = {}
        targets = generate(pipeline.unet, sampling_scheduler(pipeline.scheduler, "ddim"), settings.num_targets,
                           num_inference_steps=settings.sampling_steps, seed=settings.seed, record_x0=True,
                           device=device, progress=False,
                           on_step=lambda first, t, x: noisy_inputs.setdefault(t, x.detach().cpu()))
    else:
        noisy_inputs, targets = None, saved   # a samples file keeps no x_t
    indices = [targets.step_index(t) for t in settings.steps]
    scores = np.lib.format.open_memmap(folder / "scores.npy", mode="w+", dtype=np.float32,
                                       shape=(len(data.train), settings.num_targets, len(indices)))
    labels, num_classes = data.train.labels.numpy(), data.train.num_classes
    constraint_classes = list(config.constraints.classes)
    steps = []
    for column, index in enumerate(progress_bar(indices, desc="attribute", enabled=progress)):
        timestep = int(targets.timesteps[index])
        pairs = [(phi, featurizer.target_features(targets.x0_predictions[index], timestep,
                                                  resamplings=settings.resamplings, seed=settings.seed))
                 for featurizer, phi in zip(featurizers, features)]
        step_scores = ensemble_scores(pairs, settings.ridge).float()
        scores[:, :, column] = step_scores.numpy()
        helpful, harmful = step_scores.topk(settings.top, dim=0), (-step_scores).topk(settings.top, dim=0)
        sums, shares = class_sums(step_scores.numpy(), labels, num_classes)
        steps.append(StepAttribution(timestep, helpful.indices.T.tolist(), helpful.values.T.tolist(),
                                     harmful.indices.T.tolist(), (-harmful.values).T.tolist(), sums.tolist(),
                                     shares.tolist(),
                                     constraint_set_sums(sums, shares, constraint_classes) if constraint_classes
                                     else None))
    scores.flush()
    result = AttributionResult(
        settings, steps, data.mixture.classify(targets.samples).tolist() if data.mixture is not None else None,
        folder, class_names=data.train.class_names or [str(label) for label in range(num_classes)],
        training_class_shares=(np.bincount(labels, minlength=num_classes) / len(labels)).tolist(),
        constraint_classes=constraint_classes, checkpoint_steps=[step for step, _ in models[1:]],
        targets_provenance=targets.provenance)
    write_json_atomic(folder / "attribution.json", result.to_dict())
    for target in range(settings.num_targets):
        plot_journey(result, target, data.train.data, targets, indices, noisy_inputs, folder / f"journey-{target}.png")
    plot_class_shares(result, folder / "classes.png")
    write_attribution_report(result, run_dir.name)
    return result
