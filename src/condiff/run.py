"""A trained run as an object: what `condiff.train(config)` returns and `condiff.Run(path)` opens, with
typed results. The command line does exactly this:

    run = condiff.train(config)            # or condiff.Run("runs/NAME")
    result = run.evaluate()                # RunEvaluation: class shares, TV, FD, precision, recall of the
                                           # config's drawing (RUN/samples.npz, drawn when missing)
    samples = run.sample(num_samples=500, class_label=4, guidance=1.0)   # Samples: the array, file, provenance
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMPipeline

from condiff.audit.attribute import attribute_run
from condiff.audit.results import AttributionResult, AttributionSettings
from condiff.config import ExperimentConfig
from condiff.rundir import RunDirectory
from condiff.lifecycle.build import load_pipeline, load_run_config
from condiff.lifecycle.evaluation import RunEvaluation, evaluate_run
from condiff.lifecycle.sampling import sample_run, train_noise_classifier_run
from condiff.lifecycle.training import train_run
from condiff.sampling.generate import load_samples


@dataclass(frozen=True)
class TrainingSummary:
    """What training ended with (RUN/summary.json)."""

    steps: int
    multipliers: dict[str, float]          # final multipliers, by constraint name
    data_class_shares: list[float]         # class shares of the training data
    predicted_class_shares: list[float]    # the shares Theorem 1 predicts from the multipliers
    constraint_mode: str = ""              # what the multipliers did, e.g. "held multipliers (Theorem 1)"
    control: dict | None = None            # measured share control: the last control step's shares
    train_seconds: float | None = None     # wall-clock training time (None: a run from before it was kept)


@dataclass(frozen=True)
class Samples:
    """Samples of a run and where they are saved (RUN/samples*.npz, with a PNG grid beside it)."""

    path: Path
    samples: np.ndarray                    # (N, *shape), images in [-1, 1] or vectors
    provenance: dict                       # method, steps, seed, guidance, model step and digest


class Run:
    """A run directory made by condiff: its config, its training summary, sampling and evaluation."""

    def __init__(self, path: str | Path):
        self.directory = RunDirectory(path).require_run()

    @property
    def path(self) -> Path:
        return self.directory.path

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def config(self) -> ExperimentConfig:
        return load_run_config(self.path)

    @property
    def summary(self) -> TrainingSummary:
        summary = self.directory.read_json(self.directory.summary_file)
        return TrainingSummary(summary["steps"], {c["name"]: c["multiplier"] for c in summary["constraints"]},
                               summary["data_class_shares"], summary["predicted_class_shares"],
                               summary.get("constraint_mode", ""), summary.get("control"),
                               summary.get("train_seconds"))

    def pipeline(self) -> DDPMPipeline:
        """The trained model as a diffusers pipeline (`DDPMPipeline.from_pretrained(RUN/model)`)."""
        return load_pipeline(self.path)

    def sample(self, num_samples: int | None = None, *, method: str | None = None, steps: int | None = None,
               seed: int | None = None, batch_size: int | None = None, class_label: int | None = None,
               guidance: float = 0.0, guidance_kind: str | None = None, record_x0: bool = False,
               device: str | torch.device | None = None, progress: bool = True) -> Samples:
        """Draw samples (the config's `[sample]` settings fill what is None); see `sample_run`."""
        path = sample_run(self.path, num_samples=num_samples, method=method, steps=steps, seed=seed,
                          batch_size=batch_size, class_label=class_label, guidance=guidance,
                          guidance_kind=guidance_kind, record_x0=record_x0, device=device, progress=progress)
        return Samples(path, *load_samples(path))

    def evaluate(self, num_samples: int | None = None, *, resample: bool = False,
                 device: str | torch.device | None = None, progress: bool = True) -> RunEvaluation:
        """Evaluate the run's samples: RUN/samples.npz when it is the config's drawing of `num_samples`, drawn
        when there is none; samples of another drawing are replaced only with `resample` (a `Samples` obtained
        earlier then points at the new ones), refused otherwise. See `evaluate_run`."""
        return evaluate_run(self.path, num_samples=num_samples, device=device, progress=progress, resample=resample)

    def train_noise_classifier(self, steps: int = 2000, *, overwrite: bool = False,
                               device: str | torch.device | None = None, progress: bool = True) -> dict:
        """Train the noise-aware classifier that classifier guidance follows (RUN/noise_classifier); its held-out
        accuracy by timestep. See `train_noise_classifier_run`."""
        return train_noise_classifier_run(self.path, steps=steps, overwrite=overwrite, device=device,
                                          progress=progress)

    def attribute(self, settings: AttributionSettings | None = None, *, resume: bool = False, overwrite: bool = False,
                  device: str | torch.device | None = None, progress: bool = True) -> AttributionResult:
        """Which training examples guided each chosen step of new samples (RUN/attribution); see `attribute_run`."""
        return attribute_run(self.path, settings, resume=resume, overwrite=overwrite, device=device, progress=progress)


def train(config: ExperimentConfig, *, resume: bool = False, overwrite: bool = False, on_step=None,
          accelerator=None) -> Run:
    """Train the run a config describes (validated first); see `train_run`."""
    return Run(train_run(config, resume=resume, overwrite=overwrite, on_step=on_step, accelerator=accelerator))
