"""Attribution's cost on this machine, as ratios measured side by side in one run.

1. Featurization against training, same model, same device, same threads: image-timesteps per second of
   `GradientFeaturizer.train_features` (K = 10 timesteps, batch 32, sparse projection to 2,048: what
   `condiff attribute` runs) over images per second of a plain diffusers training step (batch 64, AdamW;
   `step_time.plain_diffusers_loop`), on the digits, for the digits-attribution UNet (`unet8`, widths 16, 32)
   and the default `unet8` (32, 64). Goal: at least 0.5. Rounds alternate the two; the torch.func path (the
   fallback for models with a layer no hook rule covers) is timed once per model for comparison.
2. Featurization in several processes (torchrun, CPU; skip with --skip-processes): `stored_train_features`,
   which every process of `condiff attribute` calls, with 2 processes x 1 thread against 1 process x 1 thread
   (goal: at least 1.6) and against 1 process x 2 threads.
3. End to end (skip with --skip-end-to-end): a short `unet8` run on all 1,797 digits, then
   `attribute_run` (what `condiff attribute` calls) featurizing them and attributing one target at 5 steps,
   then the same again with the features on disk (`--resume`).

    .venv/bin/python benchmarks/attribution_budget.py [--rounds 5] [--threads 1] [--examples 384]
                                                      [--device cuda] [--skip-processes]
                                                      [--skip-end-to-end] [--train-steps 100]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from condiff.attribution.features import GradientFeaturizer, timestep_grid
from condiff.attribution.projector import SparseProjector
from condiff.attribution.store import stored_train_features
from condiff.config import TrainConfig, config_from_dict
from condiff.lifecycle.build import build_noise_scheduler
from condiff.models import build_model
from condiff.runtime import end_processes, process_state, resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import make_dataset, plain_diffusers_loop  # noqa: E402

MODELS = {"digits-attribution unet8 (16, 32)": (16, 32), "unet8 (32, 64)": (32, 64)}
TIMESTEPS, DIMENSION, BATCH, TRAIN_BATCH = 10, 2048, 32, 64


def digits_scheduler():
    """The DDPM noise schedule of a digits run."""
    return build_noise_scheduler(config_from_dict({"name": "bench", "data": {"dataset": "digits"}}), True)


def featurizer_of(widths: tuple[int, ...], device: torch.device) -> GradientFeaturizer:
    """The featurizer `condiff attribute` builds, for a seeded unet8 of `widths` on `device`."""
    torch.manual_seed(0)
    model = build_model("unet8", (1, 8, 8), block_out_channels=list(widths)).to(device)
    projector = SparseProjector(sum(p.numel() for p in model.parameters()), DIMENSION, seed=0, device=device)
    return GradientFeaturizer(model, digits_scheduler().alphas_cumprod, projector, batch_size=BATCH)


def featurization_rate(featurizer: GradientFeaturizer, data: torch.Tensor) -> float:
    """Image-timesteps per second of `train_features` on `data`, after a one-batch warm-up."""
    featurizer.train_features(data[:BATCH], timestep_grid(TIMESTEPS))
    start = time.perf_counter()
    featurizer.train_features(data, timestep_grid(TIMESTEPS))
    return len(data) * TIMESTEPS / (time.perf_counter() - start)


def training_rate(featurizer: GradientFeaturizer, data, steps: int = 17) -> float:
    """Images per second of a plain diffusers training step of a copy of the featurizer's model (median
    step, the first dropped as a warm-up)."""
    stamps = plain_diffusers_loop(copy.deepcopy(featurizer.model), digits_scheduler(), data,
                                  TrainConfig(batch_size=TRAIN_BATCH), steps, featurizer.device)
    return TRAIN_BATCH / statistics.median(np.diff(stamps))


def against_training(args) -> None:
    dataset, device = make_dataset("unet8"), resolve_device(args.device)
    featurizers = {name: featurizer_of(widths, device) for name, widths in MODELS.items()}
    ratios = {name: [] for name in MODELS}
    print(f"1. featurization image-timesteps/s over training images/s (K = {TIMESTEPS}, batch {BATCH}, sparse k = "
          f"{DIMENSION}; training batch {TRAIN_BATCH}), {device}, {torch.get_num_threads()} thread(s), goal >= 0.5",
          flush=True)
    for round_index in range(args.rounds):
        for name, featurizer in featurizers.items():
            train, featurize = training_rate(featurizer, dataset), featurization_rate(featurizer, dataset.data[:128])
            ratios[name].append(featurize / train)
            print(f"  round {round_index + 1} {name}: training {train:.0f} images/s, featurization {featurize:.0f} "
                  f"image-timesteps/s, ratio {featurize / train:.2f}", flush=True)
    for name, featurizer in featurizers.items():
        functional = copy.copy(featurizer)
        functional.hooked = None   # the torch.func fallback
        rate, train = featurization_rate(functional, dataset.data[:BATCH]), training_rate(featurizer, dataset)
        print(f"  {name}: ratio median {statistics.median(ratios[name]):.2f} (range {min(ratios[name]):.2f}-"
              f"{max(ratios[name]):.2f}); torch.func path {rate / train:.2f}")


def worker(args) -> None:
    """In every torchrun process: featurize `--examples` digits into one store; the main process writes the
    image-timesteps per second of the whole (warm-up excluded)."""
    torch.set_num_threads(args.threads)
    state = process_state()
    featurizer = featurizer_of(MODELS["digits-attribution unet8 (16, 32)"], state.device)
    data = make_dataset("unet8").data[:args.examples]
    featurizer.train_features(data[:BATCH], timestep_grid(TIMESTEPS))
    state.wait_for_everyone()
    start = time.perf_counter()
    stored_train_features(featurizer, data, args.worker.with_name("features-bench.npy"), timestep_grid(TIMESTEPS),
                          seed=0, dimension=DIMENSION, batch_size=BATCH, resume=False, progress=False)
    seconds = time.perf_counter() - start   # the store returns once every process is done
    if state.is_main_process:
        args.worker.write_text(json.dumps({"rate": len(data) * TIMESTEPS / seconds}))
    end_processes()


def in_processes(args) -> None:
    print(f"\n2. featurization of {args.examples} digits (digits-attribution unet8) under torchrun, CPU", flush=True)
    rates = {}
    for processes, threads in ((1, 1), (1, 2), (2, 1)):
        env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true", OMP_NUM_THREADS=str(threads))
        with tempfile.TemporaryDirectory(prefix="condiff-bench-") as tmp:
            out = Path(tmp) / "result.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                       str(processes), __file__, "--worker", str(out), "--threads", str(threads),
                       "--examples", str(args.examples)]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"  {processes} process(es) x {threads} thread(s) failed:\n{done.stderr[-2000:]}")
                return
            rates[processes, threads] = json.loads(out.read_text())["rate"]
        print(f"  {processes} process(es) x {threads} thread(s): {rates[processes, threads]:.0f} image-timesteps/s",
              flush=True)
    print(f"  2 processes x 1 thread over 1 process x 1 thread: {rates[2, 1] / rates[1, 1]:.2f} (goal >= 1.6); "
          f"over 1 process x 2 threads: {rates[2, 1] / rates[1, 2]:.2f}")


def end_to_end(args) -> None:
    from condiff.audit.attribute import attribute_run
    from condiff.audit.results import AttributionSettings
    from condiff.lifecycle.training import train_run

    config = config_from_dict({
        "name": "digits-all", "output_dir": str(Path(args.output) / "run"),
        "data": {"dataset": "digits", "held_out_per_class": 0}, "model": {"kind": "unet8"},
        "train": {"steps": args.train_steps, "batch_size": 64, "warmup_steps": 10,
                  "checkpoint_every": args.train_steps}})
    run = train_run(config, overwrite=True)
    settings = AttributionSettings(output="dtrak", num_targets=1, steps=(900, 700, 500, 300, 100), train_timesteps=10)
    start = time.perf_counter()
    result = attribute_run(run, settings, overwrite=True)
    first = time.perf_counter() - start
    start = time.perf_counter()
    attribute_run(run, settings, resume=True)
    again = time.perf_counter() - start
    num_train = np.load(result.directory / "scores.npy", mmap_mode="r").shape[0]
    print(f"\n3. end to end, {num_train} training examples, unet8 (32, 64)")
    print(f"  featurize (K = 10, k = {settings.dimension} {settings.projection}) + attribute 1 target x 5 steps: "
          f"{first:.1f} s (budget: featurizing at most 300 s)")
    print(f"  attribute 1 target x 5 steps with the features on disk (--resume): {again:.1f} s (budget: 60 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of part 1 (and of a worker)")
    parser.add_argument("--device", help="of part 1 (default: accelerate's choice)")
    parser.add_argument("--examples", type=int, default=384, help="digits featurized in part 2")
    parser.add_argument("--skip-processes", action="store_true")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--output", default="/tmp/condiff-attribution-budget")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args)
    torch.set_num_threads(args.threads)
    against_training(args)
    if not args.skip_processes:
        in_processes(args)
    if not args.skip_end_to_end:
        end_to_end(args)


if __name__ == "__main__":
    main()
