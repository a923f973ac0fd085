"""Training a run directory from a config; finishing one that a longer job left unfinished.

`train_run(load_config("configs/digits-minority.toml"))` is what `condiff train` does. A run directory
holds everything needed to sample and evaluate it later, from anywhere: its config (paths resolved), its
model, a copy of its autoencoder (latent runs) and the data evaluation compares with
(`evaluation_data.safetensors`).
"""


from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import tomli_w
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from condiff.config import ConfigError, ExperimentConfig
from condiff.data.latent import encode_dataset, save_autoencoder, train_autoencoder
from condiff.evaluation.evaluation_data import save_evaluation_sets
from condiff.rundir import (
    RunDirectory,
    RunDirectoryError,
    check_output_directory,
    create_output_directory,
    read_metrics,
    save_pretrained_atomic,
    write_json_atomic,
    write_text_atomic,
)
from condiff.lifecycle.build import (
    ExperimentData,
    build_constraints,
    build_data,
    build_network,
    build_noise_scheduler,
    build_share_control,
    check_inputs,
    load_latent_autoencoder,
    load_run_config,
    pretrained_constraint,
)
from condiff.training.checkpoint import load_checkpoint
from condiff.training.control import MeasuredShareControl
from condiff.training.dual import predicted_shares
from condiff.training.loop import make_accelerator, train
from condiff.training.terms import DatasetTerm


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


TRACKERS = "trackers"    # RUN/trackers: accelerate's tracker logs when train.log_with is set

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


def check_output(run: RunDirectory, config: ExperimentConfig, *, resume: bool, overwrite: bool) -> None:
    """Refuse a run that cannot be resumed, or an output that may not be (re)created, before the data are built."""
    if resume:
        check_resumable(run, config)
    else:
        check_output_directory(run.path, overwrite=overwrite, resumable=True)


def check_resume_inputs(run: RunDirectory, model: torch.nn.Module, num_processes: int) -> None:
    """Read, before anything is written, what `train` reads to resume: metrics.jsonl (refused when damaged) and
    the newest checkpoint, refused when of another process count or when its weights are not of `model` (the
    run's config.toml was edited)."""
    if run.metrics_file.exists():
        read_metrics(run.metrics_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # a damaged checkpoint skipped: `train` warns as it loads the same one
        weights, state = load_checkpoint(run.checkpoints)
    ranks = state.get("ranks") if isinstance(state, dict) else None
    if not isinstance(ranks, dict):
        raise RunDirectoryError(f"{run.checkpoints}: its trainer_state.json names no processes (damaged)")
    if len(ranks) != num_processes:
        raise RunDirectoryError(f"{run.checkpoints}: written by {len(ranks)} process(es), resumed with "
                                f"{num_processes}; resume with the same number of processes")
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if {name: tuple(tensor.shape) for name, tensor in weights.items()} != expected:
        raise RunDirectoryError(f"{run.checkpoints}: its model does not match the model of {run.config_file} "
                                "(a checkpoint from another model, or an edited [model] section)")


def save_evaluation_data(run: RunDirectory, data: ExperimentData) -> None:
    """Keep the sets evaluation compares with inside the run, so that it evaluates without the data."""
    if data.mixture is None:   # a Gaussian mixture is rebuilt from the config itself
        save_evaluation_sets(run.evaluation_data, {"reference": data.reference,
                                                   "classifier_train": data.classifier_train,
                                                   "held_out": data.held_out})


def with_seed_offset(config: ExperimentConfig, offset: int) -> ExperimentConfig:
    """A copy of `config` with its training and sampling seeds moved by `offset` (the data stay the same)."""
    config = copy.deepcopy(config)
    config.train.seed += offset
    config.sample.seed += offset
    return config


@dataclasses.dataclass
class BuiltRun:
    """What a config describes, built and checked before anything is written: the data (and the training subset
    it was cut to), the frozen autoencoder of a latent run, the network and its noise schedule, the data term, the
    constraints and the share controller."""
    data: ExperimentData
    subset: dict | None
    autoencoder: torch.nn.Module | None
    noise_scheduler: DDPMScheduler
    model: torch.nn.Module
    objective: DatasetTerm
    constraints: list
    control: MeasuredShareControl | None


def build_run(config: ExperimentConfig, accelerator, keep: np.ndarray | None, coupled: bool) -> BuiltRun:
    data = build_data(config)
    subset = training_subset(keep, coupled, len(data.train))
    sampled = data.train   # what the data term draws from: with a coupled subset, the full set
    if subset is not None:
        kept = torch.from_numpy(np.asarray(subset["kept"], dtype=np.int64))
        data = dataclasses.replace(data, train=data.train.subset(kept))
        sampled = sampled if coupled else data.train
    autoencoder = load_latent_autoencoder(config)
    # Latent diffusion: the training set (and with it every class constraint's set) is encoded once,
    # up front; from here on the run is ordinary diffusion on those tensors.
    train_set = sampled if autoencoder is None else encode_dataset(autoencoder.to(accelerator.device), sampled)
    weights = None if subset is None or not coupled else torch.from_numpy(np.asarray(keep, dtype=np.float32))
    constraint_set = train_set if weights is None else train_set.subset(kept)
    noise_scheduler = build_noise_scheduler(config, pixels=len(train_set.sample_shape) == 3 and autoencoder is None)
    model, pretrained = build_network(config, train_set, noise_scheduler)
    constraints = build_constraints(config, constraint_set, noise_scheduler)
    if config.finetune.threshold is not None:
        constraints.append(pretrained_constraint(config, pretrained.to(accelerator.device), train_set.sample_shape,
                                                 noise_scheduler, progress=accelerator.is_main_process))
    objective = DatasetTerm("data", train_set, noise_scheduler, config.train.label_dropout, example_weights=weights)
    control = build_share_control(config, data, constraints, noise_scheduler, accelerator, autoencoder)
    return BuiltRun(data, subset, autoencoder, noise_scheduler, model, objective, constraints, control)


def start_run_directory(run: RunDirectory, config: ExperimentConfig, built: BuiltRun, accelerator, *,
                        resume: bool, overwrite: bool) -> None:
    """Check a resumed run against what was built, or create the directory; then the main process writes the
    config, the training subset, the autoencoder's copy and the evaluation data. Every process checks (so a
    refusal exits all of them instead of leaving some at a barrier)."""
    if resume:
        check_resume_inputs(run, built.model, accelerator.num_processes)
        recorded = run.read_json(run.train_subset) if run.train_subset.is_file() else None
        if recorded != built.subset:
            raise ConfigError(f"{run.train_subset}: cannot resume with a different training subset")
    else:
        create_output_directory(run.path, "run", overwrite=overwrite, resumable=True)
    if accelerator.is_main_process:
        if built.subset is not None:
            write_json_atomic(run.train_subset, built.subset)
        # Stored with its location resolved; on resume, with what changed (e.g. a smaller train.lr).
        write_text_atomic(run.config_file, tomli_w.dumps({**config.to_dict(), "output_dir": str(run.path.resolve())}))
        if built.autoencoder is not None and not run.autoencoder.is_dir():   # a resumed run keeps its copies
            save_pretrained_atomic(built.autoencoder, run.autoencoder)
        if not run.evaluation_data.is_file():
            save_evaluation_data(run, built.data)
    accelerator.wait_for_everyone()


def train_run(config: ExperimentConfig, *, resume: bool = False, overwrite: bool = False, on_step=None,
              accelerator=None, keep: np.ndarray | None = None, coupled: bool = True) -> Path:
    """Train the model a config describes into its run directory; returns the directory.

    `overwrite` replaces only an empty directory or one condiff created (see condiff.rundir); `resume`
    continues from the newest complete checkpoint, wherever the directory now lies.
    `keep` (a boolean mask over the training set) trains on those examples only, for counterfactual
    retraining (RUN/train_subset.json records it): `coupled` draws the full set's random stream and gives
    the left-out examples weight 0 (common random numbers: runs differ by their data alone), otherwise
    the subset is sampled on its own, as a fresh run on it would be."""
    config = config.validated()     # a config built or changed in Python is checked like a file
    run = RunDirectory(run_directory(config))
    check_inputs(config)
    check_output(run, config, resume=resume, overwrite=overwrite)
    accelerator = accelerator or make_accelerator(config.train, run.path)
    built = build_run(config, accelerator, keep, coupled)
    # Only now, with everything built and checked, is anything written.
    start_run_directory(run, config, built, accelerator, resume=resume, overwrite=overwrite)
    if config.train.log_with:
        accelerator.init_trackers(TRACKERS, config=tracker_hyperparameters(config))
    result = train(built.model, built.objective, built.constraints, config.train, config.dual, run.path,
                   resume=resume, on_step=on_step, accelerator=accelerator, control=built.control)
    for tracker in accelerator.trackers:   # not end_training(): it also ends the process group sampling needs
        tracker.finish()
    if accelerator.is_main_process:
        summary = training_summary(config, built.data, built.constraints, result, built.control)
        save_pretrained_atomic(DDPMPipeline(unet=result.model, scheduler=built.noise_scheduler), run.model)
        write_text_atomic(run.model / "README.md", model_card(config, summary, len(built.data.train)))
        write_json_atomic(run.summary_file, summary)
    accelerator.wait_for_everyone()
    return run.path


def finish_run(config: ExperimentConfig, *, resume: bool = True, keep: np.ndarray | None = None,
               coupled: bool = True, announce: bool = False) -> Path:
    """The run of `config` brought to its end, for jobs of many runs that resume: a finished one (it has
    RUN/summary.json) is kept, refused if it trained on other examples than `keep`; with `resume`, an
    interrupted one continues from its latest checkpoint and one without any is trained afresh over what it
    left. `announce` prints which of the two it does."""
    run = RunDirectory(run_directory(config))
    if run.summary_file.is_file():
        recorded = run.read_json(run.train_subset) if run.train_subset.is_file() else None
        if recorded != training_subset(keep, coupled, 0 if keep is None else len(keep)):
            raise RunDirectoryError(f"{run.path}: trained on other examples than asked for (settings changed "
                                    "since); start it afresh (overwrite it)")
        return run.path
    continuing = resume and (run.checkpoints / "latest").is_file()
    if announce:
        print(f"== {run.path.name}: {'resuming' if continuing else 'training'} ({config.train.steps} steps)")
    return train_run(config, resume=continuing, overwrite=resume and not continuing, keep=keep, coupled=coupled)


def training_subset(keep: np.ndarray | None, coupled: bool, num_train: int) -> dict | None:
    """What RUN/train_subset.json records of a `keep` mask (None: the whole training set)."""
    if keep is None:
        return None
    keep = np.asarray(keep)
    if keep.dtype != bool or keep.shape != (num_train,) or not keep.any():
        raise ConfigError(f"keep: a boolean mask of the {num_train} training examples with at least one kept, "
                          f"not {keep.dtype} of shape {keep.shape}")
    return {"kept": np.flatnonzero(keep).tolist(), "coupled": bool(coupled), "num_train": num_train}


def tracker_hyperparameters(config: ExperimentConfig) -> dict:
    """The config as flat `section.key` scalars, as trackers' hyperparameter tables take them."""
    flat = {}
    for section, values in config.to_dict().items():
        for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
            name = f"{section}.{key}" if key else section
            flat[name] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


def training_summary(config: ExperimentConfig, data: ExperimentData, constraints, result, control=None) -> dict:
    """summary.json: the constraint mode, the final multipliers and the class shares Theorem 1 predicts from
    them; under measured control, the shares the last control step measured beside that prediction."""
    shares = np.asarray(data.train.class_counts()) / len(data.train)
    classes = config.constraints.classes
    lam = {label: result.multipliers[c.name] for label, c in zip(classes, constraints)}
    reference = {}
    if config.finetune.threshold is not None:  # the pretrained model's own predicted shares join the mixture
        pretrained_summary = json.loads(RunDirectory(config.finetune.pretrained).summary_file.read_text())
        reference = {"reference_shares": pretrained_summary["predicted_class_shares"],
                     "reference_multiplier": result.multipliers[constraints[len(classes)].name]}
    predicted = predicted_shares(shares, lam, **reference)
    measured = None
    if control is not None and control.controller.history:
        last = control.controller.history[-1]
        measured = {"step": last.step, "samples": last.samples, "classes": list(classes),
                    "targets": list(config.constraints.target_shares), "shares": last.shares,
                    "smoothed": last.smoothed, "interval_95": [list(p) for p in zip(last.low, last.high)],
                    "predicted_by_theorem_1": [float(predicted[c]) for c in classes],
                    "control_steps": len(control.controller.history), "at_bound": control.controller.at_bound,
                    "paired_reference_samples": last.paired}
    return {"steps": result.step, "train_seconds": result.seconds, "constraint_mode": config.constraints.mode,
            "control": measured,
            "data_class_shares": shares.tolist(), "multipliers": result.multipliers,
            "constraints": [{"name": c.name, "threshold": c.threshold, "relaxation_cost": c.relaxation_cost,
                             "multiplier": result.multipliers[c.name],
                             "fixed": c.fixed_multiplier is not None and control is None}
                            for c in constraints],
            "predicted_class_shares": predicted.tolist()}


def model_card(config: ExperimentConfig, summary: dict, num_train: int) -> str:
    """model/README.md: what the model was trained on and under which constraints, and how to load it."""
    constraints = "\n".join(
        f"| {c['name']} | {c['threshold']:g} | {c['relaxation_cost']:g} | {c['multiplier']:.4f}"
        f"{' (fixed)' if c.get('fixed') else ''} |" for c in summary["constraints"]) or "| (none: unconstrained) | | | |"
    shares = ", ".join(f"{c}: {data:.3f} -> {predicted:.3f}" for c, (data, predicted) in
                       enumerate(zip(summary["data_class_shares"], summary["predicted_class_shares"])))
    measured = summary.get("control")
    if measured:
        measured = "\n\nThe multipliers followed the shares the model generated (measured share control): at step " + \
            f"{measured['step']}, " + ", ".join(
                f"class {c} {share:.3f} [{lo:.3f}, {hi:.3f}] for a target of {target:g}" for c, share, (lo, hi), target
                in zip(measured["classes"], measured["shares"], measured["interval_95"], measured["targets"])) + \
            f" ({measured['samples']} samples, 95% Wilson intervals)." + "".join(
                f" Class {c}'s multiplier ended on the edge of its bound (constraints.control_bound)."
                for c, edge in zip(measured["classes"], measured.get("at_bound", [])) if edge)
    return f"""---
library_name: diffusers
tags: [condiff, diffusion, constrained-training]
---

# {config.name}

A `{config.model.kind}` diffusion model trained by condiff (primal-dual training, Khalafi, Ding, Ribeiro,
NeurIPS 2024) for {summary['steps']} steps on `{config.data.dataset}` data ({num_train} training samples).
Constraints: {config.constraints.mode}.

| constraint | threshold | relaxation cost | final multiplier |
|---|---|---|---|
{constraints}

Class shares of the data -> the shares Theorem 1 predicts for the constrained optimum: {shares}.{measured or ""}

## Load it

```python
from diffusers import DDPMPipeline

pipeline = DDPMPipeline.from_pretrained("{Path(config.output_dir).resolve() / 'model'}")
```

or `condiff.Run("{Path(config.output_dir).resolve()}").sample(...)` for condiff's seeded, guided sampling.
The run's `config.toml` holds every setting it was trained with.
"""


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
