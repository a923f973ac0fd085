"""Remove-top-k per sampling step (Journey-TRAK's counterfactual): does removing the k training examples a
method ranks first for one target at step T change what the model does from there, more than removing k
random ones?

Every retrained model starts from the attributed model's own state x_T at step T of the target's trajectory
(not from fresh noise at t = 1000, where the chaos of a whole trajectory drowns the effect) and runs DDIM
to the end; measured: the RMS change of x0_hat(T) (the retrained model's prediction at that same x_T) and of
the final sample. Retrainings are coupled to the attributed model's random stream (its minibatches,
timesteps and noise; removed examples weight 0), the random removals too, so that a model differs from the
attributed one by the removed data alone. The second full model (another training seed), run from the same
x_T, is the noise floor: how much retraining chaos alone moves the output. Differences are paired per target
(the same target, step and x_T) with a bootstrap interval over targets.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from condiff.attribution.validation import Interval
from condiff.config import ExperimentConfig
from condiff.lifecycle.build import load_pipeline
from condiff.runtime import IndependentWorkers, progress_bar
from condiff.sampling.generate import SampleOutput, generate, sampling_scheduler
from condiff.validation.counterfactual import Targets, ValidationSettings, retrain
from condiff.validation.methods import QuantityChoice

NOISE_FLOOR = "second full model (noise floor)"


@dataclass
class Removal:
    name: str                   # its run directory under removals/, named by what it removes (a resumed
                                # validation whose plan changed keeps the retrainings it can reuse)
    kind: str                   # "top-k <method>", or "random k"
    target: int | None          # index among all targets (None: a random removal, compared with every target)
    step: int | None            # T
    removed: list[int]


@dataclass
class RemovalEffect:
    target: int                 # index among all targets
    step: int
    kind: str                   # a Removal's kind, or NOISE_FLOOR
    x0_change: float            # RMS change of x0_hat(T) from the attributed model's
    sample_change: float        # RMS change of the final sample


@dataclass
class RemovalComparison:
    step: int
    output: str                 # "x0_hat(T)" or "sample"
    kind: str
    against: str
    difference: Interval        # mean over targets of (change by `kind` - change by `against`)


def removal_plan(choices: dict[str, QuantityChoice], targets: Targets, settings: ValidationSettings,
                 num_train: int) -> list[Removal]:
    """Per examined target and step: the top k of the chosen TRAK and of the best baseline at that step;
    and `removal_draws` random sets of k, shared by every target."""
    k = max(1, round(settings.removal_share * num_train))
    examined = range(targets.held_out, targets.held_out + settings.removal_targets)
    plan = []
    for step in settings.removal_steps:
        choice = choices[quantity_of(targets, step)]
        for target in examined:
            for kind, candidate in (("top-k TRAK", choice.trak), (f"top-k {choice.baseline.method}", choice.baseline)):
                removed = sorted(np.argsort(-candidate.scores[:, target], kind="stable")[:k].tolist())
                plan.append(Removal(removal_name(removed), kind, target, step, removed))
    rng = np.random.default_rng(settings.seed + 7)
    for draw in range(settings.removal_draws):
        removed = sorted(rng.choice(num_train, k, replace=False).tolist())
        plan.append(Removal(removal_name(removed), "random k", None, None, removed))
    return plan


def removal_name(removed: list[int]) -> str:
    return "removal-" + hashlib.sha256(json.dumps(removed).encode()).hexdigest()[:12]


def quantity_of(targets: Targets, step: int) -> str:
    """The `t=T` quantity of the sampling step nearest `step`."""
    return f"t={int(targets.samples.timesteps[targets.samples.step_index(step)])}"


def train_removals(config: ExperimentConfig, output: Path, plan: list[Removal], num_train: int,
                   workers: IndependentWorkers, progress: bool) -> None:
    """Retrain (or keep) every removal, coupled to the attributed model, shared out between the workers."""
    unique = list({removal.name: removal for removal in plan}.values())   # two methods may remove the same k
    for removal in progress_bar(workers.share(unique), desc="removals", enabled=progress):
        keep = np.ones(num_train, dtype=bool)
        keep[removal.removed] = False
        retrain(config, output / "removals" / removal.name, keep, coupled=True)
    workers.barrier("removals")


def states_at(pipeline, targets: Targets, settings: ValidationSettings, step_index: int, rows: range,
              device) -> torch.Tensor:
    """The attributed model's x_T at sampling step `step_index` of the targets `rows` (regenerated from their
    own noise: DDIM is deterministic)."""
    kept: list[torch.Tensor] = []
    timestep = int(targets.samples.timesteps[step_index])
    generate(pipeline.unet, sampling_scheduler(pipeline.scheduler, "ddim"), len(rows),
             num_inference_steps=settings.sampling_steps, seed=settings.seed, first_index=rows.start, device=device,
             progress=False, on_step=lambda first, t, x: kept.append(x.detach().cpu()) if t == timestep else None)
    return torch.cat(kept)


def continue_from(run_dir: Path, states: torch.Tensor, step_index: int, settings: ValidationSettings,
                  device) -> SampleOutput:
    pipeline = load_pipeline(run_dir)
    return generate(pipeline.unet, sampling_scheduler(pipeline.scheduler, "ddim"), len(states),
                    num_inference_steps=settings.sampling_steps, record_x0=True, device=device, progress=False,
                    resume_from=(step_index, states))


def rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row: the root mean square difference."""
    return (a - b).pow(2).flatten(1).mean(1).sqrt()


def removal_effects(full_runs: list[Path], output: Path, plan: list[Removal], targets: Targets,
                    settings: ValidationSettings, *, device, progress: bool = True) -> list[RemovalEffect]:
    """Run every removal's model (and the second full model) from the attributed model's x_T of each examined
    target and step; the RMS changes from the attributed model's own continuation."""
    rows = range(targets.held_out, targets.held_out + settings.removal_targets)
    attributed = load_pipeline(full_runs[0])
    effects = []
    for step in settings.removal_steps:
        index = targets.samples.step_index(step)
        states = states_at(attributed, targets, settings, index, rows, device)
        reference = continue_from(full_runs[0], states, index, settings, device)
        others = [(r.kind, output / "removals" / r.name, [r.target] if r.target is not None else list(rows))
                  for r in plan if r.step in (None, step)]
        if len(full_runs) > 1:
            others.append((NOISE_FLOOR, full_runs[1], list(rows)))
        for kind, run_dir, examined in progress_bar(others, desc=f"removal effects (T = {step})", enabled=progress):
            moved = continue_from(run_dir, states, index, settings, device)
            x0, sample = rms(moved.x0_predictions[0], reference.x0_predictions[0]), rms(moved.samples, reference.samples)
            effects += [RemovalEffect(t, int(targets.samples.timesteps[index]), kind, float(x0[t - rows.start]),
                                      float(sample[t - rows.start])) for t in examined]
    return effects


def compare_removals(effects: list[RemovalEffect], kind: str, against: str, *, resamples: int = 2000,
                     seed: int = 0) -> list[RemovalComparison]:
    """Per step and output: mean over targets of the change by `kind` minus the (mean, over random draws)
    change by `against`, with a bootstrap interval over targets (paired: the same target and x_T)."""
    out = []
    for step in sorted({e.step for e in effects}):
        for output, value in (("x0_hat(T)", lambda e: e.x0_change), ("sample", lambda e: e.sample_change)):
            def per_target(name: str) -> dict[int, float]:
                chosen = [e for e in effects if e.step == step and e.kind == name]
                return {t: float(np.mean([value(e) for e in chosen if e.target == t])) for t in {e.target for e in chosen}}

            mine, theirs = per_target(kind), per_target(against)
            shared = sorted(set(mine) & set(theirs))
            if not shared:
                continue
            differences = np.array([mine[t] - theirs[t] for t in shared])
            means = np.random.default_rng(seed).choice(differences, (resamples, len(differences))).mean(1)
            low, high = np.quantile(means, [0.025, 0.975])
            out.append(RemovalComparison(step, output, kind, against, Interval(float(differences.mean()), float(low),
                                                                               float(high))))
    return out
