"""A target's journey over every sampling step (`condiff attribute`, condiff.audit.attribute): when
does its class appear, and which training examples drive it then?

Per target and visited DDIM step t: the posterior over classes of x0_hat(t) (condiff's evaluation
classifier; for Gaussian-mixture data the exact posterior of the mixture) and the TRAK scores of the
training examples followed, the union of the top `JOURNEY_EXAMPLES` helpful ones at each attributed step.
Scores are plotted in units of their step's spread over the training set (their scale changes with t).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps

from condiff.audit.results import TargetJourney
from condiff.report import GRID_PADDING_PX, new_figure, save_figure, tile_images

JOURNEY_EXAMPLES = 3     # per attributed step and target: its top helpful examples are followed over every step
STRIP_IMAGES = 8         # x0_hat(t) pictured at this many steps, evenly spread
LINE_STYLES = ("-", "--", "-.", ":")


def show_image(axes, image: torch.Tensor, title: str | None = None, fontsize: int = 8) -> None:
    """An image in [-1, 1] (C, H, W), without ticks, under an optional small title."""
    picture = ((image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).squeeze(-1).numpy()
    axes.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1)
    axes.set_xticks([])
    axes.set_yticks([])
    if title is not None:
        axes.set_title(title, fontsize=fontsize)


def data_limits(axes, points: np.ndarray) -> None:
    """The axes' limits to the data's range, with a margin: a poor x0_hat may lie far outside it."""
    low, high = points.min(0), points.max(0)
    margin = 0.1 * (high - low)
    axes.set(xlim=(low[0] - margin[0], high[0] + margin[0]), ylim=(low[1] - margin[1], high[1] + margin[1]))


def journey_indices(num_steps: int, every: int, attributed: list[int]) -> list[int]:
    """The indices of the visited steps to score: every `every`-th one and the last, with the attributed
    ones (only those with `every` = 0)."""
    chosen = set(attributed)
    if every:
        chosen |= set(range(0, num_steps, every)) | {num_steps - 1}
    return sorted(chosen)


@torch.no_grad()
def class_posteriors(classifier: torch.nn.Module, samples: torch.Tensor) -> np.ndarray:
    """(N, classes): the softmax of the classifier's logits (for a mixture's Bayes classifier, whose logits are
    the log posterior: the exact posterior)."""
    device = next(iter(classifier.state_dict().values())).device
    return torch.cat([torch.softmax(classifier(batch.to(device)).double(), dim=1).cpu()
                      for batch in samples.float().split(512)]).numpy()


def target_journeys(scores: np.ndarray, timesteps: list[int], posteriors: np.ndarray, helpful: list[list[list[int]]],
                    indices: np.ndarray) -> list[TargetJourney]:
    """Per target: `scores` (rows x steps x targets, rows being the training-set examples `indices`),
    `posteriors` (steps x targets x classes), `helpful` (per attributed step, per target: training-set indices)."""
    row_of = {int(index): row for row, index in enumerate(indices)}
    journeys = []
    for target in range(scores.shape[2]):
        followed = list(dict.fromkeys(i for step in helpful for i in step[target][:JOURNEY_EXAMPLES]))
        per_step = scores[:, :, target].astype(np.float64)
        journeys.append(TargetJourney(timesteps, posteriors[:, target].tolist(), followed,
                                      per_step[[row_of[i] for i in followed]].tolist(), per_step.std(0).tolist()))
    return journeys


def plot_journey_steps(journey: TargetJourney, target: int, class_names: list[str], train: torch.Tensor,
                       train_labels: torch.Tensor, x0: torch.Tensor, attributed: list[int], path: Path) -> Path:
    """Top: the posterior over classes of x0_hat(t), stacked, over every step; middle: the followed examples'
    scores over t, each in its class's colour (dotted verticals: the attributed steps); bottom: x0_hat(t) at a
    few steps and the followed examples (images), or for vectors the training set, x0_hat's path and the
    followed examples. `x0` (steps, *shape): the target's x0_hat(t) in data space."""
    figure = new_figure((10.0, 8.0))
    upper, lower = figure.subfigures(2, 1, height_ratios=[2.4, 1.0])
    posterior_axes, score_axes = upper.subplots(2, 1, sharex=True)
    palette = colormaps["tab10" if len(class_names) <= 10 else "tab20"]
    classes = [int(train_labels[example]) for example in journey.examples]
    colours = [palette(label % palette.N) for label in classes]   # an example's line in its class's colour
    steps = np.array(journey.timesteps)
    posterior_axes.stackplot(steps, np.array(journey.posteriors).T, labels=[f"class {name}" for name in class_names],
                             colors=[palette(c % palette.N) for c in range(len(class_names))])
    posterior_axes.set(ylabel="p(class | x0_hat(t))", ylim=(0, 1), xlim=(steps.max(), steps.min()),
                       title=f"target {target}: when its class appears, and which examples drive it then")
    posterior_axes.legend(fontsize="xx-small", ncols=min(len(class_names), 5), loc="upper left")
    spread = np.where(np.array(journey.spread) > 0, journey.spread, 1.0)
    for number, (example, scores, colour) in enumerate(zip(journey.examples, journey.scores, colours)):
        style = LINE_STYLES[classes[:number].count(classes[number]) % len(LINE_STYLES)]   # apart within a class
        score_axes.plot(steps, np.array(scores) / spread, color=colour, linestyle=style,
                        label=f"#{example} ({class_names[classes[number]]})")
    for axes in (posterior_axes, score_axes):
        for t in attributed:
            axes.axvline(t, color="0.4", linestyle=":", linewidth=0.8)
    score_axes.axhline(0, color="0.6", linewidth=0.6)
    score_axes.set(xlabel="t (sampling runs left to right)", ylabel="TRAK score / its step's spread")
    score_axes.legend(fontsize="xx-small", ncols=4)
    if train.ndim == 4:
        picture_strip(lower, journey, train, train_labels, x0, colours)
    else:
        picture_points(lower.subplots(), journey, train, x0, colours)
    return save_figure(figure, path)


def picture_strip(figure, journey: TargetJourney, train: torch.Tensor, train_labels: torch.Tensor,
                  x0: torch.Tensor, colours: list) -> None:
    """Two rows of images: x0_hat(t) at STRIP_IMAGES steps, and the followed examples in their colours. Each row is
    one picture in one axes, a caption over each image: an axes per image made the whole figure twice as slow."""
    columns = max(STRIP_IMAGES, len(journey.examples))
    shown = np.unique(np.linspace(0, len(journey.timesteps) - 1, STRIP_IMAGES).round().astype(int))
    rows = [([x0[step] for step in shown], [f"t={journey.timesteps[step]}" for step in shown], ["black"] * len(shown)),
            ([train[example] for example in journey.examples],
             [f"#{example}: {int(train_labels[example])}" for example in journey.examples], colours)]
    for axes, (images, captions, caption_colours) in zip(figure.subplots(2, 1), rows):
        axes.set_axis_off()
        if not images:
            continue
        pictures = (torch.stack(images).clamp(-1, 1).numpy() + 1) / 2
        picture = tile_images(pictures, columns).squeeze(-1)   # `columns` places, even where fewer images
        axes.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1)
        width = images[0].shape[-1]
        for column, (caption, colour) in enumerate(zip(captions, caption_colours)):
            centre = GRID_PADDING_PX + column * (width + GRID_PADDING_PX) + (width - 1) / 2   # pixel i spans i +- 0.5
            axes.text(centre, -0.8, caption, ha="center", va="bottom", fontsize=7, color=colour)


def picture_points(axes, journey: TargetJourney, train: torch.Tensor, x0: torch.Tensor, colours: list) -> None:
    """The training set (grey), x0_hat(t)'s path (black, a star at the end) and the followed examples."""
    points = train.numpy()
    axes.scatter(points[:, 0], points[:, 1], s=3, color="0.85")
    path = x0.numpy()
    axes.plot(path[:, 0], path[:, 1], color="black", linewidth=0.8)
    axes.scatter(*path[-1], marker="*", s=120, color="black", label="x0_hat at the last step", zorder=3)
    for example, colour in zip(journey.examples, colours):
        axes.scatter(*points[example], s=30, color=colour, edgecolor="black", zorder=3)
    data_limits(axes, points)
    axes.set_title("training set, x0_hat(t)'s path and the followed examples")
    axes.legend(fontsize="xx-small")
