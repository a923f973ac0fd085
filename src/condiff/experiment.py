"""From a validated config to datasets, model, constraints and a trained run directory.

This is the glue the CLI calls; a user can do the same from Python:
`train_run(load_config("configs/digits-minority.toml"))`. A run directory holds everything needed to
sample and evaluate it later, from anywhere: its config (paths resolved), its model, a copy of its
autoencoder (latent runs) and the data evaluation compares with (`evaluation_data.safetensors`).
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from condiff.config import ConfigError, ExperimentConfig, check_inputs, config_from_dict
from condiff.constraints import Constraint, DatasetTerm, PretrainedModelTerm
from condiff.data import (DataError, DataNotFound, LabelledDataset, balanced_counts, gaussian_mixture_dataset,
                          load_digits_dataset, load_fashion_mnist, load_idx, load_image_csv, load_image_folder,
                          load_mnist_5k, resize_images, split_per_class, take_per_class)
from condiff.dual import (InfeasibleConstraints, multipliers_for_target_shares, multipliers_from_kl_bounds, predicted_shares,
                          relaxation_costs_for_multipliers)
from condiff.gmm import GaussianMixture
from condiff.latent import AutoencoderLoadError, encode_dataset, load_autoencoder, save_autoencoder, train_autoencoder
from condiff.models import build_model, sample_shape_of
from condiff.rundir import (RunDirectory, RunDirectoryError, check_output_directory, create_output_directory,
                            save_pretrained_atomic, write_atomic, write_json_atomic, write_text_atomic)
from condiff.train import train


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
    except DataNotFound as err:
        raise MissingData(f"data: {err}") from None
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


# What may change when a run is resumed: where it lies, how fast it learns (a diverged run continues
# from its last checkpoint with a smaller rate), how long, and how it is sampled and evaluated.
RESUMABLE_FIELDS = ("output_dir", "train.lr", "train.steps", "train.checkpoint_every", "train.keep_checkpoints",
                    "dual.lr", "sample.", "evaluate.")


def run_directory(config: ExperimentConfig) -> Path:
    """The config's output directory; a config built in Python without one gets runs/NAME."""
    return Path(config.output_dir or Path("runs") / config.name)


def check_resumable(run: RunDirectory, config: ExperimentConfig) -> None:
    if not run.checkpoints.is_dir() or not any(run.checkpoints.glob("step-*")):
        raise RunDirectoryError(f"{run.path}: no checkpoint to resume from")
    run.require_run()
    changed = [name for name in differing_fields(load_run_config(run.path).to_dict(), config.to_dict())
               if not name.startswith(RESUMABLE_FIELDS)]
    if changed:
        raise ConfigError(f"{run.config_file}: cannot resume with a different config (changed: {', '.join(changed)})")


def save_evaluation_data(run: RunDirectory, data: ExperimentData) -> None:
    """Keep the sets evaluation compares with inside the run, so that it evaluates without the data."""
    if data.mixture is not None:   # a Gaussian mixture is rebuilt from the config itself
        return
    sets = {"reference": data.reference, "classifier_train": data.classifier_train, "held_out": data.held_out}
    tensors = {f"{name}.{part}": getattr(dataset, part).contiguous() for name, dataset in sets.items()
               for part in ("data", "labels")}
    metadata = {"num_classes": str(data.reference.num_classes),
                **{f"{name}.name": dataset.name for name, dataset in sets.items()}}
    write_atomic(run.evaluation_data, lambda p: save_file(tensors, p, metadata=metadata))


def load_evaluation_data(config: ExperimentConfig, run_dir: Path) -> ExperimentData:
    """What evaluation needs (reference, classifier sets, mixture): the run's own copy when it has one,
    else the data rebuilt from the config (runs made before condiff kept a copy)."""
    path = RunDirectory(run_dir).evaluation_data
    if not path.is_file():
        return build_data(config)
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata()
        tensors = load_file(path)
        sets = {name: LabelledDataset(tensors[f"{name}.data"], tensors[f"{name}.labels"], int(metadata["num_classes"]),
                                      metadata[f"{name}.name"])
                for name in ("reference", "classifier_train", "held_out")}
    except (OSError, KeyError, ValueError, SafetensorError) as err:
        raise RunDirectoryError(f"{path}: unreadable ({err})") from None
    return ExperimentData(sets["reference"], sets["classifier_train"], sets["held_out"], sets["reference"], None)


def train_run(config: ExperimentConfig, *, resume: bool = False, overwrite: bool = False, on_step=None,
              accelerator=None) -> Path:
    """Train the model a config describes into its run directory; returns the directory.

    `overwrite` replaces only an empty directory or one condiff created (see condiff.rundir); `resume`
    continues from the newest complete checkpoint, wherever the directory now lies."""
    from accelerate import Accelerator

    run = RunDirectory(run_directory(config))
    check_inputs(config)
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
    if resume:
        check_resumable(run, config)
    else:
        create_output_directory(run.path, "run", overwrite=overwrite, resumable=True)
    if accelerator.is_main_process:
        # Stored with its location resolved; on resume, with what changed (e.g. a smaller train.lr).
        write_text_atomic(run.config_file, tomli_w.dumps({**config.to_dict(), "output_dir": str(run.path.resolve())}))
        if autoencoder is not None:
            save_pretrained_atomic(autoencoder, run.autoencoder)
        save_evaluation_data(run, data)
    accelerator.wait_for_everyone()

    result = train(model, noise_scheduler, objective, constraints, config.train, config.dual, run.path,
                   resume=resume, on_step=on_step, accelerator=accelerator)
    if accelerator.is_main_process:
        save_pretrained_atomic(DDPMPipeline(unet=result.model, scheduler=noise_scheduler), run.model)
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
        write_json_atomic(run.summary_file, summary)
    accelerator.wait_for_everyone()
    return run.path


def train_autoencoder_for(config: ExperimentConfig, output: Path, *, steps: int, overwrite: bool = False,
                          block_out_channels: tuple[int, ...] = (16, 32), latent_channels: int = 4,
                          progress: bool = True) -> Path:
    """Train condiff's small AutoencoderKL on the images a config trains on and save it to `output`
    (diffusers format, safetensors), for `latent.autoencoder`. An existing folder is kept unless
    `overwrite`; the new one replaces it atomically."""
    data = build_data(config)
    if len(data.train.sample_shape) != 3:
        raise ConfigError(f"data.dataset: an autoencoder needs images, the {config.data.dataset} data are vectors")
    output = check_output_directory(output, overwrite=overwrite)
    try:
        vae = train_autoencoder(data.train, steps=steps, seed=config.train.seed, latent_channels=latent_channels,
                                block_out_channels=tuple(block_out_channels), progress=progress)
    except ValueError as err:  # widths that cannot halve the image size
        raise ConfigError(f"autoencoder: {err}") from None
    return save_autoencoder(vae, output)


def load_run_config(run_dir: Path) -> ExperimentConfig:
    """A run's stored config, validated without touching the data or runs it was trained from."""
    import tomllib

    run = RunDirectory(run_dir).require_run()
    try:
        table = tomllib.loads(run.config_file.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{run.config_file}: not valid TOML ({err})") from None
    return config_from_dict(table, str(run.config_file))


def load_pipeline(run_dir: Path) -> DDPMPipeline:
    run = RunDirectory(run_dir).require_model()
    # An MLP denoiser in the pipeline's `unet` slot is intended; diffusers would warn about its type
    # (and draw a bar for loading two components).
    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        return DDPMPipeline.from_pretrained(run.model, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        message = " ".join(str(err).split())
        raise RunDirectoryError(f"{run.model}: cannot load the model ({message[:300]})") from None
    finally:
        diffusers_logging.set_verbosity(previous)
        diffusers_logging.enable_progress_bar()


