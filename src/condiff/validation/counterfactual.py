"""Counterfactual validation of attribution for any run config: retrain on random subsets, measure, and see
whether the scores predicted what retraining did (the linear datamodeling score, LDS).

The headline protocol is **independent** of the method it validates:
- TRAK's models are full-set runs with training seed offsets 0 .. E-1 (`full/`, `full-seed-1/`, ...); the
  first is the attributed model and generates the targets;
- every subset model is a fresh run on its subset (`coupled=False`) with a seed offset from
  `SUBSET_SEED_OFFSET` on, disjoint from every TRAK model's; the measured quantity is the mean over `seeds`;
- measured losses draw their noise from `measurement_seed`, independent of every feature's noise.
`coupled=True` is a labelled variance-reduction variant: each subset model draws the full set's random stream
of its own seed and gives the left-out examples weight 0 (common random numbers).

Quantities: `sample` (a generated sample's denoising loss averaged over a timestep grid x R noises,
D-TRAK's) and `t=T` (the loss at step T of the sample's x0 prediction at T, re-noised R times:
Journey-TRAK's step target). Methods are scored and chosen in `condiff.validation.methods`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from condiff.attribution.features import denoising_losses, timestep_grid
from condiff.attribution.projector import PROJECTORS
from condiff.attribution.validation import random_subsets
from condiff.config import ConfigError, ExperimentConfig, refuse_first_problem
from condiff.lifecycle.build import load_pipeline
from condiff.lifecycle.training import finish_run
from condiff.runtime import IndependentWorkers, progress_bar
from condiff.sampling.generate import SampleOutput, generate, sampling_scheduler

SUBSET_SEED_OFFSET = 1000        # subset models' training seeds start here: disjoint from the ensemble's


def measurement_seed(seed: int) -> int:
    """The noise of measured losses: apart from the training side's (seed) and the targets' (target_seed)."""
    return seed + 2_000_029


@dataclass
class ValidationSettings:
    num_subsets: int = 32                 # M subsets, retrained `seeds` times each
    fraction: float = 0.5                 # alpha: each subset's share of the training set
    seeds: int = 3                        # training seeds per subset: the measured quantity is their mean
    coupled: bool = False                 # variant: common random numbers across subset models (see above)
    ensemble: int = 8                     # E full models TRAK may average; sizes 1, 2, 4, ..., E are tried
    num_targets: int = 48                 # generated samples whose LDS is reported
    held_out_targets: int = 32            # further samples on which every choice is made (never reported)
    steps: tuple[int, ...] = (700, 300)   # sampling steps whose Journey-TRAK target is also measured
    outputs: tuple[str, ...] = ("dtrak", "loss")          # output functions tried
    train_timesteps: tuple[int, ...] = (10, 100)          # K tried: the training side's timestep grid
    dimensions: tuple[int, ...] = (2048,)                 # k tried
    checkpoints: int = 4                  # the full models' checkpoints along training (a TRAK curve)
    measured_timesteps: int = 10          # the `sample` quantity's timestep grid (x R noises)
    resamplings: int = 10                 # R: noises per target and timestep
    projection: str = "sparse"
    ridges: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)   # c of lambda = c trace(Phi^T Phi) / k
    sampling_steps: int = 50              # DDIM steps of the targets
    removal_targets: int = 16             # remove-top-k: reported targets examined
    removal_steps: tuple[int, ...] = (300,)   # remove-top-k: the steps T whose x_T the retrained models start from
    removal_share: float = 0.02           # remove-top-k: k as a share of the training set
    removal_draws: int = 3                # remove-top-k: random removals (each compared with every target)
    resamples: int = 1000                 # two-way bootstrap resamples
    journeys: int = 4                     # targets whose journeys the report pictures (the chosen TRAK, full run)
    seed: int = 0
    batch_size: int = 32

    def validated(self, num_train: int) -> ValidationSettings:
        """These settings, or ConfigError naming the first one the protocol cannot honour on `num_train` examples."""
        problems = {
            "fraction": not 0 < self.fraction < 1,
            "num_subsets": self.num_subsets < 4, "num_targets": self.num_targets < 2,
            "held_out_targets": self.held_out_targets < 2, "seeds": self.seeds < 1,
            "ensemble": not 1 <= self.ensemble < SUBSET_SEED_OFFSET,
            "removal_targets": not 0 <= self.removal_targets <= self.num_targets,
            "removal_share": not 1 <= round(self.removal_share * num_train) < num_train,
            "removal_draws": self.removal_draws < 1, "projection": self.projection not in PROJECTORS,
            "journeys": self.journeys < 1,
            "steps": not all(0 <= t < 1000 for t in self.steps),
            "removal_steps": not set(self.removal_steps) <= set(self.steps),   # removals use a step's scores
            "outputs": not self.outputs or not set(self.outputs) <= {"dtrak", "loss"},
        }
        for name in ("train_timesteps", "dimensions", "ridges"):
            problems[name] = not getattr(self, name) or min(getattr(self, name)) <= 0
        refuse_first_problem(self, problems, lambda name, value: ConfigError(
            f"{name}: {value!r} is not allowed in a counterfactual validation"))
        return self

    @property
    def ensemble_sizes(self) -> list[int]:
        return sorted({min(2 ** i, self.ensemble) for i in range(self.ensemble.bit_length() + 1)})


@dataclass
class Targets:
    """Generated samples with their x0 predictions, and per quantity: its inputs and timestep grid. The
    first `held_out` are for choices, the rest are reported."""
    samples: SampleOutput
    held_out: int
    quantities: dict[str, tuple[torch.Tensor, list[int]]] = field(default_factory=dict)

    @property
    def held_out_slice(self) -> slice:
        return slice(0, self.held_out)

    @property
    def reported_slice(self) -> slice:
        return slice(self.held_out, None)


def make_targets(pipeline, settings: ValidationSettings, device) -> Targets:
    """Held-out targets first, then the reported ones, all drawn from the attributed model."""
    count = settings.held_out_targets + settings.num_targets
    samples = generate(pipeline.unet, sampling_scheduler(pipeline.scheduler, "ddim"), count,
                       num_inference_steps=settings.sampling_steps, seed=settings.seed, record_x0=True,
                       device=device, progress=False)
    grid = [t for t in timestep_grid(settings.measured_timesteps) for _ in range(settings.resamplings)]
    targets = Targets(samples, settings.held_out_targets, {"sample": (samples.samples, grid)})
    for t in settings.steps:
        index = samples.step_index(t)
        step = int(samples.timesteps[index])
        targets.quantities[f"t={step}"] = (samples.x0_predictions[index], [step] * settings.resamplings)
    return targets


def retrain(config: ExperimentConfig, output: Path, keep: np.ndarray | None, coupled: bool, seed: int = 0,
            overrides: dict | None = None) -> Path:
    """The config, its training seed offset by `seed` (and `overrides` of train.* fields that may change on
    resume), trained on the `keep`ed examples into `output`; a finished run there is kept, an interrupted
    one resumed."""
    config = copy.deepcopy(config)
    config.output_dir = str(output)
    config.train.seed += seed
    for name, value in (overrides or {}).items():
        setattr(config.train, name, value)
    return finish_run(config, keep=keep, coupled=coupled)


@dataclass
class ValidationModels:
    full: list[Path]                      # TRAK's ensemble; full[0] is the attributed model
    subsets: np.ndarray                   # (M x training examples) boolean
    subset_runs: list[list[Path]]         # [subset][seed]


def full_model_dir(output: Path, seed: int) -> Path:
    return output / ("full" if seed == 0 else f"full-seed-{seed}")


def subset_model_dir(output: Path, index: int, seed: int) -> Path:
    return output / "subsets" / f"subset-{index:02d}-seed-{seed}"


def train_models(config: ExperimentConfig, num_train: int, output: Path, settings: ValidationSettings,
                 workers: IndependentWorkers, progress: bool) -> ValidationModels:
    """Train (or keep) the E full models, with `settings.checkpoints` checkpoints along training, and the M x
    seeds subset models, shared out between the workers; every worker returns once all are trained."""
    every = max(1, config.train.steps // settings.checkpoints)
    full_overrides = {"checkpoint_every": every, "keep_checkpoints": settings.checkpoints}
    subsets = random_subsets(num_train, settings.num_subsets, settings.fraction, seed=settings.seed)
    seeds = [SUBSET_SEED_OFFSET + s for s in range(settings.seeds)]
    jobs = [(full_model_dir(output, s), None, s, full_overrides) for s in range(settings.ensemble)]
    jobs += [(subset_model_dir(output, i, s), keep, s, None) for s in seeds for i, keep in enumerate(subsets)]
    for run_dir, keep, seed, overrides in progress_bar(workers.share(jobs), desc="models", enabled=progress):
        retrain(config, run_dir, keep, settings.coupled and keep is not None, seed, overrides)
    workers.barrier("models")
    return ValidationModels([full_model_dir(output, s) for s in range(settings.ensemble)], subsets,
                            [[subset_model_dir(output, i, s) for s in seeds] for i in range(len(subsets))])


def measure(run_dir: Path, targets: Targets, settings: ValidationSettings, device) -> dict[str, np.ndarray]:
    """Per quantity, (targets,): the negated denoising loss of every target under the run's model, its noise
    independent of every feature's."""
    pipeline = load_pipeline(run_dir)
    model = pipeline.unet.to(device).eval()
    return {name: -denoising_losses(model, pipeline.scheduler.alphas_cumprod, inputs, grid,
                                    seed=measurement_seed(settings.seed)).double().numpy()
            for name, (inputs, grid) in targets.quantities.items()}


def measure_subsets(models: ValidationModels, targets: Targets, settings: ValidationSettings, device,
                    progress: bool) -> dict[str, np.ndarray]:
    """Per quantity, (seeds, subsets, targets): what every subset model does to every target."""
    measured: dict[str, np.ndarray] = {}
    for index, runs in enumerate(progress_bar(models.subset_runs, desc="measure", enabled=progress)):
        for seed, run_dir in enumerate(runs):
            for name, values in measure(run_dir, targets, settings, device).items():
                measured.setdefault(name, np.zeros((settings.seeds, len(models.subset_runs), len(values))))
                measured[name][seed, index] = values
    return measured
