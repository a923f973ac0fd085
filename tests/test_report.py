"""Tests for condiff.report: PNG figures, metrics reading, Markdown tables and reports."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from condiff.report import (
    GRID_PADDING_PX,
    _moving_average,
    image_md,
    markdown_table,
    plot_class_frequencies,
    plot_training_curves,
    save_sample_grid,
    write_report,
)
from condiff.rundir import RunDirectoryError, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path: Path) -> np.ndarray:
    """The PNG's pixels (H, W, 4), after checking it is a real, non-blank PNG."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)  # what plt.imread calls
    assert pixels.ndim == 3 and pixels.shape[0] > 10 and pixels.shape[1] > 10
    assert pixels[..., :3].std() > 0.01, "image is uniform"
    return pixels


def digit_like_images(count: int, channels: int = 1) -> torch.Tensor:
    """(count, channels, 8, 8) in [-1, 1]: a distinct bright diagonal band per image on black."""
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    images = torch.stack([((rows + cols - index % 14).abs() <= 1).float() for index in range(count)])
    return (images * 2 - 1).unsqueeze(1).repeat(1, channels, 1, 1)


def named(values: list[float]) -> dict[str, float]:
    """Per-constraint values as the trainer logs them: keyed by constraint name."""
    return {f"class {index}": value for index, value in enumerate(values)}


def metrics_record(step: int, constrained: bool, measured: bool = True) -> dict:
    return {
        "step": step, "lr": 1e-4, "dual_lr": 0.1, "objective_loss": 1.0 / (step + 1) + 0.05,
        "lagrangian": 1.0 / (step + 1) + 0.06,
        "multipliers": named([0.001 * step, 0.002 * step, 0.0]) if constrained else {},
        "constraint_losses": named([0.07, 0.06 + 0.001 * step, 0.08]) if constrained and measured else None,
        "slacks": named([-0.01, 0.001 * step, 0.02]) if constrained and measured else None,
        "dual_step": constrained,
    }


def write_metrics(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_grid_of_twenty_digits_has_the_grid_aspect(tmp_path):
    path = save_sample_grid(digit_like_images(20), tmp_path / "grid.png")

    pixels = read_png(path)
    # 16 images a row -> 2 rows; 8 px tiles with padding between and around them.
    grid_width = 16 * 8 + 17 * GRID_PADDING_PX
    grid_height = 2 * 8 + 3 * GRID_PADDING_PX
    height, width = pixels.shape[:2]
    assert width / height == pytest.approx(grid_width / grid_height, rel=0.03)


def test_grid_honours_nrow_and_title(tmp_path):
    untitled = read_png(save_sample_grid(digit_like_images(12), tmp_path / "untitled.png", nrow=4))
    titled = read_png(save_sample_grid(digit_like_images(12), tmp_path / "titled.png", nrow=4,
                                       title="Samples"))

    # 4 x 3 tiles: close to square.
    assert untitled.shape[1] / untitled.shape[0] == pytest.approx((4 * 9 + 1) / (3 * 9 + 1), rel=0.03)
    assert titled.shape[1] == untitled.shape[1] and titled.shape[0] > untitled.shape[0]


def test_rgb_grid_from_numpy_is_clipped_and_crisp(tmp_path):
    images = digit_like_images(5, channels=3).numpy() * 3.0  # outside [-1, 1]: clipped, not wrapped
    images[:, 0] = -1.0  # no red: cyan bands on black

    pixels = read_png(save_sample_grid(images, tmp_path / "rgb.png"))

    # Nearest-neighbour scaling blends nothing: only black, cyan and the white padding appear.
    colours = np.unique(pixels[..., :3].reshape(-1, 3), axis=0)
    np.testing.assert_array_equal(colours, [[0, 0, 0], [0, 1, 1], [1, 1, 1]])


def test_scatter_of_2d_vectors_with_labels(tmp_path, drawn):
    labels = torch.arange(3).repeat(100)
    centres = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    points = centres[labels] + torch.randn(300, 2, generator=torch.Generator().manual_seed(0))

    read_png(save_sample_grid(points, tmp_path / "scatter.png", labels=labels, title="Mixture"))
    read_png(save_sample_grid(points.numpy(), tmp_path / "scatter_unlabelled.png"))

    labelled, unlabelled = (figure.axes[0].collections for figure in drawn)
    assert [c.get_label() for c in labelled] == ["class 0", "class 1", "class 2"]
    for label, collection in enumerate(labelled):   # every class's points, where they are
        np.testing.assert_allclose(collection.get_offsets(), points[labels == label].numpy(), rtol=1e-6)
    assert len(unlabelled) == 1 and len(unlabelled[0].get_offsets()) == 300


@pytest.mark.parametrize("shape", [(4, 3), (4, 2, 8, 8), (8, 8)])
def test_sample_grid_rejects_other_shapes(tmp_path, shape):
    with pytest.raises(ValueError):
        save_sample_grid(torch.zeros(shape), tmp_path / "bad.png")


def test_class_frequencies_with_target_and_intervals(tmp_path, drawn):
    frequencies = {"unconstrained": [0.30, 0.25, 0.20, 0.15, 0.10],
                   "constrained": [0.21, 0.20, 0.19, 0.20, 0.20]}
    intervals = {"constrained": ([0.18, 0.17, 0.16, 0.17, 0.17], [0.24, 0.23, 0.22, 0.23, 0.23])}

    path = plot_class_frequencies(frequencies, tmp_path / "frequencies.png", target=[0.2] * 5,
                                  intervals=intervals, class_names=list("abcde"), title="Class shares")

    read_png(path)
    axes = drawn[0].axes[0]
    bars = {container.get_label(): container for container in axes.containers if hasattr(container, "patches")}
    for model, values in frequencies.items():   # one bar per class and model, as tall as its frequency
        np.testing.assert_allclose([bar.get_height() for bar in bars[model].patches], values)
    whiskers = bars["constrained"].errorbar.lines[2][0].get_segments()
    np.testing.assert_allclose([segment[:, 1] for segment in whiskers], np.transpose(intervals["constrained"]))
    assert bars["unconstrained"].errorbar is None
    target = next(c for c in axes.collections if c.get_label() == "target")
    assert [segment[0, 1] for segment in target.get_segments()] == [0.2] * 5
    assert [tick.get_text() for tick in axes.get_xticklabels()] == list("abcde")


def test_class_frequencies_rejects_mismatched_lengths(tmp_path):
    with pytest.raises(ValueError, match="same length"):
        plot_class_frequencies({"model": [0.5, 0.5]}, tmp_path / "bad.png", target=[0.3, 0.3, 0.4])
    with pytest.raises(ValueError, match="unknown model"):
        plot_class_frequencies({"model": [0.5, 0.5]}, tmp_path / "bad.png",
                               intervals={"other": ([0.4, 0.4], [0.6, 0.6])})


def test_read_metrics_round_trips_nulls_and_empty_lists(tmp_path):
    records = [metrics_record(step, constrained=True, measured=step % 2 == 0) for step in range(4)]
    records.append(metrics_record(4, constrained=False))
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, records)

    read_back = read_metrics(path)

    assert read_back == records
    assert read_back[1]["constraint_losses"] is None and read_back[4]["multipliers"] == {}


def test_read_metrics_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 0}) + "\n\n" + json.dumps({"step": 1}) + '\n{"step": 2, "lr"')
    assert read_metrics(path) == [{"step": 0}, {"step": 1}]

    path.write_text('{"step": 0, "lr"\n' + json.dumps({"step": 1}) + "\n")
    with pytest.raises(RunDirectoryError, match=":1:"):
        read_metrics(path)


def test_moving_average_is_centred_and_counts_steps_not_records():
    steps = np.arange(0, 100, 5, dtype=float)  # logged every 5th step
    smoothed = _moving_average(steps, 2.0 * steps, window=20)

    # A centred window does not lag a linear trend away from the ends.
    np.testing.assert_allclose(smoothed[2:-2], 2.0 * steps[2:-2])
    # The window [-10, 10] around step 0 holds the records of steps 0, 5 and 10.
    assert smoothed[0] == pytest.approx(10.0)


def test_training_curves_of_unconstrained_and_constrained_runs(tmp_path, drawn):
    unconstrained = [metrics_record(step, constrained=False) for step in range(200)]
    # Constraint losses measured every 5th step only; resumed at step 150 (steps re-logged).
    steps = [*range(180), *range(150, 200)]
    constrained = [metrics_record(step, constrained=True, measured=step % 5 == 0) for step in steps]
    write_metrics(tmp_path / "constrained.jsonl", constrained)

    path = plot_training_curves({"unconstrained": unconstrained,
                                 "constrained": read_metrics(tmp_path / "constrained.jsonl")},
                                tmp_path / "curves.png", constraint_names=["class 0", "class 1", "class 2"],
                                smooth=20)

    pixels = read_png(path)
    assert pixels.shape[0] > 600, "four panels in two rows"
    objective, multipliers, losses, slacks = drawn[0].axes
    assert [a.get_title() for a in drawn[0].axes] == ["(a) objective loss", "(b) multipliers",
                                                      "(c) constraint losses", "(d) slacks"]
    # The multipliers, unsmoothed, as logged; of the resumed run the re-logged records count once.
    lines = {line.get_label(): line for line in multipliers.get_lines()}
    assert sorted(lines) == ["class 0", "class 1", "class 2"]
    np.testing.assert_allclose(lines["class 1"].get_xdata(), np.arange(200))
    np.testing.assert_allclose(lines["class 1"].get_ydata(), 0.002 * np.arange(200))
    # Constraint losses exist only at the measured steps.
    np.testing.assert_allclose(losses.get_lines()[0].get_xdata(), np.arange(0, 200, 5))
    raw_objective = objective.get_lines()[0]
    np.testing.assert_allclose(raw_objective.get_ydata(), 1.0 / (np.arange(200) + 1) + 0.05)


def test_training_curves_of_an_unconstrained_run_alone(tmp_path):
    records = [metrics_record(step, constrained=False) for step in range(50)]

    pixels = read_png(plot_training_curves({"baseline": records}, tmp_path / "curves.png"))

    assert pixels.shape[1] < pixels.shape[0] * 2, "one panel"


def test_markdown_table_formats_cells():
    rows = [["constrained", 1000, 0.0123456, None], ["a|b", np.int64(7), np.float32(2.5), 1e-7]]
    table = markdown_table(["model", "steps", "KL", "note"], rows)

    assert table.splitlines() == [
        "| model | steps | KL | note |",
        "|---|---|---|---|",
        "| constrained | 1000 | 0.01235 | – |",
        "| a\\|b | 7 | 2.5 | 1e-07 |",
    ]


def test_markdown_table_rejects_ragged_rows():
    with pytest.raises(ValueError, match="row 0"):
        markdown_table(["a", "b"], [[1]])


def test_image_md_uses_relative_paths():
    assert image_md("figures/grid.png", "samples") == "![samples](figures/grid.png)"
    assert image_md(Path("my figures") / "grid.png", "samples") == "![samples](<my figures/grid.png>)"
    with pytest.raises(ValueError, match="relative"):
        image_md(Path("/abs/grid.png").resolve(), "samples")


def test_write_report_writes_headings_and_image_links_atomically(tmp_path):
    path = tmp_path / "out" / "report.md"
    path.parent.mkdir()
    path.write_text("stale")
    sections = [("Samples", image_md("grid.png", "generated digits")),
                ("Metrics", markdown_table(["KL"], [[0.5]]) + "\n")]

    write_report(path, "Constrained digits", sections)

    text = path.read_text()
    assert text.startswith("# Constrained digits\n\n## Samples\n\n![generated digits](grid.png)\n")
    assert "\n## Metrics\n\n| KL |\n|---|\n| 0.5 |\n" in text
    assert text.endswith("|\n") and not text.endswith("\n\n")
    assert [line for line in text.splitlines() if line.startswith("#")] == [
        "# Constrained digits", "## Samples", "## Metrics"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.md"], "no temp file left behind"
