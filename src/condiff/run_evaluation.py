"""Evaluating a trained run: class frequencies, TV to uniform and to Theorem 1's prediction, Frechet
distance, precision and recall against the data the run keeps, RUN/evaluation.json and RUN/report.md.

Samples are reused only when RUN/samples.npz records exactly the drawing evaluation would make;
otherwise they are redrawn, and the run says so. Under several processes the sampling is shared and
only the main process evaluates and writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list

from condiff.config import ConfigError, ExperimentConfig
from condiff.evaluate import (InceptionFIDUnavailable, check_inception_fid, class_frequency_intervals,
                              features_and_labels, frechet_distance, inception_fid, load_or_train_classifier,
                              precision_recall, predict_labels, total_variation)
from condiff.experiment import ExperimentData, load_evaluation_data, load_run_config
from condiff.data import take_per_class
from condiff.gmm import GaussianMixture
from condiff.report import image_md, markdown_table, plot_class_frequencies, plot_training_curves, write_report
from condiff.run_sampling import sample_run, sampling_settings
from condiff.rundir import RunDirectory, read_metrics, write_json_atomic
from condiff.runtime import process_state, resolve_device
from condiff.sample import load_samples


class MixtureBayesClassifier(torch.nn.Module):
    """The exact Bayes classifier of a Gaussian mixture behind the learned classifiers' interface:
    features are the raw coordinates, logits the exact log posterior."""

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.mixture = mixture
        self.register_buffer("anchor", torch.zeros(0))  # gives the module a device

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).double()

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.mixture.log_posterior(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def evaluation_classifier(config: ExperimentConfig, data: ExperimentData, device: str | torch.device | None = None):
    """(classifier, held-out accuracy): the exact Bayes classifier for mixtures, else condiff's own
    classifier trained on balanced data (on `device`) and cached."""
    if data.mixture is not None:
        classifier = MixtureBayesClassifier(data.mixture).to(resolve_device(device))
        accuracy = float((predict_labels(classifier, data.reference.data) == data.reference.labels.numpy()).mean())
        return classifier, accuracy
    key = f"{config.data.dataset}-heldout{config.data.held_out_per_class}-seed{config.data.seed}"
    return load_or_train_classifier(key, data.classifier_train, data.held_out, device=device,
                                    epochs=config.evaluate.classifier_epochs)


def describe_difference(found: dict, wanted: dict) -> str:
    return ", ".join(f"{key} {found.get(key)!r} (wanted {value!r})" for key, value in wanted.items()
                     if found.get(key) != value)


def evaluation_samples(run_dir: Path, num_samples: int, device, progress: bool) -> tuple[np.ndarray, dict]:
    """RUN/samples.npz when it records exactly the drawing evaluation makes (the config's method, steps
    and seed, unguided, `num_samples`, the current model), else freshly drawn; with its provenance."""
    path = RunDirectory(run_dir).samples_file
    wanted = sampling_settings(run_dir, num_samples=num_samples)
    if path.is_file():
        samples, provenance = load_samples(path)
        difference = describe_difference(provenance, wanted)
        if not difference:
            return samples, provenance
        if process_state().is_main_process:
            print(f"evaluate: {path} differs from what evaluation draws ({difference}); redrawing", file=sys.stderr)
    sample_run(run_dir, num_samples=num_samples, device=device, progress=progress)
    return load_samples(path)


def evaluate_run(run_dir: Path, *, num_samples: int | None = None, device: str | torch.device | None = None,
                 progress: bool = True) -> dict:
    """Sample (unless RUN/samples.npz already holds exactly that drawing), classify and compare with the
    data the run keeps: class frequencies, TV to uniform and to Theorem 1's prediction, Frechet distance
    to a balanced reference in the classifier's feature space. Writes RUN/evaluation.json (with the
    samples' provenance), plots and RUN/report.md; returns the result on every process."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    evaluation = config.evaluate
    num_samples = num_samples or evaluation.num_samples or config.sample.num_samples
    if evaluation.inception_weights:  # fail before sampling, not after
        try:
            check_inception_fid(evaluation.inception_weights)
        except InceptionFIDUnavailable as err:
            raise ConfigError(f"evaluate.inception_weights: {err}") from None
    device = resolve_device(device)
    samples, provenance = evaluation_samples(run_dir, num_samples, device, progress)
    state = process_state()
    result = [measure(run_dir, config, torch.from_numpy(samples), provenance, device) if state.is_main_process
              else None]
    if state.num_processes > 1:
        broadcast_object_list(result)
    return result[0]


def measure(run_dir: Path, config: ExperimentConfig, samples: torch.Tensor, provenance: dict, device) -> dict:
    run = RunDirectory(run_dir)
    evaluation = config.evaluate
    data = load_evaluation_data(config, run_dir)
    reference = data.reference
    if evaluation.reference_samples is not None and evaluation.reference_samples < len(reference):
        per_class = max(1, evaluation.reference_samples // reference.num_classes)
        reference = take_per_class(reference, [min(per_class, n) for n in reference.class_counts()], config.data.seed)
    classifier, accuracy = evaluation_classifier(config, data, device)
    features, labels = features_and_labels(classifier, samples)
    reference_features, _ = features_and_labels(classifier, reference.data)
    quality = precision_recall(reference_features, features, evaluation.nearest_neighbours)
    num_classes = reference.num_classes
    intervals = class_frequency_intervals(labels, num_classes)
    summary = run.read_json(run.summary_file)
    uniform = np.full(num_classes, 1.0 / num_classes)
    result = {
        "num_samples": len(samples), "samples": provenance, "classifier_accuracy": accuracy,
        "tv_to_uniform": total_variation(intervals.freq, uniform),
        "tv_to_predicted": total_variation(intervals.freq, summary["predicted_class_shares"]),
        "frechet_distance": frechet_distance(features, reference_features), "num_reference": len(reference),
        "precision": quality.precision, "recall": quality.recall, "nearest_neighbours": evaluation.nearest_neighbours,
        "class_frequencies": intervals.freq.tolist(), "class_frequencies_low": intervals.low.tolist(),
        "class_frequencies_high": intervals.high.tolist(),
        "predicted_class_shares": summary["predicted_class_shares"],
        "data_class_shares": summary["data_class_shares"],
        "multipliers": [c["multiplier"] for c in summary["constraints"]],
        "constraint_names": [c["name"] for c in summary["constraints"]],
    }
    if evaluation.inception_weights:
        if samples.ndim != 4:
            raise ConfigError("evaluate.inception_weights: Inception FID needs image samples")
        result["inception_fid"] = inception_fid(samples, reference.data, evaluation.inception_weights, device=device)
    write_json_atomic(run.evaluation_file, result)
    write_run_report(run_dir, config, result)
    return result


def class_share_rows(result: dict) -> list[list]:
    return [[c, result["data_class_shares"][c], result["predicted_class_shares"][c], result["class_frequencies"][c],
             f"[{result['class_frequencies_low'][c]:.3f}, {result['class_frequencies_high'][c]:.3f}]"]
            for c in range(len(result["class_frequencies"]))]


def write_run_report(run_dir: Path, config: ExperimentConfig, result: dict) -> Path:
    """RUN/report.md with the samples, class frequencies, training curves and a table of metrics."""
    num_classes = len(result["class_frequencies"])
    plot_class_frequencies({config.name: result["class_frequencies"]}, run_dir / "class_frequencies.png",
                           target=[1.0 / num_classes] * num_classes,
                           intervals={config.name: (result["class_frequencies_low"],
                                                    result["class_frequencies_high"])},
                           title="generated class frequencies (95% Wilson intervals); line: uniform")
    metrics = read_metrics(RunDirectory(run_dir).metrics_file)
    plot_training_curves({config.name: metrics}, run_dir / "training_curves.png",
                         constraint_names=result["constraint_names"])
    inception = ["Inception FID"] if "inception_fid" in result else []
    overview = markdown_table(
        ["samples", "classifier held-out accuracy", "TV to uniform", "TV to Theorem 1 prediction", "Frechet distance (FD)",
         f"precision (k={result['nearest_neighbours']})", "recall"] + inception,
        [[result["num_samples"], result["classifier_accuracy"], result["tv_to_uniform"], result["tv_to_predicted"],
          result["frechet_distance"], result["precision"], result["recall"]]
         + [result[k] for k in ("inception_fid",) if k in result]])
    per_class = markdown_table(["class", "data share", "Theorem 1 share", "sampled share", "95% interval"],
                               class_share_rows(result))
    multipliers = ", ".join(f"{name}: {m:.4f}" for name, m in zip(result["constraint_names"], result["multipliers"]))
    return write_report(run_dir / "report.md", f"condiff run: {config.name}", [
        ("Metrics", overview + f"\n\nFD is a Frechet distance on the features of condiff's own classifier "
         f"against a class-balanced reference set of {result['num_reference']} samples (not Inception FID); "
         "precision and recall (k-nearest-neighbour manifolds, Kynkaanniemi et al. 2019) are measured in the "
         "same feature space."),
        ("Class shares", per_class + (f"\n\nFinal multipliers: {multipliers}." if multipliers else "")
         + "\n\n" + image_md("class_frequencies.png", "class frequencies")),
        ("Samples", image_md("samples.png", "samples")),
        ("Training", image_md("training_curves.png", "training curves")),
    ])
