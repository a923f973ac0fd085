"""The attribution budget of issue 12 on this machine: featurizing all 1,797 digits with K = 10 under the
digits UNet (`unet8`), then attributing one target at 5 steps once the features exist (`--resume`).

A short run of all ten digits (no held-out images, so the training set is the whole of scikit-learn's
1,797) is trained first (its quality does not change the cost); both times are wall times of
`condiff.experiments.attribution.attribute_run`, the function `condiff attribute` calls.

    .venv/bin/python benchmarks/attribution_budget.py [--train-steps 100] [--output /tmp/condiff-budget]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from condiff.config import config_from_dict
from condiff.experiments.attribution import AttributionSettings, attribute_run
from condiff.experiments.training import train_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--output", default="/tmp/condiff-attribution-budget")
    args = parser.parse_args()
    config = config_from_dict({
        "name": "digits-all", "output_dir": str(Path(args.output) / "run"),
        "data": {"dataset": "digits", "held_out_per_class": 0}, "model": {"kind": "unet8"},
        "train": {"steps": args.train_steps, "batch_size": 64, "warmup_steps": 10, "checkpoint_every": args.train_steps}})
    run = train_run(config, overwrite=True)

    settings = AttributionSettings(num_targets=1, steps=(900, 700, 500, 300, 100), train_timesteps=10)
    start = time.perf_counter()
    result = attribute_run(run, settings, overwrite=True)
    first = time.perf_counter() - start
    start = time.perf_counter()
    attribute_run(run, settings, resume=True)
    again = time.perf_counter() - start
    num_train = np.load(result.directory / "scores.npy", mmap_mode="r").shape[0]
    print(f"training examples: {num_train}")
    print(f"featurize (K = 10, k = {settings.dimension} {settings.projection}) + attribute 1 target x 5 steps: "
          f"{first:.1f} s (budget: featurizing at most 300 s)")
    print(f"attribute 1 target x 5 steps with the features on disk (--resume): {again:.1f} s (budget: 60 s)")


if __name__ == "__main__":
    main()
