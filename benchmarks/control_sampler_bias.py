#!/usr/bin/env python
"""Which few-step sampler sees the class shares that the evaluation's sampler generates: for each trained run,
the shares of its constrained classes among the same initial noises drawn with DDIM-50 (what `condiff evaluate`
samples with) and with the candidates for measured share control (DDIM and DPM-Solver++ at a few steps), read
by the run's evaluation classifier. The same noises make the differences the samplers' own, not sampling noise.

    .venv/bin/python benchmarks/control_sampler_bias.py RUN [RUN ...] [--samples 2000]

On the demo's data (2026-12-06; three runs of digits-minority with held multipliers and an EMA, training seeds 2,
3, 4; digits 4, 5, 7; 2,000 noises), the mean of (share - DDIM-50's share) over the nine class-run pairs was
-0.0096 for DDIM-10, -0.0038 for DDIM-20, -0.0032 for DPM-Solver++-10 (mean absolute 0.0049) and -0.0106 for
DPM-Solver++-5: measured control steering DDIM-10 shares to 0.1 leaves the evaluated ones near 0.11.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from condiff.lifecycle.build import build_data, evaluation_classifier, load_pipeline, load_run_config
from condiff.sampling.generate import generate, sampling_scheduler

SAMPLERS = [("ddim", 50), ("ddim", 10), ("ddim", 20), ("dpm++", 10), ("dpm++", 5), ("dpm++", 20)]


def labels(run: Path, num_samples: int) -> tuple[list[int], dict[str, torch.Tensor]]:
    """The constrained classes, and per sampler the classifier's labels of `num_samples` samples from the same
    noises."""
    config = load_run_config(run)
    classifier, _ = evaluation_classifier(config, build_data(config))
    classifier.eval()
    pipeline = load_pipeline(run)
    classes = config.constraints.classes
    found = {}
    for method, steps in SAMPLERS:
        samples = generate(pipeline.unet, sampling_scheduler(pipeline.scheduler, method), num_samples,
                           num_inference_steps=steps, seed=123, batch_size=num_samples, progress=False).samples
        with torch.no_grad():
            found[f"{method}-{steps}"] = classifier(samples.clamp(-1, 1)).argmax(1)
    return classes, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    differences = {f"{m}-{s}": [] for m, s in SAMPLERS[1:]}
    changed = {name: [] for name in differences}
    for run in args.runs:
        classes, found = labels(run, args.samples)
        shares = {name: np.array([(found_labels == c).float().mean().item() for c in classes])
                  for name, found_labels in found.items()}
        print(f"{run}: " + "; ".join(f"{name} {', '.join(f'{v:.3f}' for v in values)}" for name, values in shares.items()))
        for name in differences:
            differences[name].append(shares[name] - shares["ddim-50"])
            changed[name].append((found[name] != found["ddim-50"]).float().mean().item())
    print("\n| sampler | mean (share - DDIM-50's) | mean abs | samples of another class than DDIM-50's |\n|---|---|---|---|")
    for name, values in differences.items():
        values = np.concatenate(values)
        print(f"| {name} | {values.mean():+.4f} | {np.abs(values).mean():.4f} | {np.mean(changed[name]):.3f} |")


if __name__ == "__main__":
    main()
