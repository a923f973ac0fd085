"""From a validated config to datasets, model, constraints and a trained run directory.

This is the glue the CLI calls; a user can do the same from Python:
`train_run(load_config("configs/digits-minority.toml"))`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tomli_w
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from diffusers.utils import logging as diffusers_logging

from condiff.checkpoint import (RunDirectoryError, check_run_directory, prepare_run_directory, save_pretrained_atomic,
                                write_text_atomic)
from condiff.config import ConfigError, ExperimentConfig, config_from_dict
from condiff.constraints import Constraint, DatasetTerm, PretrainedModelTerm
from condiff.data import (DataError, LabelledDataset, balanced_counts, gaussian_mixture_dataset,
                          load_digits_dataset, load_fashion_mnist, load_idx, load_image_csv, load_image_folder,
                          load_mnist_5k, resize_images, split_per_class, take_per_class)
from condiff.evaluate import (InceptionFIDUnavailable, check_inception_fid, class_frequency_intervals,
                              features_and_labels, frechet_distance, inception_fid, load_or_train_classifier,
                              precision_recall, predict_labels, total_variation)
from condiff.dual import (InfeasibleConstraints, multipliers_for_target_shares, multipliers_from_kl_bounds, predicted_shares,
                          relaxation_costs_for_multipliers)
from condiff.gmm import GaussianMixture
from condiff.guidance import (GUIDANCE_KINDS, ClassifierFreeGuidance, ClassifierGuidance, NoiseAwareClassifier,
                              noisy_accuracy, train_noise_aware_classifier)
from condiff.latent import (AutoencoderLoadError, decode_latents, encode_dataset, load_autoencoder, save_autoencoder,
                            train_autoencoder)
from condiff.models import build_model, null_class_label, sample_shape_of
from condiff.report import (image_md, markdown_table, plot_class_frequencies, plot_training_curves, read_metrics,
                            save_sample_grid, write_report)
from condiff.sample import generate, sampling_scheduler
from condiff.train import train


@dataclass
class ExperimentData:
    train: LabelledDataset          # what the diffusion model is trained on (possibly imbalanced)
    classifier_train: LabelledDataset | None   # balanced data for the evaluation classifier
    held_out: LabelledDataset | None          # never trained on: the classifier's accuracy
    reference: LabelledDataset      # balanced reference set for the Frechet distance
    mixture: GaussianMixture | None  # exact ground truth for Gaussian-mixture data


def class_counts(config: ExperimentConfig, available: list[int]) -> list[int]:
    data = config.data
    counts = [data.per_class if data.per_class is not None else n for n in available]
    for key, count in data.class_counts.items():
        counts[int(key)] = count
    for label, (count, have) in enumerate(zip(counts, available)):
        if count > have:
            raise ConfigError(f"data.class_counts.{label}: class {label} has {have} training samples, "
                              f"{count} requested")
    return counts


def load_dataset(config: ExperimentConfig) -> LabelledDataset:
    """The whole labelled image dataset a config names; missing or malformed data is a ConfigError."""
    data = config.data
    resolution, channels = data.resolution or 32, data.channels or 3   # image-folder / image-csv defaults
    try:
        if data.dataset == "digits":
            return load_digits_dataset()
        if data.dataset == "image-folder":
            return load_image_folder(data.path, resolution, channels)
        if data.dataset == "image-csv":
            return load_image_csv(data.path, data.labels_path, data.column, resolution, channels)
        if data.dataset == "mnist":
            full = load_mnist_5k()
        elif data.dataset == "fashion-mnist":
            full = load_fashion_mnist(data.path)
        else:
            full = load_idx(data.path, data.labels_path)
        return resize_images(full, data.resolution) if data.resolution else full   # IDX: native 28x28
    except DataError as err:
        raise ConfigError(f"data: {err}") from None


def build_data(config: ExperimentConfig) -> ExperimentData:
    data = config.data
    if data.dataset == "gmm":
        counts = [data.class_counts.get(str(k), data.per_class) for k in range(len(data.means))]
        mixture = GaussianMixture.from_lists(data.means, std=data.std)
        reference_counts = [max(counts)] * len(counts)
        return ExperimentData(gaussian_mixture_dataset(data.means, data.std, counts, data.seed), None, None,
                              gaussian_mixture_dataset(data.means, data.std, reference_counts, data.seed + 1),
                              mixture)
    # Every image dataset: hold out per class for the evaluation classifier, train on per-class counts
    # of the rest, and keep balanced sets for the classifier and the Frechet reference.
    full = load_dataset(config)
    if data.max_per_class is not None:
        full = take_per_class(full, [min(n, data.max_per_class) for n in full.class_counts()], data.seed)
    for label, count in enumerate(full.class_counts()):
        if count <= data.held_out_per_class:
            raise ConfigError(f"data.held_out_per_class: class {label} of {full.name} has {count} samples, "
                              f"{data.held_out_per_class} of them would be held out and none left to train on")
    pool, held_out = split_per_class(full, data.held_out_per_class, data.seed)
    counts = class_counts(config, pool.class_counts())
    return ExperimentData(take_per_class(pool, counts, data.seed), take_per_class(pool, balanced_counts(pool)),
                          held_out, take_per_class(full, balanced_counts(full)), None)


def build_noise_scheduler(config: ExperimentConfig, pixels: bool) -> DDPMScheduler:
    """The training noise schedule; x0 predictions are clipped to [-1, 1] by default only for pixels
    (vectors and unit-variance latents range wider)."""
    d = config.diffusion
    clip = pixels if d.clip_sample is None else d.clip_sample
    return DDPMScheduler(num_train_timesteps=d.num_train_timesteps, beta_schedule=d.beta_schedule,
                         beta_start=d.beta_start, beta_end=d.beta_end, clip_sample=clip)


def build_constraints(config: ExperimentConfig, train_set: LabelledDataset, noise_scheduler) -> list[Constraint]:
    """One constraint per listed class: its denoising loss on that class's training samples."""
    cons = config.constraints
    if not cons.classes:
        return []
    m = len(cons.classes)
    thresholds = cons.thresholds or [0.0] * m
    if cons.gamma is not None:
        gammas = [cons.gamma] * m
    elif cons.thresholds is not None:
        gammas = [0.0] * m
    else:
        mode = "target_shares" if cons.target_shares is not None else "kl_bounds"
        shares = np.asarray(train_set.class_counts()) / len(train_set)
        try:
            target = (multipliers_for_target_shares(shares, cons.classes, cons.target_shares)
                      if cons.target_shares is not None else multipliers_from_kl_bounds(cons.kl_bounds))
            gammas = relaxation_costs_for_multipliers(cons.reference_loss, target).tolist()
        except InfeasibleConstraints as err:
            raise ConfigError(f"constraints.{mode}: {err}") from None
    dropout = config.train.label_dropout
    return [Constraint(DatasetTerm(f"class {c}", train_set.of_class(c), noise_scheduler, dropout), b, g)
            for c, b, g in zip(cons.classes, thresholds, gammas)]


def load_latent_autoencoder(config: ExperimentConfig):
    """The frozen AutoencoderKL of a latent-diffusion config, or None when the model works on pixels."""
    if config.latent.autoencoder is None:
        return None
    try:
        return load_autoencoder(Path(config.latent.autoencoder).expanduser())
    except AutoencoderLoadError as err:
        raise ConfigError(f"latent.autoencoder: {err}") from None


def pretrained_models(config: ExperimentConfig, sample_shape, noise_scheduler: DDPMScheduler):
    """(model to train, frozen reference): two copies of the pretrained run's network."""
    import copy

    pipeline = load_pipeline(Path(config.finetune.pretrained))
    schedule_keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")
    if any(pipeline.scheduler.config[k] != noise_scheduler.config[k] for k in schedule_keys):
        raise ConfigError(f"diffusion: differs from the noise schedule of finetune.pretrained "
                          f"({config.finetune.pretrained})")
    if tuple(sample_shape_of(pipeline.unet)) != tuple(sample_shape):
        raise ConfigError(f"finetune.pretrained: its model makes samples of shape {tuple(sample_shape_of(pipeline.unet))}, "
                          f"the data has {tuple(sample_shape)}")
    return copy.deepcopy(pipeline.unet).train(), pipeline.unet


def differing_fields(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two nested config dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differing_fields(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def run_directory(config: ExperimentConfig) -> Path:
    return Path(config.output_dir)


def train_run(config: ExperimentConfig, *, resume: bool = False, overwrite: bool = False, on_step=None,
              accelerator=None) -> Path:
    """Train the model a config describes into its run directory; returns the directory."""
    from accelerate import Accelerator

    run_dir = run_directory(config)
    accelerator = accelerator or Accelerator(mixed_precision=config.train.mixed_precision)
    data = build_data(config)
    autoencoder = load_latent_autoencoder(config)
    # Latent diffusion: the training set (and with it every class constraint's set) is encoded once,
    # up front; from here on the run is ordinary diffusion on those tensors.
    train_set = data.train if autoencoder is None else encode_dataset(autoencoder.to(accelerator.device), data.train)
    noise_scheduler = build_noise_scheduler(config, pixels=len(train_set.sample_shape) == 3 and autoencoder is None)
    torch.manual_seed(config.train.seed)
    if config.finetune.pretrained:
        model, pretrained = pretrained_models(config, train_set.sample_shape, noise_scheduler)
    else:
        model_options = ({"hidden": config.model.hidden, "layers": config.model.layers} if config.model.kind == "mlp"
                         else {"block_out_channels": config.model.block_out_channels})
        if config.model.class_conditional:  # one embedding per class and one for "no class"
            model_options["num_class_embeds"] = train_set.num_classes + 1
        try:
            model = build_model(config.model.kind, train_set.sample_shape, **model_options)
        except ValueError as err:
            raise ConfigError(f"model.kind: {err}") from None
    constraints = build_constraints(config, train_set, noise_scheduler)
    if config.finetune.threshold is not None:
        tune = config.finetune
        term = PretrainedModelTerm("pretrained", pretrained.to(accelerator.device), noise_scheduler,
                                   train_set.sample_shape, inputs=tune.inputs,
                                   trajectory_samples=tune.trajectory_samples, keep_per_trajectory=tune.states_per_trajectory,
                                   trajectory_steps=tune.trajectory_steps,
                                   seed=config.train.seed, progress=accelerator.is_main_process)
        constraints.append(Constraint(term, tune.threshold))
    objective = DatasetTerm("data", train_set, noise_scheduler, config.train.label_dropout)

    # Only now, with everything built and checked, is anything written.
    # Every process checks (so a refusal exits all of them instead of leaving some at a barrier);
    # then the main process alone writes.
    check_run_directory(run_dir, resume=resume, overwrite=overwrite)
    if resume:
        changed = differing_fields(load_run_config(run_dir).to_dict(), config.to_dict())
        if changed:
            raise ConfigError(f"{run_dir / 'config.toml'}: cannot resume with a different config "
                              f"(changed: {', '.join(changed)})")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        prepare_run_directory(run_dir, resume=resume, overwrite=overwrite)
        if not resume:
            write_text_atomic(run_dir / "config.toml", tomli_w.dumps(config.to_dict()))
    accelerator.wait_for_everyone()

    result = train(model, noise_scheduler, objective, constraints, config.train, config.dual, run_dir,
                   resume=resume, on_step=on_step, accelerator=accelerator)
    if accelerator.is_main_process:
        DDPMPipeline(unet=result.model, scheduler=noise_scheduler).save_pretrained(run_dir / "model")
        shares = np.asarray(data.train.class_counts()) / len(data.train)
        classes = config.constraints.classes
        lam = dict(zip(classes, result.multipliers))
        reference = {}
        if config.finetune.threshold is not None:  # the pretrained model's own predicted shares join the mixture
            pretrained_summary = json.loads((Path(config.finetune.pretrained) / "summary.json").read_text())
            reference = {"reference_shares": pretrained_summary["predicted_class_shares"],
                         "reference_multiplier": result.multipliers[len(classes)]}
        summary = {"steps": result.step, "data_class_shares": shares.tolist(),
                   "constraints": [{"name": c.name, "threshold": c.threshold, "relaxation_cost": c.relaxation_cost,
                                    "multiplier": l} for c, l in zip(constraints, result.multipliers)],
                   "predicted_class_shares": predicted_shares(shares, lam, **reference).tolist()}
        write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
    accelerator.wait_for_everyone()
    return run_dir


def train_autoencoder_for(config: ExperimentConfig, output: Path, *, steps: int, overwrite: bool = False,
                          block_out_channels: tuple[int, ...] = (16, 32), latent_channels: int = 4,
                          progress: bool = True) -> Path:
    """Train condiff's small AutoencoderKL on the images a config trains on and save it to `output`
    (diffusers format, safetensors), for `latent.autoencoder`. An existing folder is kept unless
    `overwrite`; the new one replaces it atomically."""
    data = build_data(config)
    if len(data.train.sample_shape) != 3:
        raise ConfigError(f"data.dataset: an autoencoder needs images, the {config.data.dataset} data are vectors")
    output = Path(output)
    if output.exists() and not overwrite:
        raise RunDirectoryError(f"{output}: exists; pass --overwrite to replace it")
    try:
        vae = train_autoencoder(data.train, steps=steps, seed=config.train.seed, latent_channels=latent_channels,
                                block_out_channels=tuple(block_out_channels), progress=progress)
    except ValueError as err:  # widths that cannot halve the image size
        raise ConfigError(f"autoencoder: {err}") from None
    return save_autoencoder(vae, output)


def load_run_config(run_dir: Path) -> ExperimentConfig:
    import tomllib

    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise ConfigError(f"{path}: not a condiff run directory (config.toml missing)")
    return config_from_dict(tomllib.loads(path.read_text()), str(path))


def load_pipeline(run_dir: Path) -> DDPMPipeline:
    path = Path(run_dir) / "model"
    if not (path / "model_index.json").is_file():
        raise RunDirectoryError(f"{run_dir}: no trained model (model/model_index.json missing); "
                                "train it first or resume it with condiff train --resume")
    # An MLP denoiser in the pipeline's `unet` slot is intended; diffusers would warn about its type.
    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return DDPMPipeline.from_pretrained(path, use_safetensors=True)
    finally:
        diffusers_logging.set_verbosity(previous)


NOISE_CLASSIFIER_DIR = "noise_classifier"     # RUN/noise_classifier: p_phi(y | x_t, t) for classifier guidance


def sample_run(run_dir: Path, *, num_samples: int | None = None, method: str | None = None,
               steps: int | None = None, seed: int | None = None, batch_size: int | None = None,
               record_x0: bool = False, class_label: int | None = None, guidance: float = 0.0,
               guidance_kind: str | None = None, progress: bool = True) -> Path:
    """Sample a trained run into RUN/samples.npz and a PNG grid RUN/samples.png; returns the .npz path.
    A latent-diffusion run's samples are decoded to images (its latents are kept beside them).

    `class_label` samples one class: a class-conditional model by its label, an unconditional one
    through its noise-aware classifier (`train_noise_classifier_run`). `guidance` = eta > 0 sharpens
    that class (condiff.guidance): `guidance_kind` "cfg" (classifier-free; the default for
    class-conditional models) or "classifier". Class samples go to RUN/samples-class{C}-{kind}{eta}.npz,
    so that RUN/samples.npz stays the unconditional samples `evaluate` reads."""
    run_dir = Path(run_dir)
    run_config = load_run_config(run_dir)
    config = run_config.sample
    autoencoder = load_latent_autoencoder(run_config)
    pipeline = load_pipeline(run_dir)
    n = num_samples or config.num_samples
    guide, labels, path, title = run_guidance(run_dir, pipeline, class_label, guidance, guidance_kind, n)
    scheduler = sampling_scheduler(pipeline.scheduler, method or config.method, guided=guide is not None)
    output = generate(pipeline.unet, scheduler, n, num_inference_steps=steps or config.steps,
                      batch_size=batch_size or config.batch_size, seed=config.seed if seed is None else seed,
                      record_x0=record_x0, class_labels=labels, guidance=guide, progress=progress)
    if guide is not None and pipeline.scheduler.config.clip_sample:
        output.samples.clamp_(-1.0, 1.0)   # the data range, which unclipped guided steps may overshoot
    if autoencoder is not None:
        output.latents, output.samples = output.samples, decode_latents(autoencoder, output.samples)
    output.save_npz(path)
    save_sample_grid(output.samples[:256], path.with_suffix(".png"), title=f"{run_dir.name}: {title}")
    return path


def run_guidance(run_dir: Path, pipeline: DDPMPipeline, class_label: int | None, scale: float,
                 kind: str | None, num_samples: int):
    """(guidance object or None, class labels or None, output path, title) for `sample_run`."""
    if class_label is None:
        if scale or kind:
            raise ConfigError("--guidance: needs --class, the class to guide towards")
        return None, None, run_dir / "samples.npz", "samples"
    if scale < 0:
        raise ConfigError(f"--guidance: must be non-negative, got {scale}")
    null = null_class_label(pipeline.unet)
    kind = kind or ("cfg" if null is not None else "classifier")
    if kind not in GUIDANCE_KINDS:
        raise ConfigError(f"--guidance-kind: {kind!r} is not one of {', '.join(GUIDANCE_KINDS)}")
    if kind == "cfg" and null is None:
        raise ConfigError(f"--guidance-kind cfg: the model of {run_dir} is not class-conditional (train it with "
                          "model.class_conditional = true and train.label_dropout > 0), use classifier guidance")
    classifier = load_noise_classifier(run_dir) if kind == "classifier" else None
    num_classes = null if null is not None else classifier.config.num_classes
    if not 0 <= class_label < num_classes:
        raise ConfigError(f"--class: {run_dir} has classes 0-{num_classes - 1}, not {class_label}")
    if kind == "cfg":
        guide = ClassifierFreeGuidance(scale) if scale else None   # eta = 0: the conditional model itself
    else:
        guide = ClassifierGuidance(classifier, scale, pipeline.scheduler.alphas_cumprod)
    labels = torch.full((num_samples,), class_label, dtype=torch.long)
    title = f"class {class_label}, {'classifier-free' if kind == 'cfg' else 'classifier'} guidance {scale:g}"
    return guide, labels, run_dir / f"samples-class{class_label}-{kind}{scale:g}.npz", title


def load_noise_classifier(run_dir: Path) -> NoiseAwareClassifier:
    path = Path(run_dir) / NOISE_CLASSIFIER_DIR
    if not (path / "config.json").is_file():
        raise RunDirectoryError(f"{path}: no noise-aware classifier; train one with `condiff noise-classifier "
                                f"{run_dir}` for classifier guidance")
    return NoiseAwareClassifier.from_pretrained(path, use_safetensors=True).eval()


def train_noise_classifier_run(run_dir: Path, *, steps: int = 2000, overwrite: bool = False,
                               progress: bool = True) -> dict:
    """Train p_phi(y | x_t, t) on a run's training data (its latents, for a latent run) into
    RUN/noise_classifier (safetensors, atomically); returns its accuracy on held-out data noised to
    t = 0, 250, 500, 750 (of 1000), also written to RUN/noise_classifier/accuracy.json."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    pipeline = load_pipeline(run_dir)
    path = run_dir / NOISE_CLASSIFIER_DIR
    if path.exists() and not overwrite:
        raise RunDirectoryError(f"{path}: exists; pass --overwrite to retrain it")
    data = build_data(config)
    held_out = data.held_out if data.held_out is not None else data.reference
    autoencoder = load_latent_autoencoder(config)
    if autoencoder is not None:
        data.train, held_out = encode_dataset(autoencoder, data.train), encode_dataset(autoencoder, held_out)
    classifier = train_noise_aware_classifier(data.train, pipeline.scheduler, steps=steps, seed=config.train.seed,
                                              progress=progress)
    chain = pipeline.scheduler.config.num_train_timesteps
    accuracy = noisy_accuracy(classifier, held_out, pipeline.scheduler, [0, chain // 4, chain // 2, 3 * chain // 4])
    save_pretrained_atomic(classifier, path)
    write_text_atomic(path / "accuracy.json", json.dumps({str(t): a for t, a in accuracy.items()}, indent=1))
    return accuracy


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


def evaluation_classifier(config: ExperimentConfig, data: ExperimentData):
    """(classifier, held-out accuracy): the exact Bayes classifier for mixtures, else condiff's own
    classifier trained on balanced data and cached."""
    if data.mixture is not None:
        classifier = MixtureBayesClassifier(data.mixture)
        accuracy = float((predict_labels(classifier, data.reference.data) == data.reference.labels.numpy()).mean())
        return classifier, accuracy
    key = f"{config.data.dataset}-heldout{config.data.held_out_per_class}-seed{config.data.seed}"
    return load_or_train_classifier(key, data.classifier_train, data.held_out,
                                    epochs=config.evaluate.classifier_epochs)


def evaluate_run(run_dir: Path, *, num_samples: int | None = None, progress: bool = True) -> dict:
    """Sample (unless RUN/samples.npz already holds `num_samples`), classify and compare with the data:
    class frequencies, TV to uniform and to Theorem 1's prediction, Frechet distance to a balanced
    reference in the classifier's feature space. Writes RUN/evaluation.json, plots and RUN/report.md."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    evaluation = config.evaluate
    num_samples = num_samples or evaluation.num_samples or config.sample.num_samples
    if evaluation.inception_weights:  # fail before sampling, not after
        try:
            check_inception_fid(evaluation.inception_weights)
        except InceptionFIDUnavailable as err:
            raise ConfigError(f"evaluate.inception_weights: {err}") from None
    samples_path = run_dir / "samples.npz"
    if not samples_path.is_file() or len(np.load(samples_path)["samples"]) != num_samples:
        sample_run(run_dir, num_samples=num_samples, progress=progress)
    samples = torch.from_numpy(np.load(samples_path)["samples"])
    data = build_data(config)
    reference = data.reference
    if evaluation.reference_samples is not None and evaluation.reference_samples < len(reference):
        per_class = max(1, evaluation.reference_samples // reference.num_classes)
        reference = take_per_class(reference, [min(per_class, n) for n in reference.class_counts()], config.data.seed)
    classifier, accuracy = evaluation_classifier(config, data)
    features, labels = features_and_labels(classifier, samples)
    reference_features, _ = features_and_labels(classifier, reference.data)
    quality = precision_recall(reference_features, features, evaluation.nearest_neighbours)
    num_classes = data.train.num_classes
    intervals = class_frequency_intervals(labels, num_classes)
    summary = json.loads((run_dir / "summary.json").read_text())
    uniform = np.full(num_classes, 1.0 / num_classes)
    result = {
        "num_samples": num_samples, "classifier_accuracy": accuracy,
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
        result["inception_fid"] = inception_fid(samples, reference.data, evaluation.inception_weights)
    write_text_atomic(run_dir / "evaluation.json", json.dumps(result, indent=1))
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
    metrics = read_metrics(run_dir / "metrics.jsonl")
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
