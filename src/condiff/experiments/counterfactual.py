"""Counterfactual validation of attribution for any run config: retrain, measure, and see whether the scores
predicted what retraining did.

- LDS (`linear_datamodeling_scores`): models of the config trained on M random subsets (a fraction each) of
  its training set; on each, every target's denoising loss is measured with noise common to all models;
  each method's scores predict the negated loss (helpful examples lower it) as the sum over the subset.
  Quantities: `sample` (a generated sample's loss averaged over the K-timestep grid, D-TRAK's) and `t=T`
  (the loss at step T of the sample's x0 prediction at T, re-noised R times: Journey-TRAK's step target).
- Remove-top-k (`removal_effects`): retrain without the k examples a method ranks first for one target at
  one step, regenerate the target from its own noise, and measure how far x0_hat(T) and the sample moved.

Every retraining uses the config's seed (with `seeds` > 1, also the next seeds, and the measured target is
the mean over them: D-TRAK averages 3); `coupled` (the default) also keeps the full set's random stream
(minibatch indices, timesteps, noise) and gives left-out examples weight 0, so that models differ by their
data alone (common random numbers); otherwise each subset is sampled on its own, as a fresh run would be.
Training is chaotic: how far two seeds of one subset disagree bounds the LDS any method can reach, so
`test_retest` measures it.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.stats
import torch

from condiff.attribution.baselines import cosine_similarity, gradient_dot_product, random_scores
from condiff.attribution.features import GradientFeaturizer, denoising_losses, target_seed, timestep_grid
from condiff.attribution.projector import PROJECTORS
from condiff.attribution.trak import choose_ridge, ensemble_scores, trak_scores
from condiff.attribution.validation import LinearDatamodelingScore, linear_datamodeling_score, random_subsets
from condiff.config import ConfigError, ExperimentConfig
from condiff.evaluation.classifier import extract_features
from condiff.experiments.attribution import AttributionSettings, train_features
from condiff.experiments.build import ExperimentData, load_pipeline
from condiff.experiments.evaluation import evaluation_classifier
from condiff.experiments.training import train_run, training_subset
from condiff.rundir import RunDirectoryError, create_output_directory
from condiff.runtime import progress_bar, resolve_device
from condiff.sampling.generate import SampleOutput, generate, sampling_scheduler

TRAK_METHODS = {"TRAK, D-TRAK output (||eps||^2)": "dtrak", "TRAK, loss output (Journey-TRAK)": "loss"}
BASELINES = ("gradient dot product (TracIn-like)", "pixel similarity", "classifier-feature similarity", "random")


@dataclass
class ValidationSettings:
    num_subsets: int = 32                 # M retrained models
    fraction: float = 0.5                 # alpha: each subset's share of the training set
    coupled: bool = True                  # common random numbers across retrained models (see the docstring)
    seeds: int = 1                        # training seeds per subset: the measured target is their mean
    ensemble: int = 1                     # TRAK: models of the full set (seeds 0, 1, ...) whose scores are averaged
    num_targets: int = 48                 # generated samples whose LDS is reported
    held_out_targets: int = 16            # further samples on which the ridge is chosen (never reported)
    steps: tuple[int, ...] = (700, 300)   # sampling steps whose Journey-TRAK target is also measured
    train_timesteps: int = 10             # K: the training side's timestep grid
    alternative_timesteps: tuple[int, ...] = ()   # further K whose TRAK is reported among the variants
    measured_timesteps: int = 10          # the `sample` quantity's timestep grid (x R noises)
    resamplings: int = 10                 # R: noises per target and timestep (x0_hat(t) re-noised R times)
    dimension: int = 2048                 # k
    projection: str = "sparse"
    ridges: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)   # c of lambda = c trace(Phi^T Phi) / k
    sampling_steps: int = 50              # DDIM steps of the targets
    removal_share: float = 0.02           # remove-top-k: k as a share of the training set
    removal_targets: int = 2              # remove-top-k: targets (x settings.steps) examined
    seed: int = 0
    batch_size: int = 32


@dataclass
class MethodResult:
    method: str
    quantity: str                         # `sample` or `t=T`
    lds: LinearDatamodelingScore
    ridge: float | None = None            # TRAK: the c chosen on the held-out targets


@dataclass
class Targets:
    """Generated samples with their x0 predictions, and per quantity: its inputs and timestep grid."""
    samples: SampleOutput
    quantities: dict[str, tuple[torch.Tensor, list[int]]] = field(default_factory=dict)


def retrain(config: ExperimentConfig, output: Path, keep: np.ndarray | None, coupled: bool, seed: int = 0) -> Path:
    """The config, its training seed offset by `seed`, trained on the `keep`ed examples into `output`; a
    finished run there is kept, an interrupted one resumed."""
    config = copy.deepcopy(config)
    config.output_dir = str(output)
    config.train.seed += seed
    if (output / "summary.json").is_file():
        subset = output / "train_subset.json"
        recorded = json.loads(subset.read_text()) if subset.is_file() else None
        if recorded != training_subset(keep, coupled, 0 if keep is None else len(keep)):
            raise RunDirectoryError(f"{output}: trained on other examples than this validation asks for "
                                    "(settings changed since); start it afresh (--overwrite)")
        return output
    resume = (output / "checkpoints" / "latest").is_file()
    return train_run(config, resume=resume, overwrite=not resume, keep=keep, coupled=coupled)


def make_targets(pipeline, settings: ValidationSettings, device) -> Targets:
    """Held-out targets first, then the reported ones, all from the full model."""
    count = settings.held_out_targets + settings.num_targets
    samples = generate(pipeline.unet, sampling_scheduler(pipeline.scheduler, "ddim"), count,
                       num_inference_steps=settings.sampling_steps, seed=settings.seed, record_x0=True,
                       device=device, progress=False)
    grid = [t for t in timestep_grid(settings.measured_timesteps) for _ in range(settings.resamplings)]
    targets = Targets(samples, {"sample": (samples.samples, grid)})
    for t in settings.steps:
        index = samples.step_index(t)
        step = int(samples.timesteps[index])
        targets.quantities[f"t={step}"] = (samples.x0_predictions[index], [step] * settings.resamplings)
    return targets


def measure(run_dir: Path, targets: Targets, settings: ValidationSettings, device) -> dict[str, np.ndarray]:
    """Per quantity, (targets,): the negated denoising loss of every target under the run's model."""
    pipeline = load_pipeline(run_dir)
    model = pipeline.unet.to(device).eval()
    return {name: -denoising_losses(model, pipeline.scheduler.alphas_cumprod, inputs, grid,
                                    seed=target_seed(settings.seed)).double().numpy()
            for name, (inputs, grid) in targets.quantities.items()}


def gradient_features(run_dir: Path, data: ExperimentData, targets: Targets, settings: ValidationSettings, device,
                      progress: bool, train_timesteps: int) -> dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Per output function: the run's training features (kept in RUN/attribution/, where `condiff attribute`
    finds and resumes them) and, per quantity, the targets' features under the measured noise."""
    pipeline = load_pipeline(run_dir)
    model = pipeline.unet.to(device)
    folder = run_dir / "attribution"
    if not folder.is_dir():
        create_output_directory(folder, "attribution")
    projector = PROJECTORS[settings.projection](sum(p.numel() for p in model.parameters()), settings.dimension,
                                                seed=settings.seed, device=device)
    features = {}
    for output in ("dtrak", "loss"):
        attribution = AttributionSettings(output=output, train_timesteps=train_timesteps,
                                          dimension=settings.dimension, projection=settings.projection,
                                          seed=settings.seed, batch_size=settings.batch_size)
        featurizer = GradientFeaturizer(model, pipeline.scheduler.alphas_cumprod, projector, output=output,
                                        batch_size=settings.batch_size)
        phi = torch.from_numpy(train_features(featurizer, data.train.data, attribution, folder, resume=True,
                                              progress=progress))
        features[output] = (phi, {name: featurizer.train_features(inputs, grid, seed=target_seed(settings.seed))
                                  for name, (inputs, grid) in targets.quantities.items()})
    return features


def method_scores(full_runs: list[Path], data: ExperimentData, config: ExperimentConfig, targets: Targets,
                  settings: ValidationSettings, device, progress: bool) -> dict[str, dict[str, object]]:
    """Per method, per quantity: the scores (training examples x targets), or for TRAK (and its variants with
    other K) the (train, target) features of every model of `full_runs`, scored once the ridge is chosen (the
    gradient dot product uses the first model)."""
    features = {k: [gradient_features(run, data, targets, settings, device, progress, k) for run in full_runs]
                for k in (settings.train_timesteps, *settings.alternative_timesteps)}
    train = data.train.data
    classifier, _ = evaluation_classifier(config, data, device)
    train_embedding = extract_features(classifier, train)
    scores: dict[str, dict[str, object]] = {m: {} for m in (*TRAK_METHODS, *BASELINES)}
    for name, (inputs, _) in targets.quantities.items():
        for k, per_model in features.items():
            for method, output in TRAK_METHODS.items():
                label = method if k == settings.train_timesteps else f"{method}, K = {k}"
                scores.setdefault(label, {})[name] = [(model[output][0], model[output][1][name])
                                                      for model in per_model]   # scored once the ridge is chosen
        phi, per_quantity = features[settings.train_timesteps][0]["loss"]
        scores[BASELINES[0]][name] = gradient_dot_product(phi, per_quantity[name])
        scores[BASELINES[1]][name] = cosine_similarity(train, inputs)
        scores[BASELINES[2]][name] = cosine_similarity(train_embedding, extract_features(classifier, inputs))
        scores[BASELINES[3]][name] = random_scores(len(train), len(inputs), settings.seed)
    return scores


@dataclass
class LDSValidation:
    results: list[MethodResult]
    targets: Targets
    scores: dict                          # per method, per quantity: (training examples x targets)
    subsets: np.ndarray                   # (M x training examples) boolean
    test_retest: dict[str, float | None]  # per quantity: see `test_retest`
    variants: list[MethodResult]          # TRAK without the ensemble, or against one seed's measurement


def test_retest(per_seed: np.ndarray) -> float | None:
    """(seeds, subsets, targets) -> the mean over targets of the Spearman correlation, across subsets, between
    the measurements of seeds 0 and 1: how much of what is measured is the data rather than training noise
    (an LDS ceiling for one seed's measurement); None with one seed."""
    if len(per_seed) < 2:
        return None
    return float(np.mean([scipy.stats.spearmanr(per_seed[0][:, t], per_seed[1][:, t]).statistic
                          for t in range(per_seed.shape[2])]))


def linear_datamodeling_scores(config: ExperimentConfig, data: ExperimentData, output: Path,
                               settings: ValidationSettings, *, device=None, progress: bool = True) -> LDSValidation:
    """Train the full model and the M subset models under `output` (kept when already there), measure,
    score and compute every method's LDS per quantity on the reported targets."""
    device = resolve_device(device)
    full_runs = [retrain(config, output / ("full" if seed == 0 else f"full-seed-{seed}"), None, settings.coupled, seed)
                 for seed in range(settings.ensemble)]
    targets = make_targets(load_pipeline(full_runs[0]), settings, device)
    subsets = random_subsets(len(data.train), settings.num_subsets, settings.fraction, seed=settings.seed)
    measured: dict[str, list[list[np.ndarray]]] = {name: [] for name in targets.quantities}   # subset, seed
    for index, keep in enumerate(progress_bar(subsets, desc="subset models", enabled=progress)):
        per_seed = [measure(retrain(config, output / "subsets" / f"subset-{index:02d}-seed-{seed}", keep,
                                    settings.coupled, seed), targets, settings, device)
                    for seed in range(settings.seeds)]
        for name, per_subset in measured.items():
            per_subset.append([values[name] for values in per_seed])
    scores = method_scores(full_runs, data, config, targets, settings, device, progress)

    held_out = slice(0, settings.held_out_targets)
    reported = slice(settings.held_out_targets, None)
    results, reliability, variants = [], {}, []

    def lds(scores: np.ndarray, outcomes: np.ndarray) -> LinearDatamodelingScore:
        return linear_datamodeling_score(scores[:, reported], subsets, outcomes[:, reported], seed=settings.seed)

    for name in targets.quantities:
        per_seed = np.stack(measured[name]).transpose(1, 0, 2)   # (seeds, subsets, targets)
        reliability[name] = test_retest(per_seed[:, :, reported])
        outcomes = per_seed.mean(0)
        for method, by_quantity in scores.items():
            value, ridge = by_quantity[name], None
            if isinstance(value, list):   # TRAK: the ridge that predicts the held-out targets best
                models = value
                ridge = choose_ridge(models, lambda scores, outcomes=outcomes: linear_datamodeling_score(
                    scores.numpy()[:, held_out], subsets, outcomes[:, held_out]).mean, settings.ridges)
                value = by_quantity[name] = ensemble_scores(models, ridge).numpy()
                if method not in TRAK_METHODS:   # another K
                    variants.append(MethodResult(method, name, lds(value, outcomes), ridge))
                    continue
                if len(models) > 1:
                    variants.append(MethodResult(f"{method}, first model alone", name,
                                                 lds(trak_scores(*models[0], ridge).numpy(), outcomes), ridge))
                if settings.seeds > 1:
                    variants.append(MethodResult(f"{method}, against seed 0's measurement alone", name,
                                                 lds(value, per_seed[0]), ridge))
            results.append(MethodResult(method, name, lds(value, outcomes), ridge))
    return LDSValidation(results, targets, scores, subsets, reliability, variants)


@dataclass
class RemovalEffect:
    target: int                 # index among the reported targets
    quantity: str               # `t=T`
    removed: str                # what was removed: a method's top k, the k nearest, or k random
    x0_change: float            # RMS change of x0_hat(T) from the full model's
    sample_change: float        # RMS change of the final sample


def removal_sets(scores: dict, targets: Targets, settings: ValidationSettings, num_train: int
                 ) -> dict[tuple[int, str, str], np.ndarray]:
    """(target, quantity, what) -> the k training indices removed."""
    k = max(1, round(settings.removal_share * num_train))
    sets = {}
    reported = range(settings.held_out_targets, settings.held_out_targets + settings.removal_targets)
    for target in reported:
        for quantity in targets.quantities:
            if quantity == "sample":
                continue
            for what, method in (("top-k D-TRAK", next(iter(TRAK_METHODS))), ("nearest k, pixels", BASELINES[1]),
                                 ("nearest k, classifier features", BASELINES[2])):
                sets[target, quantity, what] = np.argsort(-scores[method][quantity][:, target])[:k]
    for draw in range(2):   # random removals do not depend on the target: two draws serve every row
        sets[-1, "", f"random k ({draw + 1})"] = np.random.default_rng(settings.seed + 7 + draw).choice(
            num_train, k, replace=False)
    return sets


def removal_effects(config: ExperimentConfig, data: ExperimentData, output: Path, targets: Targets, scores: dict,
                    settings: ValidationSettings, *, device=None, progress: bool = True) -> list[RemovalEffect]:
    """Retrain without each removal set, regenerate the targets from their noise, measure the change."""
    device = resolve_device(device)
    sets = removal_sets(scores, targets, settings, len(data.train))
    examined = sorted({(t, q) for t, q, _ in sets if t >= 0})
    first = settings.held_out_targets
    reference = targets.samples   # the full model's, from the same per-sample noise as the regenerations

    def regenerate(pipeline) -> SampleOutput:
        return generate(pipeline.unet.to(device), sampling_scheduler(pipeline.scheduler, "ddim"),
                        settings.removal_targets, num_inference_steps=settings.sampling_steps, seed=settings.seed,
                        first_index=first, record_x0=True, device=device, progress=False)

    effects = []
    for number, ((target, quantity, what), removed) in enumerate(progress_bar(sets.items(), desc="removals",
                                                                             enabled=progress)):
        keep = np.ones(len(data.train), dtype=bool)
        keep[removed] = False
        run_dir = retrain(config, output / "removals" / f"removal-{number:02d}", keep, settings.coupled)
        moved = regenerate(load_pipeline(run_dir))
        for t, q in (examined if target < 0 else [(target, quantity)]):
            row = t - first
            step = reference.step_index(int(q[2:]))
            effects.append(RemovalEffect(row, q, what, rms(moved.x0_predictions[step, row],
                                                           reference.x0_predictions[step, t]),
                                         rms(moved.samples[row], reference.samples[t])))
    return effects


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def check_settings(settings: ValidationSettings, num_train: int) -> None:
    if not 0 < settings.fraction < 1:
        raise ConfigError(f"fraction: {settings.fraction} is not in (0, 1)")
    if settings.num_subsets < 4 or settings.num_targets < 2 or settings.held_out_targets < 2:
        raise ConfigError("num_subsets >= 4, num_targets >= 2 and held_out_targets >= 2 are needed for an LDS")
    if settings.removal_targets > settings.num_targets or round(settings.removal_share * num_train) >= num_train:
        raise ConfigError("removal_targets / removal_share: more than the targets or the training set")
