"""The primal-dual training loop (Khalafi, Ding, Ribeiro 2024, Algorithms 2 and 3).

Minimise L(theta, lambda) = l_0(theta) + sum_i lambda_i l_i(theta) over theta with AdamW for N steps,
then take one ascent step on lambda from the constraint losses measured meanwhile; repeat. With no
constraints this is plain diffusion training. Runs unchanged under `accelerate launch`: every process
draws its own batches, gradients are averaged by DDP, and constraint losses are averaged across
processes before each dual step so that the multipliers stay identical everywhere.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

from condiff.config import DualConfig, TrainConfig
from condiff.rundir import RunDirectory, RunDirectoryError, read_metrics, write_text_atomic
from condiff.runtime import progress_bar
from condiff.training.checkpoint import load_checkpoint, optimizer_state_from_json, save_checkpoint
from condiff.training.control import MeasuredShareControl
from condiff.training.dual import DualState
from condiff.training.estimators import ESTIMATORS
from condiff.training.metrics_log import MetricsLog, StepMetrics, check_finite
from condiff.training.terms import Constraint, DatasetTerm


@dataclass
class TrainResult:
    model: torch.nn.Module          # the trained network (EMA weights when the EMA is on), unwrapped
    multipliers: dict[str, float]   # by constraint name
    step: int
    seconds: float                  # wall-clock training time, summed over resumed sessions


class StopTraining(Exception):
    """Raised by a step callback to stop a run early (tests use it to simulate a crash)."""


def restore_learning_rate(optimizer, lr_schedule, lr: float) -> None:
    """Make a resumed schedule follow the config's `lr` (the checkpoint's when unchanged: then nothing
    moves), so that a diverged run can continue from its last checkpoint with a smaller rate."""
    lr_schedule.base_lrs = [lr] * len(optimizer.param_groups)
    for group, value in zip(optimizer.param_groups, [lr * f(lr_schedule.last_epoch) for f in lr_schedule.lr_lambdas]):
        group["initial_lr"], group["lr"] = lr, value


@contextlib.contextmanager
def ema_weights(ema: EMAModel | None, model: torch.nn.Module):
    """The model holds its EMA weights inside (the weights a run saves), its training weights after."""
    if ema is None:
        yield
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield
    finally:
        ema.restore(model.parameters())


def make_accelerator(config: TrainConfig, project_dir: Path | None = None) -> Accelerator:
    """The accelerator of a training run: its mixed precision, `torch.compile` (inductor) and tracker."""
    accelerator = Accelerator(mixed_precision=config.mixed_precision,
                              dynamo_backend="inductor" if config.compile else None, log_with=config.log_with,
                              project_dir=None if project_dir is None else str(project_dir))
    if config.mixed_precision != "no" and not accelerator.native_amp:   # accelerate says nothing (fp16 on a CPU)
        warnings.warn(f"train.mixed_precision = {config.mixed_precision!r}: accelerate does not autocast it on "
                      f"{accelerator.device.type}, so this run trains in float32", stacklevel=2)
    return accelerator


class TrainingState:
    """Everything a step changes and a checkpoint holds: the prepared model, optimizer and schedule, the EMA,
    the dual state, the per-process generator and terms, and the share controller (when there is one)."""

    def __init__(self, model: torch.nn.Module, objective: DatasetTerm, constraints: list[Constraint],
                 config: TrainConfig, dual_config: DualConfig, accelerator: Accelerator,
                 control: MeasuredShareControl | None):
        self.config, self.dual_config, self.accelerator, self.control = config, dual_config, accelerator, control
        self.generator = torch.Generator().manual_seed(config.seed * 7919 + accelerator.process_index)
        # foreach: CUDA's default; on a CPU the same numbers as the per-tensor loop, 10-15% faster for a small MLP
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True)
        self.lr_schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        # The schedule stays outside accelerate.prepare, which would step it once per process per step.
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.ema = EMAModel(self.model.parameters(), decay=config.ema_decay) if config.ema_decay > 0 else None
        self.dual = DualState([c.name for c in constraints], [c.threshold for c in constraints],
                              [c.relaxation_cost for c in constraints], [c.fixed_multiplier for c in constraints])
        self.estimator = ESTIMATORS[dual_config.estimator](objective, constraints, config.batch_size,
                                                           dual_config.batch_size, dual_config.floor)
        self.terms = [objective] + [c.term for c in constraints]
        self.hold_controlled()

    def hold_controlled(self) -> None:
        """Hold the controlled constraints' multipliers at the controller's."""
        if self.control is not None:
            self.dual.hold(dict(zip(self.dual.names, self.control.controller.multipliers)))

    def restore(self, checkpoints_dir: Path, metrics_path: Path) -> tuple[int, float]:
        """Load the newest checkpoint; (its step, the training seconds before it)."""
        accelerator = self.accelerator
        weights, state = load_checkpoint(checkpoints_dir)
        if len(state["ranks"]) != accelerator.num_processes:
            raise RunDirectoryError(f"{checkpoints_dir}: written by {len(state['ranks'])} process(es), resumed "
                                    f"with {accelerator.num_processes}; resume with the same number of processes")
        try:
            accelerator.unwrap_model(self.model).load_state_dict(weights)
        except RuntimeError:
            raise RunDirectoryError(f"{checkpoints_dir}: its model does not match the config's model "
                                    "(a checkpoint from another model)") from None
        self.optimizer.load_state_dict(optimizer_state_from_json(state["optimizer"]))
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        restore_learning_rate(self.optimizer, self.lr_schedule, self.config.lr)
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.dual.load_state_dict(state["dual"])
        if self.control is not None and state.get("control"):   # (a checkpoint of a held run has none)
            self.control.controller.load_state_dict(state["control"])
            self.hold_controlled()
        rank_state = state["ranks"][str(accelerator.process_index)]
        self.generator.set_state(rank_state["generator"])
        for term, term_state in zip(self.terms, rank_state["terms"]):
            term.load_state_dict(term_state)
        if accelerator.is_main_process:  # drop lines logged after the checkpoint (and a torn last one): redone
            records = read_metrics(metrics_path) if metrics_path.exists() else []
            write_text_atomic(metrics_path, "".join(json.dumps(r, allow_nan=False) + "\n"
                                                    for r in records if r["step"] <= state["step"]))
        return state["step"], state.get("train_seconds", 0.0)

    def checkpoint(self, step: int, checkpoints_dir: Path, train_seconds: float) -> None:
        largest_weight = torch.stack([p.detach().float().abs().max() for p in self.model.parameters()]).max()
        check_finite(step, {"a model weight": largest_weight}, checkpoints_dir)   # never rotate a good one away
        accelerator = self.accelerator
        ranks = gather_object([(accelerator.process_index, {
            "generator": self.generator.get_state(), "terms": [t.state_dict() for t in self.terms]})])
        if accelerator.is_main_process:
            state = {"step": step, "optimizer": self.optimizer.state_dict(),
                     "lr_schedule": self.lr_schedule.state_dict(), "dual": self.dual.state_dict(),
                     "ranks": {str(r): s for r, s in ranks},
                     "ema": self.ema.state_dict() if self.ema is not None else None,
                     "control": self.control.controller.state_dict() if self.control is not None else None,
                     "train_seconds": train_seconds}
            save_checkpoint(checkpoints_dir, step, accelerator.unwrap_model(self.model), state,
                            self.config.keep_checkpoints)
        accelerator.wait_for_everyone()

    def primal_step(self) -> torch.Tensor:
        """One AdamW step on the Lagrangian; [objective, Lagrangian, gradient norm, constraint losses...]."""
        accelerator, device = self.accelerator, self.accelerator.device
        estimate = self.estimator.lagrangian(self.model, self.dual, self.generator, device)
        step_losses = torch.zeros(0, device=device)
        if self.dual.names:   # sums and sample counts over all processes: the multipliers stay identical
            sums, counts = accelerator.reduce(torch.stack([estimate.constraint_sums,
                                                           estimate.constraint_counts.to(device)]), "sum")
            self.dual.accumulate(sums, counts)
            step_losses = sums / counts
        accelerator.backward(estimate.lagrangian)
        # max_norm = inf measures without clipping; the norm and the averaged Lagrangian are the same
        # on every process, so every process stops at the same step.
        grad_clip = self.config.grad_clip
        grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), grad_clip if grad_clip > 0 else math.inf)
        losses = accelerator.reduce(torch.stack([estimate.objective_loss.float(),
                                                 estimate.lagrangian.detach().float()]), "mean")
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.model.parameters())
        return torch.cat([losses, grad_norm.reshape(1).float(), step_losses.float()])

    def dual_step(self, step: int, dual_lr: float, checkpoints_dir: Path) -> None:
        """One ascent step on the multipliers from the constraint losses averaged since the last one."""
        estimates = self.dual.mean_losses()
        check_finite(step, {f"the constraint loss of {n}": v for n, v in zip(self.dual.names, estimates)},
                     checkpoints_dir)
        self.dual.step(estimates, dual_lr)
        check_finite(step, {f"the multiplier of {n}": v for n, v in zip(self.dual.names, self.dual.multipliers)},
                     checkpoints_dir)

    def control_step(self, step: int) -> None:
        """Measure the shares the model (its EMA weights) generates and move the controlled multipliers."""
        with ema_weights(self.ema, self.model):
            self.control(self.accelerator.unwrap_model(self.model), self.accelerator, step)
        self.model.train()
        self.hold_controlled()

    def trained_model(self) -> torch.nn.Module:
        trained = self.accelerator.unwrap_model(self.model)
        if self.ema is not None:
            self.ema.copy_to(trained.parameters())
        return trained


def train(model: torch.nn.Module, objective: DatasetTerm, constraints: list[Constraint], config: TrainConfig,
          dual_config: DualConfig, run_dir: Path, *, resume: bool = False, on_step=None,
          accelerator: Accelerator | None = None, control: MeasuredShareControl | None = None) -> TrainResult:
    """Train `model` on `objective` subject to `constraints`, logging to run_dir/metrics.jsonl and
    checkpointing to run_dir/checkpoints. `on_step(record)` is called after every completed step
    on every process with that step's metrics record (its multipliers are this process's own).
    `control` steers the multipliers of the first constraints by the shares the model generates."""
    accelerator = accelerator or make_accelerator(config)
    state = TrainingState(model, objective, constraints, config, dual_config, accelerator, control)
    run = RunDirectory(run_dir)
    checkpoints_dir, metrics_path = run.checkpoints, run.metrics_file
    start, earlier_seconds = state.restore(checkpoints_dir, metrics_path) if resume else (0, 0.0)
    started = time.perf_counter()

    progress = progress_bar(range(start, config.steps), initial=start, total=config.steps, desc="train",
                            enabled=accelerator.is_main_process)
    log = MetricsLog(metrics_path, config.log_every, constraints, accelerator, progress, checkpoints_dir,
                     check_grad_norm=accelerator.mixed_precision != "fp16")
    state.model.train()
    try:
        for step in progress:
            lr = state.optimizer.param_groups[0]["lr"]  # the rate this step uses (set by the schedule or its restore)
            losses = state.primal_step()
            dual_lr = dual_config.lr * lr if dual_config.lr_relative else dual_config.lr
            dual_step = bool(constraints) and (step + 1) % dual_config.primal_steps_per_dual == 0
            if dual_step:
                state.dual_step(step + 1, dual_lr, checkpoints_dir)
            if control is not None and control.due(step + 1):
                state.control_step(step + 1)
            metrics = StepMetrics(step + 1, lr, dual_lr, losses, state.dual.named(state.dual.multipliers), dual_step)
            log.add(metrics)
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                log.flush()   # checks every step since the last checkpoint before anything is saved
                state.checkpoint(step + 1, checkpoints_dir, earlier_seconds + time.perf_counter() - started)
            if on_step is not None:
                on_step(metrics.record(metrics.losses.tolist(), constraints))
    finally:
        log.close()
    return TrainResult(state.trained_model(), state.dual.named(state.dual.multipliers), config.steps,
                       earlier_seconds + time.perf_counter() - started)
