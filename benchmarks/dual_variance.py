#!/usr/bin/env python
"""Spread of the dual step's constraint-loss estimates: the mixture estimator's samples from the primal
batches against the forward-only dual batch it used before, and the stratified estimator's.

A unet8 is first trained briefly on scikit-learn's digits (so that its losses are those of a model in
training, not of random weights). Then, with the multipliers held at each of --multipliers, every
repetition produces one dual step's estimate of each constraint's loss (classes 4, 5, 7 by default):

  mixture (now)      the constraint-sourced samples of N primal mixture batches of B, defensive
                     shares max(lambda_i, floor), unweighted mean per constraint
  mixture (before)   a separate forward-only batch of --dual-batch-size samples of every constraint set
                     (what the mixture estimator spent one extra forward on at every dual step)
  stratified         the --dual-batch-size samples of every constraint set in each of the N primal steps

All three are unbiased for the same losses: their means must agree within their standard errors
(printed), and the table compares their standard deviations over repetitions and the constraint samples
each uses per dual step. No gradient is taken: the estimates alone are compared.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from condiff.config import DualConfig, ExperimentConfig, TrainConfig
from condiff.data.datasets import load_digits_dataset
from condiff.lifecycle.build import build_noise_scheduler
from condiff.models import build_model
from condiff.training.dual import DualState
from condiff.training.estimators import MixtureEstimator, StratifiedEstimator
from condiff.training.loop import train
from condiff.training.terms import Constraint, DatasetTerm, per_sample_loss


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--classes", type=int, nargs="+", default=[4, 5, 7], help="one constraint per class")
    p.add_argument("--multipliers", type=float, nargs="+", default=[0.0, 0.1, 1.0],
                   help="values every multiplier is held at")
    p.add_argument("--repetitions", type=int, default=300, help="dual-step estimates per estimator")
    p.add_argument("--train-steps", type=int, default=300, help="unconstrained steps before measuring")
    p.add_argument("--batch-size", type=int, default=64, help="primal batch size B")
    p.add_argument("--dual-batch-size", type=int, default=DualConfig.batch_size)
    p.add_argument("--primal-steps-per-dual", type=int, default=DualConfig.primal_steps_per_dual)
    p.add_argument("--floor", type=float, default=DualConfig.floor)
    return p.parse_args(argv)   # the model runs on the accelerator's device (train() puts it there)


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def trained_unet(dataset, scheduler, steps: int, batch_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("unet8", dataset.sample_shape)
    with tempfile.TemporaryDirectory(prefix="condiff-bench-") as tmp, open(os.devnull, "w") as devnull, \
            contextlib.redirect_stderr(devnull):
        return train(model, DatasetTerm("data", dataset, scheduler), [],
                     TrainConfig(steps=steps, batch_size=batch_size, checkpoint_every=10**9), DualConfig(),
                     Path(tmp)).model


@torch.no_grad()
def estimates(args, model, make_estimator, multiplier: float, generator: torch.Generator) -> torch.Tensor:
    """((repetitions, constraints) dual-step estimates, constraint samples per constraint per dual step):
    the mean losses of the constraint samples of N primal steps."""
    estimator = make_estimator()
    m = len(estimator.constraints)
    dual = DualState([c.name for c in estimator.constraints], [0.0] * m, [0.0] * m)
    dual.multipliers = torch.full_like(dual.multipliers, multiplier)
    rows, samples = [], 0.0
    for _ in tqdm(range(args.repetitions), desc=f"λ={multiplier} {type(estimator).__name__}", leave=False):
        for _ in range(args.primal_steps_per_dual):
            step = estimator.lagrangian(model, dual, generator, device_of(model))
            dual.accumulate(step.constraint_sums, step.constraint_counts)
        samples += float(dual.loss_count.sum())
        rows.append(dual.mean_losses())
        dual.step(torch.zeros(len(estimator.constraints)), 0.0)   # only to reset the accumulators
    return torch.stack(rows), samples / args.repetitions / len(estimator.constraints)


@torch.no_grad()
def separate_batch_estimates(args, model, constraints, generator) -> torch.Tensor:
    """What the mixture estimator did before: one forward-only batch per constraint set per dual step."""
    device = device_of(model)
    return torch.stack([torch.stack([per_sample_loss(model, c.term.draw(args.dual_batch_size, generator).to(device)).mean()
                                     for c in constraints]).double().cpu()
                        for _ in tqdm(range(args.repetitions), desc="separate dual batch", leave=False)])


def main(argv=None) -> None:
    args = parse_args(argv)
    dataset = load_digits_dataset()
    scheduler = build_noise_scheduler(ExperimentConfig(), pixels=True)
    model = trained_unet(dataset, scheduler, args.train_steps, args.batch_size).eval()
    constraints = [Constraint(DatasetTerm(f"class {c}", dataset.of_class(c), scheduler)) for c in args.classes]
    objective = DatasetTerm("data", dataset, scheduler)
    sizes = (args.batch_size, args.dual_batch_size, args.floor)
    generator = torch.Generator().manual_seed(1)
    print(f"dual-step estimates of {len(constraints)} constraint losses (classes {args.classes}), unet8 after "
          f"{args.train_steps} steps on digits; B={args.batch_size}, N={args.primal_steps_per_dual}, "
          f"dual batch {args.dual_batch_size}, floor {args.floor}; {args.repetitions} repetitions each")
    print(f"  {'multipliers':>11}  {'estimator':<32} {'samples/constr.':>15}  {'std (mean over constr.)':>24}  "
          f"{'std / now':>9}  {'mean loss ± s.e.':>18}")
    before = separate_batch_estimates(args, model, constraints, generator)
    for multiplier in args.multipliers:
        now, now_samples = estimates(args, model, lambda: MixtureEstimator(objective, constraints, *sizes),
                                     multiplier, generator)
        stratified, stratified_samples = estimates(
            args, model, lambda: StratifiedEstimator(objective, constraints, *sizes), multiplier, generator)
        reference = now.std(0).mean()
        rows = [("mixture (now): primal batches", now_samples, now),
                ("mixture (before): separate batch", args.dual_batch_size, before),
                ("stratified", stratified_samples, stratified)]
        for name, samples, values in rows:
            std = values.std(0).mean()
            error = values.std(0).mean() / len(values) ** 0.5
            print(f"  {multiplier:>11.2f}  {name:<32} {samples:>15.1f}  {std:>24.4f}  {std / reference:>9.2f}  "
                  f"{values.mean():>10.4f} ± {error:.4f}")


if __name__ == "__main__":
    sys.exit(main())
