"""The report of `condiff reproduce attribution-digits`: the protocol, the headline (TRAK chosen on held-out
targets against the best baseline, paired), every method, the curves along TRAK's levers, the per-step
removal test, journeys; `lds.json` and `lds.png`, `lds-curves.png`, `removals.png`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from condiff.config import ExperimentConfig
from condiff.report import image_md, markdown_table, new_figure, save_figure, write_report
from condiff.rundir import write_json_atomic
from condiff.validation.counterfactual import SUBSET_SEED_OFFSET
from condiff.validation.lds import LDSValidation, MethodResult, QuantityResult
from condiff.validation.removal import NOISE_FLOOR, Removal, RemovalEffect, compare_removals

LDS_BAR = 0.25   # the bar for the `sample` quantity


def json_safe(value):
    """`value` with every NaN or infinity as None (strict JSON)."""
    if isinstance(value, dict):
        return {key: json_safe(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def interval_text(low: float, high: float) -> str:
    return f"[{low:.3f}, {high:.3f}]"


def result_row(result: MethodResult) -> list:
    return [result.label, result.held_out_lds, result.lds.mean, interval_text(result.lds.low, result.lds.high),
            "" if result.ridge is None else f"{result.ridge:g}"]


def plot_methods(results: list[QuantityResult], path: Path) -> Path:
    """Per quantity, each method's held-out choice: reported LDS with its two-way interval."""
    methods = [m.method for m in results[0].methods]
    figure = new_figure((2.5 + 1.2 * len(results) * len(methods) / 3, 3.6))
    axes = figure.subplots()
    width = 0.8 / len(methods)
    for number, method in enumerate(methods):
        rows = [next(m for m in r.methods if m.method == method) for r in results]
        centre = np.arange(len(results)) + (number - (len(methods) - 1) / 2) * width
        means = np.array([m.lds.mean for m in rows])
        axes.bar(centre, means, width, yerr=[means - [m.lds.low for m in rows], [m.lds.high for m in rows] - means],
                 capsize=2, label=method)
    for position, result in enumerate(results):
        if result.ceiling is not None:
            axes.hlines(result.ceiling, position - 0.45, position + 0.45, colors="black", linestyles="dashed",
                        label="reliability ceiling" if position == 0 else None)
    axes.axhline(0, color="0.3", linewidth=0.8)
    axes.set(xticks=np.arange(len(results)), xticklabels=[r.quantity for r in results],
             ylabel="LDS (Spearman, 95% two-way CI)", title="LDS per method (each chosen on held-out targets)")
    axes.legend(fontsize="x-small", ncols=2)
    return save_figure(figure, path)


def plot_curves(results: list[QuantityResult], path: Path) -> Path:
    """One panel per lever: the chosen TRAK's reported LDS (with intervals) as the lever moves, per quantity."""
    levers = list(dict.fromkeys(lever for r in results for lever in r.curves))
    figure = new_figure((3.4 * len(levers), 3.2))
    for axes, lever in zip(np.atleast_1d(figure.subplots(1, len(levers))), levers):
        for result in results:
            points = result.curves.get(lever, [])
            if not points:
                continue
            means = np.array([p.lds.mean for _, p in points])
            axes.errorbar(range(len(points)), means, capsize=2, marker="o", label=result.quantity,
                          yerr=[means - [p.lds.low for _, p in points], [p.lds.high for _, p in points] - means])
            axes.set_xticks(range(len(points)), [value.removeprefix("step-").lstrip("0") or value
                                                 for value, _ in points], fontsize="x-small")
        axes.axhline(0, color="0.3", linewidth=0.8)
        axes.set(title=lever, ylabel="LDS (reported targets)")
    figure.axes[0].legend(fontsize="x-small")
    return save_figure(figure, path)


def plot_removals(effects: list[RemovalEffect], path: Path) -> Path:
    """Per step and output: the RMS change each kind of removal causes, one dot per target, with the mean."""
    kinds = list(dict.fromkeys(e.kind for e in effects))
    steps = sorted({e.step for e in effects})
    figure = new_figure((3.6 * 2, 1.0 + 2.6 * len(steps)))
    panels = np.atleast_2d(figure.subplots(len(steps), 2, squeeze=False))
    for row, step in enumerate(steps):
        for column, (output, value) in enumerate((("x0_hat(T)", "x0_change"), ("sample", "sample_change"))):
            axes = panels[row, column]
            for position, kind in enumerate(kinds):
                values = [getattr(e, value) for e in effects if e.step == step and e.kind == kind]
                axes.scatter(np.full(len(values), position) + np.linspace(-0.2, 0.2, len(values)), values, s=6)
                axes.hlines(np.mean(values), position - 0.3, position + 0.3, colors="black")
            axes.set_xticks(range(len(kinds)), kinds, rotation=20, fontsize="x-small", ha="right")
            axes.set(title=f"T = {step}: change of {output}", ylabel="RMS change")
    return save_figure(figure, path)


def headline(results: list[QuantityResult]) -> str:
    rows = [[r.quantity, r.trak.label, r.trak.lds.mean, interval_text(r.trak.lds.low, r.trak.lds.high),
             r.baseline.label, r.baseline.lds.mean, r.difference.mean,
             interval_text(r.difference.low, r.difference.high), r.retest, r.ceiling] for r in results]
    table = markdown_table(["quantity", "TRAK chosen on held-out targets", "LDS", "95% CI", "best baseline (held-out)",
                            "LDS", "TRAK - baseline", "paired 95% CI", "test-retest r", "ceiling"], rows)
    sample = next(r for r in results if r.quantity == "sample")
    steps_won = [r.quantity for r in results if r.quantity != "sample" and r.difference.low > 0]
    verdict = (f"On the generated samples' loss, the chosen TRAK reaches {sample.trak.lds.mean:.3f} "
               f"{interval_text(sample.trak.lds.low, sample.trak.lds.high)} "
               f"({'at or above' if sample.trak.lds.mean >= LDS_BAR else 'below'} the bar of {LDS_BAR}); its paired "
               f"difference with the best baseline ({sample.baseline.method}) is {sample.difference.mean:+.3f} "
               f"{interval_text(sample.difference.low, sample.difference.high)}, "
               f"{'above 0' if sample.difference.low > 0 else 'not above 0'}. Journey steps where TRAK's paired "
               f"interval lies above the best baseline's: {', '.join(steps_won) if steps_won else 'none'}.")
    return table + "\n\n" + verdict


def protocol(config: ExperimentConfig, scale: str, num_train: int, validation: LDSValidation) -> str:
    s = validation.settings
    subsets = ("**coupled** (variant): each subset model draws the full-set random stream of its seed and gives "
               "the left-out examples weight 0" if s.coupled else "**fresh runs** on each subset (uncoupled)")
    return (
        f"Config `{config.name}` ({num_train} training examples, `{config.data.dataset}`), `--scale {scale}`. "
        f"TRAK's models: {s.ensemble} full-set runs, training seed offsets 0-{s.ensemble - 1} (`full*/`); the first "
        f"is the attributed model and draws the targets. LDS: {s.num_subsets} random subsets of {s.fraction:.0%} of "
        f"the training set, each retrained with {s.seeds} seed(s) from offset {SUBSET_SEED_OFFSET} on, disjoint "
        f"from every TRAK model's, as {subsets}; the measured quantity is the mean over the seeds. Measured per "
        f"model and target, with noise independent of every feature's and common to all models: `sample` = the "
        f"denoising loss of the generated sample over {s.measured_timesteps} evenly spread timesteps x "
        f"{s.resamplings} noises (D-TRAK's target); `t=T` = the loss at T of the sample's x0 prediction at T, "
        f"re-noised {s.resamplings} times (Journey-TRAK's step target). Prediction = the sum of a method's scores "
        "over the subset; LDS = the mean over targets of the Spearman correlation between prediction and negated "
        f"loss. {s.held_out_targets} held-out targets make every choice, per quantity and per configuration: "
        f"TRAK's output function ({', '.join(s.outputs)}), K ({', '.join(map(str, s.train_timesteps))}), "
        f"projection dimension ({', '.join(map(str, s.dimensions))}), ensemble size "
        f"({', '.join(map(str, s.ensemble_sizes))}), weights (final or a checkpoint's) and ridge "
        f"({', '.join(f'{c:g}' for c in s.ridges)}); the dot product's configuration the same way; the best baseline "
        f"(random excluded). The {s.num_targets} reported targets are used for nothing else. Intervals: two-way "
        f"bootstrap ({s.resamples} resamples of subsets and targets together); TRAK minus the best baseline on the "
        "same resamples (paired). Test-retest r: the Spearman agreement, across subsets, of two seeds' "
        "measurements (mean over targets and seed pairs); ceiling = sqrt(s r / (1 + (s - 1) r)), the highest "
        "correlation any method can reach with the s-seed mean.")


def removal_section(validation: LDSValidation, plan: list[Removal], effects: list[RemovalEffect]) -> str:
    s = validation.settings
    k = len(plan[0].removed)
    kinds = list(dict.fromkeys(e.kind for e in effects))
    means = [[kind, step, np.mean([e.x0_change for e in effects if e.kind == kind and e.step == step]),
              np.mean([e.sample_change for e in effects if e.kind == kind and e.step == step])]
             for step in sorted({e.step for e in effects}) for kind in kinds]
    baseline = next(kind for kind in kinds if kind.startswith("top-k") and kind != "top-k TRAK")
    pairs = [("top-k TRAK", "random k"), ("top-k TRAK", baseline), (baseline, "random k"), ("top-k TRAK", NOISE_FLOOR)]
    comparisons = [c for kind, against in pairs if against in kinds
                   for c in compare_removals(effects, kind, against, seed=s.seed)]
    rows = [[c.step, c.output, c.kind, c.against, c.difference.mean, interval_text(c.difference.low, c.difference.high)]
            for c in comparisons]
    shown = [c for c in comparisons if c.kind == "top-k TRAK" and c.against == "random k"]
    verdict = "; ".join(f"T = {c.step}, {c.output}: top-k TRAK minus random {c.difference.mean:+.4f} "
                        f"{interval_text(c.difference.low, c.difference.high)} "
                        f"({'moves the output more than random removal' if c.difference.low > 0 else 'no more than random removal'})"
                        for c in shown)
    return (f"For {s.removal_targets} reported targets at T in {list(s.removal_steps)}: a model retrained without the "
            f"k = {k} top examples of the chosen TRAK for the `t=T` quantity, and without the best baseline's top k; "
            f"and {s.removal_draws} random removals of k (each compared with every target). All retrainings are "
            "coupled to the attributed model's random stream; each runs DDIM from the attributed model's own x_T "
            f"at step T. `{NOISE_FLOOR}`: another training seed, no removal, from the same x_T. RMS change (pixels "
            "in [-1, 1]) of x0_hat(T) and of the final sample from the attributed model's.\n\n"
            + markdown_table(["removed", "T", "mean RMS change of x0_hat(T)", "mean RMS change of the sample"], means)
            + "\n\nPaired differences (per target, bootstrap over targets):\n\n"
            + markdown_table(["T", "output", "removal", "against", "mean difference", "95% CI"], rows)
            + f"\n\nVerdict: {verdict}.\n\n" + image_md("removals.png", "removal effects"))


def write_validation_report(output: Path, config: ExperimentConfig, scale: str, num_train: int,
                            validation: LDSValidation, plan: list[Removal], effects: list[RemovalEffect]) -> Path:
    results = validation.results
    write_json_atomic(output / "lds.json", json_safe({
        "settings": asdict(validation.settings), "scale": scale,
        "results": [asdict(r) for r in results],
        "removals": {"plan": [asdict(r) for r in plan], "effects": [asdict(e) for e in effects]}}))
    plot_methods(results, output / "lds.png")
    plot_curves(results, output / "lds-curves.png")
    plot_removals(effects, output / "removals.png")
    methods = "\n\n".join(
        f"**{r.quantity}**\n\n" + markdown_table(["method (its held-out choice)", "held-out LDS", "LDS", "95% CI",
                                                 "ridge c"], [result_row(m) for m in r.methods]) for r in results)
    curves = "\n\n".join(
        f"**{r.quantity}**, {lever}\n\n" + markdown_table(
            ["value", "configuration", "held-out LDS", "LDS", "95% CI", "ridge c"],
            [[value, *result_row(point)] for value, point in points])
        for r in results for lever, points in r.curves.items() if points)
    journeys = "\n\n".join(image_md(f"full/attribution/journey-{t}.png", f"journey of target {t}") + "\n\n"
                           + image_md(f"full/attribution/journey-steps-{t}.png", f"target {t} over every step")
                           for t in range(validation.settings.journeys))
    title = f"Attribution validated by retraining: {config.name} (--scale {scale}{', coupled' if validation.settings.coupled else ''})"
    return write_report(output / "report.md", title, [
        ("Protocol", protocol(config, scale, num_train, validation)),
        ("Headline", headline(results) + "\n\n" + image_md("lds.png", "LDS per method")),
        ("Every method", methods),
        ("TRAK along its levers", "Each point: the chosen configuration with one lever moved, its ridge chosen on "
                                  "the held-out targets; reported LDS.\n\n" + image_md("lds-curves.png", "curves")
         + "\n\n" + curves),
        ("Remove the top k at step T", removal_section(validation, plan, effects)),
        ("Journeys", "Four samples of the attributed model; per step, x_t, x0_hat(t), the most helpful and the most "
                     "harmful training images by the TRAK configuration chosen for `sample`; beside each, the same target over "
                     "every sampling step (the classifier's posterior of x0_hat(t) and the scores of the top examples; "
                     "`full/attribution/report.md` explains how to read it):\n\n" + journeys),
    ])
