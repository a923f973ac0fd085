"""The training log: metrics.jsonl, accelerate's trackers and the progress bar, written every few steps.

A step only queues its losses as device tensors; every `every` steps (and before every checkpoint) one
host transfer reads them all, checks them for finiteness in step order and writes their records. A
plain training loop that logs its loss syncs once per step; this one, once per `every` steps.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from condiff.errors import SwitchError


class TrainingDiverged(SwitchError, RuntimeError):
    """A loss, gradient norm, multiplier or weight became NaN or infinite; nothing of that step was saved."""


def check_finite(step: int, quantities: dict[str, float | torch.Tensor], checkpoints_dir: Path) -> None:
    """Stop on the first of `quantities` (name -> scalar) that is NaN or infinite; one host sync for all."""
    values = torch.stack([torch.as_tensor(v, dtype=torch.float64).cpu() for v in quantities.values()]).tolist()
    bad = [(name, value) for name, value in zip(quantities, values) if not math.isfinite(value)]
    if not bad:
        return
    latest = checkpoints_dir / "latest"
    advice = (f"the last finite checkpoint of {checkpoints_dir.parent}, {latest.read_text().strip()}, is kept: resume "
              "its training ({resume})" if latest.is_file() else
              "no checkpoint was written yet: train again ({overwrite})")
    name, value = bad[0]
    raise TrainingDiverged(f"step {step}: {name} is not finite ({value:.4g}); training stopped and {advice} with a "
                           "smaller train.lr")


@dataclass
class StepMetrics:
    step: int
    lr: float
    dual_lr: float
    losses: torch.Tensor     # on the device, averaged over processes: objective, Lagrangian, gradient norm,
                             # then every constraint's loss this step
    multipliers: dict[str, float]
    dual_step: bool

    def record(self, losses: list[float], constraints: list) -> dict:
        """The metrics.jsonl record, from `losses` read back from the device."""
        step_losses = dict(zip([c.name for c in constraints], losses[3:]))
        slacks = {c.name: c.slack(step_losses[c.name], self.multipliers[c.name])
                  for c in constraints if c.fixed_multiplier is None}
        return {"step": self.step, "lr": self.lr, "dual_lr": self.dual_lr, "objective_loss": losses[0],
                "lagrangian": losses[1], "multipliers": self.multipliers,
                "constraint_losses": step_losses or None, "slacks": slacks or None, "dual_step": self.dual_step}


def tracked_scalars(record: dict) -> dict[str, float]:
    """A metrics record as flat scalars for accelerate's trackers (tensorboard, wandb, ...)."""
    scalars = {key: record[key] for key in ("lr", "dual_lr", "objective_loss", "lagrangian")}
    for key, prefix in (("multipliers", "multiplier"), ("constraint_losses", "constraint_loss"), ("slacks", "slack")):
        scalars.update({f"{prefix}/{name}": value for name, value in (record[key] or {}).items()})
    return scalars


class MetricsLog:
    """Queues every step's metrics and writes them every `every` steps, on the main process; every process
    checks them (the same reduced values), so all stop at the same step when one is not finite.
    `check_grad_norm` is off under fp16, whose gradient scaler skips non-finite steps itself."""

    def __init__(self, path: Path, every: int, constraints: list, accelerator, progress, checkpoints_dir: Path,
                 check_grad_norm: bool):
        self.constraints = constraints
        self.file = open(path, "a") if accelerator.is_main_process else None
        self.every, self.accelerator, self.progress = every, accelerator, progress
        self.checkpoints_dir, self.check_grad_norm = checkpoints_dir, check_grad_norm
        self.pending: list[StepMetrics] = []

    def add(self, metrics: StepMetrics) -> None:
        self.pending.append(metrics)
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        """Check and write the queued steps; raises TrainingDiverged at the first non-finite one, after
        writing those before it."""
        if not self.pending:
            return
        queued, self.pending = self.pending, []
        records = []
        try:
            for metrics, losses in zip(queued, torch.stack([m.losses for m in queued]).tolist()):
                check_finite(metrics.step, {"the Lagrangian": losses[1], **({"the gradient norm": losses[2]}
                                                                          if self.check_grad_norm else {})},
                             self.checkpoints_dir)
                records.append(metrics.record(losses, self.constraints))
        finally:
            self.write(records)

    def write(self, records: list[dict]) -> None:
        for record in records:
            self.accelerator.log(tracked_scalars(record), step=record["step"])   # no trackers: nothing happens
        if self.file is None or not records:
            return
        self.file.write("".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
        self.file.flush()
        last = records[-1]
        self.progress.set_postfix({"loss": f"{last['objective_loss']:.4f}",   # drawn at the bar's own pace
                                   **{f"λ[{n}]": f"{v:.3f}" for n, v in last["multipliers"].items()}}, refresh=False)

    def close(self) -> None:
        """Write what is queued (checked as ever) and close the file."""
        try:
            self.flush()
        finally:
            if self.file is not None:
                self.file.close()
