"""Figures and Markdown reports: sample grids, class-frequency bar charts, training curves, tables.

Figures are drawn on bare `matplotlib.figure.Figure` objects with an Agg canvas rather than through
pyplot, so importing this module never switches the process-wide backend (a notebook that imports
condiff keeps its inline backend) and no figure is left registered with pyplot to leak memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from condiff.rundir import write_atomic, write_text_atomic

DPI = 120
IMAGES_PER_ROW = 16
GRID_PADDING_PX = 1
TITLE_STRIP_IN = 0.4  # height reserved above an image grid for its title
RUN_LINESTYLES = ("-", "--", ":", "-.")

PathLike = str | os.PathLike[str]
ArrayLike = torch.Tensor | np.ndarray


def _as_numpy(values: ArrayLike | Sequence[float]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float32).numpy()
    return np.asarray(values)


def new_figure(figsize: tuple[float, float], constrained: bool = True) -> Figure:
    """A figure on its own Agg canvas (no pyplot state; see the module docstring)."""
    figure = Figure(figsize=figsize, dpi=DPI, layout="constrained" if constrained else None)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: PathLike) -> Path:
    """Write `figure` as a PNG at the report resolution, creating the folder."""
    return write_atomic(path, lambda p: figure.savefig(p, dpi=DPI, format="png"))


def _class_colour(index: int, num_classes: int) -> tuple[float, ...]:
    palette = colormaps["tab10" if num_classes <= 10 else "tab20"]
    return palette(index % palette.N)


# --- samples ---------------------------------------------------------------------------------------


def save_sample_grid(samples: ArrayLike, path: PathLike, nrow: int | None = None, title: str | None = None,
                     labels: ArrayLike | Sequence[int] | None = None) -> Path:
    """Write samples to a PNG: a tiled grid for images, a scatter plot for 2-D vectors.

    Images are (N, C, H, W) in [-1, 1] with C = 1 (grayscale) or C = 3 (RGB); values are clipped to
    [-1, 1] and mapped to [0, 1]. `nrow` is the number of images per row (torchvision's convention),
    16 by default. Vectors are (N, 2); `labels` (N,) colours them by class and is ignored for images.
    """
    array = _as_numpy(samples).astype(np.float32)
    if len(array) == 0:
        raise ValueError("no samples to draw")
    if array.ndim == 4:
        figure = _image_grid_figure(array, nrow or min(len(array), IMAGES_PER_ROW), title)
    elif array.ndim == 2 and array.shape[1] == 2:
        figure = _scatter_figure(array, None if labels is None else _as_numpy(labels).astype(int), title)
    else:
        raise ValueError(f"expected images (N, C, H, W) or 2-D vectors (N, 2), got shape {array.shape}")
    return save_figure(figure, path)


def tile_images(images: np.ndarray, per_row: int) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> one (rows*H + pads, per_row*W + pads, C) array on a white background."""
    count, channels, height, width = images.shape
    rows = math.ceil(count / per_row)
    pad = GRID_PADDING_PX
    grid = np.ones((rows * (height + pad) + pad, per_row * (width + pad) + pad, channels), dtype=np.float32)
    for index, image in enumerate(images):
        top = pad + (index // per_row) * (height + pad)
        left = pad + (index % per_row) * (width + pad)
        grid[top:top + height, left:left + width] = image.transpose(1, 2, 0)
    return grid


def _image_grid_figure(images: np.ndarray, per_row: int, title: str | None) -> Figure:
    channels = images.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {channels}")
    if per_row < 1:
        raise ValueError(f"nrow must be positive, got {per_row}")
    grid = tile_images((np.clip(images, -1.0, 1.0) + 1.0) / 2.0, min(per_row, len(images)))
    grid_height, grid_width = grid.shape[:2]
    # About 1/16 inch per source pixel: an 8x8 digit gets ~60 screen pixels, a 16-wide row of 32x32
    # images hits the 16-inch cap.
    width_in = min(max(grid_width / 16, 4.0), 16.0)
    image_height_in = width_in * grid_height / grid_width
    title_in = TITLE_STRIP_IN if title else 0.0
    figure = new_figure((width_in, image_height_in + title_in), constrained=False)
    # Axes fill the figure below the title strip, so the PNG has exactly the grid's aspect.
    axes = figure.add_axes((0.0, 0.0, 1.0, image_height_in / (image_height_in + title_in)))
    axes.imshow(grid[..., 0] if channels == 1 else grid, cmap="gray", vmin=0.0, vmax=1.0,
                interpolation="nearest", aspect="auto")
    axes.set_axis_off()
    if title:
        figure.suptitle(title, y=1.0 - title_in / 2 / (image_height_in + title_in), va="center")
    return figure


def _scatter_figure(points: np.ndarray, labels: np.ndarray | None, title: str | None) -> Figure:
    figure = new_figure((5.5, 5.0))
    axes = figure.add_subplot()
    marker_size = 4 if len(points) > 2000 else 10
    if labels is None:
        axes.scatter(points[:, 0], points[:, 1], s=marker_size, alpha=0.6, linewidths=0)
    else:
        if labels.shape != (len(points),):
            raise ValueError(f"labels must have shape ({len(points)},), got {labels.shape}")
        classes = np.unique(labels)
        for label in classes:
            chosen = labels == label
            axes.scatter(points[chosen, 0], points[chosen, 1], s=marker_size, alpha=0.6, linewidths=0,
                         color=_class_colour(int(label), int(classes.max()) + 1), label=f"class {label}")
        axes.legend(markerscale=2, fontsize="small", loc="best")
    axes.set_aspect("equal", adjustable="datalim")
    axes.set_xlabel("$x_1$")
    axes.set_ylabel("$x_2$")
    axes.set_title(title or f"{len(points)} samples")
    axes.grid(alpha=0.3)
    return figure


# --- class frequencies -----------------------------------------------------------------------------


def plot_class_frequencies(frequencies: dict[str, list[float]], path: PathLike,
                           target: list[float] | None = None,
                           intervals: dict[str, tuple[list[float], list[float]]] | None = None,
                           class_names: list[str] | None = None, title: str | None = None) -> Path:
    """Grouped bar chart: one group per class, one bar per model, the target as a black line per class.

    `intervals[model] = (low, high)` adds error bars to that model's bars (models without an entry get
    none).
    """
    if not frequencies:
        raise ValueError("no frequencies to plot")
    intervals = intervals or {}
    num_classes = len(next(iter(frequencies.values())))
    lengths = {f"frequencies[{name!r}]": len(values) for name, values in frequencies.items()}
    if target is not None:
        lengths["target"] = len(target)
    if class_names is not None:
        lengths["class_names"] = len(class_names)
    for name, (low, high) in intervals.items():
        if name not in frequencies:
            raise ValueError(f"interval for unknown model {name!r}; models are {list(frequencies)}")
        lengths[f"intervals[{name!r}]"] = min(len(low), len(high))
    if set(lengths.values()) != {num_classes}:
        raise ValueError(f"all per-class lists must have the same length, got {lengths}")

    positions = np.arange(num_classes)
    group_width = 0.8
    bar_width = group_width / len(frequencies)
    figure = new_figure((max(6.0, 0.8 * num_classes + 2.0), 4.5))
    axes = figure.add_subplot()
    for model_index, (name, values) in enumerate(frequencies.items()):
        values = np.asarray(values, dtype=float)
        error = None
        if name in intervals:
            low, high = (np.asarray(bound, dtype=float) for bound in intervals[name])
            # Matplotlib rejects negative error lengths; an interval that misses its point estimate
            # (possible for some bootstrap variants) is drawn as reaching up to it.
            error = np.clip(np.stack([values - low, high - values]), 0.0, None)
        offset = (model_index - (len(frequencies) - 1) / 2) * bar_width
        axes.bar(positions + offset, values, bar_width, yerr=error, capsize=2, label=name,
                 error_kw={"linewidth": 1, "ecolor": "0.2"})
    if target is not None:
        axes.hlines(target, positions - group_width / 2, positions + group_width / 2, colors="black",
                    linewidth=2, label="target", zorder=3)
    axes.set_xticks(positions, class_names or [str(label) for label in range(num_classes)])
    axes.set_xlabel("class")
    axes.set_ylabel("frequency")
    axes.set_ylim(bottom=0.0)
    axes.set_title(title or "Class frequencies of generated samples")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize="small")
    return save_figure(figure, path)


# --- training metrics ------------------------------------------------------------------------------


class ConstraintPanel(NamedTuple):
    """A training-curve panel of one per-constraint list in the metrics records."""

    key: str
    title: str
    y_label: str
    smoothed: bool  # multipliers are a projected running sum of slacks, smooth already


CONSTRAINT_PANELS = (
    ConstraintPanel("multipliers", "multipliers", "multiplier $\\lambda$", smoothed=False),
    ConstraintPanel("constraint_losses", "constraint losses", "constraint loss", smoothed=True),
    ConstraintPanel("slacks", "slacks", "slack", smoothed=True),
)


def _moving_average(steps: np.ndarray, values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the values logged in [step - window/2, step + window/2] for each (sorted) step.

    Centred, because a trailing mean lags a loss that falls fast early on by half a window. A window
    in steps rather than records treats sparsely logged series (constraint losses measured every k
    steps) the same as per-step ones; near the ends the window holds what there is.
    """
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    starts = np.searchsorted(steps, steps - window / 2, side="left")
    ends = np.searchsorted(steps, steps + window / 2, side="right")
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def _per_constraint(value) -> list:
    """Per-constraint values in constraint order: keyed by name (or, in older metrics, a list)."""
    return list(value.values()) if isinstance(value, dict) else list(value or ())


def _series(records: list[dict[str, Any]], key: str, index: int | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of record[key], or of its index-th constraint's value; nulls skipped."""
    kept = [(record["step"], record[key] if index is None else _per_constraint(record[key])[index])
            for record in records
            if record.get(key) is not None and (index is None or len(_per_constraint(record[key])) > index)]
    steps, values = zip(*kept) if kept else ((), ())
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _num_constraints(records: list[dict[str, Any]], key: str) -> int:
    return max((len(_per_constraint(record.get(key))) for record in records), default=0)


def _plot_per_constraint(axes: Axes, runs: dict[str, list[dict[str, Any]]], key: str,
                         constraint_names: list[str], smooth: int | None) -> None:
    """One line per (run, constraint): colour marks the constraint, line style the run."""
    runs_with_data = {name: records for name, records in runs.items() if _num_constraints(records, key)}
    # Colours from the largest constraint count, so constraint k has one colour across runs.
    num_constraints = max(_num_constraints(records, key) for records in runs_with_data.values())
    for run_index, (run_name, records) in enumerate(runs_with_data.items()):
        for index in range(_num_constraints(records, key)):
            steps, values = _series(records, key, index)
            if smooth is not None:
                values = _moving_average(steps, values, smooth)
            name = constraint_names[index] if index < len(constraint_names) else f"constraint {index}"
            axes.plot(steps, values, color=_class_colour(index, num_constraints),
                      linestyle=RUN_LINESTYLES[run_index % len(RUN_LINESTYLES)], linewidth=1.2,
                      label=name if len(runs_with_data) == 1 else f"{run_name}: {name}")
    entries = len(axes.get_lines())
    axes.legend(fontsize="x-small", ncol=2 if entries > 6 else 1)


def plot_training_curves(runs: dict[str, list[dict[str, Any]]], path: PathLike,
                         constraint_names: list[str] | None = None, smooth: int = 50) -> Path:
    """Training curves of one or more runs (name -> read_metrics records) in one figure.

    Panels: objective loss (raw faint, centred moving average over `smooth` steps on top; log scale when
    positive), multipliers, constraint losses and slacks per constraint (the last two smoothed like
    the objective, raw omitted to keep many-constraint panels legible). Constraint panels with no data
    in any run are left out; a figure of unconstrained runs only says so in its objective panel.
    """
    if not runs:
        raise ValueError("no runs to plot")
    if smooth < 1:
        raise ValueError(f"smooth must be at least 1 step, got {smooth}")
    # A resumed run re-logs the steps after its last checkpoint; the later records are the ones the
    # final model descends from.
    runs = {name: sorted({record["step"]: record for record in records}.values(), key=lambda r: r["step"])
            for name, records in runs.items()}
    constraint_names = constraint_names or []
    constraint_panels = [panel for panel in CONSTRAINT_PANELS
                         if any(_num_constraints(records, panel.key) for records in runs.values())]

    num_panels = 1 + len(constraint_panels)
    columns = 1 if num_panels == 1 else 2
    rows = math.ceil(num_panels / columns)
    figure = new_figure((6.0 * columns, 4.0 * rows))
    panel_axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for unused in panel_axes[num_panels:]:
        unused.remove()

    objective_axes = panel_axes[0]
    all_positive = True
    for run_index, (run_name, records) in enumerate(runs.items()):
        steps, losses = _series(records, "objective_loss")
        colour = f"C{run_index % 10}"
        objective_axes.plot(steps, losses, color=colour, alpha=0.2, linewidth=0.8)
        objective_axes.plot(steps, _moving_average(steps, losses, smooth), color=colour, linewidth=1.5,
                            label=run_name)
        all_positive = all_positive and bool(np.all(losses > 0))
    if all_positive:
        # Diffusion losses drop by orders of magnitude in the first steps, flattening a linear scale.
        objective_axes.set_yscale("log")
    objective_axes.legend(fontsize="small")
    objective_axes.set_ylabel("objective loss")
    objective_axes.set_title("(a) objective loss" + ("" if constraint_panels else " (no constraints)"))

    for letter, axes, panel in zip("bcd", panel_axes[1:], constraint_panels):
        _plot_per_constraint(axes, runs, panel.key, constraint_names, smooth if panel.smoothed else None)
        if panel.key == "slacks":
            axes.axhline(0.0, color="0.4", linestyle=":", linewidth=1)
        axes.set_ylabel(panel.y_label)
        axes.set_title(f"({letter}) {panel.title}")
    for axes in panel_axes[:num_panels]:
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    return save_figure(figure, path)


# --- Markdown --------------------------------------------------------------------------------------


def _format_cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    # A literal pipe would end the cell early.
    return str(value).replace("|", "\\|")


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table: floats to 4 significant digits, ints as they are, None as an en dash."""
    for number, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"row {number} has {len(row)} cells for {len(headers)} headers")
    lines = ["| " + " | ".join(_format_cell(header) for header in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_format_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def image_md(path_relative: PathLike, alt: str) -> str:
    """A Markdown image link; the path must be relative (to the report) so the report can be moved."""
    path = Path(path_relative)
    if path.is_absolute():
        raise ValueError(f"image path must be relative to the report, got {path}")
    target = path.as_posix()
    # CommonMark takes a link target with spaces only between angle brackets.
    return f"![{alt}](<{target}>)" if " " in target else f"![{alt}]({target})"


def write_report(path: PathLike, title: str, sections: list[tuple[str, str]]) -> Path:
    """Write `# title` then `## heading` and body per section, atomically."""
    parts = [f"# {title}\n"] + [f"## {heading}\n\n{body.strip()}\n" for heading, body in sections]
    return write_text_atomic(path, "\n".join(parts))
