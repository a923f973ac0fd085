#!/usr/bin/env python
"""Where a run's Frechet distance comes from: the mixture of classes it generates, or the samples within each
class. For each evaluated run (RUN/samples.npz and its evaluation classifier, as `condiff evaluate` left them),
the FD of all its samples against the class-balanced reference (what evaluation.json reports), the FD of
class-balanced subsets (the same number of samples of every class as the classifier labels them, averaged
over draws: the class mixture's part taken out) and the classes' counts.

    .venv/bin/python benchmarks/fd_by_class.py RUN [RUN ...] [--per-class 85] [--draws 20]

Runs are best compared at the same --per-class (FD grows as samples shrink). On the demo's data (2026-12-06,
digits-minority seeds 5 and 6 of `benchmarks/seed_spread.py`, held multipliers, measured control, and held
multipliers fixed from step 0 at measured control's final ones): docs/share-control.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from condiff.evaluation.classifier import features_and_labels
from condiff.evaluation.metrics import frechet_distance
from condiff.lifecycle.build import evaluation_classifier, load_run_config
from condiff.lifecycle.evaluation import load_evaluation_data, reference_set
from condiff.rundir import RunDirectory
from condiff.sampling.generate import load_samples


def fd_by_class(run: Path, per_class: int, draws: int, seed: int = 0) -> dict:
    """FD of the run's samples, mean and standard error of the class-balanced subsets' FD, the class counts."""
    config = load_run_config(run)
    data = load_evaluation_data(config, run)
    reference = reference_set(config, data)
    classifier, _ = evaluation_classifier(config, data)
    samples = torch.from_numpy(load_samples(RunDirectory(run).samples_file)[0])
    features, labels = features_and_labels(classifier, samples)
    reference_features, _ = features_and_labels(classifier, reference.data)
    counts = np.bincount(labels, minlength=reference.num_classes)
    if counts.min() < per_class:
        raise SystemExit(f"{run}: class {counts.argmin()} has {counts.min()} samples, fewer than --per-class "
                         f"{per_class}")
    rng, by_class = np.random.default_rng(seed), [np.flatnonzero(labels == c) for c in range(len(counts))]
    balanced = [frechet_distance(features[np.concatenate([rng.choice(i, per_class, replace=False) for i in by_class])],
                                 reference_features) for _ in range(draws)]
    return {"fd": frechet_distance(features, reference_features), "balanced": float(np.mean(balanced)),
            "balanced_se": float(np.std(balanced) / np.sqrt(draws)), "counts": counts.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--per-class", type=int, default=85, help="samples of every class in a balanced subset")
    parser.add_argument("--draws", type=int, default=20, help="balanced subsets per run")
    args = parser.parse_args()
    print(f"| run | FD | FD, {args.per_class} per class (mean of {args.draws}) | class counts |\n|---|---|---|---|")
    for run in tqdm(args.runs, desc="runs"):
        found = fd_by_class(run, args.per_class, args.draws)
        print(f"| {run} | {found['fd']:.2f} | {found['balanced']:.2f} +- {found['balanced_se']:.2f} | "
              f"{' '.join(map(str, found['counts']))} |")


if __name__ == "__main__":
    main()
