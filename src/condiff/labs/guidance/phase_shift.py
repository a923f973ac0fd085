"""Part 3 of the exact guidance lab: the discretisation phase shift, strong guidance with few DDPM
steps splitting the centre component into two clusters, against the number of steps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from condiff.gmm.guidance import (
    SPLIT_THRESHOLD,
    GuidedSamples,
    PhaseShiftExample,
    centre_dip_ratio,
    collinear_mixture,
    mean_confidence,
    sample_guided_sweep,
)
from condiff.labs.guidance.measures import format_numbers
from condiff.report import image_md, markdown_table, new_figure, save_figure
from condiff.runtime import progress_bar


@dataclass
class PhaseShiftSweep:
    """Claim 3: the centre component of three collinear ones against the number of sampler steps,
    guided (the example's eta) and unguided (eta = 0, same noise) as a control."""
    m: float
    eta: float
    method: str
    T: float
    num_samples: int
    steps: list[int]
    threshold: float
    guided_dip_ratio: list[float]
    unguided_dip_ratio: list[float]
    guided_split: list[bool]
    unguided_split: list[bool]
    guided_confidence: list[float]           # E[p_0(centre | Y)]
    unguided_confidence: list[float]
    guided_median_abs_x1: list[float]        # where the mass sits along the line of the means
    split_at_few_steps: bool                 # the example's few_steps: guided splits, unguided does not
    split_at_many_steps: bool                # the example's many_steps: guided splits


def sample_phase_shift(example: PhaseShiftExample, steps: Sequence[int], num_samples: int, *,
                       generator: torch.Generator | None = None,
                       progress: bool = True) -> dict[int, tuple[GuidedSamples, GuidedSamples]]:
    """(guided, unguided) runs of the example's centre class at every step count, noise shared between
    the two within a step count."""
    mixture = collinear_mixture(example.m)
    runs = {}
    for count in progress_bar(steps, desc="phase shift", enabled=progress):
        guided, unguided = sample_guided_sweep(mixture, 1, [example.eta, 0.0], num_samples, T=example.T,
                                               steps=count, method=example.method, start=example.start,
                                               generator=generator)
        runs[count] = (guided, unguided)
    return runs


def measure_phase_shift(example: PhaseShiftExample,
                        runs: dict[int, tuple[GuidedSamples, GuidedSamples]]) -> PhaseShiftSweep:
    for required in (example.few_steps, example.many_steps):
        if required not in runs:
            raise ValueError(f"the step counts must include the example's {required}")
    mixture = collinear_mixture(example.m)
    steps = sorted(runs)
    guided = [runs[count][0].samples for count in steps]
    unguided = [runs[count][1].samples for count in steps]
    guided_dip = [centre_dip_ratio(samples) for samples in guided]
    unguided_dip = [centre_dip_ratio(samples) for samples in unguided]
    few, many = steps.index(example.few_steps), steps.index(example.many_steps)
    return PhaseShiftSweep(
        m=example.m, eta=example.eta, method=example.method, T=example.T, num_samples=len(guided[0]),
        steps=steps, threshold=SPLIT_THRESHOLD, guided_dip_ratio=guided_dip, unguided_dip_ratio=unguided_dip,
        guided_split=[ratio < SPLIT_THRESHOLD for ratio in guided_dip],
        unguided_split=[ratio < SPLIT_THRESHOLD for ratio in unguided_dip],
        guided_confidence=[mean_confidence(mixture, samples, 1) for samples in guided],
        unguided_confidence=[mean_confidence(mixture, samples, 1) for samples in unguided],
        guided_median_abs_x1=[samples[:, 0].abs().median().item() for samples in guided],
        split_at_few_steps=guided_dip[few] < SPLIT_THRESHOLD <= unguided_dip[few],
        split_at_many_steps=guided_dip[many] < SPLIT_THRESHOLD)


def plot_phase_shift_histograms(example: PhaseShiftExample, runs: dict[int, tuple[GuidedSamples, GuidedSamples]],
                                path: Path) -> Path:
    panels = [(f"$\\eta$ = {example.eta:g}, {example.few_steps} steps", runs[example.few_steps][0]),
              (f"$\\eta$ = {example.eta:g}, {example.many_steps} steps", runs[example.many_steps][0]),
              (f"$\\eta$ = 0 (control), {example.few_steps} steps", runs[example.few_steps][1])]
    figure = new_figure((12.0, 3.6))
    for axes, (title, run) in zip(figure.subplots(1, 3, sharex=True, sharey=True), panels):
        first = run.samples[:, 0].numpy()
        axes.hist(first, bins=120, density=True, color="C0", alpha=0.8)
        for mean in (-example.m, 0.0, example.m):
            axes.axvline(mean, color="black" if mean == 0.0 else "0.5", linestyle=":", linewidth=1)
        axes.set_title(f"{title}\ndip ratio {centre_dip_ratio(run.samples):.2f}")
        axes.set_xlabel("first coordinate $x_1$")
        axes.grid(alpha=0.3)
    figure.axes[0].set_ylabel("density")
    figure.suptitle(f"centre target of components at $-{example.m:g}, 0, +{example.m:g}$ "
                    f"({example.method.upper()}, T = {example.T:g}); dotted: component means")
    return save_figure(figure, path)


def plot_phase_shift_curve(sweep: PhaseShiftSweep, path: Path) -> Path:
    figure = new_figure((6.5, 4.0))
    axes = figure.add_subplot()
    axes.plot(sweep.steps, sweep.guided_dip_ratio, marker="o", label=f"$\\eta$ = {sweep.eta:g}")
    axes.plot(sweep.steps, sweep.unguided_dip_ratio, marker="s", linestyle="--", label="$\\eta$ = 0 (control)")
    axes.axhline(sweep.threshold, color="red", linestyle=":", label=f"split threshold {sweep.threshold:g}")
    axes.set_xscale("log")
    axes.set_xticks(sweep.steps, [str(count) for count in sweep.steps])
    axes.set_ylim(0.0, 1.05)
    axes.set_xlabel(f"number of {sweep.method.upper()} steps over [0, {sweep.T:g}]")
    axes.set_ylabel("centre density / peak density")
    axes.set_title("centre dip ratio against the number of steps")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return save_figure(figure, path)




def phase_shift_section(sweep: PhaseShiftSweep, example: PhaseShiftExample) -> str:
    rows = [[count, sweep.guided_dip_ratio[i], sweep.guided_split[i], sweep.guided_confidence[i],
             sweep.guided_median_abs_x1[i], sweep.unguided_dip_ratio[i], sweep.unguided_split[i],
             sweep.unguided_confidence[i]] for i, count in enumerate(sweep.steps)]
    table = markdown_table(["steps", f"dip ratio (eta={sweep.eta:g})", "split", "E[p0(centre|Y)]", "median |x1|",
                            "dip ratio (eta=0)", "split (eta=0)", "E[p0(centre|Y)] (eta=0)"], rows)
    few, many = sweep.steps.index(example.few_steps), sweep.steps.index(example.many_steps)
    return (
        f"`PHASE_SHIFT_EXAMPLE`: components at -{sweep.m:g}, 0, +{sweep.m:g} on the first axis, target the "
        f"centre, eta = {sweep.eta:g}, {sweep.method.upper()} sampler, T = {sweep.T:g}, exact start, "
        f"{sweep.num_samples} samples per step count; eta = 0 with the same noise as the control. The dip ratio "
        f"is the density of x1 at 0 over its peak density (kernel density estimate); below {sweep.threshold:g} "
        f"counts as split.\n\n"
        f"- At {example.few_steps} steps the guided output is split (dip ratio "
        f"{sweep.guided_dip_ratio[few]:.3f}, mass near x1 = ±{sweep.guided_median_abs_x1[few]:.1f}) while the "
        f"unguided control is not ({sweep.unguided_dip_ratio[few]:.3f}): **{sweep.split_at_few_steps}**.\n"
        f"- At {example.many_steps} steps the guided output is split: **{sweep.split_at_many_steps}** (dip ratio "
        f"{sweep.guided_dip_ratio[many]:.3f}).\n"
        f"- Guided dip ratio against steps: {format_numbers(sweep.guided_dip_ratio)} at {sweep.steps} steps.\n\n"
        + image_md("phase_shift_histograms.png", "first coordinate at few and many steps") + "\n\n"
        + image_md("phase_shift_dip_ratio.png", "dip ratio against the number of steps") + "\n\n" + table)
