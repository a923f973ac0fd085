"""Evaluating a trained run: class frequencies, TV to uniform and to Theorem 1's prediction, Frechet
distance, precision and recall against the data the run keeps, RUN/evaluation.json and RUN/report.md.

Samples are reused only when RUN/samples.npz records exactly the drawing evaluation would make; samples of
another drawing are redrawn (and the run says so) only when the caller allows it (`resample`). Under several
processes the sampling is shared and only the main process evaluates and writes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list

from condiff.config import ArgumentError, ConfigError, ExperimentConfig
from condiff.data.datasets import LabelledDataset, take_per_class
from condiff.evaluation.classifier import features_and_labels
from condiff.evaluation.evaluation_data import load_evaluation_sets
from condiff.evaluation.inception import InceptionFIDUnavailable, check_inception_fid, inception_fid
from condiff.evaluation.metrics import SampleMeasures, evaluate_samples, total_variation
from condiff.models import sample_shape_of
from condiff.report import image_md, markdown_table, plot_class_frequencies, plot_training_curves, write_report
from condiff.rundir import RunDirectory, RunDirectoryError, read_metrics, write_json_atomic
from condiff.lifecycle.build import (
    ExperimentData,
    build_data,
    evaluation_classifier,
    load_latent_autoencoder,
    load_pipeline,
    load_run_config,
)
from condiff.lifecycle.sampling import sample_run, sampling_settings
from condiff.runtime import process_state, resolve_device
from condiff.sampling.generate import load_samples


def load_evaluation_data(config: ExperimentConfig, run_dir: Path) -> ExperimentData:
    """What evaluation needs (reference, classifier sets, mixture): the run's own copy when it has one,
    else the data rebuilt from the config (runs made before condiff kept a copy)."""
    path = RunDirectory(run_dir).evaluation_data
    if not path.is_file():
        return build_data(config)
    sets = load_evaluation_sets(path)
    return ExperimentData(sets["reference"], sets["classifier_train"], sets["held_out"], sets["reference"], None)


def describe_difference(found: dict, wanted: dict) -> str:
    return ", ".join(f"{key} {found.get(key)!r} (wanted {value!r})" for key, value in wanted.items()
                     if found.get(key) != value)


def evaluation_samples(run_dir: Path, num_samples: int, device, progress: bool, resample: bool
                       ) -> tuple[np.ndarray, dict]:
    """RUN/samples.npz when it records exactly the drawing evaluation makes (the config's method, steps
    and seed, unguided, `num_samples`, the current model), else freshly drawn into it when there is none or
    `resample` allows replacing it; with its provenance."""
    path = RunDirectory(run_dir).samples_file
    wanted = sampling_settings(run_dir, num_samples=num_samples)
    if path.is_file():
        samples, provenance = load_samples(path)
        difference = describe_difference(provenance, wanted)
        if not difference:
            return samples, provenance
        if not resample:
            raise ArgumentError("resample", f"{path} holds other samples than evaluation draws ({difference}); "
                                "allow it to replace them, or sample the run with the config's settings first")
        if process_state().is_main_process:
            print(f"evaluate: {path} differs from what evaluation draws ({difference}); redrawing", file=sys.stderr)
    sample_run(run_dir, num_samples=num_samples, device=device, progress=progress)
    return load_samples(path)


def evaluate_run(run_dir: Path, *, num_samples: int | None = None, device: str | torch.device | None = None,
                 progress: bool = True, resample: bool = False) -> RunEvaluation:
    """Sample (unless RUN/samples.npz already holds exactly that drawing; samples.npz of another drawing are
    replaced only with `resample`, refused otherwise), classify and compare with the
    data the run keeps: class frequencies, TV to uniform and to Theorem 1's prediction, Frechet distance
    to a balanced reference in the classifier's feature space. Writes RUN/evaluation.json (with the
    samples' provenance), plots and RUN/report.md; returns the result on every process."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    evaluation = config.evaluate
    num_samples = num_samples or evaluation.num_samples or config.sample.num_samples
    if num_samples <= evaluation.nearest_neighbours:   # before anything is drawn: RUN/samples.npz stays as it is
        raise ConfigError(f"num_samples {num_samples}: precision and recall need more samples than their "
                          f"{evaluation.nearest_neighbours} nearest neighbours (evaluate.nearest_neighbours)")
    if evaluation.inception_weights:  # fail before sampling, not after
        try:
            check_inception_fid(evaluation.inception_weights)
        except InceptionFIDUnavailable as err:
            raise ConfigError(f"evaluate.inception_weights: {err}") from None
    # A run that was never trained, a damaged log or summary, data its model does not draw: refused before drawing.
    run = RunDirectory(run_dir).require_model()
    metrics = read_metrics(run.metrics_file)
    summary = run.read_summary()
    data = load_evaluation_data(config, run_dir)
    check_evaluable(run_dir, config, summary, data)
    device = resolve_device(device)
    samples, provenance = evaluation_samples(run_dir, num_samples, device, progress, resample)
    state = process_state()
    result = [measure(run_dir, config, torch.from_numpy(samples), provenance, metrics, summary, data, device)
              if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(result)
    return result[0]


@dataclass
class RunEvaluation(SampleMeasures):
    """What `evaluate` measured of a run's samples (RUN/evaluation.json): the measures of any set of samples
    (`SampleMeasures`, in the feature space of condiff's classifier, or the exact Bayes classifier of a Gaussian
    mixture; FD against a class-balanced reference) and the run's own below."""

    samples: dict                      # how the samples were drawn (their provenance)
    tv_to_uniform: float               # total variation of the class frequencies to uniform
    tv_to_predicted: float             # ... and to the shares Theorem 1 predicts from the multipliers
    predicted_class_shares: list[float]
    data_class_shares: list[float]
    multipliers: dict[str, float]      # the run's final multipliers, by constraint name
    inception_fid: float | None = None

    @classmethod
    def from_dict(cls, values: dict) -> "RunEvaluation":
        """Read evaluation.json, also as written before multipliers were keyed by name."""
        values = {k: v for k, v in values.items() if k in {f.name for f in fields(cls)} | {"constraint_names"}}
        if "constraint_names" in values:
            values["multipliers"] = dict(zip(values.pop("constraint_names"), values["multipliers"]))
        return cls(**{"samples": {}, **values})


def drawn_sample_shape(run_dir: Path, config: ExperimentConfig) -> tuple[int, ...]:
    """The shape of one sample the run draws: its model's, decoded to an image for a latent run."""
    shape = tuple(sample_shape_of(load_pipeline(run_dir).unet))
    autoencoder = load_latent_autoencoder(config, run_dir)
    if autoencoder is None:
        return shape
    scale = 2 ** (len(autoencoder.config.block_out_channels) - 1)   # each encoder level after the first halves
    return (autoencoder.config.out_channels, shape[1] * scale, shape[2] * scale)


def reference_set(config: ExperimentConfig, data: ExperimentData) -> LabelledDataset:
    """The class-balanced reference the samples are compared with, at most evaluate.reference_samples of it."""
    reference, cap = data.reference, config.evaluate.reference_samples
    if cap is not None and cap < len(reference):
        per_class = max(1, cap // reference.num_classes)
        reference = take_per_class(reference, [min(per_class, n) for n in reference.class_counts()], config.data.seed)
    return reference


def check_evaluable(run_dir: Path, config: ExperimentConfig, summary: dict, data: ExperimentData) -> None:
    """Refuse, before anything is drawn, a run whose model draws samples of another shape than its data (a
    config.toml not its own), whose summary.json has the class shares of another number of classes, or whose
    reference set is not finite or too small for precision and recall."""
    run, reference, where = RunDirectory(run_dir), reference_set(config, data), f"{config.data.dataset} data"
    shape = drawn_sample_shape(run_dir, config)
    if shape != tuple(reference.sample_shape):
        raise RunDirectoryError(f"{run.model}: draws samples of shape {shape}, the {where} of {run.config_file} "
                                f"have {tuple(reference.sample_shape)} (is it this run's config?)")
    if len(summary["predicted_class_shares"]) != reference.num_classes:
        raise RunDirectoryError(f"{run.summary_file}: class shares of {len(summary['predicted_class_shares'])} "
                                f"classes, the {where} of {run.config_file} have {reference.num_classes}")
    if not torch.isfinite(reference.data).all():
        raise ConfigError(f"{run.config_file}: the {where} are not all finite numbers (data.means or data.std beyond "
                          "float32?)")
    if len(reference) <= config.evaluate.nearest_neighbours:
        raise ConfigError(f"{run.config_file}: a reference set of {len(reference)} samples (data.per_class, "
                          "evaluate.reference_samples), precision and recall need more than "
                          f"evaluate.nearest_neighbours = {config.evaluate.nearest_neighbours}")


def measure(run_dir: Path, config: ExperimentConfig, samples: torch.Tensor, provenance: dict, metrics: list[dict],
            summary: dict, data: ExperimentData, device) -> RunEvaluation:
    """Evaluate the samples drawn as `provenance` says against the run's `data`; write RUN/evaluation.json and
    RUN/report.md (its training curves: the `metrics` records; its shares and multipliers: the `summary`'s)."""
    run = RunDirectory(run_dir)
    evaluation = config.evaluate
    reference = reference_set(config, data)
    expected = (provenance["num_samples"], *reference.sample_shape)
    if tuple(samples.shape) != expected:   # a file whose provenance matches, but not its array
        raise RunDirectoryError(f"{run.samples_file}: samples of shape {tuple(samples.shape)}, expected {expected} "
                                "for this run")
    classifier, accuracy = evaluation_classifier(config, data, device)
    reference_features, _ = features_and_labels(classifier, reference.data)
    num_classes = reference.num_classes
    measured = evaluate_samples(samples, classifier, accuracy, reference_features, np.full(num_classes, 1 / num_classes),
                                num_classes, nearest_neighbours=evaluation.nearest_neighbours)
    result = RunEvaluation(
        **{f.name: getattr(measured, f.name) for f in fields(SampleMeasures)}, samples=provenance,
        tv_to_uniform=measured.tv_to_target,
        tv_to_predicted=total_variation(measured.class_frequencies, summary["predicted_class_shares"]),
        predicted_class_shares=summary["predicted_class_shares"], data_class_shares=summary["data_class_shares"],
        multipliers={c["name"]: c["multiplier"] for c in summary["constraints"]})
    if evaluation.inception_weights:
        if samples.ndim != 4:
            raise ConfigError("evaluate.inception_weights: Inception FID needs image samples")
        result.inception_fid = inception_fid(samples, reference.data, evaluation.inception_weights, device=device)
    write_json_atomic(run.evaluation_file, result.to_dict())
    write_run_report(run_dir, config, result, metrics, control=summary.get("control"))
    return result


def class_share_rows(result: RunEvaluation) -> list[list]:
    return [[c, result.data_class_shares[c], result.predicted_class_shares[c], result.class_frequencies[c],
             f"[{result.class_frequencies_low[c]:.3f}, {result.class_frequencies_high[c]:.3f}]"]
            for c in range(len(result.class_frequencies))]


def control_reading_md(config: ExperimentConfig, control: dict, result: RunEvaluation) -> str:
    """The last control step's readings beside the evaluated shares: a gap beyond the readings' noise is the
    control sampler's bias or the model's drift since, which a user of measured control needs to see."""
    cons = config.constraints
    rows = [[c, target, smoothed, f"[{low:.3f}, {high:.3f}]", result.class_frequencies[c]]
            for c, target, smoothed, (low, high) in zip(control["classes"], control["targets"], control["smoothed"],
                                                        control["interval_95"])]
    paired = control.get("paired_reference_samples", 0)
    reading = (f"{cons.control_samples} samples of {cons.control_method}-{cons.control_steps}" + (
        f", corrected by {paired} of their noises drawn with {config.sample.method}-{config.sample.steps} as well"
        if paired else ""))
    return (f"The last control step (training step {control.get('step')}) read these shares from {reading}, "
            f"against the evaluated {config.sample.method}-{config.sample.steps} shares: a gap beyond the interval "
            "is the control sampler's bias or the model's change since that step (docs/share-control.md; "
            "benchmarks/control_sampler_bias.py measures the bias).\n\n"
            + markdown_table(["class", "target", "control reading (smoothed)", "last reading's 95% interval",
                              "evaluated share"], rows))


def describe_multipliers(multipliers: dict[str, float]) -> str:
    return ", ".join(f"{name}: {value:.4f}" for name, value in multipliers.items())


def write_run_report(run_dir: Path, config: ExperimentConfig, result: RunEvaluation, metrics: list[dict],
                     control: dict | None = None) -> Path:
    """RUN/report.md with the samples, class frequencies, training curves (of the `metrics` records), a
    table of metrics and, under measured control, its last readings (`control`, summary.json's record)."""
    num_classes = len(result.class_frequencies)
    plot_class_frequencies({config.name: result.class_frequencies}, run_dir / "class_frequencies.png",
                           target=[1.0 / num_classes] * num_classes,
                           intervals={config.name: (result.class_frequencies_low, result.class_frequencies_high)},
                           title="generated class frequencies (95% Wilson intervals); line: uniform")
    plot_training_curves({config.name: metrics}, run_dir / "training_curves.png",
                         constraint_names=list(result.multipliers))
    inception = [] if result.inception_fid is None else ["Inception FID"]
    overview = markdown_table(
        ["samples", "classifier held-out accuracy", "TV to uniform", "TV to Theorem 1 prediction", "Frechet distance (FD)",
         f"precision (k={result.nearest_neighbours})", "recall"] + inception,
        [[result.num_samples, result.classifier_accuracy, result.tv_to_uniform, result.tv_to_predicted,
          result.frechet_distance, result.precision, result.recall]
         + ([] if result.inception_fid is None else [result.inception_fid])])
    per_class = markdown_table(["class", "data share", "Theorem 1 share", "sampled share", "95% interval"],
                               class_share_rows(result))
    multipliers = describe_multipliers(result.multipliers)
    return write_report(run_dir / "report.md", f"condiff run: {config.name}", [
        ("Metrics", overview + f"\n\nFD is a Frechet distance on the features of condiff's own classifier "
         f"against a class-balanced reference set of {result.num_reference} samples (not Inception FID); "
         "precision and recall (k-nearest-neighbour manifolds, Kynkaanniemi et al. 2019) are measured in the "
         "same feature space."),
        ("Class shares", per_class + (f"\n\nFinal multipliers: {multipliers}." if multipliers else "")
         + ("" if control is None else "\n\n" + control_reading_md(config, control, result))
         + "\n\n" + image_md("class_frequencies.png", "class frequencies")),
        ("Samples", image_md("samples.png", "samples")),
        ("Training", image_md("training_curves.png", "training curves")),
    ])


def plot_runs_side_by_side(output: Path, results: dict[str, RunEvaluation], title: str) -> None:
    """output/class_frequencies.png and output/training_curves.png of the runs output/NAME, one per result."""
    num_classes = len(next(iter(results.values())).class_frequencies)
    plot_class_frequencies({n: r.class_frequencies for n, r in results.items()}, output / "class_frequencies.png",
                           target=[1.0 / num_classes] * num_classes,
                           intervals={n: (r.class_frequencies_low, r.class_frequencies_high) for n, r in results.items()},
                           title=f"{title}: generated class frequencies")
    names = max((list(r.multipliers) for r in results.values()), key=len)
    plot_training_curves({n: read_metrics(RunDirectory(output / n).metrics_file) for n in results},
                         output / "training_curves.png", constraint_names=names)
