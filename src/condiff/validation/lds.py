"""The LDS validation end to end: models (condiff.validation.counterfactual), methods and held-out choices
(condiff.validation.methods), and per quantity the reported figures: every method's LDS with its two-way
bootstrap interval, the paired difference of TRAK and the best baseline, the curves along the levers TRAK has
(ensemble size, K, training length), and the ceiling training noise puts on any method."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from condiff.attribution.validation import (
    Interval,
    LinearDatamodelingScore,
    lds_mean,
    linear_datamodeling_score,
    paired_difference,
    reliability_ceiling,
    retest_correlation,
)
from condiff.config import ExperimentConfig
from condiff.rundir import RunDirectory, write_atomic
from condiff.lifecycle.build import ExperimentData, evaluation_classifier, load_pipeline
from condiff.runtime import IndependentWorkers, progress_bar, resolve_device
from condiff.validation.counterfactual import (
    Targets,
    ValidationModels,
    ValidationSettings,
    make_targets,
    measure_subsets,
    train_models,
)
from condiff.validation.methods import (
    FINAL,
    TRAK,
    Candidate,
    FeatureBank,
    QuantityChoice,
    TrakConfig,
    choose_methods,
    similarity_candidates,
    trak_candidates,
    trak_configs,
)


@dataclass
class MethodResult:
    label: str
    method: str
    lds: LinearDatamodelingScore          # on the reported targets
    held_out_lds: float
    ridge: float | None = None


@dataclass
class QuantityResult:
    quantity: str
    trak: MethodResult                    # the TRAK configuration chosen on held-out targets
    baseline: MethodResult                # the best baseline, chosen the same way
    difference: Interval                  # LDS(TRAK) - LDS(best baseline), paired two-way bootstrap
    methods: list[MethodResult]           # each method's held-out choice
    curves: dict[str, list[tuple[str, MethodResult]]]   # lever -> (value, result)
    retest: float | None                  # r: agreement of two training seeds' measurements
    ceiling: float | None                 # sqrt(Spearman-Brown reliability of the seed mean)
    candidates: list[dict] = field(default_factory=list)   # every candidate: held-out and reported LDS


@dataclass
class LDSValidation:
    settings: ValidationSettings
    models: ValidationModels
    targets: Targets
    measured: dict[str, np.ndarray]       # per quantity (seeds, subsets, targets)
    choices: dict[str, QuantityChoice]
    results: list[QuantityResult]


def reported_result(candidate: Candidate, subsets: np.ndarray, outcomes: np.ndarray, targets: Targets,
                    settings: ValidationSettings) -> MethodResult:
    part = targets.reported_slice
    lds = linear_datamodeling_score(candidate.scores[:, part], subsets, outcomes[:, part],
                                    resamples=settings.resamples, seed=settings.seed)
    return MethodResult(candidate.label, candidate.method, lds, candidate.held_out_lds, candidate.ridge)


def curves(choice: QuantityChoice, settings: ValidationSettings, report) -> dict[str, list[tuple[str, MethodResult]]]:
    """The chosen TRAK along each lever, the others held at the choice (each point's ridge chosen on the
    held-out targets); ensemble size and K with the final weights, training length with every model."""
    tried = {c.config: c for c in choice.candidates if c.method == TRAK}
    anchor = replace(choice.trak.config, weights=FINAL)
    step = next((c.at_step for c in tried if c.at_step is not None), None)
    timesteps = [(str(k), replace(anchor, train_timesteps=k, at_step=None)) for k in settings.train_timesteps]
    if step is not None:
        timesteps.append((f"{settings.resamplings} at t = {step}",
                          replace(anchor, train_timesteps=settings.resamplings, at_step=step)))
    weights = sorted({c.weights for c in tried} - {FINAL}) + [FINAL]
    levers = {
        "ensemble models": [(str(m), replace(anchor, models=m)) for m in settings.ensemble_sizes],
        "K (training timesteps)": timesteps,
        "weights (training length)": [(w, replace(anchor, weights=w, models=settings.ensemble, at_step=None,
                                                  train_timesteps=min(settings.train_timesteps),
                                                  dimension=min(settings.dimensions))) for w in weights],
    }
    return {lever: [(value, report(tried[config])) for value, config in points if config in tried]
            for lever, points in levers.items()}


def quantity_result(quantity: str, choice: QuantityChoice, subsets: np.ndarray, per_seed: np.ndarray,
                    targets: Targets, settings: ValidationSettings) -> QuantityResult:
    outcomes = per_seed.mean(0)
    part = targets.reported_slice

    def report(candidate: Candidate) -> MethodResult:
        return reported_result(candidate, subsets, outcomes, targets, settings)

    difference = paired_difference(choice.trak.scores[:, part], choice.baseline.scores[:, part], subsets,
                                   outcomes[:, part], resamples=settings.resamples, seed=settings.seed)
    lines = curves(choice, settings, report)
    if len(per_seed) > 1:
        one_seed = reported_result(choice.trak, subsets, per_seed[0], targets, settings)
        lines["measured seeds"] = [("1", one_seed), (str(len(per_seed)), report(choice.trak))]
    retest = retest_correlation(per_seed[:, :, part])
    return QuantityResult(
        quantity, report(choice.trak), report(choice.baseline), difference,
        [report(c) for c in choice.per_method.values()], lines, retest, reliability_ceiling(retest, len(per_seed)),
        [{"label": c.label, "method": c.method, "ridge": c.ridge, "held_out": c.held_out_lds,
          "reported": lds_mean(c.scores[:, part], subsets, outcomes[:, part])} for c in choice.candidates])


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as file:   # a file object: np.savez would add ".npz" to a temporary's name
        np.savez(file, **arrays)


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in RunDirectory(run_dir).checkpoints.glob("step-*"))


def score_quantities(bank: FeatureBank, data: ExperimentData, config: ExperimentConfig, subsets: np.ndarray,
                     measured: dict[str, np.ndarray], device) -> dict[str, QuantityChoice]:
    """Per quantity, every candidate and the choices its held-out targets make. TRAK's training-length curve
    is computed for the output function chosen with the final weights."""
    settings, targets = bank.settings, bank.targets
    classifier, _ = evaluation_classifier(config, data, device)
    steps = checkpoint_steps(bank.runs[0])
    choices = {}
    for quantity, (inputs, grid) in targets.quantities.items():
        outcomes = measured[quantity].mean(0)
        step = None if quantity == "sample" else grid[0]
        candidates = trak_candidates(bank, trak_configs(settings, [], step), quantity, subsets, outcomes)
        candidates += similarity_candidates(data, classifier, inputs, settings, subsets, outcomes,
                                            targets.held_out_slice)
        output = choose_methods(candidates).trak.config.output
        along_training = [c for c in trak_configs(replace(settings, outputs=(output,)), steps) if c.weights != FINAL]
        candidates += trak_candidates(bank, along_training, quantity, subsets, outcomes)
        choices[quantity] = choose_methods(candidates)
    return choices


def linear_datamodeling_scores(config: ExperimentConfig, data: ExperimentData, output: Path,
                               settings: ValidationSettings, workers: IndependentWorkers, *, device=None,
                               progress: bool = True) -> LDSValidation | None:
    """Train (or keep) every model under `output`, shared out between `workers`; on the main worker, measure,
    featurize, choose on held-out targets and report per quantity (other workers return None)."""
    device = resolve_device(device)
    models = train_models(config, len(data.train), output, settings, workers, progress)
    bank = FeatureBank(models.full, data, None, settings, device, progress)
    features = [(m, TrakConfig(o, k, d, settings.ensemble)) for m in range(settings.ensemble) for o in settings.outputs
                for k in settings.train_timesteps for d in settings.dimensions]
    for model, trak in workers.share(features):   # the training side of the final weights, shared out
        bank.train(model, trak)
    workers.barrier("features")
    if not workers.is_main:
        return None
    bank.targets = make_targets(load_pipeline(models.full[0]), settings, device)
    targets = bank.targets
    measured = measure_subsets(models, targets, settings, device, progress)
    write_atomic(output / "measured.npz", lambda path: save_arrays(path, measured))   # for the record
    choices = score_quantities(bank, data, config, models.subsets, measured, device)
    results = [quantity_result(q, choices[q], models.subsets, measured[q], targets, settings)
               for q in progress_bar(choices, desc="intervals", enabled=progress)]
    return LDSValidation(settings, models, targets, measured, choices, results)
