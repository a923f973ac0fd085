#!/usr/bin/env python
"""Throughput of condiff's training step and sampler against plain diffusers, on the device present.

(a) Time per training step of condiff's `train()` (unconstrained, temporary run directory, tqdm to /dev/null,
    `on_step` stamps as in step_time.py) and of a hand-written diffusers loop (torch.autocast, GradScaler),
    per TrainConfig key: train.mixed_precision = no / fp16 / bf16, train.channels_last, train.compile (--compile).
(b) Images/s of DDIM with condiff's `generate` (what `condiff sample` runs) and with diffusers' DDIMPipeline
    on the same UNet, schedule, batch and steps; condiff also per sample.mixed_precision, sample.channels_last.
(c) Images/s and steps/s of 1 and 2 torchrun processes training and sampling under accelerate (this script
    in a hidden --worker mode; on CPUs with ACCELERATE_USE_CPU=true and the threads shared out).

Variants are interleaved (each once per round, rotating the order); tables give medians over rounds with
[min .. max], ratios the median of per-round ratios (paired, so drifts of machine load cancel).
`--size paper`: the UNet of configs/paper/mnist-minority.toml, batch 128, random 28x28 images;
`--size reduced`: a tiny UNet on the 8x8 digits, seconds on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object
from diffusers import DDIMPipeline, DDIMScheduler

import condiff.training.loop as condiff_train
from condiff.config import DualConfig, load_config
from condiff.lifecycle.build import build_network, build_noise_scheduler
from condiff.runtime import end_processes, process_state, resolve_device
from condiff.sampling.generate import generate, sampling_scheduler
from condiff.training.terms import DatasetTerm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import fmt_range, kept_window, make_dataset, plain_diffusers_loop, stamped_train, step_durations  # noqa: E402

PAPER_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "paper" / "mnist-minority.toml"
# --size: overrides of the paper config (the same builders make both models).
SIZES = {"paper": {},
         "reduced": {"model.kind": "unet8", "model.block_out_channels": [16, 32], "train.batch_size": 16,
                     "sample.batch_size": 32}}
# --size: default rounds and training steps per run (a reduced step takes ~20 ms: more of them to average).
RUNS = {"paper": {"rounds": 3, "steps": 8}, "reduced": {"rounds": 10, "steps": 24}}
PRECISIONS = ("no", "fp16", "bf16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="paper")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: paper 3, reduced 10)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per run, warm-up and final step included (default: paper 8, reduced 24)")
    p.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of every training run")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None,
                   help="mixed precisions to time (default: all; on a CPU no and bf16: fp16 is emulated there)")
    p.add_argument("--sample-batch", type=int, default=None, help="images per sampling call (default: sample.batch_size)")
    p.add_argument("--sample-steps", type=int, default=None, help="DDIM steps (default: sample.steps, 50)")
    p.add_argument("--compile", action="store_true", help="also time train.compile = true (torch.compile)")
    p.add_argument("--skip-multiprocess", action="store_true", help="skip the torchrun part (c)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)   # (c): result file
    args = p.parse_args(argv)
    for key, value in RUNS[args.size].items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    if kept_window(args.steps, args.warmup, 1) is None:
        p.error(f"--steps {args.steps} leaves no timed step after {args.warmup} warm-up steps and the final one")
    return args


class Setup:
    """The model, data, schedule and settings every variant shares."""

    def __init__(self, args):
        self.config = load_config(PAPER_CONFIG, SIZES[args.size])
        self.dataset = make_dataset(self.config.model.kind)
        self.scheduler = build_noise_scheduler(self.config, pixels=True)
        # EMA and checkpoints off: the plain loop has neither.
        self.train = dataclasses.replace(self.config.train, ema_decay=0.0, checkpoint_every=10**9, keep_checkpoints=1)
        self.sample_batch = args.sample_batch or self.config.sample.batch_size
        self.sample_steps = args.sample_steps or self.config.sample.steps
        self.device = resolve_device()
        self.model = self.new_model()

    def new_model(self) -> torch.nn.Module:
        return build_network(self.config, self.dataset, self.scheduler)[0]   # seeded: the same weights every time


def unsupported(setup: Setup, key: str, value, training: bool) -> str | None:
    """Why the device cannot run setting `key` = `value` (None: it can)."""
    device = setup.device
    if key != "mixed_precision" or value == "no":
        return None
    if not torch.amp.is_autocast_available(device.type):
        return f"no autocast on {device.type}"
    if value == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    if training:
        AcceleratorState._reset_state()   # a process keeps its first Accelerator's mixed precision otherwise
        if not condiff_train.make_accelerator(dataclasses.replace(setup.train, mixed_precision=value)).native_amp:
            return f"accelerate does not autocast {value} on {device.type} (it would train in fp32)"
    return None


class Variant:
    """One row of a table: `who` with one config key set as a user sets it (`section.key = value`)."""

    who, section = "", ""

    def __init__(self, setup: Setup, key: str | None = None, value=None):
        self.setup, self.key, self.value = setup, key, value
        self.setting = "" if key is None else f"{self.section}.{key} = {json.dumps(value)}"
        self.label = f"{self.who}  {self.setting}".strip()


def condiff_training(setup: Setup, config, accelerator=None) -> list[float]:
    """on_step stamps of condiff's train(), unconstrained."""
    objective = DatasetTerm("data", setup.dataset, setup.scheduler)
    return stamped_train(setup.new_model(), objective, [], config, DualConfig(), accelerator)[0]


# ----------------------------------------------------------------------------------------- training


class CondiffTrain(Variant):
    who, section = "condiff", "train"

    def run(self, steps: int) -> list[float]:
        AcceleratorState._reset_state()   # an Accelerator's mixed precision is fixed per process otherwise
        return condiff_training(self.setup, dataclasses.replace(self.setup.train, steps=steps, **{self.key: self.value}))


class PlainTrain(Variant):
    """The canonical diffusers training step by hand: torch.autocast and GradScaler, no accelerate."""

    who, section = "plain  ", "train"

    def run(self, steps: int) -> list[float]:
        model = self.setup.new_model()
        if self.key == "channels_last":   # converted as train() converts it
            model = model.to(memory_format=torch.channels_last)
        return plain_diffusers_loop(model, self.setup.scheduler, self.setup.dataset, self.setup.train, steps,
                                    self.setup.device, precision=self.value if self.key == "mixed_precision" else "no",
                                    compile=self.key == "compile")


# ----------------------------------------------------------------------------------------- sampling


class CondiffSampling(Variant):
    """condiff's generate (DDIM) on its own copy of the model (channels_last converts it in place); the
    scheduler is made once, as the pipeline's."""

    who, section = "condiff generate", "sample"

    def __init__(self, setup: Setup, key: str, value):
        super().__init__(setup, key, value)
        self.model, self.scheduler = copy.deepcopy(setup.model), sampling_scheduler(setup.scheduler, "ddim")

    def run(self) -> float:
        s, start = self.setup, time.perf_counter()
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):   # its bar, drawn
            generate(self.model, self.scheduler, s.sample_batch,
                     num_inference_steps=s.sample_steps, batch_size=s.sample_batch, device=s.device,
                     **{self.key: self.value})
        return time.perf_counter() - start


class PipelineSampling(Variant):
    """diffusers' DDIMPipeline around a copy of the same UNet and a DDIMScheduler of the same schedule;
    output_type "np" brings the images to the host, as generate does."""

    who = "diffusers DDIMPipeline"

    def __init__(self, setup: Setup):
        super().__init__(setup)
        scheduler = DDIMScheduler.from_config(setup.scheduler.config)
        self.pipeline = DDIMPipeline(unet=copy.deepcopy(setup.model), scheduler=scheduler).to(setup.device)

    def run(self) -> float:
        s, start = self.setup, time.perf_counter()
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):   # its bar, drawn
            self.pipeline(batch_size=s.sample_batch, num_inference_steps=s.sample_steps,
                          generator=torch.Generator().manual_seed(0), output_type="np")
        return time.perf_counter() - start


# ------------------------------------------------------------------------------------ measurement


def usable(variants: list[Variant], try_run, baselines: set[str], training: bool) -> list[Variant]:
    """Variants that survive one unrecorded warm-up run; the others are printed with the reason."""
    kept = []
    for v in variants:
        reason = unsupported(v.setup, v.key, v.value, training)
        if reason is None:
            try:
                try_run(v)
            except Exception as err:   # an option this device or install cannot do (e.g. no C++ compiler)
                if v.setting in baselines:
                    raise
                reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
        if reason is None:
            kept.append(v)
        else:
            print(f"  skipped {v.label}: {reason}", flush=True)
    return kept


def rounds(variants: list[Variant], measure, count: int, unit) -> dict[str, list[float]]:
    """Per variant label, `measure(v)` once per round, the variants in rotating order."""
    values: dict[str, list[float]] = {v.label: [] for v in variants}
    for r in range(count):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            values[v.label].append(measure(v))
        print(f"  round {r + 1}/{count}: " + "  ".join(unit(values[v.label][-1]) for v in variants), flush=True)
    return values


def ratio_line(text: str, ratios: list[float], goal: float | None = None) -> str:
    """`goal`: the least median ratio that meets it."""
    verdict = "" if goal is None else f"  goal >= {goal}: {'met' if statistics.median(ratios) >= goal else 'MISSED'}"
    return f"  {text:<62} {statistics.median(ratios):6.3f}  {fmt_range(ratios, digits=3)}{verdict}"


def time_training(setup: Setup, args) -> dict:
    settings = [("mixed_precision", p) for p in args.precisions] + [("channels_last", True)]
    settings += [("compile", True)] if args.compile else []
    variants = [cls(setup, k, v) for k, v in settings for cls in (PlainTrain, CondiffTrain)]
    window = kept_window(args.steps, args.warmup, 1)
    print(f"\n(a) training: batch {setup.train.batch_size}, {args.rounds} rounds x {args.steps} steps per variant, "
          f"timed steps {window[0]}..{window[1]} (median step per run); per round, ms/step in table order:", flush=True)
    base = 'train.mixed_precision = "no"'
    variants = usable(variants, lambda v: v.run(window[0] + 1), {base}, training=True)
    per_round = rounds(variants, lambda v: statistics.median(step_durations(v.run(args.steps), window).values()),
                       args.rounds, lambda t: f"{t * 1e3:.1f}")
    print(f"\n  {'variant':<52} {'ms/step':>9}  {'range':<19} {'images/s':>9}")
    for v in variants:
        ms = statistics.median(per_round[v.label]) * 1e3
        print(f"  {v.label:<52} {ms:9.1f}  {fmt_range(per_round[v.label], 1e3):<19} "
              f"{setup.train.batch_size / ms * 1e3:9.1f}")
    print("\n  Ratios of step times (median of per-round ratios, [min .. max]; below 1: faster)")
    times = {(v.who.strip(), v.setting): per_round[v.label] for v in variants}
    timed = list(dict.fromkeys(v.setting for v in variants))
    pairs = [(f"{who} {setting} / fp32", (who, setting), (who, base))
             for who in ("condiff", "plain") for setting in timed if setting != base]
    pairs += [(f"condiff / plain diffusers, {setting}", ("condiff", setting), ("plain", setting)) for setting in timed]
    for text, numerator, denominator in pairs:
        if numerator in times and denominator in times:
            print(ratio_line(text, [a / b for a, b in zip(times[numerator], times[denominator])]))
    return per_round


def time_sampling(setup: Setup, args) -> dict:
    print(f"\n(b) sampling: DDIM-{setup.sample_steps}, {setup.sample_batch} images per call, {args.rounds} rounds; "
          "per round, s/call in table order:", flush=True)
    settings = [("mixed_precision", p) for p in args.precisions] + [("channels_last", True)]
    variants = [PipelineSampling(setup)] + [CondiffSampling(setup, k, v) for k, v in settings]
    variants = usable(variants, lambda v: v.run(), {"", 'sample.mixed_precision = "no"'}, training=False)
    per_round = rounds(variants, lambda v: v.run(), args.rounds, lambda t: f"{t:.2f}s")
    print(f"\n  {'variant':<52} {'s/call':>8}  {'range':<19} {'images/s':>9}")
    for v in variants:
        seconds = statistics.median(per_round[v.label])
        print(f"  {v.label:<52} {seconds:8.3f}  {fmt_range(per_round[v.label], digits=3):<19} "
              f"{setup.sample_batch / seconds:9.1f}")
    print("\n  Ratios of throughput (images/s; median of per-round ratios, [min .. max]; above 1: faster)")
    pipeline, base = per_round[variants[0].label], per_round[variants[1].label]
    print(ratio_line("condiff generate / diffusers DDIMPipeline", [p / c for p, c in zip(pipeline, base)], 1.0))
    for v in variants[2:]:
        print(ratio_line(f"{v.setting} / fp32", [b / c for b, c in zip(base, per_round[v.label])]))
    return per_round


# ---------------------------------------------------------------------------------- two processes


def worker(args) -> None:
    """(c), in every torchrun process: train --steps steps and sample two batches under accelerate."""
    setup = Setup(args)
    accelerator = condiff_train.make_accelerator(setup.train)   # reads ACCELERATE_USE_CPU
    config = dataclasses.replace(setup.train, steps=args.steps)
    step = statistics.median(step_durations(condiff_training(setup, config, accelerator),
                                            kept_window(args.steps, args.warmup, 1)).values())
    state, batch = process_state(), setup.sample_batch
    total = 2 * batch * state.num_processes
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        generate(setup.model, sampling_scheduler(setup.scheduler, "ddim"), batch, num_inference_steps=2,
                 batch_size=batch)   # warm-up
        state.wait_for_everyone()
        start = time.perf_counter()
        with state.split_between_processes(list(range(total))) as mine:
            generate(setup.model, sampling_scheduler(setup.scheduler, "ddim"), len(mine), batch_size=batch,
                     num_inference_steps=setup.sample_steps, first_index=mine[0])   # returns on the host: synced
        state.wait_for_everyone()
        seconds = time.perf_counter() - start
    results = gather_object([{"rank": state.process_index, "step": step, "sample_seconds": seconds}])
    if state.is_main_process:
        args.worker.write_text(json.dumps({"processes": state.num_processes, "batch": setup.train.batch_size,
                                           "images": total, "ranks": results}))
    end_processes()   # as condiff's commands end: a rank leaving an open group can abort


def time_processes(args) -> dict:
    on_cpu = torch.cuda.device_count() < 2
    if torch.cuda.is_available() and on_cpu:
        print("\n(c) skipped: two processes need two GPUs (run with CUDA_VISIBLE_DEVICES= to time two CPU processes)")
        return {}
    threads = args.threads or len(os.sched_getaffinity(0))
    print(f"\n(c) torchrun, {'CPU (ACCELERATE_USE_CPU=true)' if on_cpu else 'one GPU per process'}: each process "
          f"trains {args.steps} steps and samples 2 batches", flush=True)
    found = {}
    for processes in (1, 2):
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        if on_cpu:   # the same threads either way: shared out among the processes
            env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS=str(max(1, threads // processes)))
        with tempfile.TemporaryDirectory(prefix="condiff-bench-") as tmp:
            out = Path(tmp) / "result.json"
            passed = {"--size": args.size, "--steps": args.steps, "--warmup": args.warmup,
                      "--sample-batch": args.sample_batch, "--sample-steps": args.sample_steps}
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                       __file__, "--worker", str(out)] + [f"{k}={v}" for k, v in passed.items() if v is not None]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"  {processes} process(es) failed:\n{done.stderr[-2000:]}")
                return found
            found[processes] = json.loads(out.read_text())
    print(f"\n  {'processes':<10} {'threads each':>12} {'train steps/s (sum)':>20} {'train images/s':>15} "
          f"{'sample images/s':>16}")
    rates = {}
    for processes, result in found.items():
        step = max(r["step"] for r in result["ranks"])   # in lockstep under DDP: the slowest sets the pace
        seconds = max(r["sample_seconds"] for r in result["ranks"])
        rates[processes] = (processes / step, processes * result["batch"] / step, result["images"] / seconds)
        each = max(1, threads // processes) if on_cpu else torch.get_num_threads()
        print(f"  {processes:<10} {each:>12} {rates[processes][0]:20.2f} {rates[processes][1]:15.1f} "
              f"{rates[processes][2]:16.1f}")
    if len(rates) == 2:
        print(f"  2 processes / 1 process, images/s: train {rates[2][1] / rates[1][1]:.3f}, "
              f"sample {rates[2][2] / rates[1][2]:.3f}")
    return found


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker is not None:
        return worker(args)
    setup = Setup(args)
    device = setup.device
    if args.precisions is None:   # fp16 on a CPU: accelerate ignores it, autocast emulates it (about 10x slower)
        args.precisions = ["no", "bf16"] if device.type == "cpu" else list(PRECISIONS)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}"
    load = os.getloadavg()
    print(f"condiff throughput benchmark, --size {args.size}: {setup.config.model.kind} "
          f"{setup.config.model.block_out_channels or 'preset'} ({sum(p.numel() for p in setup.model.parameters()):,} "
          f"parameters), data {setup.dataset.name} {tuple(setup.dataset.data.shape)}")
    print(f"  device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpus available {len(os.sched_getaffinity(0))}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"  mixed precisions {' '.join(args.precisions)}; the paper config's train settings (lr {setup.train.lr}, "
          f"warm-up {setup.train.warmup_steps}, clip {setup.train.grad_clip}), EMA and checkpoints off", flush=True)
    start = time.perf_counter()
    results = {"train": time_training(setup, args), "sample": time_sampling(setup, args)}
    results["processes"] = {} if args.skip_multiprocess else time_processes(args)
    load = os.getloadavg()
    print(f"\n{time.perf_counter() - start:.1f} s; load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
