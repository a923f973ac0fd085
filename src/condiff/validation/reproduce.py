"""`condiff reproduce attribution-digits`: is attribution right? The independent counterfactual validation
(condiff.validation.lds) of configs/digits-attribution.toml, the per-step removal test
(condiff.validation.removal) and journeys of the attributed model, in one report.

`--scale cpu` took 1 h 0 min on two cores with two workers
(`ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m condiff reproduce attribution-digits`,
which shares out the models; one process needs about twice that). `--scale paper` has D-TRAK's protocol sizes,
for GPUs (one H200 with 8 workers trained 8 of its ~330 models in 3 min: a few hours in all). `--scale smoke`
runs the same protocol with a few short trainings (a minute or two: it checks the pipeline, its figures mean
nothing). `--coupled` is the variance-reduction variant (subset models coupled to their seed's full-set random
stream), labelled so.
A reproduction resumes (`--resume`): finished models and features are kept.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from condiff.audit.attribute import attribute_run
from condiff.audit.results import AttributionSettings
from condiff.config import CONFIG_DIR, ArgumentError, ExperimentConfig, load_config
from condiff.rundir import create_or_resume_directory, write_json_atomic
from condiff.lifecycle.build import build_data
from condiff.runtime import independent_workers, resolve_device
from condiff.validation.counterfactual import ValidationSettings
from condiff.validation.lds import linear_datamodeling_scores
from condiff.validation.removal import Removal, removal_effects, removal_plan, train_removals
from condiff.validation.report import write_validation_report

SCALES = {
    "cpu": ({}, ValidationSettings()),
    # D-TRAK's protocol sizes (64 subsets x 3 seeds, K = 10 and 100, k up to 32768) and longer training: for GPUs.
    "paper": ({"train.steps": 5000},
              ValidationSettings(num_subsets=64, seeds=3, ensemble=8, num_targets=200, held_out_targets=50,
                                 dimensions=(2048, 32768), removal_targets=32, removal_steps=(700, 300))),
    "smoke": ({"train.steps": 60, "train.warmup_steps": 5},
              ValidationSettings(num_subsets=6, seeds=2, ensemble=2, num_targets=8, held_out_targets=4,
                                 train_timesteps=(2, 4), checkpoints=2, measured_timesteps=4, resamplings=4,
                                 dimensions=(256,), ridges=(0.01, 1.0), sampling_steps=10, removal_targets=2,
                                 removal_draws=2, resamples=200)),
}


def reproduce_attribution(output: Path, *, scale: str = "cpu", overwrite: bool = False, resume: bool = False,
                          coupled: bool = False, device: str | torch.device | None = None, progress: bool = True,
                          config: ExperimentConfig | None = None, settings: ValidationSettings | None = None) -> Path:
    """Validate attribution on digits (or on `config`'s run, with `settings`, from Python) into `output`;
    returns output/report.md. Under torchrun, the processes share out the models (the main one reports)."""
    workers = independent_workers()   # before anything asks accelerate for its state
    if scale not in SCALES:
        raise ArgumentError("scale", f"{scale}: attribution-digits has the scales {', '.join(SCALES)}")
    overrides, scale_settings = SCALES[scale]
    settings = replace(settings or scale_settings, coupled=coupled or (settings or scale_settings).coupled)
    config = config or load_config(CONFIG_DIR / "digits-attribution.toml", overrides)
    data = build_data(config)
    settings.validated(len(data.train))
    output = create_or_resume_directory(output, "reproduce", resume=resume, overwrite=overwrite, create=workers.is_main)
    workers.barrier("created")   # nobody writes into the output before the main worker has made it
    device = resolve_device(device)
    validation = linear_datamodeling_scores(config, data, output, settings, workers, device=device, progress=progress)
    plan_file = output / "removal_plan.json"
    if workers.is_main:
        plan = removal_plan(validation.choices, validation.targets, settings, len(data.train))
        write_json_atomic(plan_file, [asdict(r) for r in plan])
    workers.barrier("plan")
    plan = [Removal(**r) for r in json.loads(plan_file.read_text())]
    train_removals(config, output, plan, len(data.train), workers, progress)
    workers.leave()
    if not workers.is_main:
        return output / "report.md"
    effects = removal_effects(validation.models.full, output, plan, validation.targets, settings, device=device,
                              progress=progress)
    sample = next(r for r in validation.results if r.quantity == "sample")
    chosen = validation.choices["sample"].trak.config
    journeys = AttributionSettings(num_targets=settings.journeys, output=chosen.output,
                                   train_timesteps=chosen.train_timesteps, dimension=chosen.dimension,
                                   projection=settings.projection,
                                   sampling_steps=settings.sampling_steps, seed=settings.seed,
                                   ridge=sample.trak.ridge, checkpoints=1,
                                   models=tuple(str(p) for p in validation.models.full[1:chosen.models]))
    attribute_run(output / "full", journeys, resume=True, device=device, progress=progress)
    return write_validation_report(output, config, scale, len(data.train), validation, plan, effects)
