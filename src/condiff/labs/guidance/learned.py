"""The learned-model part of `condiff guidance-lab`: does the theory's trend hold for learned scores?

Two class-conditional models that condiff trains itself (label dropout, so that classifier-free
guidance applies) are swept over the guidance strength eta with shared noise:
- the reference mixture of docs/guidance-reference.md (unit-variance components at +-(1, 0), target +(1, 0)): the
  learned model's guided samples beside those of the exact noise predictor, run through the same
  diffusers schedulers (DDIM and DDPM), noise and guidance code, so that the only difference is the
  learned score. Confidence is the exact posterior p_0(y | x), diversity the k-NN entropy.
- the embedded 8x8 digits: confidence is condiff's evaluation classifier's probability of the
  requested digit; diversity is the per-class spread of its features (relative to real digits of
  the class) and the per-class Frechet distance to them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from condiff.config import ExperimentConfig, config_from_dict
from condiff.evaluation.classifier import features_and_labels
from condiff.evaluation.metrics import frechet_distance
from condiff.gmm.guidance import knn_entropy, mean_confidence
from condiff.gmm.mixture import ExactNoisePredictor
from condiff.labs.guidance.measures import is_non_decreasing, is_non_increasing
from condiff.report import image_md, markdown_table, new_figure, save_figure, save_sample_grid
from condiff.rundir import write_json_atomic
from condiff.lifecycle.build import build_data, evaluation_classifier, load_pipeline
from condiff.lifecycle.training import train_run
from condiff.sampling.generate import generate, sampling_scheduler
from condiff.sampling.guidance import ClassifierFreeGuidance

LEARNED_ETAS = (0.0, 0.5, 1.0, 2.0, 4.0)
METHODS = ("ddim", "ddpm")
TARGET = 0                                   # +(1, 0) in the reference mixture


@dataclass(frozen=True)
class LearnedSizes:
    mixture_train_steps: int = 2000
    mixture_samples: int = 4000
    mixture_sampling_steps: int = 100
    digits_train_steps: int = 1000
    digits_per_class: int = 100
    digits_sampling_steps: int = 25


FULL_LEARNED = LearnedSizes()
QUICK_LEARNED = LearnedSizes(mixture_train_steps=300, mixture_samples=600, mixture_sampling_steps=20,
                             digits_train_steps=60, digits_per_class=12, digits_sampling_steps=5)


def mixture_config(output: Path, sizes: LearnedSizes) -> ExperimentConfig:
    return config_from_dict({
        "name": "learned-mixture", "output_dir": str(output / "learned-mixture"),
        "data": {"dataset": "gmm", "means": [[1.0, 0.0], [-1.0, 0.0]], "std": 1.0, "per_class": 4000},
        "model": {"kind": "mlp", "hidden": 128, "layers": 3, "class_conditional": True},
        "train": {"steps": sizes.mixture_train_steps, "batch_size": 256, "lr": 2e-3, "warmup_steps": 100,
                  "checkpoint_every": sizes.mixture_train_steps, "label_dropout": 0.2},
    })


def digits_config(output: Path, sizes: LearnedSizes) -> ExperimentConfig:
    return config_from_dict({
        "name": "learned-digits", "output_dir": str(output / "learned-digits"),
        "data": {"dataset": "digits", "held_out_per_class": 30},
        "model": {"kind": "unet8", "class_conditional": True},
        "train": {"steps": sizes.digits_train_steps, "batch_size": 64, "lr": 2e-3, "warmup_steps": 50,
                  "checkpoint_every": sizes.digits_train_steps, "label_dropout": 0.15},
    })


def guided_samples(model, scheduler, method: str, labels: torch.Tensor, eta: float, steps: int) -> torch.Tensor:
    """Guided samples with the same seed (initial and per-step noise) for every eta and model."""
    return generate(model, sampling_scheduler(scheduler, method, guided=True), len(labels), num_inference_steps=steps,
                    batch_size=len(labels), seed=0, class_labels=labels, guidance=ClassifierFreeGuidance(eta),
                    progress=False).samples


# ----------------------------------------------------------------------------------------------------
# The reference mixture: learned beside exact
# ----------------------------------------------------------------------------------------------------

@dataclass
class MixtureCurves:
    etas: list[float]
    confidence: dict[str, list[float]]     # "learned ddim", "exact ddim", ...: E[p_0(y | x)] per eta
    entropy: dict[str, list[float]]        # k-NN entropy (nats) per eta
    largest_confidence_gap: float          # max over eta and sampler of |learned - exact| confidence
    largest_entropy_gap: float             # the same for the k-NN entropy
    num_samples: int
    sampling_steps: int


def measure_learned_mixture(output: Path, sizes: LearnedSizes, etas=LEARNED_ETAS) -> MixtureCurves:
    config = mixture_config(output, sizes)
    run = train_run(config)
    pipeline = load_pipeline(run)
    mixture = build_data(config).mixture
    models = {"learned": pipeline.unet, "exact": ExactNoisePredictor(mixture, pipeline.scheduler.alphas_cumprod)}
    labels = torch.full((sizes.mixture_samples,), TARGET)
    confidence, entropy = {}, {}
    for method in METHODS:
        for name, model in models.items():
            key = f"{name} {method}"
            samples = [guided_samples(model, pipeline.scheduler, method, labels, eta, sizes.mixture_sampling_steps)
                       for eta in etas]
            confidence[key] = [mean_confidence(mixture, s.double(), TARGET) for s in samples]
            entropy[key] = [knn_entropy(s) for s in samples]
    def largest_gap(curves):
        return max(abs(a - b) for m in METHODS for a, b in zip(curves[f"learned {m}"], curves[f"exact {m}"]))

    return MixtureCurves(list(etas), confidence, entropy, largest_gap(confidence), largest_gap(entropy),
                         sizes.mixture_samples, sizes.mixture_sampling_steps)


def plot_learned_mixture(curves: MixtureCurves, path: Path) -> Path:
    figure = new_figure((10, 4))
    left, right = figure.subplots(1, 2)
    for key in curves.confidence:
        style = "-" if key.startswith("learned") else "--"
        left.plot(curves.etas, curves.confidence[key], style, marker="o", label=key)
        right.plot(curves.etas, curves.entropy[key], style, marker="o", label=key)
    left.set(xlabel="guidance strength eta", ylabel="mean confidence E[p_0(y | x)]", title="confidence")
    right.set(xlabel="guidance strength eta", ylabel="k-NN entropy (nats)", title="diversity")
    for axes in (left, right):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    return save_figure(figure, path)


# ----------------------------------------------------------------------------------------------------
# Digits
# ----------------------------------------------------------------------------------------------------

@dataclass
class DigitsCurves:
    etas: list[float]
    confidence: list[float]        # mean classifier probability of the requested digit
    accuracy: list[float]          # share of samples classified as the requested digit
    spread: list[float]            # mean over digits of tr Cov(features), relative to real digits of the class
    frechet_distance: list[float]  # mean over digits of FD to real digits of the class
    classifier_accuracy: float     # the evaluation classifier's held-out accuracy
    per_class: int
    sampling_steps: int


def class_feature_stats(features: np.ndarray, labels: np.ndarray, reference: np.ndarray,
                        reference_labels: np.ndarray, num_classes: int) -> tuple[float, float]:
    """(mean over classes of tr Cov(generated) / tr Cov(real), mean over classes of FD(generated, real))."""
    spreads, distances = [], []
    for c in range(num_classes):
        generated, real = features[labels == c], reference[reference_labels == c]
        spreads.append(np.trace(np.cov(generated, rowvar=False)) / np.trace(np.cov(real, rowvar=False)))
        distances.append(frechet_distance(generated, real))
    return float(np.mean(spreads)), float(np.mean(distances))


def measure_learned_digits(output: Path, sizes: LearnedSizes, etas=LEARNED_ETAS) -> tuple[DigitsCurves, list]:
    """The curves and, per eta, the first samples of every digit (for a grid)."""
    config = digits_config(output, sizes)
    run = train_run(config)
    pipeline = load_pipeline(run)
    data = build_data(config)
    classifier, classifier_accuracy = evaluation_classifier(config, data)
    reference, _ = features_and_labels(classifier, data.reference.data)
    reference_labels = data.reference.labels.numpy()
    num_classes = data.train.num_classes
    labels = torch.arange(num_classes).repeat_interleave(sizes.digits_per_class)
    curves = DigitsCurves(list(etas), [], [], [], [], classifier_accuracy, sizes.digits_per_class,
                          sizes.digits_sampling_steps)
    grids = []
    for eta in etas:
        samples = guided_samples(pipeline.unet, pipeline.scheduler, "ddim", labels, eta,
                                 sizes.digits_sampling_steps).clamp(-1, 1)
        features, predicted = features_and_labels(classifier, samples)
        with torch.no_grad():
            probabilities = torch.softmax(classifier.head(torch.as_tensor(features, dtype=torch.float32)), dim=1)
        curves.confidence.append(probabilities[torch.arange(len(labels)), labels].mean().item())
        curves.accuracy.append(float((predicted == labels.numpy()).mean()))
        spread, distance = class_feature_stats(features, labels.numpy(), reference, reference_labels, num_classes)
        curves.spread.append(spread)
        curves.frechet_distance.append(distance)
        grids.append(samples.view(num_classes, sizes.digits_per_class, *samples.shape[1:])[:, :2])
    return curves, grids


def plot_learned_digits(curves: DigitsCurves, path: Path) -> Path:
    figure = new_figure((13, 3.8))
    confidence, spread, distance = figure.subplots(1, 3)
    confidence.plot(curves.etas, curves.confidence, marker="o", label="mean probability of the digit")
    confidence.plot(curves.etas, curves.accuracy, marker="s", label="share classified as the digit")
    confidence.set(title="confidence", ylabel="condiff classifier")
    spread.plot(curves.etas, curves.spread, marker="o")
    spread.axhline(1.0, color="black", lw=0.8, ls=":")
    spread.set(title="per-digit feature spread / real", ylabel="tr Cov ratio")
    distance.plot(curves.etas, curves.frechet_distance, marker="o")
    distance.set(title="per-digit Frechet distance to real", ylabel="FD")
    for axes in (confidence, spread, distance):
        axes.set_xlabel("guidance strength eta")
        axes.grid(alpha=0.3)
    confidence.legend(fontsize=8)
    return save_figure(figure, path)


# ----------------------------------------------------------------------------------------------------
# Report sections
# ----------------------------------------------------------------------------------------------------

def _trend(values: list[float], rising: bool) -> str:
    return "yes" if (is_non_decreasing if rising else is_non_increasing)(values) else "no"


def _trend_all(curves: dict[str, list[float]], rising: bool) -> str:
    failing = [key for key, values in curves.items() if _trend(values, rising) == "no"]
    return "yes" if not failing else "not for " + ", ".join(failing)


def learned_sections(output: Path, sizes: LearnedSizes = FULL_LEARNED) -> list[tuple[str, str]]:
    """Train both models into `output`, sweep eta, write figures and learned_guidance.json; return the
    report sections (heading, Markdown body)."""
    mixture = measure_learned_mixture(output, sizes)
    plot_learned_mixture(mixture, output / "learned_mixture.png")
    digits, grids = measure_learned_digits(output, sizes)
    plot_learned_digits(digits, output / "learned_digits.png")
    save_sample_grid(torch.cat([g.flatten(0, 1) for g in grids]), output / "learned_digits_samples.png",
                     nrow=len(grids[0]) * 2, title="rows: eta " + ", ".join(f"{e:g}" for e in digits.etas)
                     + "; two samples of each digit 0-9")
    write_json_atomic(output / "learned_guidance.json", {"mixture": asdict(mixture), "digits": asdict(digits)})

    rows = [[key] + values for key, values in mixture.confidence.items()]
    entropy_rows = [[key] + values for key, values in mixture.entropy.items()]
    headers = ["model, sampler"] + [f"eta {e:g}" for e in mixture.etas]
    mixture_body = (
        f"A class-conditional MLP trained by condiff ({sizes.mixture_train_steps} steps, label dropout 0.2) on "
        f"the reference mixture, and the exact noise predictor, sampled for y = +(1, 0) with the same diffusers "
        f"DDIM / DDPM schedulers ({mixture.sampling_steps} steps of the 1000-step training chain, from N(0, I)), "
        f"the same classifier-free guidance code and the same noise; {mixture.num_samples} samples per cell.\n\n"
        "Mean confidence E[p_0(y | x)]:\n\n" + markdown_table(headers, rows)
        + "\n\nk-NN entropy (nats):\n\n" + markdown_table(headers, entropy_rows)
        + f"\n\nLargest |learned - exact| gap: confidence {mixture.largest_confidence_gap:.3f}, entropy "
        f"{mixture.largest_entropy_gap:.3f} nats (guidance multiplies by eta the difference of the learned "
        "conditional and unconditional outputs, and with it their errors). Confidence rises "
        "with eta for every model and sampler: "
        + _trend_all(mixture.confidence, rising=True) + "; entropy falls: " + _trend_all(mixture.entropy, rising=False)
        + ".\n\n" + image_md("learned_mixture.png", "learned vs exact guidance on the mixture"))
    digits_body = (
        f"A class-conditional UNet trained by condiff on the 8x8 digits ({sizes.digits_train_steps} steps, label "
        f"dropout 0.15), classifier-free guidance, DDIM-{digits.sampling_steps} without x0 clipping (see "
        f"`condiff.sample.sampling_scheduler`), {digits.per_class} samples of every digit per eta. Confidence from "
        f"condiff's digits classifier (held-out accuracy {digits.classifier_accuracy:.3f}); diversity from its "
        "features, per digit, against the real digits of the class.\n\n"
        + markdown_table(["eta", "mean probability of the digit", "classified as the digit",
                          "feature spread / real", "per-digit FD"],
                         [[e, c, a, s, d] for e, c, a, s, d in zip(digits.etas, digits.confidence, digits.accuracy,
                                                                   digits.spread, digits.frechet_distance)])
        + f"\n\nConfidence rises monotonically with eta: {_trend(digits.confidence, rising=True)}; feature spread "
        f"falls: {_trend(digits.spread, rising=False)}.\n\n" + image_md("learned_digits.png", "digits sweep")
        + "\n\n" + image_md("learned_digits_samples.png", "guided digits"))
    return [("Learned scores: the reference mixture", mixture_body), ("Learned scores: digits", digits_body)]

