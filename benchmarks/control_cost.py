#!/usr/bin/env python
"""What measured share control costs: training time under `constraints.control = "measured"` over training
time with the multipliers held, same config, side by side in one process.

Per config, both variants train `control_every + 2` steps with the control starting at once, so that the
timed window (steps 2 to control_every + 1: step 1 has no start stamp, the last step writes the final
checkpoint) holds `control_every` steps and exactly one control step, as every control period of a real run
does. Variants alternate over rounds; the table gives the median over rounds of the per-round ratio
measured / held of the window's time (paired within a round, so slow drifts of machine load cancel). A
real run pays this from `control_start` of its training on (0.2 by default) and, once per data set, the
evaluation classifier's training (cached; warmed here before timing).

    .venv/bin/python benchmarks/control_cost.py [--configs digits-minority mnist-minority ...] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from condiff.config import load_config
from condiff.experiments.build import MissingData, build_data, evaluation_classifier
from condiff.experiments.training import CONFIG_DIR, train_run

CONFIGS = ["digits-minority", "mnist-minority", "fashion-minority"]


def window_seconds(config_name: str, control: str, folder: Path) -> float:
    """Seconds of the timed window of one run."""
    config = load_config(CONFIG_DIR / f"{config_name}.toml", {"output_dir": str(folder / control)})
    every = config.constraints.control_every
    config.train.steps, config.train.checkpoint_every = every + 2, every + 2
    config.constraints.control, config.constraints.control_start = control, 0.0
    stamps: list[float] = []
    train_run(config, overwrite=True, on_step=lambda record: stamps.append(time.perf_counter()))
    return stamps[every] - stamps[0]   # steps 2 .. every + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print("| config | control (samples x DDIM steps, every) | held window (s) | measured / held |")
    print("|---|---|---|---|")
    for name in args.configs:
        config = load_config(CONFIG_DIR / f"{name}.toml")
        try:
            evaluation_classifier(config, build_data(config))   # trained once and cached, as a run would
        except MissingData as err:
            print(f"| {name} | skipped: {err} | | |")
            continue
        cons = config.constraints
        held, ratios = [], []
        with tempfile.TemporaryDirectory(prefix="condiff-control-") as tmp:
            for round_ in range(args.rounds):
                order = ("held", "measured") if round_ % 2 == 0 else ("measured", "held")
                seconds = {control: window_seconds(name, control, Path(tmp)) for control in order}
                held.append(seconds["held"])
                ratios.append(seconds["measured"] / seconds["held"])
        print(f"| {name} | {cons.control_samples} x {cons.control_steps}, every {cons.control_every} | "
              f"{statistics.median(held):.1f} | {statistics.median(ratios):.3f} "
              f"({', '.join(f'{r:.3f}' for r in ratios)}) |", flush=True)


if __name__ == "__main__":
    main()
