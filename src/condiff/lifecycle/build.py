"""From a validated config to what training needs: the datasets (and the sets evaluation compares
with), the files a config names checked, the noise schedule, the constraints, the latent autoencoder,
and the pretrained model a fine-tuning run starts from."""


from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from diffusers.utils import logging as diffusers_logging
from safetensors import SafetensorError

from condiff.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    check_classes,
    config_from_dict,
    image_channels,
    known_num_classes,
)
from condiff.data.datasets import (
    DataError,
    DataNotFound,
    LabelledDataset,
    balanced_counts,
    gaussian_mixture_dataset,
    load_digits_dataset,
    load_fashion_mnist,
    load_idx,
    load_idx_labels,
    load_mnist_5k,
    resize_images,
    split_per_class,
    take_per_class,
)
from condiff.data.images import image_folder_classes, load_image_csv, load_image_folder
from condiff.data.latent import AutoencoderLoadError, decode_latents, load_autoencoder
from condiff.evaluation.classifier import MixtureBayesClassifier, load_or_train_classifier, predict_labels
from condiff.gmm.mixture import GaussianMixture
from condiff.models import build_model, sample_shape_of
from condiff.rundir import RunDirectory, RunDirectoryError
from condiff.runtime import resolve_device
from condiff.sampling.generate import sampling_scheduler
from condiff.training.control import MeasuredShareControl, ShareController
from condiff.training.dual import InfeasibleConstraints, multipliers_for_target_shares, multipliers_from_kl_bounds
from condiff.training.terms import Constraint, DatasetTerm, PretrainedModelTerm


class MissingData(ConfigError):
    """The dataset a config names is not on this machine (optional data: see `make data`)."""


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
        counts[key] = count
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
    except DataNotFound as err:
        raise MissingData(f"data: {err}") from None
    except DataError as err:
        raise ConfigError(f"data: {err}") from None


def dataset_num_classes(data: DataConfig) -> int:
    """Classes of the configured dataset; reads an image folder's sub-folders and an IDX labels file."""
    if data.dataset not in ("image-folder", "idx"):
        return known_num_classes(data)
    try:
        if data.dataset == "image-folder":
            return len(image_folder_classes(data.path))
        return int(load_idx_labels(data.labels_path).max()) + 1
    except DataError as err:
        field_name = "path" if data.dataset == "image-folder" else "labels_path"
        raise ConfigError(f"data.{field_name}: {err}") from None


def _check_autoencoder_file(config: ExperimentConfig) -> None:
    """The autoencoder must be a diffusers AutoencoderKL folder that takes the data's images."""
    path, channels = config.latent.autoencoder, image_channels(config.data)
    if path is None:
        return
    file = Path(path).expanduser() / "config.json"
    try:
        vae_config = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"latent.autoencoder: {file} not found; give a diffusers AutoencoderKL folder "
                          "(e.g. Stable Diffusion's vae/) or make one with `condiff autoencoder CONFIG`") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"latent.autoencoder: {file} is unreadable ({err})") from None
    if vae_config.get("_class_name") != "AutoencoderKL":
        raise ConfigError(f"latent.autoencoder: {file} describes {vae_config.get('_class_name')!r}, not an AutoencoderKL")
    if vae_config.get("in_channels") != channels:
        raise ConfigError(f"latent.autoencoder: it takes {vae_config.get('in_channels')}-channel images, "
                          f"the {config.data.dataset} data have {channels}")


def check_inputs(config: ExperimentConfig, source: str = "config") -> None:
    """Check the files a config reads before it trains: the dataset's classes (image folders, IDX labels),
    the pretrained run, the autoencoder. Errors name `source` and the field."""
    try:
        if known_num_classes(config.data) is None:
            check_classes(config, dataset_num_classes(config.data))
        pretrained = config.finetune.pretrained
        if pretrained and not (RunDirectory(pretrained).model / "model_index.json").is_file():
            raise ConfigError(f"finetune.pretrained: {pretrained} is not a trained condiff run "
                              "(model/model_index.json missing)")
        _check_autoencoder_file(config)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def build_data(config: ExperimentConfig) -> ExperimentData:
    data = config.data
    if data.dataset == "gmm":
        counts = [data.class_counts.get(k, data.per_class) for k in range(len(data.means))]
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
    thresholds, gammas, fixed = cons.thresholds or [0.0] * m, [cons.gamma or 0.0] * m, [None] * m
    if cons.target_shares is not None or cons.kl_bounds is not None:
        # Theorems 1 and 2 give the optimal multipliers in closed form: held there, the Lagrangian's
        # minimiser is exactly the requested mixture, whatever the constraint losses turn out to be.
        mode = "target_shares" if cons.target_shares is not None else "kl_bounds"
        shares = np.asarray(train_set.class_counts()) / len(train_set)
        try:
            fixed = (multipliers_for_target_shares(shares, cons.classes, cons.target_shares)
                     if cons.target_shares is not None else multipliers_from_kl_bounds(cons.kl_bounds)).tolist()
        except InfeasibleConstraints as err:
            raise ConfigError(f"constraints.{mode}: {err}") from None
    dropout = config.train.label_dropout
    return [Constraint(DatasetTerm(f"class {c}", train_set.of_class(c), noise_scheduler, dropout), b, g, lam)
            for c, b, g, lam in zip(cons.classes, thresholds, gammas, fixed)]


def build_share_control(config: ExperimentConfig, data: ExperimentData, constraints: list[Constraint],
                        noise_scheduler: DDPMScheduler, accelerator, autoencoder=None) -> MeasuredShareControl | None:
    """Measured control of the target shares (`constraints.control = "measured"`), labelled by the run's
    evaluation classifier (trained by the main process first, then loaded from the cache by the others);
    None for runs that do not ask for it."""
    cons = config.constraints
    if cons.control != "measured":
        return None
    with accelerator.main_process_first():
        classifier, _ = evaluation_classifier(config, data, accelerator.device)
    classifier.eval()

    def label(samples: torch.Tensor) -> torch.Tensor:
        return classifier(samples.to(accelerator.device)).argmax(1)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(autoencoder, latents)

    data_shares = np.asarray(data.train.class_counts())[cons.classes] / len(data.train)
    controller = ShareController(cons.target_shares, [c.fixed_multiplier for c in constraints[:len(cons.classes)]],
                                 data_shares, rate=cons.control_rate, smoothing=cons.control_smoothing,
                                 bound=cons.control_bound, proportional=cons.control_proportional)
    return MeasuredShareControl(controller, cons.classes, label, sampling_scheduler(noise_scheduler, cons.control_method),
                                every=cons.control_every, first_step=math.ceil(cons.control_start * config.train.steps),
                                samples=cons.control_samples, steps=cons.control_steps, seed=config.train.seed,
                                decode=None if autoencoder is None else decode,
                                reference=(sampling_scheduler(noise_scheduler, config.sample.method), config.sample.steps,
                                           cons.control_reference_samples))


def load_latent_autoencoder(config: ExperimentConfig, run_dir: Path | None = None):
    """The frozen AutoencoderKL of a latent-diffusion config (the run's own copy when `run_dir` has one),
    or None when the model works on pixels."""
    if config.latent.autoencoder is None:
        return None
    copy = RunDirectory(run_dir).autoencoder if run_dir is not None else None
    try:
        if copy is not None and copy.is_dir():
            return load_autoencoder(copy)
        return load_autoencoder(Path(config.latent.autoencoder).expanduser())
    except AutoencoderLoadError as err:
        raise ConfigError(f"latent.autoencoder: {err}") from None


def build_network(config: ExperimentConfig, train_set: LabelledDataset, noise_scheduler: DDPMScheduler):
    """(network to train, frozen pretrained network or None): a fresh model, or two copies of the
    pretrained run's for fine-tuning."""
    torch.manual_seed(config.train.seed)
    if config.finetune.pretrained:
        return pretrained_models(config, train_set.sample_shape, noise_scheduler)
    options = ({"hidden": config.model.hidden, "layers": config.model.layers} if config.model.kind == "mlp"
               else {"block_out_channels": config.model.block_out_channels})
    if config.model.class_conditional:  # one embedding per class and one for "no class"
        options["num_class_embeds"] = train_set.num_classes + 1
    try:
        return build_model(config.model.kind, train_set.sample_shape, **options), None
    except ValueError as err:
        raise ConfigError(f"model.kind: {err}") from None


def pretrained_constraint(config: ExperimentConfig, pretrained, sample_shape, noise_scheduler: DDPMScheduler, *,
                          progress: bool) -> Constraint:
    """Fine-tuning's constraint: stay within finetune.threshold of the frozen pretrained model."""
    tune = config.finetune
    term = PretrainedModelTerm("pretrained", pretrained, noise_scheduler, sample_shape, inputs=tune.inputs,
                               trajectory_samples=tune.trajectory_samples,
                               keep_per_trajectory=tune.states_per_trajectory, trajectory_steps=tune.trajectory_steps,
                               seed=config.train.seed, progress=progress)
    return Constraint(term, tune.threshold)


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


def load_run_config(run_dir: Path) -> ExperimentConfig:
    """A run's stored config, validated without touching the data or runs it was trained from."""
    import tomllib

    run = RunDirectory(run_dir).require_run()
    try:
        table = tomllib.loads(run.config_file.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{run.config_file}: not valid TOML ({err})") from None
    return config_from_dict(table, str(run.config_file))


def check_samplers(scheduler: DDPMScheduler, sample_shape: tuple[int, ...]) -> None:
    """Both samplers step, on a sample of `sample_shape`, at either end of the whole schedule: a damaged
    scheduler_config.json (a value of the wrong type, betas of another length) fails only once one does."""
    zero = torch.zeros(1, *sample_shape)
    generator = torch.Generator().manual_seed(0)   # the global random stream stays untouched
    for method in ("ddim", "ddpm"):
        sampler = sampling_scheduler(scheduler, method)
        sampler.set_timesteps(sampler.config.num_train_timesteps)
        for t in (sampler.timesteps[0], sampler.timesteps[-1]):
            sampler.step(zero, t, zero, generator=generator)


def load_pipeline(run_dir: Path) -> DDPMPipeline:
    run = RunDirectory(run_dir).require_model()
    # An MLP denoiser in the pipeline's `unet` slot is intended; diffusers would warn about its type
    # (and draw a bar for loading two components).
    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # and a damaged config gets deprecation notes besides its error
            pipeline = DDPMPipeline.from_pretrained(run.model, use_safetensors=True)
        check_samplers(pipeline.scheduler, tuple(sample_shape_of(pipeline.unet)))
        return pipeline
    # A damaged model_index.json or config.json: diffusers fails with whatever its values make of its code.
    except (OSError, ValueError, RuntimeError, SafetensorError, TypeError, KeyError, AttributeError, IndexError) as err:
        message = " ".join(str(err).split())
        raise RunDirectoryError(f"{run.model}: cannot load the model ({message[:300]})") from None
    finally:
        diffusers_logging.set_verbosity(previous)
        diffusers_logging.enable_progress_bar()


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
