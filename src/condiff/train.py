"""The primal-dual training loop (Khalafi, Ding, Ribeiro 2024, Algorithms 2 and 3).

Minimise L(theta, lambda) = l_0(theta) + sum_i lambda_i l_i(theta) over theta with AdamW for N steps,
then take one ascent step on lambda from the constraint losses measured meanwhile; repeat. With no
constraints this is plain diffusion training. Runs unchanged under `accelerate launch`: every process
draws its own batches, gradients are averaged by DDP, and constraint losses are averaged across
processes before each dual step so that the multipliers stay identical everywhere.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from diffusers import DDPMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from condiff.checkpoint import load_checkpoint, optimizer_state_from_json, save_checkpoint
from condiff.config import DualConfig, TrainConfig
from condiff.constraints import Constraint, DatasetTerm, DenoisingBatch, per_sample_loss
from condiff.dual import resilient_ascent
from condiff.rundir import RunDirectoryError, read_metrics, write_text_atomic


@dataclass
class TrainResult:
    model: torch.nn.Module          # the trained network (EMA weights when the EMA is on), unwrapped
    multipliers: list[float]
    step: int


class StopTraining(Exception):
    """Raised by a step callback to stop a run early (tests use it to simulate a crash)."""


class TrainingDiverged(RuntimeError):
    """A loss, gradient norm, multiplier or weight became NaN or infinite; nothing of that step was saved."""


def check_finite(step: int, quantity: str, value, checkpoints_dir: Path) -> None:
    values = torch.as_tensor(value, dtype=torch.float64).flatten().tolist()
    if all(math.isfinite(v) for v in values):
        return
    latest = checkpoints_dir / "latest"
    advice = (f"the last finite checkpoint, {latest.read_text().strip()}, is kept: continue with `condiff train "
              f"--resume {checkpoints_dir.parent} --set train.lr=...`" if latest.is_file() else
              "no checkpoint was written yet: start again with `--overwrite --set train.lr=...`")
    raise TrainingDiverged(f"step {step}: {quantity} is not finite ({', '.join(f'{v:.4g}' for v in values)}); "
                           f"training stopped and {advice} (a smaller rate)")


def restore_learning_rate(optimizer, lr_schedule, lr: float) -> None:
    """Make a resumed schedule follow the config's `lr` (the checkpoint's when unchanged: then nothing
    moves), so that a diverged run can continue from its last checkpoint with a smaller rate."""
    lr_schedule.base_lrs = [lr] * len(optimizer.param_groups)
    for group, value in zip(optimizer.param_groups, [lr * f(lr_schedule.last_epoch) for f in lr_schedule.lr_lambdas]):
        group["initial_lr"], group["lr"] = lr, value
    lr_schedule._last_lr = [group["lr"] for group in optimizer.param_groups]   # what get_last_lr() reports


class DualState:
    """The multipliers and the constraint losses accumulated since the last dual step."""

    def __init__(self, constraints: list[Constraint]):
        m = len(constraints)
        self.multipliers = torch.zeros(m, dtype=torch.float64)
        self.loss_sum = torch.zeros(m, dtype=torch.float64)
        self.loss_count = 0
        self.thresholds = torch.tensor([c.threshold for c in constraints], dtype=torch.float64)
        self.relaxation_costs = torch.tensor([c.relaxation_cost for c in constraints], dtype=torch.float64)

    def accumulate(self, losses: torch.Tensor) -> None:
        self.loss_sum += losses.double().cpu()
        self.loss_count += 1

    def step(self, losses: torch.Tensor, step_size: float) -> None:
        # gamma = 0 makes the resilient rule exactly projected ascent, so one call serves both kinds.
        self.multipliers = resilient_ascent(self.multipliers, losses.double().cpu(), self.thresholds,
                                            step_size, self.relaxation_costs)
        self.loss_sum.zero_()
        self.loss_count = 0

    def state_dict(self) -> dict:
        return {"multipliers": self.multipliers.tolist(), "loss_sum": self.loss_sum.tolist(),
                "loss_count": self.loss_count}

    def load_state_dict(self, state: dict) -> None:
        self.multipliers = torch.tensor(state["multipliers"], dtype=torch.float64)
        self.loss_sum = torch.tensor(state["loss_sum"], dtype=torch.float64)
        self.loss_count = state["loss_count"]


def stratified_lagrangian(model, objective: DatasetTerm, constraints: list[Constraint], dual: DualState,
                          batch_size: int, dual_batch_size: int, generator, device):
    """The paper's estimator: one minibatch of the data and one of every constraint set.

    The batches go through the network as one concatenated batch: the same losses as separate
    passes (the networks have no batch statistics), and one forward per backward, as DDP requires.
    """
    batches = [objective.draw(batch_size, generator)] + [c.term.draw(dual_batch_size, generator) for c in constraints]
    losses = per_sample_loss(model, DenoisingBatch.concatenate(batches).to(device))
    objective_loss, *constraint_losses = [part.mean() for part in losses.split([len(b) for b in batches])]
    lagrangian = objective_loss + sum(float(lam) * l for lam, l in zip(dual.multipliers, constraint_losses))
    measured = torch.stack([l.detach() for l in constraint_losses]) if constraints else None
    return lagrangian, objective_loss.detach(), measured


def mixture_lagrangian(model, objective: DatasetTerm, constraints: list[Constraint], dual: DualState,
                       batch_size: int, generator, device):
    """One minibatch from the lambda-weighted mixture of the data and the constraint sets.

    E[(1 + sum lambda) mean_batch loss] = l_0 + sum lambda_i l_i, so the gradient is unbiased for
    the Lagrangian while a step costs one forward/backward of `batch_size`, whatever the number of
    constraints. Constraint losses for the dual step come from a separate forward-only batch.
    """
    weights = torch.cat([torch.ones(1, dtype=torch.float64), dual.multipliers])
    sources = torch.multinomial(weights / weights.sum(), batch_size, replacement=True, generator=generator)
    counts = torch.bincount(sources, minlength=len(weights)).tolist()
    terms = [objective] + [c.term for c in constraints]
    batch = DenoisingBatch.concatenate([t.draw(n, generator) for t, n in zip(terms, counts) if n > 0])
    losses = per_sample_loss(model, batch.to(device))
    lagrangian = weights.sum().item() * losses.mean()
    objective_loss = losses[:counts[0]].detach().mean() if counts[0] else torch.full((), float("nan"), device=device)
    return lagrangian, objective_loss, None


@torch.no_grad()
def measure_constraint_losses(model, constraints: list[Constraint], batch_size: int, generator, device):
    """Forward-only estimate of every constraint's loss, all constraints in one batch."""
    batch = DenoisingBatch.concatenate([c.term.draw(batch_size, generator) for c in constraints])
    losses = per_sample_loss(model, batch.to(device))
    return torch.stack([part.mean() for part in losses.split(batch_size)])


def train(model: torch.nn.Module, noise_scheduler: DDPMScheduler, objective: DatasetTerm,
          constraints: list[Constraint], config: TrainConfig, dual_config: DualConfig, run_dir: Path,
          *, resume: bool = False, on_step=None, accelerator: Accelerator | None = None) -> TrainResult:
    """Train `model` on `objective` subject to `constraints`, logging to run_dir/metrics.jsonl and
    checkpointing to run_dir/checkpoints. `on_step(record)` is called after every completed step
    on every process with that step's metrics record (its multipliers are this process's own)."""
    accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision)
    device = accelerator.device
    generator = torch.Generator().manual_seed(config.seed * 7919 + accelerator.process_index)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    # The schedule stays outside accelerate.prepare, which would step it once per process per step.
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMAModel(model.parameters(), decay=config.ema_decay) if config.ema_decay > 0 else None
    dual = DualState(constraints)
    terms = [objective] + [c.term for c in constraints]
    start = 0

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
        rank_state = state["ranks"][str(accelerator.process_index)]
        generator.set_state(rank_state["generator"])
        for term, term_state in zip(terms, rank_state["terms"]):
            term.load_state_dict(term_state)
        start = state["step"]
        if accelerator.is_main_process:  # drop lines logged after the checkpoint (and a torn last one): redone
            records = read_metrics(metrics_path) if metrics_path.exists() else []
            write_text_atomic(metrics_path, "".join(json.dumps(r, allow_nan=False) + "\n"
                                                    for r in records if r["step"] <= start))

    def checkpoint(step: int) -> None:
        largest_weight = torch.stack([p.detach().float().abs().max() for p in model.parameters()]).max()
        check_finite(step, "a model weight", largest_weight, checkpoints_dir)   # never rotate a good one away
        ranks = gather_object([(accelerator.process_index, {
            "generator": generator.get_state(), "terms": [t.state_dict() for t in terms]})])
        if accelerator.is_main_process:
            state = {"step": step, "optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(),
                     "dual": dual.state_dict(), "ranks": {str(r): s for r, s in ranks},
                     "ema": ema.state_dict() if ema is not None else None}
            save_checkpoint(checkpoints_dir, step, accelerator.unwrap_model(model), state, config.keep_checkpoints)
        accelerator.wait_for_everyone()

    names = [c.name for c in constraints]
    progress = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="train",
                    disable=not accelerator.is_main_process, dynamic_ncols=True)
    metrics_file = open(metrics_path, "a") if accelerator.is_main_process else None
    try:
        for step in progress:
            model.train()
            lr = lr_schedule.get_last_lr()[0]  # the rate this step uses
            if dual_config.estimator == "stratified":
                lagrangian, objective_loss, measured = stratified_lagrangian(
                    model, objective, constraints, dual, config.batch_size, dual_config.batch_size,
                    generator, device)
                if measured is not None:
                    dual.accumulate(accelerator.reduce(measured, "mean"))
            else:
                lagrangian, objective_loss, measured = mixture_lagrangian(
                    model, objective, constraints, dual, config.batch_size, generator, device)
            accelerator.backward(lagrangian)
            # max_norm = inf measures without clipping; the norm and the averaged Lagrangian are the same
            # on every process, so every process stops at the same step.
            grad_norm = accelerator.clip_grad_norm_(model.parameters(),
                                                    config.grad_clip if config.grad_clip > 0 else math.inf)
            logged = accelerator.reduce(torch.stack([objective_loss.float(), lagrangian.detach().float()]), "mean")
            check_finite(step + 1, "the Lagrangian", logged[1], checkpoints_dir)
            if accelerator.mixed_precision != "fp16":   # fp16's grad scaler skips non-finite steps by design
                check_finite(step + 1, "the gradient norm", grad_norm, checkpoints_dir)
            optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(model.parameters())

            dual_lr = dual_config.lr * lr if dual_config.lr_relative else dual_config.lr
            dual_step = bool(constraints) and (step + 1) % dual_config.primal_steps_per_dual == 0
            estimates = None
            if dual_step:
                if dual_config.estimator == "stratified":
                    estimates = dual.loss_sum / dual.loss_count  # reuses the primal phase's losses
                else:
                    estimates = accelerator.reduce(measure_constraint_losses(
                        model, constraints, dual_config.batch_size, generator, device), "mean").double().cpu()
                check_finite(step + 1, f"a constraint loss ({', '.join(names)})", estimates, checkpoints_dir)
                dual.step(estimates, dual_lr)
                check_finite(step + 1, f"a multiplier ({', '.join(names)})", dual.multipliers, checkpoints_dir)

            losses = measured if measured is not None else estimates
            losses = None if losses is None else [float(l) for l in losses]
            objective_value = float(logged[0])  # NaN when a mixture batch drew no data sample
            record = {"step": step + 1, "lr": lr, "dual_lr": dual_lr,
                      "objective_loss": None if objective_value != objective_value else objective_value,
                      "lagrangian": float(logged[1]), "multipliers": dual.multipliers.tolist(),
                      "constraint_losses": losses,
                      "slacks": None if losses is None else [
                          c.slack(l, float(lam)) for c, l, lam in zip(constraints, losses, dual.multipliers)],
                      "dual_step": dual_step}
            if metrics_file is not None:
                metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
                metrics_file.flush()
                progress.set_postfix({"loss": f"{objective_value:.4f}",
                                      **{f"λ[{n}]": f"{float(v):.3f}" for n, v in zip(names, dual.multipliers)}})
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                checkpoint(step + 1)
            if on_step is not None:
                on_step(record)
    finally:
        if metrics_file is not None:
            metrics_file.close()

    trained = accelerator.unwrap_model(model)
    if ema is not None:
        ema.copy_to(trained.parameters())
    return TrainResult(trained, dual.multipliers.tolist(), config.steps)
