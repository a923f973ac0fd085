#!/usr/bin/env python
"""Time per training step of condiff's trainer, constrained and not, against a plain diffusers loop.

Variants train the same UNet (same preset, same initial weights) on the same data with the same
primal batch size B:

  plain        a hand-written diffusers training step (sample batch, noise, DDPMScheduler.add_noise,
               unet(x_t, t).sample, MSE, backward, clip_grad_norm_, AdamW step, lr schedule step,
               zero_grad, loss.item() for logging), no accelerate, no metrics file
  (a)          condiff.train.train() with no constraints
  (s1, s3 ...) condiff.train.train() with the `stratified` estimator and 1, 3, ... constraints (one per
               class: the first k of --classes)
  (m1, m3 ...) the same with the `mixture` estimator

The constrained variants run the real `train()` loop (accelerate, AdamW, cosine schedule, grad clipping,
metrics.jsonl, tqdm, dual steps every N primal steps) into a temporary run directory. Step times come
from the `on_step` callback: the time between consecutive callbacks is one whole loop iteration. Step 1
(no start stamp), the next warm-up steps and the last step (which also writes train()'s final
checkpoint) are dropped; the kept window is a whole number of N-step dual periods. Per run, the
per-step cost with the dual step amortised is ((N - 1) x median step without a dual step + median
step with one) / N: the mean over a dual period, but robust to a single disturbed step. Neither
estimator spends a forward pass on the dual step: it uses the constraint losses of the primal steps.

The constrained variants start with every multiplier at --multiplier (0.1) by wrapping
condiff.training.loop.DualState in this process (no file is changed), and the dual step size is 0 by
default so the multipliers stay there: the mixture batch then really mixes data and constraint
samples in fixed proportions. The dual step itself still runs every N steps.

Variants are interleaved: every round runs each variant once (S steps, rotating the order), and
the table reports medians over rounds of the per-round amortised step time, and medians of the
per-round ratios (paired within a round, so slow drifts of machine load cancel).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup

import condiff.training.loop as condiff_train
from condiff.config import DualConfig, ExperimentConfig, TrainConfig
from condiff.data.datasets import LabelledDataset, load_digits_dataset
from condiff.lifecycle.build import build_noise_scheduler
from condiff.models import UNET_PRESETS, build_model
from condiff.runtime import resolve_device
from condiff.sampling.generate import network_precision
from condiff.training.terms import Constraint, DatasetTerm

# Per-preset defaults: steps per train() call, warm-up steps dropped per call, rounds.
DEFAULTS = {"unet8": dict(steps=16, warmup=3, rounds=20), "unet28": dict(steps=8, warmup=2, rounds=3)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(DEFAULTS), default="unet8",
                   help="unet8: sklearn digits (8x8); unet28: random 28x28 tensors with labels")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per variant per round, warm-up and final step included "
                        "(default: 16 for unet8, 8 for unet28)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 20 / 3)")
    p.add_argument("--warmup", type=int, default=None,
                   help="steps dropped at the start of every run, >= 1 (default: 3 / 2)")
    p.add_argument("--batch-size", type=int, default=64, help="primal batch size B")
    p.add_argument("--dual-batch-size", type=int, default=DualConfig.batch_size,
                   help="stratified: samples of every constraint set per step")
    p.add_argument("--floor", type=float, default=DualConfig.floor,
                   help="mixture: constraint i is drawn with weight max(lambda_i, floor)")
    p.add_argument("--primal-steps-per-dual", type=int, default=DualConfig.primal_steps_per_dual,
                   help="N: primal steps per dual step")
    p.add_argument("--classes", type=int, nargs="+", default=[4, 5, 7, 0, 1, 2, 3, 6, 8, 9],
                   help="the constrained classes, in order: a variant with k constraints takes the first k")
    p.add_argument("--constraints", type=int, nargs="+", default=[1, 3, 10],
                   help="numbers of constraints to time, each with both estimators")
    p.add_argument("--multiplier", type=float, default=0.1, help="initial value of every multiplier")
    p.add_argument("--dual-lr", type=float, default=0.0,
                   help="absolute dual step size (0 keeps the multipliers at --multiplier)")
    # One thread by default: with two OpenMP threads on a 2-vCPU machine whole runs came out up to 30% slower
    # or faster at random, which hides the few-percent differences this benchmark is for.
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw step times here")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if max(args.constraints) > len(args.classes):
        p.error(f"--constraints {max(args.constraints)} needs that many --classes")
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (step 1 has no start time)")
    if kept_window(args.steps, args.warmup, args.primal_steps_per_dual) is None:
        p.error(f"--steps {args.steps} leaves no whole dual period of {args.primal_steps_per_dual} steps "
                f"after {args.warmup} warm-up steps and the final (checkpointing) step")
    return args


def kept_window(steps: int, warmup: int, period: int) -> tuple[int, int] | None:
    """1-based step numbers [first, last] to keep: after the warm-up, before the final step, and a
    whole number of dual periods long (extra steps are dropped from the start)."""
    last = steps - 1
    count = last - warmup
    count -= count % period
    if count < period:
        return None
    return last - count + 1, last


def step_durations(stamps: list[float], window: tuple[int, int]) -> dict[int, float]:
    """Duration of step k = stamp(k) - stamp(k - 1), for k in the window (stamps[i] is step i + 1)."""
    first, last = window
    return {k: stamps[k - 1] - stamps[k - 2] for k in range(first, last + 1)}


# --------------------------------------------------------------------------------------------- data


def make_dataset(preset: str) -> LabelledDataset:
    if preset == "unet8":
        return load_digits_dataset()
    size = UNET_PRESETS[preset]["sample_size"]
    generator = torch.Generator().manual_seed(0)
    n = 2000
    data = torch.rand(n, 1, size, size, generator=generator) * 2 - 1
    return LabelledDataset(data, torch.arange(n) % 10, 10, f"random{size}")


# ----------------------------------------------------------------------------------------- variants


@contextlib.contextmanager
def initial_multipliers(value: float):
    """Make condiff.training.loop.train() start its DualState with every multiplier at `value`."""
    original = condiff_train.DualState

    class SeededDualState(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.multipliers = torch.full_like(self.multipliers, value)

    condiff_train.DualState = SeededDualState
    try:
        yield
    finally:
        condiff_train.DualState = original


def drawn(term: DatasetTerm) -> int:
    """Samples a term has drawn so far (its epoch sampler's position over all epochs)."""
    return term.sampler.epoch * term.sampler.size + term.sampler.position


def stamped_train(model, objective, constraints, config, dual_config, accelerator=None):
    """(on_step time stamps, metrics records) of condiff's train() into a temporary run directory (no records
    on the other processes of a multi-process run)."""
    stamps: list[float] = []
    with tempfile.TemporaryDirectory(prefix="condiff-bench-") as tmp, open(os.devnull, "w") as devnull, \
            contextlib.redirect_stderr(devnull):
        # tqdm's bar is drawn (to /dev/null), so its cost stays in the measurement.
        condiff_train.train(model, objective, constraints, config, dual_config, Path(tmp),
                            accelerator=accelerator, on_step=lambda record: stamps.append(time.perf_counter()))
        log = Path(tmp) / "metrics.jsonl"   # written by the main process only
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return stamps, records


def plain_diffusers_loop(model, scheduler, dataset: LabelledDataset, config: TrainConfig, steps: int, device, *,
                         precision: str = "no", compile: bool = False) -> list[float]:
    """Time stamps of the canonical diffusers training loop written out by hand (torch only, no accelerate):
    shuffled batches, noise and timesteps on the device, add_noise, the forward under autocast at
    `precision` (torch.compile'd with `compile`, inductor as accelerate's), MSE, GradScaler (fp16 only),
    clipping, AdamW, cosine lr, and loss.item() every step, as diffusers' example logs it."""
    model = model.to(device).train()
    forward = torch.compile(model) if compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = network_precision(device, precision)
    generator = torch.Generator().manual_seed(0)
    data, n, batch_size = dataset.data, len(dataset), config.batch_size
    order, position = torch.randperm(n, generator=generator), 0
    stamps: list[float] = []
    for _ in range(steps):
        if position + batch_size > n:            # reshuffle, like a DataLoader(shuffle=True)
            order, position = torch.randperm(n, generator=generator), 0
        clean = data[order[position:position + batch_size]].to(device)
        position += batch_size
        noise = torch.randn(clean.shape, device=device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),), device=device)
        with autocast:
            prediction = forward(scheduler.add_noise(clean, noise, timesteps), timesteps).sample
        loss = F.mse_loss(prediction.float(), noise)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.detach().item()
        stamps.append(time.perf_counter())
    return stamps


class CondiffVariant:
    def __init__(self, key, label, estimator, classes, args, preset, dataset, scheduler, init_state):
        self.key, self.label, self.estimator, self.classes = key, label, estimator, classes
        self.args, self.preset, self.dataset, self.scheduler, self.init_state = (
            args, preset, dataset, scheduler, init_state)
        self.info: dict = {}

    def run(self, steps: int) -> list[float]:
        args = self.args
        model = build_model(self.preset, self.dataset.sample_shape)
        model.load_state_dict(self.init_state)
        objective = DatasetTerm("data", self.dataset, self.scheduler)
        constraints = [Constraint(DatasetTerm(f"class {c}", self.dataset.of_class(c), self.scheduler), 0.0)
                       for c in self.classes]
        config = TrainConfig(steps=steps, batch_size=args.batch_size, checkpoint_every=10**9,
                             keep_checkpoints=1)
        dual_config = DualConfig(estimator=self.estimator, batch_size=args.dual_batch_size,
                                 floor=args.floor, primal_steps_per_dual=args.primal_steps_per_dual,
                                 lr=args.dual_lr, lr_relative=False)
        seeded = initial_multipliers(args.multiplier) if constraints else contextlib.nullcontext()
        with seeded:
            stamps, records = stamped_train(model, objective, constraints, config, dual_config)
        self.info = {"multipliers_end": records[-1]["multipliers"],
                     "dual_steps": sum(r["dual_step"] for r in records),
                     "data_samples_per_step": drawn(objective) / steps,
                     "constraint_samples_per_step": sum(drawn(c.term) for c in constraints) / steps}
        return stamps


class PlainVariant:
    """The canonical diffusers loop, written out by hand (torch only, no accelerate)."""

    key, label = "plain", "plain diffusers loop"

    def __init__(self, args, preset, dataset, scheduler, init_state):
        self.args, self.preset, self.dataset, self.scheduler, self.init_state = (
            args, preset, dataset, scheduler, init_state)
        self.info: dict = {}

    def run(self, steps: int) -> list[float]:
        model = build_model(self.preset, self.dataset.sample_shape)
        model.load_state_dict(self.init_state)
        config = TrainConfig(batch_size=self.args.batch_size)   # condiff's defaults: lr, wd, clip, warmup
        stamps = plain_diffusers_loop(model, self.scheduler, self.dataset, config, steps, resolve_device())
        self.info = {"data_samples_per_step": config.batch_size, "constraint_samples_per_step": 0}
        return stamps


# ------------------------------------------------------------------------------------------- report


def fmt_range(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    return f"[{min(values) * scale:.{digits}f} .. {max(values) * scale:.{digits}f}]"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset, period = args.preset, args.primal_steps_per_dual
    window = kept_window(args.steps, args.warmup, period)

    dataset = make_dataset(preset)
    scheduler = build_noise_scheduler(ExperimentConfig(), pixels=True)
    torch.manual_seed(0)
    init_state = {k: v.clone() for k, v in build_model(preset, dataset.sample_shape).state_dict().items()}
    n_params = sum(v.numel() for v in init_state.values())
    common = (args, preset, dataset, scheduler, init_state)
    variants = [PlainVariant(*common), CondiffVariant("a", "(a) condiff, unconstrained", "stratified", [], *common)]
    for k in args.constraints:
        variants += [CondiffVariant(f"s{k}", f"(s{k}) condiff, stratified, {k} constr.", "stratified",
                                    args.classes[:k], *common),
                     CondiffVariant(f"m{k}", f"(m{k}) condiff, mixture, {k} constr.", "mixture",
                                    args.classes[:k], *common)]

    load_start = os.getloadavg()
    print(f"condiff step-time benchmark: preset {preset} ({n_params:,} parameters), data {dataset.name} "
          f"{tuple(dataset.data.shape)}", flush=True)
    print(f"  torch {torch.__version__}, threads {torch.get_num_threads()} (interop "
          f"{torch.get_num_interop_threads()}), cpus available {len(os.sched_getaffinity(0))}, "
          f"{platform.machine()} {platform.python_implementation()} {platform.python_version()}")
    print(f"  primal batch B={args.batch_size}, stratified: {args.dual_batch_size} more per constraint, mixture: "
          f"floor {args.floor}; {args.constraints} constraints on the first classes of {args.classes}, "
          f"N={period} primal steps per dual step, multipliers {args.multiplier} (dual lr {args.dual_lr})")
    print(f"  {args.rounds} rounds x {args.steps} steps per variant; timed steps {window[0]}..{window[1]} "
          f"of each run ({window[1] - window[0] + 1} steps, {(window[1] - window[0] + 1) // period} dual periods)")
    print(f"  load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", flush=True)

    # One short unrecorded run of each variant: first-call costs (allocator, kernels) land here.
    t0 = time.perf_counter()
    for v in variants:
        v.run(window[0] + period)
    print(f"  warm-up pass: {time.perf_counter() - t0:.1f} s", flush=True)

    per_round: dict[str, list[float]] = {v.key: [] for v in variants}        # amortised s/step per round
    steps_by_kind: dict[str, dict[str, list[float]]] = {v.key: {"dual": [], "primal": []} for v in variants}
    final_step: dict[str, list[float]] = {v.key: [] for v in variants}     # extra time of the last step
    raw: dict[str, list[list[float]]] = {v.key: [] for v in variants}
    t_start = time.perf_counter()
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            stamps = v.run(args.steps)
            durations = step_durations(stamps, window)
            has_dual = bool(getattr(v, "classes", None))
            kinds = {"dual": [], "primal": []}
            for k, d in durations.items():
                kinds["dual" if has_dual and k % period == 0 else "primal"].append(d)
            # Robust amortised cost: per-kind medians (one disturbed step does not move them),
            # weighted by how often each kind occurs (N - 1 primal-only steps per dual step).
            if not kinds["dual"]:
                amortised = statistics.median(kinds["primal"])
            elif not kinds["primal"]:                  # N = 1: every step is a dual step
                amortised = statistics.median(kinds["dual"])
            else:
                amortised = (statistics.median(kinds["primal"]) * (period - 1)
                             + statistics.median(kinds["dual"])) / period
            per_round[v.key].append(amortised)
            for kind, values in kinds.items():
                steps_by_kind[v.key][kind].extend(values)
            last_kind = "dual" if has_dual and args.steps % period == 0 else "primal"
            final_step[v.key].append(stamps[-1] - stamps[-2] - statistics.median(kinds[last_kind]))
            raw[v.key].append(stamps)
        line = "  ".join(f"{v.key} {per_round[v.key][-1] * 1e3:7.1f}" for v in variants)
        print(f"  round {r + 1:2d}/{args.rounds}: ms/step  {line}", flush=True)
    elapsed = time.perf_counter() - t_start
    load_end = os.getloadavg()

    med = {k: statistics.median(vals) for k, vals in per_round.items()}
    print()
    print(f"Time per training step, dual step amortised over N={period} "
          f"((N-1) x median step without + median step with a dual step, per round);")
    print(f"median over {args.rounds} rounds, [min .. max] over rounds")
    print(f"  {'variant':<38} {'ms/step':>9}  {'range':<19} {'samples/step (data + constr.)':>30}")
    for v in variants:
        samples = f"{v.info['data_samples_per_step']:.1f} + {v.info['constraint_samples_per_step']:.1f}"
        print(f"  {v.label:<38} {med[v.key] * 1e3:9.1f}  {fmt_range(per_round[v.key], 1e3):<19} {samples:>30}")

    print()
    print("Ratios, median of the per-round ratios (paired within each round); [min .. max] over rounds")
    goals = {("m3", "a"): 1.02, ("a", "plain"): 1.03}   # the goals of issue 13 (2 idle CPU cores, unet8)
    pairs = [(f"{e}{k}", "a", f"({e}{k}) {name:<10} / (a) unconstrained")
             for k in args.constraints for e, name in (("s", "stratified"), ("m", "mixture"))]
    for num, den, text in pairs + [("a", "plain", "(a) condiff unconstrained / plain diffusers")]:
        ratios = [x / y for x, y in zip(per_round[num], per_round[den])]
        goal = goals.get((num, den))
        verdict = "" if goal is None else f"  goal <= {goal}: {'met' if statistics.median(ratios) <= goal else 'MISSED'}"
        print(f"  {text:<44} {statistics.median(ratios):6.3f}  {fmt_range(ratios, digits=3)}{verdict}")

    print()
    print("Breakdown (medians over all timed steps of all rounds)")
    for v in variants:
        kinds = steps_by_kind[v.key]
        parts = []
        if kinds["primal"]:
            parts.append(f"steps without dual step {statistics.median(kinds['primal']) * 1e3:7.1f} ms")
        if kinds["dual"]:
            parts.append(f"steps with dual step {statistics.median(kinds['dual']) * 1e3:7.1f} ms")
        print(f"  {v.label:<38} " + ", ".join(parts))
    for v in variants[1:]:
        extra = statistics.median(final_step[v.key])
        print(f"  {v.label:<38} last step (writes train()'s final checkpoint): {extra * 1e3:+.1f} ms "
              "over a normal step of the same run (excluded above)")
    for v in variants[2:]:
        print(f"  {v.label:<38} multipliers at end of last run {v.info['multipliers_end']}, "
              f"{v.info['dual_steps']} dual steps in {args.steps} steps")
    print()
    print(f"timed section {elapsed:.1f} s; load average at end: {load_end[0]:.2f} {load_end[1]:.2f} "
          f"{load_end[2]:.2f}")

    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                         "window": window, "stamps": raw}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
