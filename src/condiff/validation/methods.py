"""The methods an LDS validation compares, and every choice among them, made on held-out targets only.

TRAK is a family of configurations (`TrakConfig`: output function, K, projection dimension, how many of the
ensemble's models, which weights of them); each configuration's ridge is chosen on the held-out targets,
and the configuration with the best held-out LDS is the one reported. The baselines: the gradient dot
product (TracIn-like: TRAK without its kernel, its configuration chosen the same way), cosine similarity of
pixels and of condiff's evaluation-classifier features, and random scores. `choose` never reads a reported
target's outcome (a test perturbs them and checks that no choice moves).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from condiff.attribution.baselines import cosine_similarity, random_scores
from condiff.attribution.features import GradientFeaturizer, target_seed, timestep_grid
from condiff.attribution.projector import PROJECTORS
from condiff.attribution.store import stored_train_features
from condiff.attribution.trak import RidgePath
from condiff.attribution.validation import lds_mean
from condiff.audit.results import features_file
from condiff.evaluation.classifier import extract_features
from condiff.rundir import RunDirectory, create_output_directory
from condiff.lifecycle.build import ExperimentData, load_pipeline
from condiff.training.checkpoint import MODEL_WEIGHTS
from condiff.validation.counterfactual import Targets, ValidationSettings

FINAL = "final"   # the weights that generated the targets (the EMA model when the run keeps one)
TRAK = "TRAK"
DOT_PRODUCT = "gradient dot product (TracIn-like)"
SIMILARITIES = ("pixel similarity", "classifier-feature similarity")
RANDOM = "random"


@dataclass(frozen=True)
class TrakConfig:
    output: str                   # dtrak | loss
    train_timesteps: int          # K
    dimension: int                # k
    models: int                   # the first `models` full models are averaged
    weights: str = FINAL          # or "step-NNNNNNN": the raw weights of that checkpoint of every model
    at_step: int | None = None    # a `t=T` quantity's own timestep on the training side (K noises of it)

    @property
    def label(self) -> str:
        weights = "" if self.weights == FINAL else f", weights at {self.weights}"
        grid = f"K = {self.train_timesteps}" + ("" if self.at_step is None else f" at t = {self.at_step}")
        return (f"{self.output} output, {grid}, k = {self.dimension}, "
                f"{self.models} model{'s' if self.models > 1 else ''}{weights}")

    @property
    def timesteps(self) -> list[int]:
        """The training side's timesteps: the K-bin grid, or K times the step's own."""
        return timestep_grid(self.train_timesteps) if self.at_step is None else [self.at_step] * self.train_timesteps


@dataclass
class Candidate:
    method: str                   # TRAK, DOT_PRODUCT, a similarity or RANDOM
    config: TrakConfig | None
    ridge: float | None           # TRAK: the c chosen on the held-out targets
    held_out_lds: float
    scores: np.ndarray            # (training examples x every target, held-out ones first)

    @property
    def label(self) -> str:
        return self.method if self.config is None else f"{self.method} ({self.config.label})"


def model_weights(run_dir: Path, weights: str) -> torch.nn.Module:
    """The run's network: its final model, or the raw weights of one of its checkpoints."""
    model = load_pipeline(run_dir).unet
    if weights != FINAL:
        model.load_state_dict(load_file(RunDirectory(run_dir).checkpoints / weights / MODEL_WEIGHTS))
    return model.eval()


class FeatureBank:
    """Projected gradients of every full model, computed once: the training side on disk beside the model
    (`RUN/attribution/features-*.npy`, where `condiff attribute` finds them, resumable), the target side per
    quantity in memory."""

    def __init__(self, runs: list[Path], data: ExperimentData, targets: Targets | None, settings: ValidationSettings,
                 device, progress: bool):
        self.runs, self.data, self.targets, self.settings = runs, data, targets, settings
        self.device, self.progress = device, progress
        self._train: dict[tuple, torch.Tensor] = {}
        self._target: dict[tuple, dict[str, torch.Tensor]] = {}
        self._projectors: dict[tuple[int, int], object] = {}   # one per (p, k): every model projects alike

    def projector(self, num_params: int, dimension: int):
        if (num_params, dimension) not in self._projectors:
            self._projectors[num_params, dimension] = PROJECTORS[self.settings.projection](
                num_params, dimension, seed=self.settings.seed, device=self.device)
        return self._projectors[num_params, dimension]

    def featurizer(self, model: int, weights: str, output: str, dimension: int) -> GradientFeaturizer:
        network = model_weights(self.runs[model], weights).to(self.device)
        projector = self.projector(sum(p.numel() for p in network.parameters()), dimension)
        return GradientFeaturizer(network, load_pipeline(self.runs[model]).scheduler.alphas_cumprod, projector,
                                  output=output, batch_size=self.settings.batch_size)

    def train(self, model: int, config: TrakConfig) -> torch.Tensor:
        key = (model, config.weights, config.output, config.train_timesteps, config.dimension, config.at_step)
        if key not in self._train:
            folder = self.runs[model] / "attribution"
            if not folder.is_dir():
                create_output_directory(folder, "attribution", resumable=True)
            # Named as `condiff attribute` names its features, so that it finds these.
            step = None if config.weights == FINAL else int(config.weights.removeprefix("step-"))
            path = folder / features_file(config.output, config.train_timesteps, config.dimension,
                                          self.settings.projection, at_step=config.at_step, checkpoint_step=step)
            self._train[key] = torch.from_numpy(stored_train_features(
                self.featurizer(model, config.weights, config.output, config.dimension), self.data.train.data, path,
                config.timesteps, seed=self.settings.seed, dimension=config.dimension,
                batch_size=self.settings.batch_size, resume=True, progress=self.progress,
                desc=f"features ({self.runs[model].name}, {config.label})"))
        return self._train[key]

    def target(self, model: int, weights: str, output: str, dimension: int) -> dict[str, torch.Tensor]:
        key = (model, weights, output, dimension)
        if key not in self._target:
            featurizer = self.featurizer(model, weights, output, dimension)
            self._target[key] = {name: featurizer.train_features(inputs, grid, seed=target_seed(self.settings.seed))
                                 for name, (inputs, grid) in self.targets.quantities.items()}
        return self._target[key]


def trak_configs(settings: ValidationSettings, checkpoint_steps: list[int], step: int | None = None) -> list[TrakConfig]:
    """Every configuration tried: output x K x k x ensemble size with the final weights (for a `t=T` quantity
    also with the training side at T, R noises), and, for the smallest K and k, every checkpoint's raw weights
    of all E models (the training-length curve)."""
    configs = [TrakConfig(o, k, d, m) for o in settings.outputs for k in settings.train_timesteps
               for d in settings.dimensions for m in settings.ensemble_sizes]
    if step is not None:
        configs += [TrakConfig(o, settings.resamplings, d, m, at_step=step) for o in settings.outputs
                    for d in settings.dimensions for m in settings.ensemble_sizes]
    configs += [TrakConfig(o, min(settings.train_timesteps), min(settings.dimensions), settings.ensemble,
                           f"step-{step:07d}") for o in settings.outputs for step in checkpoint_steps]
    return configs


def choose(candidates: list[Candidate]) -> Candidate:
    """The candidate with the best held-out LDS."""
    return max(candidates, key=lambda c: -np.inf if np.isnan(c.held_out_lds) else c.held_out_lds)


def trak_candidates(bank: FeatureBank, configs: list[TrakConfig], quantity: str, subsets: np.ndarray,
                    outcomes: np.ndarray) -> list[Candidate]:
    """Per configuration, its ridge chosen on the held-out targets, and the dot-product baseline of the same
    features; the ridge-wise scores of each model are computed once and averaged over ensemble prefixes."""
    held = bank.targets.held_out_slice
    per_model: dict[tuple, list[np.ndarray]] = {}   # (model, weights, output, K, k, at_step) -> scores per ridge

    def scores(model: int, config: TrakConfig) -> list[np.ndarray]:
        key = (model, config.weights, config.output, config.train_timesteps, config.dimension, config.at_step)
        if key not in per_model:
            phi = bank.train(model, config)
            targets = bank.target(model, config.weights, config.output, config.dimension)[quantity]
            path = RidgePath(phi, targets)
            per_model[key] = [path.scores(c).numpy() for c in bank.settings.ridges]
            per_model[key].append((phi.double() @ targets.double().T).numpy())   # the dot product
        return per_model[key]

    out = []
    for config in configs:
        averaged = np.mean([scores(m, config) for m in range(config.models)], axis=0)   # (ridges + 1, n, T)
        held_out = [lds_mean(s[:, held], subsets, outcomes[:, held]) for s in averaged[:-1]]
        best = int(np.nanargmax(held_out))
        out.append(Candidate(TRAK, config, bank.settings.ridges[best], held_out[best], averaged[best]))
        out.append(Candidate(DOT_PRODUCT, config, None, lds_mean(averaged[-1][:, held], subsets, outcomes[:, held]),
                             averaged[-1]))
    return out


def similarity_candidates(data: ExperimentData, classifier, inputs: torch.Tensor, settings: ValidationSettings,
                          subsets: np.ndarray, outcomes: np.ndarray, held: slice) -> list[Candidate]:
    train = data.train.data
    scores = {SIMILARITIES[0]: cosine_similarity(train, inputs),
              SIMILARITIES[1]: cosine_similarity(extract_features(classifier, train), extract_features(classifier, inputs)),
              RANDOM: random_scores(len(train), len(inputs), settings.seed)}
    return [Candidate(name, None, None, lds_mean(s[:, held], subsets, outcomes[:, held]), s) for name, s in scores.items()]


@dataclass
class QuantityChoice:
    """What the held-out targets chose for one quantity."""
    trak: Candidate
    baseline: Candidate               # the best baseline (random excluded: it is the floor)
    per_method: dict[str, Candidate]  # each method's held-out choice
    candidates: list[Candidate]


def choose_methods(candidates: list[Candidate]) -> QuantityChoice:
    per_method = {}
    for method in (TRAK, DOT_PRODUCT, *SIMILARITIES, RANDOM):
        per_method[method] = choose([c for c in candidates if c.method == method])
    baseline = choose([per_method[m] for m in (DOT_PRODUCT, *SIMILARITIES)])
    return QuantityChoice(per_method[TRAK], baseline, per_method, candidates)
