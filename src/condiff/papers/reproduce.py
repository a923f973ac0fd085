"""`condiff reproduce EXPERIMENT`: the paper's experiments, end to end, with a report beside its figures.

- mnist-minority / fashion-minority / digits-minority (the demo's data): digits (items) 4, 5, 7 kept at a
  quarter of the other classes (MNIST: 256 per class, 64 for the minorities, the authors' setting). A config
  that requests target shares gives four models, same budget: unconstrained, the paper's resilient dual
  training (Algorithm 3), multipliers held at Theorem 1's closed form, and measured share control; a config
  without target shares (the paper scale) an unconstrained and a constrained model.
- mnist-finetune: a model pretrained without digit 9 is adapted to 9 alone, unconstrained and under
  the constraint "stay close to the pretrained model" (fixed threshold).

Each run is an ordinary condiff run directory under the output folder (so `condiff sample/evaluate`
work on it); `--resume` continues an interrupted reproduction, finished runs are kept. `--scale cpu`
runs the configs in configs/ (reduced: a laptop CPU within the hour); `--scale paper` those in
configs/paper/ (the authors' settings, for GPUs).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean

import numpy as np
import torch

from condiff.config import CONFIG_DIR, ArgumentError, ConstraintsConfig, ExperimentConfig, describe_constraints, load_config
from condiff.report import image_md, markdown_table, write_report
from condiff.rundir import RunDirectory, create_or_resume_directory, read_metrics, write_json_atomic
from condiff.lifecycle.evaluation import RunEvaluation, describe_multipliers, evaluate_run, plot_runs_side_by_side
from condiff.lifecycle.training import finish_run, with_seed_offset
from condiff.runtime import process_state, run_side_by_side

SCALES = {"cpu": CONFIG_DIR, "paper": CONFIG_DIR / "paper"}
# Attribution validated by retraining (condiff.validation.reproduce), with its own scales.
ATTRIBUTION_EXPERIMENTS = ("attribution-digits",)


@dataclass
class PaperFigure:
    unconstrained: float | None             # None: the paper reports no figure
    constrained: float | None
    metric: str = "FID (Inception, clean-fid), 15,000 samples against a balanced reference"

    @property
    def ratio(self) -> float | None:
        return None if self.unconstrained is None else self.constrained / self.unconstrained


@dataclass
class Experiment:
    name: str
    title: str
    config: str                              # the constrained run's config file
    paper: PaperFigure
    pretrain_config: str | None = None       # fine-tuning: the pretraining run's config
    new_classes: list[int] = field(default_factory=list)
    scales: tuple[str, ...] = ("cpu", "paper")


EXPERIMENTS = {e.name: e for e in [
    Experiment("mnist-minority", "MNIST, digits 4, 5, 7 under-represented", "mnist-minority.toml",
               PaperFigure(15.9, 13.4)),
    Experiment("fashion-minority", "Fashion-MNIST, items 4, 5, 7 under-represented", "fashion-minority.toml",
               PaperFigure(None, None, "not reported in the paper")),
    Experiment("digits-minority", "8x8 digits (the demo's data), digits 4, 5, 7 under-represented",
               "digits-minority.toml", PaperFigure(None, None, "not in the paper"), scales=("cpu",)),
    Experiment("mnist-finetune", "MNIST fine-tuning: pretrained without 9, adapted to 9", "mnist-finetune.toml",
               PaperFigure(45.9, 25.2), pretrain_config="mnist-pretrain-without-9.toml", new_classes=[9]),
]}


# Models of a config that requests target shares, two at a time ("resilient" calibrates on a finished "held").
SHARE_STAGES = (("unconstrained", "held"), ("resilient", "measured"))
PAPER_PEAK_DUAL_LR = 0.1     # the authors' dual step: 1000 x their peak primal lr of 1e-4


def unconstrained_variant(config: ExperimentConfig) -> ExperimentConfig:
    """A copy of the run with its constraints dropped: the baseline with an equal budget."""
    config = copy.deepcopy(config)
    config.constraints, config.finetune.threshold = ConstraintsConfig(), None
    return config


def resilient_variant(config: ExperimentConfig, held_run: Path) -> ExperimentConfig:
    """The paper's Algorithm 3 on the same classes: multipliers from 0 by resilient dual ascent, N = 2 primal
    steps per dual step, a dual step following the primal schedule with the authors' peak of 0.1, one batch of
    every constraint set per step (their estimator). Its fixed point is lambda_c = l_c / (2 gamma); gamma =
    mean_c l_c / (2 lambda*_c) puts it at Theorem 1's multipliers lambda* for the requested shares, with l_c
    the constraint losses of the held run's last quarter (the calibration of docs/constrained-training.md).
    `config` itself is left as it was."""
    config = copy.deepcopy(config)
    held = RunDirectory(held_run)
    constraints = json.loads(held.summary_file.read_text())["constraints"]
    records = [r for r in read_metrics(held.metrics_file) if r["constraint_losses"]]
    late = records[len(records) * 3 // 4:]
    config.constraints.gamma = fmean(fmean(r["constraint_losses"][c["name"]] for r in late) / (2 * c["multiplier"])
                                     for c in constraints)
    config.constraints.target_shares, config.constraints.control = None, "held"
    config.dual.estimator, config.dual.primal_steps_per_dual = "stratified", 2
    config.dual.lr, config.dual.lr_relative = PAPER_PEAK_DUAL_LR / config.train.lr, True
    return config


def variant_config(variant: str, config: ExperimentConfig, output: Path) -> ExperimentConfig:
    """The model `variant` of an experiment's config (a copy): "constrained" is the config as it is."""
    if variant == "unconstrained":
        return unconstrained_variant(config)
    if variant == "resilient":
        return resilient_variant(config, output / "held")
    config = copy.deepcopy(config)
    if variant in ("held", "measured"):
        config.constraints.control = variant
    return config


def run_once(config: ExperimentConfig, resume: bool, device, progress: bool) -> RunEvaluation:
    """Train (or continue, or keep a finished) run, then evaluate it unless already evaluated."""
    run_dir = finish_run(config, resume=resume, announce=True)
    evaluation = RunDirectory(run_dir).evaluation_file
    if resume and evaluation.is_file():
        return RunEvaluation.from_dict(json.loads(evaluation.read_text()))
    print(f"== {run_dir.name}: evaluating")
    return evaluate_run(run_dir, device=device, progress=progress, resample=True)


def reproduce(name: str, output: Path, *, scale: str = "cpu", overwrite: bool = False, resume: bool = False,
              device: str | torch.device | None = None, progress: bool = True, seed: int = 0,
              coupled: bool = False) -> Path:
    """Run experiment `name` into `output` and write output/report.md; returns the report's path.
    Models are evaluated on `device` (default: the accelerator's); `overwrite` replaces only a
    directory condiff made; `seed` offsets every model's training and sampling seeds (same data);
    `coupled`: attribution-digits' variant with coupled subset models."""
    if name in ATTRIBUTION_EXPERIMENTS:
        if seed:
            raise ArgumentError("seed", f"{name} draws its own seeds (disjoint seed ranges); leave it at 0")
        from condiff.validation.reproduce import reproduce_attribution

        return reproduce_attribution(output, scale=scale, overwrite=overwrite, resume=resume, coupled=coupled,
                                     device=device, progress=progress)
    if coupled:
        raise ArgumentError("coupled", f"only attribution-digits has a coupled variant, not {name}")
    if name not in EXPERIMENTS:
        raise ArgumentError("name", f"unknown experiment {name!r}; choose one of "
                                f"{', '.join([*EXPERIMENTS, *ATTRIBUTION_EXPERIMENTS])}")
    if scale not in EXPERIMENTS[name].scales:
        raise ArgumentError("scale", f"{scale}: {name} has the scales {', '.join(EXPERIMENTS[name].scales)}")
    experiment, config_dir = EXPERIMENTS[name], SCALES[scale]
    output = create_or_resume_directory(output, "reproduce", resume=resume, overwrite=overwrite)

    configs: dict[str, ExperimentConfig] = {}
    results: dict[str, RunEvaluation] = {}
    overrides = {}
    if experiment.pretrain_config:
        configs["pretrained"] = with_seed_offset(load_config(config_dir / experiment.pretrain_config,
                                                   {"output_dir": str(output / "pretrained")}), seed)
        results["pretrained"] = run_once(configs["pretrained"], resume, device, progress)
        overrides = {"finetune.pretrained": str(output / "pretrained")}
    def load(variant: str) -> ExperimentConfig:
        return with_seed_offset(load_config(config_dir / experiment.config,
                                            {**overrides, "output_dir": str(output / variant)}), seed)

    requests_shares = load_config(config_dir / experiment.config, overrides).constraints.target_shares is not None
    for stage in SHARE_STAGES if requests_shares else (("unconstrained", "constrained"),):
        staged = {variant: variant_config(variant, load(variant), output) for variant in stage}
        configs.update(staged)
        results.update(run_side_by_side(run_once, {variant: (config, resume, device, progress)
                                                   for variant, config in staged.items()}))
    if not process_state().is_main_process:
        return output / "report.md"
    return write_reproduction_report(experiment, scale, output, configs, results)


def old_class_coverage(frequencies, reference, new_classes: list[int]) -> float:
    """Share of the pretrained model's old-class distribution the model still covers:
    sum over old classes of min(p(c), p_pre(c)) / sum of p_pre(c). 1 keeps all of it; collapsing onto
    the new classes, or onto a few old ones, lowers it."""
    old = [c for c in range(len(reference)) if c not in new_classes]
    p, q = np.asarray(frequencies)[old], np.asarray(reference)[old]
    return float(np.minimum(p, q).sum() / q.sum())


def result_rows(experiment: Experiment, output: Path, configs: dict[str, ExperimentConfig],
                results: dict[str, RunEvaluation]) -> tuple[list[str], list[list], dict]:
    """The results table (headers, rows) and summary.json's per-model entries."""
    classes = next((c.constraints.classes for c in configs.values() if c.constraints.target_shares), [])
    headers = ["model", "class TV to uniform", "FD (condiff classifier)", "precision", "recall", "training (s)",
               "classifier held-out accuracy", "samples"]
    if classes:
        headers[1:1] = [f"share of class {c} [95%]" for c in classes]
    rows, summary = [], {}
    for n, r in results.items():
        seconds = json.loads(RunDirectory(output / n).summary_file.read_text()).get("train_seconds")
        summary[n] = {k: getattr(r, k) for k in ("tv_to_uniform", "frechet_distance", "precision", "recall",
                                                 "classifier_accuracy", "class_frequencies", "multipliers")}
        summary[n]["train_seconds"] = seconds
        rows.append([n, *(f"{r.class_frequencies[c]:.3f} [{r.class_frequencies_low[c]:.3f}, "
                          f"{r.class_frequencies_high[c]:.3f}]" for c in classes),
                     r.tv_to_uniform, r.frechet_distance, r.precision, r.recall, seconds, r.classifier_accuracy,
                     r.num_samples])
    if experiment.new_classes:
        reference = results["pretrained"].class_frequencies
        headers[1:1] = ["new-class share", "old-class coverage"]
        for row, (n, r) in zip(rows, results.items()):
            new_share = float(sum(r.class_frequencies[c] for c in experiment.new_classes))
            coverage = old_class_coverage(r.class_frequencies, reference, experiment.new_classes)
            row[1:1] = [new_share, coverage]
            summary[n].update(new_class_share=new_share, old_class_coverage=coverage)
    return headers, rows, summary


def write_reproduction_report(experiment: Experiment, scale: str, output: Path, configs: dict[str, ExperimentConfig],
                              results: dict[str, RunEvaluation]) -> Path:
    order = [n for n in ("pretrained", "unconstrained", "resilient", "held", "measured", "constrained") if n in results]
    results = {n: results[n] for n in order}
    plot_runs_side_by_side(output, results, experiment.title)
    headers, rows, summary = result_rows(experiment, output, configs, results)
    paper_model = "resilient" if "resilient" in results else "constrained"   # the paper's own method
    baseline = results["unconstrained"]
    findings = []
    if experiment.new_classes:
        findings.append("Old-class coverage: sum over the old classes of min(p(c), p_pretrained(c)), divided by "
                        "the pretrained model's old-class mass (1 = keeps everything it generated).")
    for n, r in results.items():
        if n in ("pretrained", "unconstrained"):
            continue
        summary[n]["tv_ratio"] = r.tv_to_uniform / max(baseline.tv_to_uniform, 1e-12)
        summary[n]["fd_ratio"] = r.frechet_distance / baseline.frechet_distance
        findings.append(f"{n} / unconstrained: class TV {summary[n]['tv_ratio']:.3f}, FD {summary[n]['fd_ratio']:.3f}.")
    summary.update(scale=scale, paper_model=paper_model, tv_ratio=summary[paper_model]["tv_ratio"],
                   fd_ratio=summary[paper_model]["fd_ratio"])
    write_json_atomic(output / "summary.json", summary)

    paper = experiment.paper
    comparison = markdown_table(
        ["source", "metric", "unconstrained", "constrained", "constrained / unconstrained"],
        [["paper (Khalafi et al. 2024)", paper.metric, paper.unconstrained, paper.constrained, paper.ratio],
         [f"condiff, --scale {scale} ({paper_model})", "FD on condiff's own classifier features (not Inception "
          f"FID), {results[paper_model].num_samples} samples against a balanced reference of "
          f"{results[paper_model].num_reference}", baseline.frechet_distance, results[paper_model].frechet_distance,
          summary["fd_ratio"]]])
    multipliers = "\n".join(f"- {n}: {describe_multipliers(r.multipliers)}" for n, r in results.items() if r.multipliers)
    setup = "\n".join(f"- **{n}**: `{c.data.dataset}` data, model `{c.model.kind}`, {c.train.steps} steps of batch "
                      f"{c.train.batch_size}, lr {c.train.lr:g}, {describe_constraints(c)}; sampled with "
                      f"{c.sample.method.upper()}-{c.sample.steps}; training seed {c.train.seed}, sampling seed "
                      f"{c.sample.seed}." for n, c in configs.items())
    return write_report(output / "report.md", f"condiff reproduce {experiment.name} (--scale {scale})", [
        ("Setup", f"{experiment.title}.\n\n{setup}\n\nConfigs: `{output}/*/config.toml`."),
        ("Results", markdown_table(headers, rows) + "\n\nShares and intervals (95% Wilson) by condiff's evaluation "
         "classifier on each model's samples; training time is wall-clock on this machine (launched as one "
         "process, condiff trains two models at a time, side by side, each on half of the threads). " + " ".join(findings)
         + f"\n\nFinal multipliers:\n\n{multipliers}\n\nTheorem 1's shares from them are in `MODEL/report.md`."),
        ("Beside the paper", comparison + "\n\nThe two metrics differ (different feature extractors, sample "
         "counts and model scales): compare the direction and the ratios, not the values."),
        ("Class frequencies", image_md("class_frequencies.png", "class frequencies")),
        ("Samples", "\n\n".join(f"{n}:\n\n" + image_md(f"{n}/samples.png", f"{n} samples") for n in results)),
        ("Training curves", image_md("training_curves.png", "losses and multipliers")),
    ])

