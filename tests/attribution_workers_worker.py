"""Run by test_attribution_workers.py under torchrun (or alone): the validation protocol of a tiny Gaussian
mixture into argv[1], its models shared out between the processes, as independent workers."""

import sys
from pathlib import Path

import torch

from condiff.config import config_from_dict
from condiff.validation.reproduce import reproduce_attribution
from condiff.validation.counterfactual import ValidationSettings

torch.set_num_threads(1)
output = Path(sys.argv[1])
MIXTURE = {"name": "mixture", "output_dir": str(output / "full"),
           "data": {"dataset": "gmm", "means": [[-2.0, -2.0], [2.0, -2.0], [-2.0, 2.0], [2.0, 2.0]], "std": 0.5,
                    "per_class": 15},
           "model": {"kind": "mlp", "hidden": 32, "layers": 1},
           "train": {"steps": 60, "batch_size": 32, "lr": 2e-3, "warmup_steps": 5, "checkpoint_every": 60,
                     "ema_decay": 0.0},
           "sample": {"num_samples": 8, "batch_size": 8, "steps": 4}}
SETTINGS = ValidationSettings(num_subsets=4, seeds=2, ensemble=2, num_targets=4, held_out_targets=2, steps=(300,),
                              train_timesteps=(4,), dimensions=(64,), checkpoints=2, measured_timesteps=2,
                              resamplings=2, ridges=(0.1, 1.0), sampling_steps=5, removal_targets=1,
                              removal_steps=(300,), removal_draws=1, resamples=50, projection="gaussian",
                              journeys=1)
reproduce_attribution(output, config=config_from_dict(MIXTURE), settings=SETTINGS, progress=False)
