"""The figures and report.md of `condiff attribute` (condiff.experiments.attribution): one journey per
target, the classes the positive scores come from, and the tables."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from condiff.report import image_md, markdown_table, new_figure, save_figure, write_report

if TYPE_CHECKING:
    from condiff.experiments.attribution import AttributionResult
    from condiff.sampling.generate import SampleOutput


def plot_journey(result: AttributionResult, target: int, train: torch.Tensor, targets: SampleOutput,
                 indices: list[int], noisy_inputs: dict[int, torch.Tensor] | None, path: Path) -> Path:
    """One row per step: x_t (when known), x0_hat(t), the top-K helpful and top-K harmful training examples
    (images); for vector data, one panel per step with the training set, x0_hat(t) and its helpful/harmful
    points."""
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
                picture = ((image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).squeeze(-1).numpy()
                axes[row, column].imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1)
                axes[row, column].set_xticks([])
                axes[row, column].set_yticks([])
                if row == 0:
                    axes[row, column].set_title(title, fontsize=8)
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
            low, high = points.min(0), points.max(0)
            margin = 0.1 * (high - low)
            panel.set(xlim=(low[0] - margin[0], high[0] + margin[0]), ylim=(low[1] - margin[1], high[1] + margin[1]),
                      title=f"t={step.timestep}")   # the data's range: a poor x0_hat may lie outside it
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


def write_attribution_report(result: AttributionResult, run_name: str) -> Path:
    settings = result.settings
    rows = []
    for step in result.steps:
        for target in range(settings.num_targets):
            rows.append([step.timestep, target, ", ".join(map(str, step.helpful[target])),
                         ", ".join(map(str, step.harmful[target]))])
    purity = ""
    if result.target_classes is not None:
        purity = ("\n\nTarget components (exact posterior of the mixture): "
                  f"{', '.join(map(str, result.target_classes))}.")
    if settings.samples_file is None:
        targets = f"{settings.num_targets} DDIM-{settings.sampling_steps} samples (seed {settings.seed})"
    else:
        drawn = result.targets_provenance or {}
        targets = (f"the first {settings.num_targets} samples of `{settings.samples_file}` "
                   f"({drawn.get('method', '?')}-{drawn.get('steps', '?')}, seed {drawn.get('seed', '?')}; "
                   "no x_t in the journeys: the file keeps none)")
    models = "the final model" + (
        f" averaged with the checkpoint(s) of step(s) {', '.join(map(str, result.checkpoint_steps))} (their trained, "
        "not EMA, weights; targets from the final model)" if result.checkpoint_steps else "")
    return write_report(result.directory / "report.md", f"condiff attribute: {run_name}", [
        ("Settings", f"Output function `{settings.output}`, K = {settings.train_timesteps} training timesteps, "
                     f"R = {settings.resamplings} re-noisings per target, {settings.projection} projection to "
                     f"k = {settings.dimension}, ridge c = {settings.ridge:g}; TRAK scores of {models}; "
                     f"targets: {targets}. Scores: `scores.npy` (training examples x targets x steps); all "
                     "indices in `attribution.json`." + purity),
        ("Top examples", markdown_table(["t", "target", f"top {settings.top} helpful", f"top {settings.top} harmful"],
                                        rows)),
        ("Classes", class_section(result)),
        ("Journeys", "\n\n".join(image_md(f"journey-{t}.png", f"journey of target {t}")
                                 for t in range(settings.num_targets))),
    ])
