"""`condiff guidance-lab`, exact-score part: the guidance claims of Wu et al. (ICML 2024) measured on
Gaussian mixtures, with figures and a Markdown report.

On a Gaussian mixture the scores are known exactly (`condiff.gmm_guidance`), so what the report shows
is the guidance itself, not a learned model's errors: only the sampler's discretisation and Monte
Carlo error remain, and both are stated beside the numbers. Four parts, one function each to sample,
to measure (plain dataclasses, also written to guidance_lab.json) and to draw:

1. the reference setting (two components at +-(1, 0), target +(1, 0)): confidence rises and entropy
   falls with the guidance strength eta, for the ODE and the SDE, and pathwise with shared noise;
2. three components: a target at the end of a line, in its centre, or at a triangle's corner, and
   where the guidance drift along mu_y - mu_k is negative;
3. the discretisation phase shift of `PHASE_SHIFT_EXAMPLE` against the number of steps;
4. the reference table of docs/guidance-gmm.md beside the measured values.

`extra_sections` lets other parts of the lab (learned models) add sections to the same report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import Normalize
from tqdm.auto import tqdm

from condiff.gmm import GaussianMixture
from condiff.gmm_guidance import (
    PHASE_SHIFT_EXAMPLE,
    REFERENCE_T,
    REFERENCE_TABLE,
    REFERENCE_TARGET,
    SPLIT_THRESHOLD,
    GuidedSamples,
    PhaseShiftExample,
    centre_dip_ratio,
    classifier_score,
    collinear_mixture,
    gaussian_entropy,
    knn_entropy,
    mean_confidence,
    ode_output_entropy,
    reference_mixture,
    reference_samples,
    sample_guided_sweep,
)
from condiff.report import image_md, markdown_table, new_figure, save_figure, write_report
from condiff.rundir import create_output_directory, write_json_atomic

ETAS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
SCATTER_ETAS = (0.0, 1.0, 4.0, 8.0)
PHASE_SHIFT_STEPS = (10, 20, 30, 40, 50, 100, 200)
DRIFT_TIMES = (0.0, 1.0)          # noise levels at which the sign of the guidance drift is mapped
REFERENCE_TOLERANCE = 0.01
KNN_NEIGHBOURS = 3
SEED = 0

ExtraSections = Callable[[Path], list[tuple[str, str]]]


@dataclass(frozen=True)
class LabSizes:
    """Sample and step counts of every part; `FULL_SIZES` is the report's setting."""
    sweep_samples: int = 20000     # reference setting: the doc's table used 20,000 samples ...
    sweep_steps: int = 2000        # ... and 2,000 Euler steps
    geometry_samples: int = 10000
    geometry_steps: int = 2000
    drift_samples: int = 100000    # draws from the target component to measure where drifts are negative
    phase_samples: int = 20000
    scatter_points: int = 2000     # points per scatter panel (a subset of the sweep's samples)
    paths_shown: int = 8           # shared-noise paths drawn in the pathwise figure


FULL_SIZES = LabSizes()
# For tests and smoke runs: the same parts and figures in seconds, with ~4x the Monte Carlo error and
# 10x coarser steps.
QUICK_SIZES = LabSizes(sweep_samples=1000, sweep_steps=200, geometry_samples=800, geometry_steps=200,
                       drift_samples=4000, phase_samples=2000, scatter_points=500, paths_shown=6)


# ----------------------------------------------------------------------------------------------------
# Shared measurements
# ----------------------------------------------------------------------------------------------------

def path_confidences(mixture: GaussianMixture, runs: Sequence[GuidedSamples], y: int) -> np.ndarray:
    """p_0(y | Y) of every sample in every run, shape (N, len(runs)): one row per shared-noise path."""
    return np.stack([mixture.log_posterior(run.samples).exp()[:, y].numpy() for run in runs], axis=1)


def pathwise_monotone_fraction(confidences: np.ndarray) -> float:
    """Share of paths (rows) whose confidence never decreases from one eta (column) to the next."""
    return float(np.mean(np.all(np.diff(confidences, axis=1) >= 0.0, axis=1)))


def largest_pathwise_drop(confidences: np.ndarray) -> float:
    """The largest decrease of one path's confidence between consecutive etas (0 when none)."""
    return float(max(0.0, -np.diff(confidences, axis=1).min()))


def orthogonal_variance(mixture: GaussianMixture, samples: torch.Tensor) -> float:
    """Per-coordinate sample variance of the samples projected off the span of the mean differences:
    guidance only acts inside that span, so this variance should stay that of the components (1)."""
    differences = (mixture.means[1:] - mixture.means[0]).T
    directions, singular_values, _ = torch.linalg.svd(differences, full_matrices=False)
    basis = directions[:, singular_values > 1e-9 * singular_values.max()]   # collinear means span one axis
    residual = samples - samples @ basis @ basis.T
    return (residual.var(dim=0).sum() / (samples.shape[1] - basis.shape[1])).item()


def is_non_decreasing(values: Sequence[float]) -> bool:
    return bool(np.all(np.diff(values) >= 0.0))


def is_non_increasing(values: Sequence[float]) -> bool:
    return bool(np.all(np.diff(values) <= 0.0))


# ----------------------------------------------------------------------------------------------------
# 1. Confidence and entropy against eta, reference setting
# ----------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------
# 2. Component geometry with three components
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Geometry:
    """Three unit-variance components, equal weights; `target` indexes the guided class."""
    name: str
    means: tuple[tuple[float, float], ...]
    target: int

    def mixture(self) -> GaussianMixture:
        return GaussianMixture.from_lists(self.means)


GEOMETRY_SPACING = 2.0   # distance from the target to its nearest other component in every geometry
_CIRCUMRADIUS = GEOMETRY_SPACING / math.sqrt(3.0)
GEOMETRIES = (
    Geometry("line, target at the end", ((-GEOMETRY_SPACING, 0.0), (0.0, 0.0), (GEOMETRY_SPACING, 0.0)), 2),
    Geometry("line, target in the centre", ((-GEOMETRY_SPACING, 0.0), (0.0, 0.0), (GEOMETRY_SPACING, 0.0)), 1),
    Geometry("triangle", ((0.0, _CIRCUMRADIUS), (-GEOMETRY_SPACING / 2, -_CIRCUMRADIUS / 2),
                          (GEOMETRY_SPACING / 2, -_CIRCUMRADIUS / 2)), 0),
)


@dataclass
class DriftSign:
    """Where the guidance drift along u = mu_y - mu_k is negative, for x ~ p_t(.|y) = N(a_t mu_y, v_t I).

    The guidance part of the drift is eta a_t (mu_y - mubar_t(x)) / v_t (twice that for the SDE): its
    sign along u does not depend on eta or on the sampler, only on x and t."""
    other: int                       # k
    time: float                      # t
    negative_share: float            # share of p_t(.|y) where <grad log p_t(y|x), u> < 0
    mean_where_negative: float       # E[<grad log p_t(y|x), u/|u|> | negative] (0 when never negative)
    num_draws: int


@dataclass
class GeometryResult:
    """Claim 2 for one geometry: confidence and entropy against eta, and where the drift is negative."""
    name: str
    means: list[list[float]]
    target: int
    etas: list[float]
    num_samples: int
    steps: int
    ode_confidence: list[float]
    sde_confidence: list[float]
    ode_entropy: list[float]         # divergence identity
    sde_entropy_knn: list[float]
    ode_monotone_fraction: float
    sde_monotone_fraction: float
    ode_largest_drop: float
    sde_largest_drop: float
    confidence_non_decreasing: bool      # ODE and SDE means
    entropy_non_increasing: bool         # ODE divergence identity and SDE k-NN
    drift_signs: list[DriftSign]


def guidance_drift_along(mixture: GaussianMixture, x: torch.Tensor, t: float, y: int, k: int) -> torch.Tensor:
    """<grad log p_t(y|x), u/|u|> with u = mu_y - mu_k: the guidance drift per unit eta along u."""
    u = mixture.means[y] - mixture.means[k]
    return classifier_score(mixture, x, t, y) @ (u / u.norm())


def measure_drift_signs(geometry: Geometry, times: Sequence[float], num_samples: int, *,
                        generator: torch.Generator | None = None) -> list[DriftSign]:
    mixture = geometry.mixture()
    signs = []
    for t in times:
        means_t, var = mixture.noisy_components(math.exp(-2.0 * t))   # alpha_bar = a_t^2
        x = means_t[geometry.target] + var ** 0.5 * torch.randn(num_samples, 2, generator=generator,
                                                                dtype=torch.float64)
        for k in range(len(geometry.means)):
            if k == geometry.target:
                continue
            drift = guidance_drift_along(mixture, x, t, geometry.target, k)
            negative = drift < 0.0
            signs.append(DriftSign(k, float(t), negative.double().mean().item(),
                                   drift[negative].mean().item() if negative.any() else 0.0, num_samples))
    return signs


def sample_geometry(geometry: Geometry, etas: Sequence[float], num_samples: int, steps: int, *,
                    generator: torch.Generator | None = None) -> tuple[list[GuidedSamples], list[GuidedSamples]]:
    """Shared-noise ODE (Euler) and SDE (Euler-Maruyama) runs at every eta, T = 8, exact start."""
    kwargs = dict(T=REFERENCE_T, steps=steps, start="exact", generator=generator)
    mixture = geometry.mixture()
    ode = sample_guided_sweep(mixture, geometry.target, etas, num_samples, method="ode_euler", **kwargs)
    sde = sample_guided_sweep(mixture, geometry.target, etas, num_samples, method="sde_euler", **kwargs)
    return ode, sde


def measure_geometry(geometry: Geometry, ode: Sequence[GuidedSamples], sde: Sequence[GuidedSamples],
                     drift_signs: list[DriftSign]) -> GeometryResult:
    mixture = geometry.mixture()
    ode_paths = path_confidences(mixture, ode, geometry.target)
    sde_paths = path_confidences(mixture, sde, geometry.target)
    ode_confidence, sde_confidence = ode_paths.mean(0).tolist(), sde_paths.mean(0).tolist()
    ode_entropy = [ode_output_entropy(run) for run in ode]
    sde_entropy_knn = [knn_entropy(run.samples, KNN_NEIGHBOURS) for run in sde]
    return GeometryResult(
        name=geometry.name, means=[list(mean) for mean in geometry.means], target=geometry.target,
        etas=[run.eta for run in ode], num_samples=len(ode_paths), steps=ode[0].steps,
        ode_confidence=ode_confidence, sde_confidence=sde_confidence, ode_entropy=ode_entropy,
        sde_entropy_knn=sde_entropy_knn,
        ode_monotone_fraction=pathwise_monotone_fraction(ode_paths),
        sde_monotone_fraction=pathwise_monotone_fraction(sde_paths),
        ode_largest_drop=largest_pathwise_drop(ode_paths), sde_largest_drop=largest_pathwise_drop(sde_paths),
        confidence_non_decreasing=is_non_decreasing(ode_confidence) and is_non_decreasing(sde_confidence),
        entropy_non_increasing=is_non_increasing(ode_entropy) and is_non_increasing(sde_entropy_knn),
        drift_signs=drift_signs)


def run_geometries(geometries: Sequence[Geometry], etas: Sequence[float], sizes: LabSizes, *,
                   generator: torch.Generator | None = None, progress: bool = True) -> list[GeometryResult]:
    results = []
    for geometry in tqdm(geometries, desc="geometries", disable=not progress):
        ode, sde = sample_geometry(geometry, etas, sizes.geometry_samples, sizes.geometry_steps, generator=generator)
        signs = measure_drift_signs(geometry, DRIFT_TIMES, sizes.drift_samples, generator=generator)
        results.append(measure_geometry(geometry, ode, sde, signs))
    return results


def centre_confidence_ceiling(geometry: Geometry) -> float:
    """p_0(centre | x) on the line x_1 = 0 through the centre, perpendicular to the means (the same at
    every x_2): the confidence reached when guidance pulls the first coordinate onto the centre."""
    return mean_confidence(geometry.mixture(), torch.zeros(1, 2, dtype=torch.float64), geometry.target)


def plot_drift_maps(geometries: Sequence[Geometry], path: Path, t: float = 0.0, resolution: int = 161) -> Path:
    """Per geometry, min over k != y of the guidance drift along (mu_y - mu_k)/|mu_y - mu_k| on the plane
    (red where negative: there guidance moves x towards some other component), arrows the direction of
    grad log p_t(y|x)."""
    extent = 4.5
    axis = torch.linspace(-extent, extent, resolution, dtype=torch.float64)
    grid_x, grid_y = torch.meshgrid(axis, axis, indexing="xy")
    points = torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1)
    maps, arrows = [], []
    for geometry in geometries:
        mixture = geometry.mixture()
        along = torch.stack([guidance_drift_along(mixture, points, t, geometry.target, k)
                             for k in range(len(geometry.means)) if k != geometry.target])
        maps.append(along.min(dim=0).values.reshape(resolution, resolution).numpy())
        arrows.append(classifier_score(mixture, points, t, geometry.target).reshape(resolution, resolution, 2).numpy())
    limit = max(np.abs(m).max() for m in maps)
    norm = Normalize(-limit, limit)   # shared and centred on 0, so white means no push either way
    figure = new_figure((4.2 * len(geometries) + 1.0, 4.4))
    panels = figure.subplots(1, len(geometries), squeeze=False)[0]
    stride = resolution // 16
    for axes, geometry, drift_map, arrow in zip(panels, geometries, maps, arrows):
        image = axes.pcolormesh(grid_x.numpy(), grid_y.numpy(), drift_map, cmap="RdBu", norm=norm, shading="auto")
        axes.contour(grid_x.numpy(), grid_y.numpy(), drift_map, levels=[0.0], colors="black", linewidths=0.8)
        sub = (slice(None, None, stride), slice(None, None, stride))
        length = np.maximum(np.linalg.norm(arrow[sub], axis=-1), 1e-12)
        # Unit arrows: directions matter here, magnitudes are in the colours.
        axes.quiver(grid_x.numpy()[sub], grid_y.numpy()[sub], arrow[sub][..., 0] / length,
                    arrow[sub][..., 1] / length, color="0.25", width=0.004, scale=28)
        means = np.asarray(geometry.means)
        axes.scatter(means[:, 0], means[:, 1], marker="o", color="black", s=30, zorder=3)
        axes.scatter(*means[geometry.target], marker="*", color="gold", edgecolors="black", s=200, zorder=4)
        axes.set_aspect("equal")
        axes.set_title(geometry.name)
        axes.set_xlabel("$x_1$")
    panels[0].set_ylabel("$x_2$")
    figure.colorbar(image, ax=list(panels), shrink=0.85,
                    label="$\\min_{k\\neq y}\\ \\langle \\nabla \\log p_t(y|x), u_k/|u_k| \\rangle$")
    figure.suptitle(f"guidance drift per unit $\\eta$ at t = {t:g}: red where it points towards another "
                    "component (star: target)")
    return save_figure(figure, path)


def plot_geometry_sweep(results: Sequence[GeometryResult], path: Path) -> Path:
    figure = new_figure((10.0, 4.0))
    confidence_axes, entropy_axes = figure.subplots(1, 2)
    for index, result in enumerate(results):
        colour = f"C{index}"
        confidence_axes.plot(result.etas, result.ode_confidence, color=colour, marker="o", label=f"{result.name}, ODE")
        confidence_axes.plot(result.etas, result.sde_confidence, color=colour, marker="s", linestyle="--",
                             label=f"{result.name}, SDE")
        entropy_axes.plot(result.etas, result.ode_entropy, color=colour, marker="o", label=f"{result.name}, ODE")
        entropy_axes.plot(result.etas, result.sde_entropy_knn, color=colour, marker="s", linestyle="--",
                          label=f"{result.name}, SDE (k-NN)")
    label_eta_axes(confidence_axes, entropy_axes, "(a) confidence", "(b) entropy (ODE: divergence identity)")
    confidence_axes.legend(fontsize="x-small")
    return save_figure(figure, path)


# ----------------------------------------------------------------------------------------------------
# 3. Discretisation phase shift
# ----------------------------------------------------------------------------------------------------

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
    for count in tqdm(steps, desc="phase shift", disable=not progress):
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


# ----------------------------------------------------------------------------------------------------
# 4. The reference table
# ----------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------

def _numbers(values: Sequence[float], digits: int = 3) -> str:
    return ", ".join(f"{value:.{digits}f}" for value in values)


def _eta_sweep_section(sweep: EtaSweep) -> str:
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


def _geometry_section(results: Sequence[GeometryResult]) -> str:
    sweep_rows = [[result.name, eta, result.ode_confidence[i], result.sde_confidence[i], result.ode_entropy[i],
                   result.sde_entropy_knn[i]]
                  for result in results for i, eta in enumerate(result.etas)]
    sweep_table = markdown_table(["geometry", "eta", "ODE E[p0(y|Y)]", "SDE E[p0(y|Y)]", "ODE entropy (divergence)",
                                  "SDE entropy (k-NN)"], sweep_rows)
    drift_rows = []
    for result in results:
        for k in sorted({sign.other for sign in result.drift_signs}):
            signs = [sign for sign in result.drift_signs if sign.other == k]
            position = ", ".join(f"{coordinate:.2f}" for coordinate in result.means[k])
            drift_rows.append([result.name, f"{k} at ({position})"]
                              + [f"{sign.negative_share:.3f} ({sign.mean_where_negative:.3f})" for sign in signs])
    drift_table = markdown_table(["geometry", "other component k"]
                                 + [f"share negative at t = {t:g} (mean there)" for t in DRIFT_TIMES], drift_rows)
    path_rows = [[result.name, result.ode_monotone_fraction, result.sde_monotone_fraction, result.ode_largest_drop,
                  result.sde_largest_drop] for result in results]
    path_table = markdown_table(["geometry", "ODE paths monotone", "SDE paths monotone", "ODE largest drop",
                                 "SDE largest drop"], path_rows)
    findings = []
    for result in results:
        negative = max(sign.negative_share for sign in result.drift_signs)
        findings.append(
            f"- **{result.name}**: ODE confidence {result.ode_confidence[0]:.3f} -> {result.ode_confidence[-1]:.3f}, "
            f"SDE {result.sde_confidence[0]:.3f} -> {result.sde_confidence[-1]:.3f}; ODE entropy "
            f"{result.ode_entropy[0]:.2f} -> {result.ode_entropy[-1]:.2f} nats, SDE (k-NN) "
            f"{result.sde_entropy_knn[0]:.2f} -> {result.sde_entropy_knn[-1]:.2f} (eta {result.etas[0]:g} -> "
            f"{result.etas[-1]:g}). Mean confidence non-decreasing: {result.confidence_non_decreasing}; entropy "
            f"non-increasing: {result.entropy_non_increasing}. Largest share of "
            f"p_t(.|y) where the drift along some mu_y - mu_k is negative: {negative:.3f}.")
    never_negative = [f"*{r.name}*" for r in results if max(sign.negative_share for sign in r.drift_signs) == 0.0]
    centre = next(geometry for geometry in GEOMETRIES if geometry.name == "line, target in the centre")
    result = next(r for r in results if r.name == centre.name)
    centre_negative = min(sign.negative_share for sign in result.drift_signs)
    reading = (
        f"Reading: for {' and '.join(never_negative) or 'no geometry'} the guidance drift along every mu_y - mu_k "
        f"was non-negative at every draw: guidance never points from the target towards another component. With the "
        f"target in the centre it is negative on at least {centre_negative:.3f} of the target component for each "
        f"k: guidance pulls x1 towards the centre, so confidence "
        f"saturates near p0(centre | x1 = 0) = {centre_confidence_ceiling(centre):.3f} (ODE at eta = "
        f"{result.etas[-1]:g}: {result.ode_confidence[-1]:.3f}) while the ODE entropy keeps falling, and "
        f"{1 - result.sde_monotone_fraction:.1%} of the SDE's shared-noise paths lose confidence somewhere "
        f"between consecutive etas (by up to {result.sde_largest_drop:.3f}).")
    return (
        f"Three unit-variance components, equal weights, nearest other component at distance "
        f"{GEOMETRY_SPACING:g} from the target in each geometry; T = 8, exact start, {results[0].num_samples} "
        f"samples, {results[0].steps} Euler(-Maruyama) steps, shared noise across etas.\n\n"
        + "\n".join(findings) + "\n\n" + reading + "\n\n"
        + image_md("geometry_drift.png", "where the guidance drift is negative") + "\n\n"
        f"Share of the target component's noisy distribution p_t(.|y) = N(a_t mu_y, v_t I) "
        f"({results[0].drift_signs[0].num_draws} draws per t) where the guidance drift along u = mu_y - mu_k is negative, "
        "and its mean value per unit eta along u/|u| there:\n\n" + drift_table + "\n\n"
        + image_md("geometry_sweep.png", "confidence and entropy against eta per geometry") + "\n\n"
        + sweep_table + "\n\nPathwise (shared noise): share of paths with non-decreasing final p0(y|Y) in eta, "
        "and the largest decrease of any path:\n\n" + path_table)


def _phase_shift_section(sweep: PhaseShiftSweep, example: PhaseShiftExample) -> str:
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
        f"- Guided dip ratio against steps: {_numbers(sweep.guided_dip_ratio)} at {sweep.steps} steps.\n\n"
        + image_md("phase_shift_histograms.png", "first coordinate at few and many steps") + "\n\n"
        + image_md("phase_shift_dip_ratio.png", "dip ratio against the number of steps") + "\n\n" + table)


def _reference_section(comparison: ReferenceComparison) -> str:
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
        f"docs/guidance-gmm.md's reference run beside ours: the same setting, {comparison.num_samples} samples, "
        f"{comparison.steps} Euler steps: the run of section 1 (its extra eta = 0.5 gets the same noise as the "
        "others and changes none of their values).\n\n" + markdown_table(headers, rows)
        + f"\n\nLargest absolute difference {comparison.max_abs_difference:.4f}; every cell within "
        f"{comparison.tolerance:g}: **{comparison.all_within_tolerance}**.")


def run_guidance_lab(output: Path, *, overwrite: bool = False, progress: bool = True,
                     extra_sections: ExtraSections | None = None, sizes: LabSizes = FULL_SIZES) -> Path:
    """Measure the guidance claims with exact scores, write figures, guidance_lab.json and report.md into
    `output` (refused if it exists and is not empty, unless `overwrite`); returns the report's path.

    `extra_sections(output)` is called after the exact-score work; its (heading, Markdown) sections are
    appended to the report. `sizes` trades Monte Carlo error for time (`QUICK_SIZES` for tests)."""
    output = Path(output)
    create_output_directory(output, "guidance-lab", overwrite=overwrite)
    started = time.perf_counter()
    generators = {part: torch.Generator().manual_seed(SEED + offset)
                  for offset, part in enumerate(("sweep", "geometry", "phase_shift"))}

    ode, sde = reference_samples(ETAS, sizes.sweep_samples, sizes.sweep_steps, generator=generators["sweep"])
    sweep = measure_eta_sweep(ode, sde, paths_shown=sizes.paths_shown)
    reference = compare_with_reference(sweep)
    plot_confidence_entropy(sweep, output / "confidence_entropy.png")
    plot_pathwise_confidence(sweep, output / "pathwise_confidence.png")
    plot_guided_scatter(ode, sde, SCATTER_ETAS, output / "guided_samples.png", points=sizes.scatter_points)

    geometries = run_geometries(GEOMETRIES, ETAS, sizes, generator=generators["geometry"], progress=progress)
    plot_drift_maps(GEOMETRIES, output / "geometry_drift.png")
    plot_geometry_sweep(geometries, output / "geometry_sweep.png")

    example = PHASE_SHIFT_EXAMPLE
    phase_runs = sample_phase_shift(example, PHASE_SHIFT_STEPS, sizes.phase_samples,
                                    generator=generators["phase_shift"], progress=progress)
    phase_shift = measure_phase_shift(example, phase_runs)
    plot_phase_shift_histograms(example, phase_runs, output / "phase_shift_histograms.png")
    plot_phase_shift_curve(phase_shift, output / "phase_shift_dip_ratio.png")
    elapsed = time.perf_counter() - started

    results = {
        "sizes": asdict(sizes), "seed": SEED, "elapsed_s": elapsed, "torch_threads": torch.get_num_threads(),
        "eta_sweep": asdict(sweep), "geometry": [asdict(result) for result in geometries],
        "phase_shift": asdict(phase_shift), "reference": asdict(reference),
        "claims": {
            "confidence_non_decreasing": sweep.confidence_non_decreasing,
            "entropy_non_increasing": sweep.entropy_non_increasing,
            "pathwise_monotone_ode": sweep.ode_monotone_fraction == 1.0,
            "pathwise_monotone_sde": sweep.sde_monotone_fraction == 1.0,
            "phase_shift_at_few_steps": phase_shift.split_at_few_steps,
            "phase_shift_at_many_steps": phase_shift.split_at_many_steps,
            "reference_within_tolerance": reference.all_within_tolerance,
        },
    }
    write_json_atomic(output / "guidance_lab.json", results)

    sections = [
        ("Setting", f"Exact scores of isotropic Gaussian mixtures (`condiff.gmm_guidance`), Ornstein-Uhlenbeck time "
                    f"(a_t = exp(-t)), guidance strength eta (classifier guidance = classifier-free guidance with "
                    f"w = eta). ODE = probability-flow ODE, SDE = reverse SDE. Sizes: reference setting "
                    f"{sizes.sweep_samples} samples x {sizes.sweep_steps} steps; three-component geometries "
                    f"{sizes.geometry_samples} samples x {sizes.geometry_steps} steps ({sizes.drift_samples} "
                    f"draws for the drift signs); phase shift {sizes.phase_samples} samples per step count; "
                    f"seed {SEED}. "
                    f"The exact-score part took {elapsed:.0f} s (torch threads: {torch.get_num_threads()}). "
                    f"All numbers are in guidance_lab.json."),
        ("1. Confidence and entropy against eta", _eta_sweep_section(sweep)),
        ("Guided samples", f"The first {sizes.scatter_points} samples of the runs above at eta = "
                           f"{', '.join(f'{eta:g}' for eta in SCATTER_ETAS)}.\n\n"
                           + image_md("guided_samples.png", "guided samples at several etas")),
        ("2. Component geometry with three components", _geometry_section(geometries)),
        ("3. Discretisation phase shift", _phase_shift_section(phase_shift, example)),
        ("4. Reference table of docs/guidance-gmm.md", _reference_section(reference)),
    ]
    if extra_sections is not None:
        sections += list(extra_sections(output))
    return write_report(output / "report.md", "condiff guidance-lab: guidance on Gaussian mixtures", sections)
