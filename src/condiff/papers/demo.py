"""`condiff demo`: the paper's Figure 1 on the embedded 8x8 digits.

Digits 4, 5 and 7 are kept at a quarter of the other classes. An unconstrained and a constrained
model (target share 0.1 for each) are trained with equal budgets (same steps, same data batch; the constrained one
uses the mixture estimator, so its steps cost the same), both are evaluated with condiff's own
classifier, and runs/demo/report.md puts them side by side.
"""

from __future__ import annotations

from pathlib import Path

import torch

import condiff.runtime as runtime
from condiff.config import CONFIG_DIR, ExperimentConfig, describe_constraints, load_config
from condiff.report import image_md, markdown_table, write_report
from condiff.rundir import create_output_directory
from condiff.lifecycle.evaluation import (RunEvaluation, class_share_rows, describe_multipliers, evaluate_run,
                                          plot_runs_side_by_side)
from condiff.lifecycle.training import train_run, with_seed_offset

DEMO_CONFIGS = {"unconstrained": "digits-minority-unconstrained.toml", "constrained": "digits-minority.toml"}
# The 5-minute budget on a 2-core CPU: 1,000 DDIM samples per model (a share of 0.1 then has a standard deviation
# of 0.0095); `condiff reproduce digits-minority` evaluates the same models on the configs' 2,000.
DEMO_SAMPLES = 1000


def demo_configs(output: Path, seed: int = 0, steps: int | None = None) -> dict[str, ExperimentConfig]:
    """Both models' configs: runs under `output`, training and sampling seeds offset by `seed` (the data stay the
    same), `steps` training steps when given."""
    configs = {name: with_seed_offset(load_config(CONFIG_DIR / file), seed) for name, file in DEMO_CONFIGS.items()}
    for name, config in configs.items():
        config.output_dir = str(output / name)
        if steps is not None:
            config.train.steps = steps
            config.train.warmup_steps = min(config.train.warmup_steps, steps // 10)
    return configs


def train_and_evaluate(config: ExperimentConfig, device, progress: bool) -> RunEvaluation:
    """One model of the demo trained and evaluated."""
    print(f"== {Path(config.output_dir).name}: {config.train.steps} steps", flush=True)
    run_dir = train_run(config)
    return evaluate_run(run_dir, num_samples=DEMO_SAMPLES, device=device, progress=progress, resample=True)


def train_side_by_side(configs: dict[str, ExperimentConfig], device, progress: bool) -> dict[str, RunEvaluation]:
    """Both models at once, a worker process each (one after the other under a multi-process launch)."""
    return runtime.run_side_by_side(train_and_evaluate, {name: (config, device, progress)
                                                         for name, config in configs.items()})


def run_demo(output: Path, *, overwrite: bool = False, steps: int | None = None, seed: int = 0,
             device: str | torch.device | None = None, progress: bool = True) -> Path:
    """Train, evaluate and compare both models under `output` (evaluated on `device`, default the
    accelerator's); returns the report's path. `overwrite` replaces only a directory condiff made.
    `seed` offsets the training and sampling seeds of both models (the data stay the same). A single process
    trains the two models side by side in two worker processes; under a multi-process launch, one after the other."""
    configs = demo_configs(Path(output), seed, steps)
    output = create_output_directory(output, "demo", overwrite=overwrite)
    results = train_side_by_side(configs, device, progress)
    if not runtime.process_state().is_main_process:
        return output / "report.md"

    plot_runs_side_by_side(output, results, "digits 4, 5, 7 under-represented")
    table = markdown_table(
        ["model", "class TV to uniform", "Frechet distance (FD)", "classifier held-out accuracy", "samples"],
        [[n, r.tv_to_uniform, r.frechet_distance, r.classifier_accuracy, r.num_samples]
         for n, r in results.items()])
    ratio = results["constrained"].tv_to_uniform / max(results["unconstrained"].tv_to_uniform, 1e-12)
    constrained = configs["constrained"]
    multipliers = describe_multipliers(results["constrained"].multipliers)
    shares = markdown_table(["class", "data share", "Theorem 1 share", "sampled share", "95% interval"],
                            class_share_rows(results["constrained"]))
    result, cons = results["constrained"], constrained.constraints
    requested = "Requested against sampled (" + cons.mode + "): " + ", ".join(
        f"digit {c}: {target:g} -> {result.class_frequencies[c]:.3f} [{result.class_frequencies_low[c]:.3f}, "
        f"{result.class_frequencies_high[c]:.3f}]" for c, target in zip(cons.classes, cons.target_shares or [])) + ". "
    return write_report(output / "report.md", "condiff demo: minority digits 4, 5, 7", [
        ("Setup", f"8x8 digits, {constrained.data.per_class} training images per class and "
                  f"{constrained.data.class_counts[4]} for each of digits 4, 5, 7. Both models: "
                  f"{constrained.train.steps} steps of batch {constrained.train.batch_size}, UNet "
                  f"`{constrained.model.kind}`, DDIM-{constrained.sample.steps} sampling. The constrained model "
                  f"has {describe_constraints(constrained)}. "
                  f"Training seed {constrained.train.seed}, sampling seed {constrained.sample.seed}."),
        ("Results", table + f"\n\n{requested if cons.target_shares else ''}Constrained / unconstrained class TV "
                    f"to uniform: {ratio:.3f}. FD is a Frechet "
                    "distance on the features of condiff's own digits classifier against a class-balanced "
                    "reference set (not Inception FID)."),
        ("Class frequencies", image_md("class_frequencies.png", "class frequencies")
         + f"\n\nConstrained model, final multipliers {multipliers}; shares predicted by Theorem 1 from them "
           "beside the sampled ones (under measured control the multipliers are moved until the sampled shares, "
           "not Theorem 1's, meet the request):\n\n" + shares),
        ("Samples", "\n\n".join(f"{n}:\n\n" + image_md(f"{n}/samples.png", f"{n} samples") for n in results)),
        ("Training curves", image_md("training_curves.png", "losses and multipliers")),
    ])
