"""Part 1 and 4 of the exact guidance lab: confidence and entropy against eta in the reference
setting (two components at +-(1, 0), target +(1, 0)), for the ODE and the SDE and pathwise with shared
noise, and the reference table of the literature (docs/guidance-reference.md) beside the measured values."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from condiff.gmm.guidance import GuidedSamples, gaussian_entropy, knn_entropy, ode_output_entropy
from condiff.labs.guidance.measures import (
    is_non_decreasing,
    is_non_increasing,
    largest_pathwise_drop,
    orthogonal_variance,
    path_confidences,
    pathwise_monotone_fraction,
)
from condiff.labs.guidance.reference import REFERENCE_TABLE, REFERENCE_TARGET, reference_mixture
from condiff.labs.guidance.settings import KNN_NEIGHBOURS, REFERENCE_TOLERANCE
from condiff.report import image_md, markdown_table, new_figure, save_figure


@dataclass
class EtaSweep:
    """Claim 1 in the reference setting: one entry per eta, ODE (Euler) and SDE (Euler-Maruyama)."""
    etas: list[float]
    num_samples: int
    steps: int
    ode_confidence: list[float]
    ode_confidence_se: list[float]           # standard error of the mean over samples
    sde_confidence: list[float]
    sde_confidence_se: list[float]
    ode_entropy: list[float]                 # nats, divergence (Liouville) identity
    ode_entropy_knn: list[float]             # nats, Kozachenko-Leonenko, as a cross-check
    sde_entropy_knn: list[float]
    ode_orthogonal_variance: list[float]
    sde_orthogonal_variance: list[float]
    ode_monotone_fraction: float             # share of shared-noise paths with non-decreasing confidence
    sde_monotone_fraction: float
    ode_largest_drop: float
    sde_largest_drop: float
    shown_paths: list[int]                   # indices of the paths in the pathwise figure
    ode_path_confidence: list[list[float]]   # (shown path, eta)
    sde_path_confidence: list[list[float]]
    confidence_non_decreasing: bool          # ODE and SDE means
    entropy_non_increasing: bool             # ODE divergence identity and both k-NN estimates


def measure_eta_sweep(ode: Sequence[GuidedSamples], sde: Sequence[GuidedSamples], *,
                      paths_shown: int = 8) -> EtaSweep:
    """Claim-1 numbers from shared-noise runs of the reference setting at increasing etas
    (as `reference_samples` returns them)."""
    etas = [run.eta for run in ode]
    if etas != sorted(etas) or etas != [run.eta for run in sde]:
        raise ValueError(f"ODE and SDE runs must share increasing etas, got {etas} and {[r.eta for r in sde]}")
    mixture = reference_mixture()
    ode_paths = path_confidences(mixture, ode, REFERENCE_TARGET)
    sde_paths = path_confidences(mixture, sde, REFERENCE_TARGET)
    n = len(ode_paths)
    # Paths at evenly spaced quantiles of their unguided confidence, so the figure spans easy and hard ones.
    order = np.argsort(ode_paths[:, 0])
    shown = [int(order[round(q * (n - 1))]) for q in np.linspace(0.02, 0.98, paths_shown)]
    ode_confidence, sde_confidence = ode_paths.mean(0).tolist(), sde_paths.mean(0).tolist()
    ode_entropy = [ode_output_entropy(run) for run in ode]
    ode_entropy_knn = [knn_entropy(run.samples, KNN_NEIGHBOURS) for run in ode]
    sde_entropy_knn = [knn_entropy(run.samples, KNN_NEIGHBOURS) for run in sde]
    return EtaSweep(
        etas=etas, num_samples=n, steps=ode[0].steps,
        ode_confidence=ode_confidence, ode_confidence_se=(ode_paths.std(0) / math.sqrt(n)).tolist(),
        sde_confidence=sde_confidence, sde_confidence_se=(sde_paths.std(0) / math.sqrt(n)).tolist(),
        ode_entropy=ode_entropy, ode_entropy_knn=ode_entropy_knn, sde_entropy_knn=sde_entropy_knn,
        ode_orthogonal_variance=[orthogonal_variance(mixture, run.samples) for run in ode],
        sde_orthogonal_variance=[orthogonal_variance(mixture, run.samples) for run in sde],
        ode_monotone_fraction=pathwise_monotone_fraction(ode_paths),
        sde_monotone_fraction=pathwise_monotone_fraction(sde_paths),
        ode_largest_drop=largest_pathwise_drop(ode_paths), sde_largest_drop=largest_pathwise_drop(sde_paths),
        shown_paths=shown, ode_path_confidence=ode_paths[shown].tolist(),
        sde_path_confidence=sde_paths[shown].tolist(),
        confidence_non_decreasing=is_non_decreasing(ode_confidence) and is_non_decreasing(sde_confidence),
        entropy_non_increasing=all(is_non_increasing(h) for h in (ode_entropy, ode_entropy_knn, sde_entropy_knn)))


def label_eta_axes(confidence_axes, entropy_axes, confidence_title: str, entropy_title: str) -> None:
    """Axis labels, titles and grids of a (confidence, entropy) against eta pair of panels."""
    confidence_axes.set(ylabel="mean confidence $E[p_0(y|Y)]$", title=confidence_title)
    entropy_axes.set(ylabel="differential entropy (nats)", title=entropy_title)
    for axes in (confidence_axes, entropy_axes):
        axes.set_xlabel("guidance strength $\\eta$")
        axes.grid(alpha=0.3)


def plot_confidence_entropy(sweep: EtaSweep, path: Path) -> Path:
    figure = new_figure((10.0, 4.0))
    confidence_axes, entropy_axes = figure.subplots(1, 2)
    confidence_axes.errorbar(sweep.etas, sweep.ode_confidence, yerr=sweep.ode_confidence_se, marker="o",
                             label="ODE (Euler)")
    confidence_axes.errorbar(sweep.etas, sweep.sde_confidence, yerr=sweep.sde_confidence_se, marker="s",
                             linestyle="--", label="SDE (Euler-Maruyama)")
    entropy_axes.plot(sweep.etas, sweep.ode_entropy, marker="o", label="ODE, divergence identity")
    entropy_axes.plot(sweep.etas, sweep.ode_entropy_knn, marker="x", linestyle=":", label="ODE, k-NN")
    entropy_axes.plot(sweep.etas, sweep.sde_entropy_knn, marker="s", linestyle="--", label="SDE, k-NN")
    entropy_axes.axhline(gaussian_entropy(2), color="0.5", linewidth=1, label="$h(N(\\mu_y, I))$")
    label_eta_axes(confidence_axes, entropy_axes, "(a) mean confidence", "(b) output entropy")
    for axes in (confidence_axes, entropy_axes):
        axes.legend(fontsize="small")
    figure.suptitle(f"two components at $\\pm(1,0)$, target $+(1,0)$: {sweep.num_samples} samples, "
                    f"{sweep.steps} steps, exact scores")
    return save_figure(figure, path)


def plot_pathwise_confidence(sweep: EtaSweep, path: Path) -> Path:
    figure = new_figure((10.0, 4.0))
    for axes, name, paths, fraction in zip(figure.subplots(1, 2, sharey=True), ("ODE", "SDE"),
                                           (sweep.ode_path_confidence, sweep.sde_path_confidence),
                                           (sweep.ode_monotone_fraction, sweep.sde_monotone_fraction)):
        for index, confidences in zip(sweep.shown_paths, paths):
            axes.plot(sweep.etas, confidences, marker=".", linewidth=1, label=f"path {index}")
        # Confidences crowd near 1 as eta grows; the logit scale keeps their rise visible.
        axes.set_yscale("logit")
        axes.set_xlabel("guidance strength $\\eta$")
        monotone = round(fraction * sweep.num_samples)
        axes.set_title(f"{name}: non-decreasing on {monotone} of {sweep.num_samples} paths")
        axes.grid(alpha=0.3)
    figure.axes[0].set_ylabel("final $p_0(y|Y)$ of one shared-noise path")
    return save_figure(figure, path)


def plot_guided_scatter(ode: Sequence[GuidedSamples], sde: Sequence[GuidedSamples], etas: Sequence[float],
                        path: Path, points: int = 2000) -> Path:
    """Guided samples of the reference setting at a few etas (first `points` samples of each run)."""
    by_eta = {name: {run.eta: run.samples[:points].numpy() for run in runs} for name, runs in
              (("ODE", ode), ("SDE", sde))}
    means = reference_mixture().means.numpy()
    figure = new_figure((3.0 * len(etas), 6.0))
    grid = figure.subplots(2, len(etas), sharex=True, sharey=True, squeeze=False)
    for row, name in enumerate(("ODE", "SDE")):
        for column, eta in enumerate(etas):
            axes, samples = grid[row, column], by_eta[name][eta]
            axes.scatter(samples[:, 0], samples[:, 1], s=3, alpha=0.4, linewidths=0)
            axes.scatter(means[:, 0], means[:, 1], marker="x", color="black", s=40)
            axes.scatter(*means[REFERENCE_TARGET], marker="*", color="red", s=120, label="target mean")
            axes.axvline(0.0, color="0.5", linestyle=":", linewidth=1)   # the Bayes decision boundary
            axes.set_aspect("equal", adjustable="box")
            axes.set_title(f"{name}, $\\eta$ = {eta:g}")
            axes.grid(alpha=0.3)
    grid[0, 0].legend(fontsize="small", loc="lower left")
    figure.suptitle(f"guided samples ({points} per panel); dotted: decision boundary $x_1 = 0$")
    return save_figure(figure, path)



COLUMNS = ("ode_confidence", "ode_entropy", "sde_confidence")


@dataclass
class ReferenceComparison:
    """The doc's table beside the measured values; rows in `etas` order, columns `COLUMNS`."""
    etas: list[float]
    columns: list[str]
    reference: list[list[float]]
    measured: list[list[float]]
    abs_difference: list[list[float]]
    max_abs_difference: float
    tolerance: float
    all_within_tolerance: bool
    num_samples: int
    steps: int


def compare_with_reference(sweep: EtaSweep, tolerance: float = REFERENCE_TOLERANCE) -> ReferenceComparison:
    """Pick the reference etas out of the sweep (it must contain all of them)."""
    missing = [eta for eta in REFERENCE_TABLE if eta not in sweep.etas]
    if missing:
        raise ValueError(f"the sweep lacks the reference etas {missing}")
    etas = sorted(REFERENCE_TABLE)
    columns = {"ode_confidence": sweep.ode_confidence, "ode_entropy": sweep.ode_entropy,
               "sde_confidence": sweep.sde_confidence}
    reference = [list(REFERENCE_TABLE[eta]) for eta in etas]
    measured = [[columns[name][sweep.etas.index(eta)] for name in COLUMNS] for eta in etas]
    differences = np.abs(np.asarray(measured) - np.asarray(reference))
    return ReferenceComparison(
        etas=etas, columns=list(COLUMNS), reference=reference, measured=measured,
        abs_difference=differences.tolist(), max_abs_difference=float(differences.max()), tolerance=tolerance,
        all_within_tolerance=bool(np.all(differences <= tolerance)), num_samples=sweep.num_samples,
        steps=sweep.steps)




def eta_sweep_section(sweep: EtaSweep) -> str:
    rows = [[eta, f"{sweep.ode_confidence[i]:.4f} ± {sweep.ode_confidence_se[i]:.4f}",
             f"{sweep.sde_confidence[i]:.4f} ± {sweep.sde_confidence_se[i]:.4f}",
             f"{sweep.ode_entropy[i]:.3f}", f"{sweep.ode_entropy_knn[i]:.3f}", f"{sweep.sde_entropy_knn[i]:.3f}",
             f"{sweep.ode_orthogonal_variance[i]:.3f}", f"{sweep.sde_orthogonal_variance[i]:.3f}"]
            for i, eta in enumerate(sweep.etas)]
    table = markdown_table(["eta", "ODE E[p0(y|Y)] ± s.e.", "SDE E[p0(y|Y)] ± s.e.", "ODE entropy (divergence)",
                            "ODE entropy (k-NN)", "SDE entropy (k-NN)", "ODE var. orthogonal",
                            "SDE var. orthogonal"], rows)
    orthogonal = sweep.ode_orthogonal_variance + sweep.sde_orthogonal_variance
    knn_gap = max(abs(a - b) for a, b in zip(sweep.ode_entropy, sweep.ode_entropy_knn))
    return (
        f"Two components at ±(1, 0), equal weights, unit variance, target +(1, 0), T = 8, exact start, "
        f"{sweep.num_samples} samples and {sweep.steps} Euler(-Maruyama) steps; every eta uses the same noise. "
        f"Entropies in nats; k = {KNN_NEIGHBOURS} for the Kozachenko-Leonenko estimate.\n\n{table}\n\n"
        f"- Mean confidence non-decreasing in eta (ODE and SDE): **{sweep.confidence_non_decreasing}**. "
        f"Entropy non-increasing in eta (ODE by the divergence identity, ODE and SDE by k-NN): "
        f"**{sweep.entropy_non_increasing}**.\n"
        f"- Pathwise: the share of shared-noise paths whose final p0(y|Y) never decreases from one eta to the "
        f"next is **{sweep.ode_monotone_fraction:.4f}** (ODE) and **{sweep.sde_monotone_fraction:.4f}** (SDE) "
        f"of {sweep.num_samples} paths; largest decrease of any path {sweep.ode_largest_drop:.2g} (ODE), "
        f"{sweep.sde_largest_drop:.2g} (SDE).\n"
        f"- The variance orthogonal to the means is {min(orthogonal):.3f} to {max(orthogonal):.3f} over all etas "
        f"and both samplers (Monte Carlo s.e. of a sample variance: sqrt(2/N) = "
        f"{math.sqrt(2.0 / sweep.num_samples):.3f}); guidance acts only along the means.\n"
        f"- Monte Carlo error: confidence s.e. as in the table (at most {max(sweep.ode_confidence_se + sweep.sde_confidence_se):.4f}); "
        f"the k-NN estimate of the ODE output's entropy is within {knn_gap:.3f} nats of the divergence identity "
        f"at every eta, against an entropy drop of {sweep.ode_entropy[0] - sweep.ode_entropy[-1]:.3f} nats from "
        f"eta = {sweep.etas[0]:g} to {sweep.etas[-1]:g}.\n\n"
        + image_md("confidence_entropy.png", "confidence and entropy against eta") + "\n\n"
        + image_md("pathwise_confidence.png", "per-path confidence against eta"))




def reference_section(comparison: ReferenceComparison) -> str:
    rows = []
    for eta, reference, measured, difference in zip(comparison.etas, comparison.reference, comparison.measured,
                                                    comparison.abs_difference):
        row = [eta]
        for ref, got, diff in zip(reference, measured, difference):
            row += [f"{ref:.3f}", f"{got:.4f}", f"{diff:.4f}"]
        rows.append(row)
    headers = ["eta"]
    for name in ("ODE E[p0(y|Y)]", "ODE entropy", "SDE E[p0(y|Y)]"):
        headers += [f"{name} doc", "measured", "abs diff"]
    return (
        f"docs/guidance-reference.md's reference run beside ours: the same setting, {comparison.num_samples} samples, "
        f"{comparison.steps} Euler steps: the run of section 1 (its extra eta = 0.5 gets the same noise as the "
        "others and changes none of their values).\n\n" + markdown_table(headers, rows)
        + f"\n\nLargest absolute difference {comparison.max_abs_difference:.4f}; every cell within "
        f"{comparison.tolerance:g}: **{comparison.all_within_tolerance}**.")
