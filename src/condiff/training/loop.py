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
from diffusers import DDPMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

from condiff.config import DualConfig, TrainConfig
from condiff.rundir import RunDirectoryError, read_metrics, write_text_atomic
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


def train(model: torch.nn.Module, noise_scheduler: DDPMScheduler, objective: DatasetTerm,
          constraints: list[Constraint], config: TrainConfig, dual_config: DualConfig, run_dir: Path,
          *, resume: bool = False, on_step=None, accelerator: Accelerator | None = None,
          control: MeasuredShareControl | None = None) -> TrainResult:
    """Train `model` on `objective` subject to `constraints`, logging to run_dir/metrics.jsonl and
    checkpointing to run_dir/checkpoints. `on_step(record)` is called after every completed step
    on every process with that step's metrics record (its multipliers are this process's own).
    `control` steers the multipliers of the first constraints by the shares the model generates."""
    accelerator = accelerator or make_accelerator(config)
    device = accelerator.device
    generator = torch.Generator().manual_seed(config.seed * 7919 + accelerator.process_index)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The schedule stays outside accelerate.prepare, which would step it once per process per step.
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMAModel(model.parameters(), decay=config.ema_decay) if config.ema_decay > 0 else None
    dual = DualState([c.name for c in constraints], [c.threshold for c in constraints],
                     [c.relaxation_cost for c in constraints], [c.fixed_multiplier for c in constraints])
    estimator = ESTIMATORS[dual_config.estimator](objective, constraints, config.batch_size, dual_config.batch_size,
                                                  dual_config.floor)
    terms = [objective] + [c.term for c in constraints]
    start, earlier_seconds, started = 0, 0.0, time.perf_counter()

    def hold_controlled() -> None:
        if control is not None:
            dual.hold(dict(zip(dual.names, control.controller.multipliers)))
    hold_controlled()

    checkpoints_dir, metrics_path = run_dir / "checkpoints", run_dir / "metrics.jsonl"
    if resume:
        weights, state = load_checkpoint(checkpoints_dir)
        if len(state["ranks"]) != accelerator.num_processes:
            raise RunDirectoryError(f"{checkpoints_dir}: written by {len(state['ranks'])} process(es), resumed "
                                    f"with {accelerator.num_processes}; resume with the same number of processes")
        try:
            accelerator.unwrap_model(model).load_state_dict(weights)
        except RuntimeError:
            raise RunDirectoryError(f"{checkpoints_dir}: its model does not match the config's model "
                                    "(a checkpoint from another model)") from None
        optimizer.load_state_dict(optimizer_state_from_json(state["optimizer"]))
        lr_schedule.load_state_dict(state["lr_schedule"])
        restore_learning_rate(optimizer, lr_schedule, config.lr)
        if ema is not None:
            ema.load_state_dict(state["ema"])
        dual.load_state_dict(state["dual"])
        if control is not None and state.get("control"):   # (a checkpoint of a held run has none)
            control.controller.load_state_dict(state["control"])
            hold_controlled()
        rank_state = state["ranks"][str(accelerator.process_index)]
        generator.set_state(rank_state["generator"])
        for term, term_state in zip(terms, rank_state["terms"]):
            term.load_state_dict(term_state)
        start, earlier_seconds = state["step"], state.get("train_seconds", 0.0)
        if accelerator.is_main_process:  # drop lines logged after the checkpoint (and a torn last one): redone
            records = read_metrics(metrics_path) if metrics_path.exists() else []
            write_text_atomic(metrics_path, "".join(json.dumps(r, allow_nan=False) + "\n"
                                                    for r in records if r["step"] <= start))

    def checkpoint(step: int) -> None:
        largest_weight = torch.stack([p.detach().float().abs().max() for p in model.parameters()]).max()
        check_finite(step, {"a model weight": largest_weight}, checkpoints_dir)   # never rotate a good one away
        ranks = gather_object([(accelerator.process_index, {
            "generator": generator.get_state(), "terms": [t.state_dict() for t in terms]})])
        if accelerator.is_main_process:
            state = {"step": step, "optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(),
                     "dual": dual.state_dict(), "ranks": {str(r): s for r, s in ranks},
                     "ema": ema.state_dict() if ema is not None else None,
                     "control": control.controller.state_dict() if control is not None else None,
                     "train_seconds": earlier_seconds + time.perf_counter() - started}
            save_checkpoint(checkpoints_dir, step, accelerator.unwrap_model(model), state, config.keep_checkpoints)
        accelerator.wait_for_everyone()

    progress = progress_bar(range(start, config.steps), initial=start, total=config.steps, desc="train",
                            enabled=accelerator.is_main_process)
    log = MetricsLog(metrics_path, config.log_every, constraints, accelerator, progress, checkpoints_dir,
                     check_grad_norm=accelerator.mixed_precision != "fp16")
    model.train()
    try:
        for step in progress:
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (set by the schedule or its restore)
            estimate = estimator.lagrangian(model, dual, generator, device)
            step_losses = torch.zeros(0, device=device)
            if constraints:   # sums and sample counts over all processes: the multipliers stay identical
                sums, counts = accelerator.reduce(torch.stack([estimate.constraint_sums,
                                                               estimate.constraint_counts.to(device)]), "sum")
                dual.accumulate(sums, counts)
                step_losses = sums / counts
            accelerator.backward(estimate.lagrangian)
            # max_norm = inf measures without clipping; the norm and the averaged Lagrangian are the same
            # on every process, so every process stops at the same step.
            grad_norm = accelerator.clip_grad_norm_(model.parameters(),
                                                    config.grad_clip if config.grad_clip > 0 else math.inf)
            losses = accelerator.reduce(torch.stack([estimate.objective_loss.float(),
                                                     estimate.lagrangian.detach().float()]), "mean")
            optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(model.parameters())

            dual_lr = dual_config.lr * lr if dual_config.lr_relative else dual_config.lr
            dual_step = bool(constraints) and (step + 1) % dual_config.primal_steps_per_dual == 0
            if dual_step:
                estimates = dual.mean_losses()
                check_finite(step + 1, {f"the constraint loss of {n}": v for n, v in zip(dual.names, estimates)},
                             checkpoints_dir)
                dual.step(estimates, dual_lr)
                check_finite(step + 1, {f"the multiplier of {n}": v for n, v in zip(dual.names, dual.multipliers)},
                             checkpoints_dir)
            if control is not None and control.due(step + 1):
                with ema_weights(ema, model):
                    control(accelerator.unwrap_model(model), accelerator, step + 1)
                model.train()
                hold_controlled()
            metrics = StepMetrics(step + 1, lr, dual_lr, torch.cat([losses, grad_norm.reshape(1).float(),
                                                                    step_losses.float()]),
                                  dual.named(dual.multipliers), dual_step)
            log.add(metrics)
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                log.flush()   # checks every step since the last checkpoint before anything is saved
                checkpoint(step + 1)
            if on_step is not None:
                on_step(metrics.record(metrics.losses.tolist(), constraints))
    finally:
        log.close()

    trained = accelerator.unwrap_model(model)
    if ema is not None:
        ema.copy_to(trained.parameters())
    return TrainResult(trained, dual.named(dual.multipliers), config.steps,
                       earlier_seconds + time.perf_counter() - started)
