#!/usr/bin/env python
"""What measured share control costs: the time of a control step (sampling with a few solver steps,
labelling, the dual step) against the training steps it steers, measured inside one training run.

Per config, one run with `constraints.control = "measured"` trains `periods x control_every + 2` steps with
the control starting at once, so that it holds `periods` control steps; step times are the gaps between
consecutive `on_step` calls (the first step has no start stamp, the last writes the final checkpoint: both
dropped). A control step's cost is its time less the median training step's, so the control and the steps
it is compared with share the machine's state of the moment (on this 2-core CPU, whole runs differ by up to
30% from one minute to the next, which a ratio of two runs cannot resolve). The table gives the median
over control steps of

* per period: cost / (control_every x median step), the share the control adds while it runs;
* per run: that cost times the control steps of a default run (from `control_start` on) over the run's
  training time, i.e. what a whole run with the config's settings pays.

The evaluation classifier is trained (and cached) before timing, as a real run does once per data set.

`--reference-samples N` sets `constraints.control_reference_samples` (paired draws with the evaluation's
sampler that correct the control's reading; the configs' own value otherwise).

    .venv/bin/python benchmarks/control_cost.py [--configs digits-minority mnist-minority ...] [--periods 4]
        [--reference-samples N]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

from condiff.config import CONFIG_DIR, load_config
from condiff.lifecycle.build import MissingData, build_data, evaluation_classifier
from condiff.lifecycle.training import train_run

CONFIGS = ["digits-minority", "mnist-minority", "fashion-minority"]


def step_seconds(config, periods: int, folder: Path) -> list[float]:
    """Seconds of steps 2 .. periods x every + 1 of a measured-control run, by step number."""
    every = config.constraints.control_every
    config.output_dir = str(folder)
    config.train.steps = config.train.checkpoint_every = periods * every + 2
    config.constraints.control, config.constraints.control_start = "measured", 0.0
    stamps: list[float] = []
    train_run(config, overwrite=True, on_step=lambda record: stamps.append(time.perf_counter()))
    return [later - earlier for earlier, later in zip(stamps, stamps[1:-1])]   # index i: step i + 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--periods", type=int, default=4)
    parser.add_argument("--reference-samples", type=int, default=None)
    args = parser.parse_args()
    overrides = ({} if args.reference_samples is None
                 else {"constraints.control_reference_samples": args.reference_samples})
    print("| config | control (samples x solver steps, every) | median step (s) | control step (s) "
          "| per period | per run |")
    print("|---|---|---|---|---|---|")
    for name in args.configs:
        config = load_config(CONFIG_DIR / f"{name}.toml", overrides)
        try:
            evaluation_classifier(config, build_data(config))
        except MissingData as err:
            print(f"| {name} | skipped: {err} | | | | |")
            continue
        cons, steps = config.constraints, config.train.steps
        first = max(1, math.ceil(cons.control_start * steps))
        controls_per_run = sum(1 for step in range(first, steps + 1) if step % cons.control_every == 0)
        with tempfile.TemporaryDirectory(prefix="condiff-control-") as tmp:
            seconds = step_seconds(load_config(CONFIG_DIR / f"{name}.toml", overrides), args.periods, Path(tmp))
        every = cons.control_every
        control_steps = {i: s for i, s in enumerate(seconds) if (i + 2) % every == 0}
        median_step = statistics.median(s for i, s in enumerate(seconds) if i not in control_steps)
        cost = statistics.median(control_steps.values()) - median_step
        paired = (f" + {cons.control_reference_samples} x {config.sample.steps} {config.sample.method}"
                  if cons.control_reference_samples else "")
        print(f"| {name} | {cons.control_samples} x {cons.control_steps} {cons.control_method}{paired}, every {every} | "
              f"{median_step:.3f} | {cost:.2f} | {cost / (every * median_step):.3f} | "
              f"{controls_per_run * cost / (steps * median_step):.3f} |", flush=True)


if __name__ == "__main__":
    main()
