"""`condiff attribute RUN`: which training examples guided each step of a run's generations.

Targets are generated with their x0 predictions at every step (of a chosen class, for a class-conditional
model) or read from a `condiff sample --record-x0` file; at each visited step t, a target's features are the
gradients of the output function at its x0 prediction re-noised to t (R times), and every example of the
run's training set (condiff.audit.inputs: a fine-tuned run's own data, a latent run's latents, each
example with its label for a class-conditional model) is scored by TRAK (condiff.attribution),
averaged over the final model, with `checkpoints` > 1 the newest saved checkpoints, and with `models` other
runs of the same config (other seeds). Everything lands in RUN/attribution/:
- `features-OUTPUT-K*-k*-PROJECTION[-runDIGEST][-stepSTEP].npy` (condiff.audit.results.features_file): the
  training features of each model (another run's by its weights' digest, a checkpoint by its step),
  memory-mapped and filled batch by batch; a killed run resumes where it stopped (`resume=True`),
  `done-*.npy` marking the finished batches;
- `scores.npy`: (training examples x targets x chosen steps), memory-mapped;
- `attribution.json`: the settings and, per chosen step and target, the top-K helpful and harmful examples
  and the scores summed over each class (and over the constraint set and the rest); per target, its journey
  over every visited step (condiff.audit.journey);
- `journey-TARGET.png`, `journey-steps-TARGET.png`, `classes.png` and `report.md`
  (condiff.audit.report).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from condiff.attribution.features import GradientFeaturizer, timestep_grid
from condiff.attribution.projector import PROJECTORS
from condiff.attribution.store import stored_train_features
from condiff.attribution.trak import ensemble_scores
from condiff.audit.inputs import (
    EnsembleModel,
    Targets,
    TrainingSet,
    draw_targets,
    ensemble_models,
    saved_targets,
    target_class,
    training_set,
)
from condiff.audit.journey import class_posteriors, journey_indices, plot_journey_steps, target_journeys
from condiff.audit.report import plot_class_shares, plot_journey, write_attribution_report
from condiff.audit.results import (
    AttributionResult,
    AttributionSettings,
    StepAttribution,
    TargetJourney,
    features_file,
)
from condiff.config import ArgumentError, ExperimentConfig
from condiff.data.latent import decode_latents
from condiff.models import null_class_label, sample_shape_of
from condiff.rundir import RunDirectory, create_output_directory, write_json_atomic
from condiff.lifecycle.build import evaluation_classifier, load_latent_autoencoder, load_pipeline, load_run_config
from condiff.runtime import process_state, progress_bar, resolve_device
from condiff.sampling.generate import SampleOutput


def train_features(featurizer: GradientFeaturizer, data: torch.Tensor, settings: AttributionSettings,
                   folder: Path, *, checkpoint_step: int | None = None, run_tag: str = "",
                   class_labels: torch.Tensor | None = None, resume: bool, progress: bool) -> np.ndarray:
    """The training set's projected features, memory-mapped in `folder` (one file per model: named by the
    settings, `run_tag` for another run than the attributed one, and a checkpoint's step; unsuffixed for the
    final model); with `resume`, batches a killed run finished are kept. `class_labels`: each example's label,
    for a class-conditional model."""
    name = features_file(settings.output, settings.train_timesteps, settings.dimension, settings.projection,
                         run_tag=run_tag, checkpoint_step=checkpoint_step)
    suffix = run_tag + ("" if checkpoint_step is None else f"-step{checkpoint_step:07d}")
    return stored_train_features(featurizer, data, folder / name,
                                 timestep_grid(settings.train_timesteps), seed=settings.seed,
                                 dimension=settings.dimension, batch_size=settings.batch_size,
                                 class_labels=class_labels, resume=resume, progress=progress,
                                 desc=f"features ({suffix.lstrip('-')})" if suffix else "features")


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


def featurize(models: list[EnsembleModel], alphas_cumprod: torch.Tensor, training: TrainingSet,
              settings: AttributionSettings, folder: Path, device, *, resume: bool,
              progress: bool) -> list[tuple[GradientFeaturizer, torch.Tensor]]:
    """Per model: its featurizer and the training set's features under it (all projected alike)."""
    projector = PROJECTORS[settings.projection](sum(p.numel() for p in models[0].model.parameters()),
                                                settings.dimension, seed=settings.seed, device=device)
    featurized = []
    for member in models:
        featurizer = GradientFeaturizer(member.model.to(device), alphas_cumprod, projector, output=settings.output,
                                        batch_size=settings.batch_size)
        features = train_features(featurizer, training.inputs, settings, folder, checkpoint_step=member.checkpoint_step,
                                  run_tag=member.tag, class_labels=training.class_labels, resume=resume,
                                  progress=progress)
        featurized.append((featurizer, torch.from_numpy(features)))
    return featurized


def step_scores(featurized: list[tuple[GradientFeaturizer, torch.Tensor]], targets: Targets, indices: list[int],
                settings: AttributionSettings, progress: bool) -> np.ndarray:
    """(training examples x steps x targets): the ensemble's TRAK scores of every target at each visited step
    of `indices`; one kernel solve per model for all of them."""
    output = targets.output
    bar = progress_bar(total=len(featurized) * len(indices), desc="attribute", enabled=progress)
    pairs = []
    for featurizer, features in featurized:
        per_step = []
        for index in indices:
            per_step.append(featurizer.target_features(output.x0_predictions[index], int(output.timesteps[index]),
                                                       resamplings=settings.resamplings, seed=settings.seed,
                                                       class_labels=targets.model_labels))
            bar.update()
        pairs.append((features, torch.cat(per_step)))
    bar.close()
    scores = ensemble_scores(pairs, settings.ridge).float().numpy()   # columns: step-major, then target
    return scores.reshape(len(scores), len(indices), -1)


def step_attribution(timestep: int, scores: np.ndarray, training: TrainingSet, top: int,
                     constraint_classes: list[int]) -> StepAttribution:
    """The top helpful and harmful examples (training-set indices) and the class sums of one step's scores
    (training examples x targets)."""
    tensor, indices = torch.from_numpy(scores), training.indices
    helpful, harmful = tensor.topk(top, dim=0), (-tensor).topk(top, dim=0)
    sums, shares = class_sums(scores, training.labels.numpy(), training.data.train.num_classes)
    return StepAttribution(timestep, indices[helpful.indices].T.tolist(), helpful.values.T.tolist(),
                           indices[harmful.indices].T.tolist(), (-harmful.values).T.tolist(), sums.tolist(),
                           shares.tolist(),
                           constraint_set_sums(sums, shares, constraint_classes) if constraint_classes else None)


def in_data_space(output: SampleOutput, autoencoder) -> SampleOutput:
    """The targets with their x0 predictions as the data (decoded, for a latent run), to picture and classify."""
    if autoencoder is None:
        return output
    x0 = output.x0_predictions
    decoded = decode_latents(autoencoder, x0.flatten(0, 1))
    return dataclasses.replace(output, x0_predictions=decoded.reshape(*x0.shape[:2], *decoded.shape[1:]))


def journeys(config: ExperimentConfig, training: TrainingSet, shown: SampleOutput, scores: np.ndarray,
             indices: list[int], steps: list[StepAttribution], device) -> tuple[list[TargetJourney], str]:
    """Per target, its journey over the visited steps `indices` (see condiff.audit.journey),
    and what gave the posteriors."""
    classifier, accuracy = evaluation_classifier(config, training.data, device)
    x0 = shown.x0_predictions[indices]
    posteriors = class_posteriors(classifier, x0.flatten(0, 1)).reshape(len(indices), x0.shape[1], -1)
    source = ("the exact posterior of the mixture" if training.data.mixture is not None else
              f"condiff's evaluation classifier (held-out accuracy {accuracy:.3f})")
    timesteps = [int(shown.timesteps[index]) for index in indices]
    return target_journeys(scores, timesteps, posteriors, [step.helpful for step in steps],
                           training.indices.numpy()), source


def write_figures(result: AttributionResult, training: TrainingSet, shown: SampleOutput, attributed: list[int],
                  journey: list[int], noisy_inputs: dict[int, torch.Tensor] | None) -> None:
    train, folder = training.data.train, result.directory
    for target in range(result.settings.num_targets):
        plot_journey(result, target, train.data, shown, attributed, noisy_inputs, folder / f"journey-{target}.png")
        if result.journeys:
            plot_journey_steps(result.journeys[target], target, result.class_names, train.data, train.labels,
                               shown.x0_predictions[journey, target], [step.timestep for step in result.steps],
                               folder / f"journey-steps-{target}.png")
    plot_class_shares(result, folder / "classes.png")


def summary(settings: AttributionSettings, steps: list[StepAttribution], training: TrainingSet, targets: Targets,
            folder: Path, constraint_classes: list[int], models: list[EnsembleModel],
            run_dir: Path) -> AttributionResult:
    """The result, but for the journeys."""
    train, mixture = training.data.train, training.data.mixture
    return AttributionResult(
        settings, steps, mixture.classify(targets.output.samples).tolist() if mixture is not None else None, folder,
        class_names=train.class_names or [str(label) for label in range(train.num_classes)],
        training_class_shares=(np.bincount(training.labels.numpy(), minlength=train.num_classes)
                               / len(training.labels)).tolist(),
        constraint_classes=constraint_classes,
        checkpoint_steps=[m.checkpoint_step for m in models if m.run == run_dir and m.checkpoint_step is not None],
        targets_provenance=targets.output.provenance, training_set=training.description,
        train_indices=training.indices.tolist() if training.subset else None,
        conditional=training.class_labels is not None, target_class=targets.class_label,
        ensemble=[m.name for m in models])


def attribute_run(run_dir: Path, settings: AttributionSettings | None = None, *, resume: bool = False,
                  overwrite: bool = False, device: str | torch.device | None = None,
                  progress: bool = True) -> AttributionResult | None:
    """Attribute each chosen step of `settings.num_targets` samples of the run (generated, of
    `settings.target_class` if given, or the first of `settings.samples_file`) to the run's training set (see
    condiff.audit.inputs for what that is for each kind of run), TRAK scores averaged over
    the run's and `settings.models`' final models and newest checkpoints; follows every target over its
    visited steps; writes RUN/attribution/ (see the module docstring). Bad input is refused before anything
    is written. Under torchrun every process featurizes its share of the training set and only the main one
    goes on (the others return None)."""
    settings = (settings or AttributionSettings()).validated()
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    device = resolve_device(device)
    pipeline = load_pipeline(run_dir)
    autoencoder = load_latent_autoencoder(config, run_dir)
    autoencoder = None if autoencoder is None else autoencoder.to(device)
    training = training_set(config, run_dir, autoencoder, null_class_label(pipeline.unet) is not None)
    if settings.top > len(training.inputs):
        raise ArgumentError("top", f"{settings.top}: more than the {len(training.inputs)} examples of the run's "
                          "training set, of which each step shows the top helpful and harmful")
    models = ensemble_models(run_dir, config, pipeline.unet, training, settings.models, settings.checkpoints, device)
    saved = (None if settings.samples_file is None else
             saved_targets(Path(settings.samples_file), run_dir, settings.num_targets, sample_shape_of(pipeline.unet)))
    drawn_as = target_class(run_dir, pipeline.unet, settings.target_class, saved)
    folder = RunDirectory(run_dir).path / "attribution"
    state = process_state()   # under torchrun, the processes share out the training examples; the main one reports
    if not (resume and folder.is_dir()):
        create_output_directory(folder, "attribution", overwrite=overwrite, resumable=True)   # on every process
    featurized = featurize(models, pipeline.scheduler.alphas_cumprod, training, settings, folder, device,
                           resume=resume, progress=progress and state.is_main_process)
    if not state.is_main_process:
        return None
    targets = draw_targets(pipeline, settings.num_targets, drawn_as, saved, steps=settings.sampling_steps,
                           seed=settings.seed, device=device)
    attributed = [targets.output.step_index(t) for t in settings.steps]
    journey = journey_indices(len(targets.output.timesteps), settings.journey_every, attributed)
    scores = step_scores(featurized, targets, journey, settings, progress)
    columns = [journey.index(index) for index in attributed]
    saved_scores = np.lib.format.open_memmap(folder / "scores.npy", mode="w+", dtype=np.float32,
                                             shape=(len(training.inputs), settings.num_targets, len(columns)))
    saved_scores[:] = scores[:, columns].transpose(0, 2, 1)
    saved_scores.flush()
    constraint_classes = list(config.constraints.classes)
    steps = [step_attribution(int(targets.output.timesteps[index]), scores[:, column], training, settings.top,
                              constraint_classes) for index, column in zip(attributed, columns)]
    shown = in_data_space(targets.output, autoencoder)
    followed, source = (journeys(config, training, shown, scores, journey, steps, device) if settings.journey_every
                        else ([], ""))
    result = dataclasses.replace(
        summary(settings, steps, training, targets, folder, constraint_classes, models, run_dir),
        journeys=followed, posterior_source=source)
    write_json_atomic(folder / "attribution.json", result.to_dict())
    write_figures(result, training, shown, attributed, journey,
                  targets.noisy_inputs if autoencoder is None else None)   # a latent x_t pictures nothing
    write_attribution_report(result, run_dir.name)
    return result
