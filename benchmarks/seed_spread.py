"""How much a headline rests on one seed: `condiff demo` (or `condiff reproduce EXPERIMENT`) with the
training and sampling seeds offset by 0, 1, 2 (same data), each model's class TV to uniform and FD, and
the constrained / unconstrained TV ratio's mean and range over the seeds.

    .venv/bin/python benchmarks/seed_spread.py [--experiment demo|mnist-minority|fashion-minority]
                                               [--seeds 3] [--output /tmp/condiff-seed-spread]

A reproduction takes about an hour per seed on 2 cores: an interrupted run continues where it stopped
when started again with the same --output (finished seeds and models are kept).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from condiff.experiments.demo import run_demo
from condiff.experiments.reproduce import reproduce
from condiff.rundir import is_condiff_directory


def run_seed(experiment: str, folder: Path, seed: int) -> None:
    if experiment == "demo":
        run_demo(folder, overwrite=True, seed=seed, progress=False)
    else:
        reproduce(experiment, folder, resume=is_condiff_directory(folder), seed=seed, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", choices=["demo", "mnist-minority", "fashion-minority"], default="demo")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--output", default="/tmp/condiff-seed-spread")
    args = parser.parse_args()
    ratios = []
    for seed in range(args.seeds):
        folder = Path(args.output) / f"{args.experiment}-seed-{seed}"
        run_seed(args.experiment, folder, seed)
        tv = {name: json.loads((folder / name / "evaluation.json").read_text())
              for name in ("unconstrained", "constrained")}
        ratios.append(tv["constrained"]["tv_to_uniform"] / tv["unconstrained"]["tv_to_uniform"])
        print(f"seed offset {seed}: TV {tv['unconstrained']['tv_to_uniform']:.3f} -> {tv['constrained']['tv_to_uniform']:.3f} "
              f"(ratio {ratios[-1]:.3f}); FD {tv['unconstrained']['frechet_distance']:.2f} -> "
              f"{tv['constrained']['frechet_distance']:.2f}", flush=True)
    print(f"{args.experiment}: constrained / unconstrained TV over {args.seeds} seeds: mean {np.mean(ratios):.3f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    main()
