"""`condiff reproduce attribution-digits`: is attribution right? The counterfactual validation of
condiff.experiments.counterfactual on the embedded digits, with journey strips of the attributed model, in
one report: the LDS of every method (95% bootstrap intervals) per quantity, and the remove-top-k table.

`--scale cpu` retrains 32 half-subset models of configs/digits-attribution.toml (within the hour on two
cores); `--scale paper` D-TRAK's sizes, for GPUs; `--scale smoke` the same protocol with a few short
trainings (minutes: it checks the pipeline, its figures mean nothing). A reproduction resumes (`--resume`): finished models are kept.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from condiff.config import ExperimentConfig, load_config
from condiff.experiments.attribution import AttributionSettings, attribute_run
from condiff.experiments.build import build_data
from condiff.experiments.counterfactual import (
    BASELINES,
    TRAK_METHODS,
    LDSValidation,
    MethodResult,
    RemovalEffect,
    ValidationSettings,
    check_settings,
    linear_datamodeling_scores,
    removal_effects,
)
from condiff.experiments.training import CONFIG_DIR
from condiff.report import image_md, markdown_table, new_figure, save_figure, write_report
from condiff.rundir import RunDirectoryError, create_output_directory, is_condiff_directory, write_json_atomic

SCALES = {
    "cpu": ({}, ValidationSettings(seeds=2, ensemble=3, train_timesteps=100, alternative_timesteps=(10,))),
    # D-TRAK's protocol sizes (64 subsets, K = 100, k = 32768) and longer training: for GPUs.
    "paper": ({"train.steps": 5000, "train.checkpoint_every": 5000},
              ValidationSettings(num_subsets=64, seeds=3, ensemble=8, num_targets=200, held_out_targets=50,
                                 train_timesteps=100, dimension=32768, removal_targets=4)),
    "smoke": ({"train.steps": 60, "train.warmup_steps": 5},
              ValidationSettings(num_subsets=6, seeds=2, ensemble=2, num_targets=8, held_out_targets=4,
                                 train_timesteps=4, alternative_timesteps=(2,), measured_timesteps=4,
                                 resamplings=4, dimension=256, ridges=(0.01, 1.0), sampling_steps=10, removal_targets=1)),
}


def reproduce_attribution(output: Path, *, scale: str = "cpu", overwrite: bool = False, resume: bool = False,
                          device: str | torch.device | None = None, progress: bool = True,
                          config: ExperimentConfig | None = None, settings: ValidationSettings | None = None) -> Path:
    """Validate attribution on digits (or on `config`'s run, with `settings`, from Python) into `output`;
    returns output/report.md."""
    if scale not in SCALES:
        raise RunDirectoryError(f"--scale {scale}: attribution-digits has the scales {', '.join(SCALES)}")
    overrides, scale_settings = SCALES[scale]
    settings = settings or scale_settings
    config = config or load_config(CONFIG_DIR / "digits-attribution.toml", overrides)
    data = build_data(config)
    check_settings(settings, len(data.train))
    output = Path(output)
    if not resume:
        create_output_directory(output, "reproduce", overwrite=overwrite, resumable=True)
    elif not is_condiff_directory(output):
        raise RunDirectoryError(f"{output}: nothing to resume (not a directory condiff created)")
    validation = linear_datamodeling_scores(config, data, output, settings, device=device, progress=progress)
    results = validation.results
    effects = removal_effects(config, data, output, validation.targets, validation.scores, settings, device=device,
                              progress=progress)
    journeys = AttributionSettings(num_targets=4, steps=(900, 700, 500, 300, 100), train_timesteps=settings.train_timesteps,
                                   dimension=settings.dimension, projection=settings.projection,
                                   sampling_steps=settings.sampling_steps, seed=settings.seed,
                                   ridge=chosen_ridge(results))
    attribute_run(output / "full", journeys, resume=True, device=device, progress=progress)
    write_json_atomic(output / "lds.json", {
        "settings": asdict(settings), "scale": scale,
        "lds": [{"method": r.method, "quantity": r.quantity, "ridge": r.ridge, **asdict(r.lds)} for r in results],
        "test_retest": validation.test_retest,
        "variants": [{"method": r.method, "quantity": r.quantity, "ridge": r.ridge, **asdict(r.lds)}
                     for r in validation.variants],
        "removals": [asdict(e) for e in effects]})
    plot_lds(results, output / "lds.png")
    return write_attribution_validation_report(output, config, scale, settings, len(data.train), validation, effects)


def chosen_ridge(results: list[MethodResult]) -> float:
    """The D-TRAK ridge chosen on held-out targets for the `sample` quantity."""
    return next(r.ridge for r in results if r.method == next(iter(TRAK_METHODS)) and r.quantity == "sample")


def plot_lds(results: list[MethodResult], path: Path) -> Path:
    quantities = list(dict.fromkeys(r.quantity for r in results))
    methods = list(dict.fromkeys(r.method for r in results))
    figure = new_figure((2.2 + 1.4 * len(quantities) * len(methods) / 3, 3.6))
    axes = figure.subplots()
    width = 0.8 / len(methods)
    for number, method in enumerate(methods):
        rows = [next(r for r in results if r.method == method and r.quantity == q) for q in quantities]
        centre = np.arange(len(quantities)) + (number - (len(methods) - 1) / 2) * width
        means = np.array([r.lds.mean for r in rows])
        errors = np.array([[r.lds.mean - r.lds.low for r in rows], [r.lds.high - r.lds.mean for r in rows]])
        axes.bar(centre, means, width, yerr=errors, capsize=2, label=method)
    axes.axhline(0, color="0.3", linewidth=0.8)
    axes.set(xticks=np.arange(len(quantities)), xticklabels=quantities, ylabel="LDS (Spearman, 95% CI)",
             title="Linear datamodeling score per method and target quantity")
    axes.legend(fontsize="x-small", ncols=2)
    return save_figure(figure, path)


def removal_rows(effects: list[RemovalEffect]) -> list[list]:
    rows = [[e.target, e.quantity, e.removed, e.x0_change, e.sample_change] for e in effects]
    return sorted(rows, key=lambda row: (row[0], row[1], row[2]))


def removal_summary(effects: list[RemovalEffect]) -> list[list]:
    """Per kind of removal (the random draws pooled): the mean change of x0_hat(T) and of the sample."""
    def kind(effect: RemovalEffect) -> str:
        return "random k" if effect.removed.startswith("random") else effect.removed

    rows = []
    for name in dict.fromkeys(map(kind, effects)):
        chosen = [e for e in effects if kind(e) == name]
        rows.append([name, len(chosen), float(np.mean([e.x0_change for e in chosen])),
                     float(np.mean([e.sample_change for e in chosen]))])
    return rows


def write_attribution_validation_report(output: Path, config: ExperimentConfig, scale: str,
                                        settings: ValidationSettings, num_train: int, validation: LDSValidation,
                                        effects: list[RemovalEffect]) -> Path:
    results = validation.results
    table = markdown_table(["quantity", "method", "LDS", "95% CI", "ridge c (held-out targets)"],
                           [[r.quantity, r.method, r.lds.mean, f"[{r.lds.low:.3f}, {r.lds.high:.3f}]",
                             "" if r.ridge is None else f"{r.ridge:g}"] for r in results])
    best = {}
    for r in results:
        if r.quantity == "sample":
            best[r.method] = r.lds
    trak = max((best[m] for m in TRAK_METHODS), key=lambda lds: lds.mean)
    similarity = max((best[m] for m in BASELINES[1:3]), key=lambda lds: lds.mean)
    verdict = (f"Best TRAK LDS on samples {trak.mean:.3f} [{trak.low:.3f}, {trak.high:.3f}]; best similarity baseline "
               f"{similarity.mean:.3f} [{similarity.low:.3f}, {similarity.high:.3f}]; random "
               f"{best['random'].mean:.3f} [{best['random'].low:.3f}, {best['random'].high:.3f}]. TRAK's interval "
               f"{'lies above' if trak.low > max(similarity.high, best['random'].high) else 'does not lie above'} "
               "both baselines' intervals.")
    retest = ", ".join(f"{name} {value:.3f}" for name, value in validation.test_retest.items() if value is not None)
    if retest:
        verdict += (" Test-retest: the Spearman correlation across subsets between the measurements of two training "
                    f"seeds, mean over targets, is {retest}: the share of what is measured that the data, rather than "
                    f"training noise, decides; the {settings.seeds}-seed mean is more reliable, but no method can "
                    "predict the rest.")
    k = max(1, round(settings.removal_share * num_train))
    protocol = (
        f"Config `{config.name}` (`full/config.toml`; {num_train} training examples, `{config.data.dataset}` data), "
        f"`--scale {scale}`. The attributed model (`full/`) and every retrained model use the config's seed"
        + (f" (subset models also the next {settings.seeds - 1}: the measured target is the mean over "
           f"{settings.seeds} seeds)" if settings.seeds > 1 else "") + "; "
        + ("retraining is **coupled**: every model draws the full set's minibatches, timesteps and noise and gives "
           "the left-out examples weight 0 (common random numbers), so models differ by their data alone. "
           if settings.coupled else "each subset model samples its own subset with the fixed seed. ")
        + f"LDS: {settings.num_subsets} random subsets of {settings.fraction:.0%} of the training set "
        f"(`subsets/`), one model each; targets are {settings.num_targets} DDIM-{settings.sampling_steps} samples "
        f"of the full model (plus {settings.held_out_targets} held-out samples on which the TRAK ridge is chosen "
        "and which are never reported). Measured per model and target, noise common to all models: `sample` = "
        f"the denoising loss of the generated sample averaged over {settings.measured_timesteps} evenly spread "
        f"timesteps x {settings.resamplings} noises (D-TRAK's target); `t=T` = the loss at T of the sample's x0 prediction at T, re-noised "
        f"R = {settings.resamplings} times (Journey-TRAK's step target). Prediction = the sum of a method's scores "
        "over the subset; LDS = mean over targets of the Spearman correlation between prediction and the negated "
        "loss (helpful examples lower it); 95% bootstrap interval over targets. TRAK: gradients of the output "
        f"function averaged over K = {settings.train_timesteps} evenly spread timesteps, {settings.projection} projection to k = {settings.dimension}, "
        + (f"scores averaged over {settings.ensemble} models of the full set (seeds 0-{settings.ensemble - 1}, "
           "`full*/`)" if settings.ensemble > 1 else "one model (the final weights)") + ". Baselines: the loss gradients' dot product without the kernel (TracIn-"
        "like), cosine similarity of pixels and of condiff's evaluation-classifier features, random scores.")
    removal = (
        f"For the first {settings.removal_targets} reported targets and each step T, a model is retrained (coupled) "
        f"without k = {k} images ({settings.removal_share:.0%}): the top k by D-TRAK at T, the k nearest to "
        "x0_hat(T) in pixels and in classifier features; and, for every row, k random images (two draws). Each "
        "target is regenerated from its own noise; RMS change (pixels in [-1, 1]) of x0_hat(T) and of the final "
        "sample from the full model's.\n\n"
        + markdown_table(["removed", "rows", "mean RMS change of x0_hat(T)", "mean RMS change of the sample"],
                         removal_summary(effects))
        + "\n\n" + markdown_table(["target", "step", "removed", "RMS change of x0_hat(T)", "RMS change of the sample"],
                                  removal_rows(effects)))
    journeys = "\n\n".join(image_md(f"full/attribution/journey-{t}.png", f"journey of target {t}") for t in range(4))
    return write_report(output / "report.md", f"Attribution validated by retraining: {config.name} (--scale {scale})", [
        ("Protocol", protocol),
        ("Linear datamodeling score", table + "\n\n" + verdict + "\n\n" + image_md("lds.png", "LDS per method")),
        ("Variants", "What the ensemble, the seed average and K do (TRAK's ridge chosen the same way, same targets):\n\n" + markdown_table(
            ["quantity", "variant", "LDS", "95% CI"],
            [[r.quantity, r.method, r.lds.mean, f"[{r.lds.low:.3f}, {r.lds.high:.3f}]"] for r in validation.variants])
         if validation.variants else "None: one model and one seed."),
        ("Remove the top k", removal),
        ("Journeys", "Four samples of the full model; per step, x_t, x0_hat(t), the six most helpful and the six "
                     "most harmful training images by D-TRAK (ridge chosen above):\n\n" + journeys),
    ])

