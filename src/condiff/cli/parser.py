"""The command line's flags, one function per command; a usage error is one line like every other refusal."""

from __future__ import annotations

import argparse
import math
import sys

from condiff.config import INT_LIMIT, ConfigError

from condiff.cli.commands import (
    cmd_attribute,
    cmd_autoencoder,
    cmd_demo,
    cmd_evaluate,
    cmd_guidance_lab,
    cmd_noise_classifier,
    cmd_reproduce,
    cmd_sample,
    cmd_train,
)

DEVICE_HELP = "where models run, e.g. cuda, cuda:1, cpu (default: the accelerator's device, CUDA when present)"



def integer(text: str) -> int:
    """An integer flag: refused beyond 64 bits, which no count, index or seed can use."""
    value = int(text)   # a ValueError: argparse's "invalid integer value"
    if not -INT_LIMIT <= value < INT_LIMIT:
        raise argparse.ArgumentTypeError(f"{text} is beyond 64-bit integers")
    return value


def number(text: str) -> float:
    """A real-valued flag: a finite number (a NaN or an infinity means nothing to any of them)."""
    value = float(text)   # a ValueError: argparse's "invalid number value"
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other refusal (not the usage, then the error)."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a (constrained) diffusion model from a TOML config")
    p.add_argument("config", help="experiment config, e.g. configs/digits-minority.toml; with --resume also a run "
                                  "directory (resumed from its own config, wherever it lies)")
    p.add_argument("--resume", action="store_true", help="continue the run from its newest complete checkpoint "
                                                         "(--set train.lr=... to continue a diverged run more slowly)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run directory if condiff created it (never a folder of your own)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=200 (repeatable)")
    p.set_defaults(func=cmd_train)


def add_autoencoder(sub) -> None:
    p = sub.add_parser("autoencoder", help="train a small AutoencoderKL on a config's images, for latent diffusion")
    p.add_argument("config", help="experiment config whose data the autoencoder learns")
    p.add_argument("--output", help="default: the config's latent.autoencoder, else runs/NAME-autoencoder")
    p.add_argument("--steps", type=integer, default=2000, help="training steps (default 2000)")
    p.add_argument("--block-out-channels", type=integer, nargs="+", default=[16, 32],
                   help="encoder widths; each after the first halves the resolution (default 16 32)")
    p.add_argument("--latent-channels", type=integer, default=4, help="default 4")
    p.add_argument("--overwrite", action="store_true", help="replace an autoencoder folder condiff created")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.set_defaults(func=cmd_autoencoder)


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample a trained run: RUN/samples.npz and RUN/samples.png")
    p.add_argument("run", help="run directory")
    p.add_argument("--num-samples", type=integer, help="default: the config's sample.num_samples")
    p.add_argument("--method", choices=["ddim", "ddpm"], help="default: the config's sample.method")
    p.add_argument("--steps", type=integer, help="inference steps; default: the config's sample.steps")
    p.add_argument("--seed", type=integer, help="default: the config's sample.seed")
    p.add_argument("--batch-size", type=integer, help="default: the config's sample.batch_size")
    p.add_argument("--record-x0", action="store_true", help="also store the per-step x0 predictions")
    p.add_argument("--class", type=integer, metavar="C",
                   help="sample class C (written to RUN/samples-classC-KINDETA.npz)")
    p.add_argument("--guidance", type=number, default=0.0, metavar="ETA",
                   help="guidance strength towards --class: (1+ETA) cond - ETA uncond (default 0: plain conditional)")
    p.add_argument("--guidance-kind", choices=["cfg", "classifier"],
                   help="cfg (classifier-free; default for class-conditional models) or classifier "
                        "(needs `condiff noise-classifier RUN`; default for unconditional models)")
    p.add_argument("--device", help=DEVICE_HELP)
    p.set_defaults(func=cmd_sample)


def add_noise_classifier(sub) -> None:
    p = sub.add_parser("noise-classifier", help="train the noise-aware classifier of a run, for classifier guidance")
    p.add_argument("run", help="run directory")
    p.add_argument("--steps", type=integer, default=2000, help="training steps (default 2000)")
    p.add_argument("--overwrite", action="store_true", help="retrain an existing RUN/noise_classifier")
    p.add_argument("--device", help=DEVICE_HELP)
    p.set_defaults(func=cmd_noise_classifier)


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="class frequencies, TV to uniform and Frechet distance of a run")
    p.add_argument("run", help="run directory")
    p.add_argument("--num-samples", type=integer, help="default: the config's sample.num_samples")
    p.add_argument("--device", help=DEVICE_HELP)
    p.set_defaults(func=cmd_evaluate)


class DeprecatedFlag(argparse.Action):
    """An old name of a renamed flag: still read for one release, with a note on stderr naming the new one."""

    def __init__(self, option_strings, dest, *, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"condiff: {option_string} is deprecated, use {self.new} (the old name goes in the next release)",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_attribute(sub) -> None:
    from condiff.audit.results import VALIDATION, AttributionSettings
    defaults = AttributionSettings()   # the validated defaults live there, and only there
    p = sub.add_parser("attribute", help="which training examples guided each step of a run's generations (TRAK)",
                       description=f"Defaults of --output-function, --train-timesteps, --ridge, --checkpoints and "
                                   f"the ensemble size: {VALIDATION}.")
    p.add_argument("run", help="run directory")
    p.add_argument("--samples", type=integer, default=defaults.num_targets,
                   help=f"targets to generate and explain (default {defaults.num_targets})")
    p.add_argument("--seed", type=integer, default=defaults.seed,
                   help=f"seed of the targets and of every noise (default {defaults.seed})")
    p.add_argument("--timesteps", default=",".join(map(str, defaults.steps)),
                   help=f"sampling timesteps to attribute (default {','.join(map(str, defaults.steps))})")
    p.add_argument("--steps", dest="timesteps", action=DeprecatedFlag, new="--timesteps", help=argparse.SUPPRESS)
    p.add_argument("--top", type=integer, default=defaults.top,
                   help=f"helpful and harmful examples shown per step (default {defaults.top})")
    p.add_argument("--output-function", choices=["dtrak", "loss"], default=defaults.output,
                   help=f"D-TRAK's ||eps||^2/d (dtrak) or the denoising loss (loss, Journey-TRAK); "
                        f"default {defaults.output}")
    p.add_argument("--output", dest="output_function", choices=["dtrak", "loss"], action=DeprecatedFlag,
                   new="--output-function", help=argparse.SUPPRESS)
    p.add_argument("--train-timesteps", type=integer, default=defaults.train_timesteps,
                   help=f"K training-side timesteps (default {defaults.train_timesteps})")
    p.add_argument("--resamplings", type=integer, default=defaults.resamplings,
                   help=f"R re-noisings per target (default {defaults.resamplings})")
    p.add_argument("--projection", choices=["sparse", "gaussian"], default=defaults.projection,
                   help=f"default {defaults.projection}")
    p.add_argument("--dimension", type=integer, default=defaults.dimension,
                   help=f"projected dimension k (default {defaults.dimension})")
    p.add_argument("--ridge", type=number, default=defaults.ridge,
                   help=f"c of the ridge c trace(Phi^T Phi) / k (default {defaults.ridge:g})")
    p.add_argument("--samples-file", metavar="NPZ",
                   help="explain the first --samples samples of this file (from `condiff sample --record-x0`) "
                        "instead of new ones")
    p.add_argument("--class", type=integer, metavar="C",
                   help="generate targets of class C (class-conditional runs; default: unconditional, or the class "
                        "the --samples-file was drawn as)")
    p.add_argument("--checkpoints", type=integer, default=defaults.checkpoints, metavar="N",
                   help=f"average the scores of each run's final model and its N-1 newest saved checkpoints "
                        f"(default {defaults.checkpoints})")
    p.add_argument("--models", nargs="+", default=[], metavar="RUN",
                   help="other runs of the same data and architecture (e.g. other train.seed) whose scores are "
                        "averaged in: the ensemble TRAK needs")
    p.add_argument("--journey-every", type=integer, default=defaults.journey_every, metavar="N",
                   help="follow each target over every N-th DDIM step for journey-steps-T.png "
                        f"(default {defaults.journey_every}: every step; 0: none)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="keep the training features a killed run computed")
    group.add_argument("--overwrite", action="store_true", help="replace RUN/attribution")
    p.add_argument("--device", help=DEVICE_HELP)
    p.set_defaults(func=cmd_attribute)


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="minority digits 4, 5, 7: unconstrained vs constrained, with a report")
    p.add_argument("--output", default="runs/demo", help="where the two runs and report.md go")
    p.add_argument("--overwrite", action="store_true", help="replace the demo directory if condiff created it")
    p.add_argument("--steps", type=integer, help="training steps per model (default: the demo configs')")
    p.add_argument("--seed", type=integer, default=0, help="offset of both models' training and sampling seeds")
    p.add_argument("--device", help=DEVICE_HELP)
    p.set_defaults(func=cmd_demo)


def add_guidance_lab(sub) -> None:
    p = sub.add_parser("guidance-lab", help="what guidance does to confidence and diversity: exact Gaussian "
                                            "mixtures (Wu et al. 2024) and condiff-trained models")
    p.add_argument("--output", default="runs/guidance-lab", help="where the figures and report.md go")
    p.add_argument("--overwrite", action="store_true", help="replace the output directory if condiff created it")
    p.add_argument("--exact-only", action="store_true", help="skip the learned models (exact scores only)")
    p.add_argument("--quick", action="store_true", help="reduced sample counts and training (a smoke test)")
    p.set_defaults(func=cmd_guidance_lab)


def add_reproduce(sub) -> None:
    from condiff.papers.reproduce import ATTRIBUTION_EXPERIMENTS, EXPERIMENTS, SCALES
    p = sub.add_parser("reproduce", help="one of the papers' experiments, with a report")
    p.add_argument("experiment", choices=sorted([*EXPERIMENTS, *ATTRIBUTION_EXPERIMENTS]))
    p.add_argument("--scale", choices=sorted({*SCALES, "smoke"}), default="cpu",
                   help="cpu: reduced, for 2 cores (default); paper: the authors' settings, for GPUs; "
                        "smoke: attribution-digits' pipeline in minutes (its figures mean nothing)")
    p.add_argument("--output", help="where the runs and report.md go (default: runs/EXPERIMENT-SCALE)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="replace the output directory if condiff created it")
    group.add_argument("--resume", action="store_true", help="continue an interrupted reproduction")
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--seed", type=integer, default=0, help="offset of every model's training and sampling seeds")
    p.add_argument("--coupled", action="store_true",
                   help="attribution-digits: the labelled variant whose subset models share their seed's random stream")
    p.set_defaults(func=cmd_reproduce)


COMMANDS = (add_train, add_autoencoder, add_sample, add_noise_classifier, add_evaluate, add_attribute, add_demo,
            add_guidance_lab, add_reproduce)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="condiff", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an error too (also: environment CONDIFF_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser
