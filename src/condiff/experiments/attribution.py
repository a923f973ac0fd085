"""`condiff attribute RUN`: which training examples guided each chosen step of a run's generations.

Targets are generated with their x0 predictions at every step; at each chosen step t, a target's features
are the gradients of the output function at its x0 prediction re-noised to t (R times), and every training
example is scored by TRAK (condiff.attribution). Everything lands in RUN/attribution/:
- `features-OUTPUT-K*-k*.npy`: the training features, memory-mapped and filled batch by batch; a killed
  run resumes where it stopped (`resume=True`), `done-*.npy` marking the finished batches;
- `scores.npy`: (training examples x targets x steps), memory-mapped;
- `attribution.json`: the settings and, per step and target, the top-K helpful and harmful examples;
- `journey-TARGET.png`: per step, x_t, x0_hat(t), the top-K helpful and the top-K harmful training
  examples; and `report.md`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from condiff.attribution.features import OUTPUT_FUNCTIONS, GradientFeaturizer
from condiff.attribution.projector import PROJECTORS
from condiff.attribution.trak import trak_scores
from condiff.config import ConfigError
from condiff.experiments.build import build_data, load_pipeline, load_run_config
from condiff.report import image_md, markdown_table, new_figure, save_figure, write_report
from condiff.rundir import RunDirectory, create_output_directory, write_json_atomic
from condiff.runtime import progress_bar, resolve_device
from condiff.sampling.generate import generate, sampling_scheduler


@dataclass
class AttributionSettings:
    output: str = "dtrak"                       # dtrak (D-TRAK's ||eps||^2 / d) | loss (Journey-TRAK's)
    steps: tuple[int, ...] = (900, 700, 500, 300, 100)   # sampling timesteps to attribute (nearest taken)
    num_targets: int = 4                        # samples generated to be explained
    seed: int = 0                               # of the targets and of every noise
    top: int = 6                                # helpful and harmful examples shown per step
    train_timesteps: int = 10                   # K: training-side timesteps, evenly spread
    resamplings: int = 20                       # R: re-noisings of x0_hat(t) per target
    projection: str = "sparse"                  # sparse | gaussian
    dimension: int = 2048                       # k
    ridge: float = 0.1                          # c of lambda = c trace(Phi^T Phi) / k
    sampling_steps: int = 50                    # DDIM steps of the targets
    batch_size: int = 32

    def validate(self) -> "AttributionSettings":
        checks = {"output": self.output in OUTPUT_FUNCTIONS, "projection": self.projection in PROJECTORS,
                  "steps": bool(self.steps) and all(0 <= t < 1000 for t in self.steps)}
        checks.update({name: getattr(self, name) > 0 for name in (
            "num_targets", "top", "train_timesteps", "resamplings", "dimension", "ridge", "sampling_steps",
            "batch_size")})
        flags = {"num_targets": "samples"}   # the command line's name where it differs
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"--{flags.get(name, name).replace('_', '-')}: {getattr(self, name)!r} is not allowed")
        return self


@dataclass
class StepAttribution:
    timestep: int
    helpful: list[list[int]] = field(default_factory=list)        # per target: top-K training indices
    helpful_scores: list[list[float]] = field(default_factory=list)
    harmful: list[list[int]] = field(default_factory=list)        # per target: bottom-K
    harmful_scores: list[list[float]] = field(default_factory=list)


@dataclass
class AttributionResult:
    settings: AttributionSettings
    steps: list[StepAttribution]
    target_classes: list[int] | None            # for Gaussian mixtures: each target's exact component
    directory: Path

    def to_dict(self) -> dict:
        return {"settings": asdict(self.settings), "steps": [asdict(s) for s in self.steps],
                "target_classes": self.target_classes}


def train_features(featurizer: GradientFeaturizer, data: torch.Tensor, settings: AttributionSettings,
                   folder: Path, *, resume: bool, progress: bool) -> np.ndarray:
    """The training set's projected features, memory-mapped in `folder`, computed in batches; with
    `resume`, batches a killed run finished are kept."""
    name = f"{settings.output}-K{settings.train_timesteps}-k{settings.dimension}-{settings.projection}"
    path, done_path = folder / f"features-{name}.npy", folder / f"done-{name}.npy"
    batches = range(0, len(data), settings.batch_size)
    if resume and path.is_file() and done_path.is_file():
        features = np.lib.format.open_memmap(path, mode="r+")
        done = np.lib.format.open_memmap(done_path, mode="r+")
    else:
        features = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(data), settings.dimension))
        done = np.lib.format.open_memmap(done_path, mode="w+", dtype=bool, shape=(len(batches),))
    timesteps = list(range(0, 1000, 1000 // settings.train_timesteps))[:settings.train_timesteps]
    bar = progress_bar(total=len(data), desc="features", enabled=progress, unit="img")
    for index, start in enumerate(batches):
        stop = min(start + settings.batch_size, len(data))
        if not done[index]:
            features[start:stop] = featurizer.train_features(data[start:stop], timesteps, seed=settings.seed,
                                                             first_index=start).numpy()
            features.flush()
            done[index] = True
            done.flush()
        bar.update(stop - start)
    bar.close()
    return np.asarray(features)


def attribute_run(run_dir: Path, settings: AttributionSettings | None = None, *, resume: bool = False,
                  overwrite: bool = False, device: str | torch.device | None = None,
                  progress: bool = True) -> AttributionResult:
    """Generate `settings.num_targets` samples of the run and attribute each chosen step of each to the
    training set; writes RUN/attribution/ (see the module docstring)."""
    settings = (settings or AttributionSettings()).validate()
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    if config.latent.autoencoder is not None:
        raise ConfigError(f"{run_dir}: attribution of latent-diffusion runs is not supported yet")
    pipeline = load_pipeline(run_dir)
    folder = RunDirectory(run_dir).path / "attribution"
    if not (resume and folder.is_dir()):
        create_output_directory(folder, "attribution", overwrite=overwrite, resumable=True)
    device = resolve_device(device)
    model = pipeline.unet.to(device)
    data = build_data(config)
    projector = PROJECTORS[settings.projection](sum(p.numel() for p in model.parameters()), settings.dimension,
                                                seed=settings.seed, device=device)
    featurizer = GradientFeaturizer(model, pipeline.scheduler.alphas_cumprod, projector, output=settings.output,
                                    batch_size=settings.batch_size)
    phi = torch.from_numpy(train_features(featurizer, data.train.data, settings, folder, resume=resume,
                                          progress=progress))

    noisy_inputs: dict[int, torch.Tensor] = {}
    targets = generate(model, sampling_scheduler(pipeline.scheduler, "ddim"), settings.num_targets,
                       num_inference_steps=settings.sampling_steps, seed=settings.seed, record_x0=True,
                       device=device, progress=False,
                       on_step=lambda first, t, x: noisy_inputs.setdefault(t, x.detach().cpu()))
    indices = [int((targets.timesteps - t).abs().argmin()) for t in settings.steps]
    scores = np.lib.format.open_memmap(folder / "scores.npy", mode="w+", dtype=np.float32,
                                       shape=(len(phi), settings.num_targets, len(indices)))
    steps = []
    for column, index in enumerate(progress_bar(indices, desc="attribute", enabled=progress)):
        timestep = int(targets.timesteps[index])
        target = featurizer.target_features(targets.x0_predictions[index], timestep, resamplings=settings.resamplings,
                                            seed=settings.seed)
        step_scores = trak_scores(phi, target, settings.ridge).float()
        scores[:, :, column] = step_scores.numpy()
        helpful, harmful = step_scores.topk(settings.top, dim=0), (-step_scores).topk(settings.top, dim=0)
        steps.append(StepAttribution(timestep, helpful.indices.T.tolist(), helpful.values.T.tolist(),
                                     harmful.indices.T.tolist(), (-harmful.values).T.tolist()))
    scores.flush()
    classes = data.mixture.classify(targets.samples).tolist() if data.mixture is not None else None
    result = AttributionResult(settings, steps, classes, folder)
    write_json_atomic(folder / "attribution.json", result.to_dict())
    for target in range(settings.num_targets):
        plot_journey(result, target, data.train.data, targets, indices, noisy_inputs, folder / f"journey-{target}.png")
    write_attribution_report(result, run_dir.name)
    return result


def plot_journey(result: AttributionResult, target: int, train: torch.Tensor, targets, indices: list[int],
                 noisy_inputs: dict[int, torch.Tensor], path: Path) -> Path:
    """One row per step: x_t, x0_hat(t), the top-K helpful and top-K harmful training examples (images);
    for vector data, one panel per step with the training set, x0_hat(t) and its helpful/harmful points."""
    top = result.settings.top
    if train.ndim == 4:
        columns = 2 + 2 * top
        figure = new_figure((0.9 * columns, 1.0 * len(indices) + 0.4), constrained=False)
        axes = figure.subplots(len(indices), columns, squeeze=False)
        for row, (step, index) in enumerate(zip(result.steps, indices)):
            timestep = int(targets.timesteps[index])
            images = [noisy_inputs[timestep][target], targets.x0_predictions[index][target]]
            images += [train[i] for i in step.helpful[target]] + [train[i] for i in step.harmful[target]]
            titles = ["x_t", "x0_hat"] + ["+"] * top + ["-"] * top
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
    return write_report(result.directory / "report.md", f"condiff attribute: {run_name}", [
        ("Settings", f"Output function `{settings.output}`, K = {settings.train_timesteps} training timesteps, "
                     f"R = {settings.resamplings} re-noisings per target, {settings.projection} projection to "
                     f"k = {settings.dimension}, ridge c = {settings.ridge:g}, targets: {settings.num_targets} "
                     f"DDIM-{settings.sampling_steps} samples (seed {settings.seed}). Scores: `scores.npy` "
                     "(training examples x targets x steps); all indices in `attribution.json`." + purity),
        ("Top examples", markdown_table(["t", "target", f"top {settings.top} helpful", f"top {settings.top} harmful"],
                                        rows)),
        ("Journeys", "\n\n".join(image_md(f"journey-{t}.png", f"journey of target {t}")
                                 for t in range(settings.num_targets))),
    ])
