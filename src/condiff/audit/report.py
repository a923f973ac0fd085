"""The figures and report.md of `condiff attribute` (condiff.audit.attribute): one journey per
target, the classes the positive scores come from, and the tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from condiff.audit.journey import JOURNEY_EXAMPLES, data_limits, show_image
from condiff.audit.results import AttributionResult
from condiff.report import image_md, markdown_table, new_figure, save_figure, write_report
from condiff.sampling.generate import SampleOutput


def plot_journey(result: AttributionResult, target: int, train: torch.Tensor, targets: SampleOutput,
                 indices: list[int], noisy_inputs: dict[int, torch.Tensor] | None, path: Path) -> Path:
    """One row per step: x_t (when known), x0_hat(t), the top-K helpful and top-K harmful training examples
    (images; `targets`' x0 predictions in data space); for vector data, one panel per step with the training
    set, x0_hat(t) and its helpful/harmful points."""
    top = result.settings.top
    if train.ndim == 4:
        leading = ["x0_hat"] if noisy_inputs is None else ["x_t", "x0_hat"]
        columns = len(leading) + 2 * top
        figure = new_figure((0.9 * columns, 1.0 * len(indices) + 0.4), constrained=False)
        axes = figure.subplots(len(indices), columns, squeeze=False)
        for row, (step, index) in enumerate(zip(result.steps, indices)):
            images = [targets.x0_predictions[index][target]]
            if noisy_inputs is not None:
                images.insert(0, noisy_inputs[step.timestep][target])
            images += [train[i] for i in step.helpful[target]] + [train[i] for i in step.harmful[target]]
            titles = leading + ["+"] * top + ["-"] * top
            for column, (image, title) in enumerate(zip(images, titles)):
                show_image(axes[row, column], image, title if row == 0 else None)
            axes[row, 0].set_ylabel(f"t={step.timestep}", fontsize=8)
    else:
        figure = new_figure((3.0 * len(indices), 3.2))
        axes = figure.subplots(1, len(indices), squeeze=False)[0]
        for panel, step, index in zip(axes, result.steps, indices):
            points = train.numpy()
            panel.scatter(points[:, 0], points[:, 1], s=4, color="0.8")
            panel.scatter(*points[step.helpful[target]].T, s=12, color="tab:green", label="helpful")
            panel.scatter(*points[step.harmful[target]].T, s=12, color="tab:red", label="harmful")
            panel.scatter(*targets.x0_predictions[index][target].numpy(), marker="*", s=120, color="black",
                          label="x0_hat")
            data_limits(panel, points)
            panel.set_title(f"t={step.timestep}")
        axes[0].legend(fontsize="x-small")
    figure.suptitle(f"target {target}: the training examples that guided each step ({result.settings.output})")
    return save_figure(figure, path)


def plot_class_shares(result: AttributionResult, path: Path) -> Path:
    """Per class, its share of the positive score averaged over the targets, one bar per step, beside the
    class's share of the training set."""
    num_classes = len(result.class_names)
    positions = np.arange(num_classes)
    width = 0.8 / len(result.steps)
    figure = new_figure((max(5.5, 0.7 * num_classes + 2.0), 3.4))
    axes = figure.add_subplot()
    for number, step in enumerate(result.steps):
        axes.bar(positions + (number - (len(result.steps) - 1) / 2) * width,
                 np.mean(step.class_positive_shares, axis=0), width, label=f"t={step.timestep}")
    axes.hlines(result.training_class_shares, positions - 0.4, positions + 0.4, colors="black", linewidth=2,
                label="share of the training set", zorder=3)
    axes.set_xticks(positions, result.class_names)
    axes.set(xlabel="class", ylabel="share of the positive score", ylim=(0, None),
             title="Share of the positive score, mean over targets")
    axes.legend(fontsize="x-small")
    return save_figure(figure, path)


def class_section(result: AttributionResult) -> str:
    """The per-class table (and the constraint set's, for a constrained run) with how it is normalised."""
    classes = result.class_names
    headers = ["t", "target"] + [f"class {name}" for name in classes]
    constrained = bool(result.constraint_classes)
    if constrained:
        headers += ["constraint set", "rest"]
    rows = []
    for step in result.steps:
        for target, (sums, shares) in enumerate(zip(step.class_sums, step.class_positive_shares)):
            row = [step.timestep, target] + [f"{total:+.3g} ({share:.0%})" for total, share in zip(sums, shares)]
            if constrained:
                own = step.constraint_set[target]
                row += [f"{own['sum']:+.3g} ({own['positive_share']:.0%})",
                        f"{own['rest_sum']:+.3g} ({sum(shares) - own['positive_share']:.0%})"]
            rows.append(row)
    training = ", ".join(f"{name} {share:.0%}" for name, share in zip(classes, result.training_class_shares))
    constraint = (f" The constraint set is class(es) {', '.join(map(str, result.constraint_classes))}, "
                  f"{sum(result.training_class_shares[c] for c in result.constraint_classes):.0%} of the training "
                  "set." if constrained else "")
    return ("Each cell: the scores summed over the class's training examples, and in brackets the class's share "
            "of the target's total positive score (the sum over the class of max(score, 0) over the same sum "
            "over every example). Sums keep their sign and a scale that differs between steps; the shares "
            "compare across steps and with the classes' shares of the training set: "
            f"{training}.{constraint} Per step and target in `attribution.json` (`class_sums`, "
            "`class_positive_shares`, `constraint_set`).\n\n" + markdown_table(headers, rows) + "\n\n"
            + image_md("classes.png", "share of the positive score per class and step"))


def targets_sentence(result: AttributionResult) -> str:
    """How the targets were drawn, and as which class."""
    settings = result.settings
    drawn_as = ("" if result.target_class is None and not result.conditional
                else " unconditional (the model's \"no class\" label)" if result.target_class is None
                else f" of class {result.target_class}")
    if settings.samples_file is None:
        return f"{settings.num_targets}{drawn_as} DDIM-{settings.sampling_steps} samples (seed {settings.seed})"
    drawn = result.targets_provenance or {}
    guidance = f", {drawn['guidance_kind']} guidance {drawn['guidance']:g}" if drawn.get("guidance") else ""
    return (f"the first {settings.num_targets} samples of `{settings.samples_file}`{drawn_as} "
            f"({drawn.get('method', '?')}-{drawn.get('steps', '?')}, seed {drawn.get('seed', '?')}{guidance}; "
            "no x_t in the journeys: the file keeps none)")


def settings_section(result: AttributionResult) -> str:
    """What was computed, on which training set, by which models, and where its defaults come from."""
    settings = result.settings
    models = "the final model" + (
        f" averaged with the checkpoint(s) of step(s) {', '.join(map(str, result.checkpoint_steps))} (their trained, "
        "not EMA, weights; targets from the final model)" if result.checkpoint_steps else "")
    if len(result.ensemble) > len(result.checkpoint_steps) + 1:
        models += (f"; an ensemble of {settings.ensemble} independently trained runs of the same data and "
                   f"architecture, {len(result.ensemble)} models in all: "
                   + ", ".join(f"`{name}`" for name in result.ensemble))
    overridden = settings.overridden()
    choices = ("none overridden" if not overridden else "overridden here: " + ", ".join(
        f"{name} = {value} (validated: {validated})" for name, (value, validated) in overridden.items()))
    if "ensemble" in overridden:
        choices += " (runs of other training seeds, given as `models`, make the ensemble)"
    purity = ("" if result.target_classes is None else
              f"\n\nTarget components (exact posterior of the mixture): {', '.join(map(str, result.target_classes))}.")
    return (f"Output function `{settings.output}`, K = {settings.train_timesteps} training timesteps, "
            f"R = {settings.resamplings} re-noisings per target, {settings.projection} projection to "
            f"k = {settings.dimension}, ridge c = {settings.ridge:g}; TRAK scores of {models}; "
            f"targets: {targets_sentence(result)}. Scores: `scores.npy` (training examples x targets x steps); all "
            "indices in `attribution.json`.\n\n"
            f"Training set: {result.training_set}\n\n"
            f"Defaults: the output function, K, the ridge, the checkpoints and the ensemble size are the settings "
            f"chosen by {result.validation}; {choices}." + purity)


def journeys_section(result: AttributionResult) -> str:
    """The strips per target and, beside each, its journey over every step, with how to read them."""
    settings, parts = result.settings, []
    if result.journeys:
        steps = len(result.journeys[0].timesteps)
        every = ("every one" if settings.journey_every == 1 else
                 f"one in {settings.journey_every} and the attributed ones")
        parts.append(
            f"Beside each strip, `journey-steps-T.png` follows the target over {steps} of its sampling steps "
            f"({every}: `journey_every`), noisy on the left, clean on the right. Top: the posterior over classes "
            f"of x0_hat(t) by {result.posterior_source}, stacked: where one colour takes over the band is when the "
            "target's class is decided. Middle: the TRAK scores of the training examples followed (the top "
            f"{JOURNEY_EXAMPLES} helpful ones at each attributed step, dotted), each in its class's colour and in "
            "units of the spread of that step's scores over the training set (their scale changes with t): an "
            "example high while the posterior shifts drives the class as it appears; one that rises only near "
            "the end shapes details. Bottom: x0_hat(t) at a few steps and the followed examples (number and "
            "class). The values: `journeys` in `attribution.json` (timesteps, posteriors, examples, scores, "
            "spread).")
    for target in range(settings.num_targets):
        strip = image_md(f"journey-{target}.png", f"journey of target {target}")
        parts.append(strip + (" " + image_md(f"journey-steps-{target}.png", f"target {target} over every step")
                              if result.journeys else ""))
    return "\n\n".join(parts)


def write_attribution_report(result: AttributionResult, run_name: str) -> Path:
    settings = result.settings
    rows = []
    for step in result.steps:
        for target in range(settings.num_targets):
            rows.append([step.timestep, target, ", ".join(map(str, step.helpful[target])),
                         ", ".join(map(str, step.harmful[target]))])
    return write_report(result.directory / "report.md", f"condiff attribute: {run_name}", [
        ("Settings", settings_section(result)),
        ("Top examples", markdown_table(["t", "target", f"top {settings.top} helpful", f"top {settings.top} harmful"],
                                        rows)),
        ("Classes", class_section(result)),
        ("Journeys", journeys_section(result)),
    ])
