"""Command line: a thin layer over condiff.lifecycle (train, sample, evaluate), condiff.audit (attribute),
condiff.papers (demo, reproduce) and condiff.labs (guidance-lab).

Bad input (config, run directory, infeasible constraints) and what the system refuses (a file it cannot
read or write, a full disk) print one line naming the field or file and exit with code 2, having written
nothing; so does a training run that diverges (it keeps its last finite checkpoint), and a command on a run
that another command is writing into (every command that writes into a run holds its lock). A command that
fails after it started puts back what it wrote (condiff.journal), but for those that resume (train,
attribute, reproduce). Ctrl-C prints one line saying what the run holds now and exits with code 130.
`--debug` or CONDIFF_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tomllib
import traceback
import warnings
from pathlib import Path
from typing import Iterator

from condiff.config import INT_LIMIT, ArgumentError, ConfigError, InfeasibleConstraints, check_seed
from condiff.rundir import RunDirectory, RunDirectoryError
from condiff.runtime import close_progress_bars, end_processes, resolve_device
from condiff.training.metrics_log import TrainingDiverged

# Per command, the flag of each library argument whose flag is not its name with dashes (ArgumentError names
# arguments): the library never speaks of flags.
FLAGS = {"sample": {"class_label": "--class"}, "reproduce": {"name": "EXPERIMENT"},
         "attribute": {"target_class": "--class", "num_targets": "--samples", "output": "--output-function",
                       "steps": "--timesteps"}}
DEVICE_HELP = "where models run, e.g. cuda, cuda:1, cpu (default: the accelerator's device, CUDA when present)"


def parse_override(text: str) -> tuple[str, object]:
    """`train.steps=200` -> ("train.steps", 200), the value parsed as TOML."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.steps=200")
    try:
        return key.strip(), tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key.strip(), value  # a bare word is a string


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a command on a run, with what the run holds now."""


@contextlib.contextmanager
def writing(folder: Path, *, create: bool = False, resume: str | None = None,
            progress: str = "**/checkpoints/step-*") -> Iterator[None]:
    """Hold `folder`'s lock for the whole command (see RunDirectory.lock) and undo what the command changed if it
    fails (RunDirectory.transaction); an interruption says what it left. `create`: the command may make the
    folder. `resume`: how to continue this command (train, reproduce, attribute), which keeps what it computed
    (the files `progress` matches) when interrupted instead of undoing it."""
    before = RunDirectory(folder).listing()
    try:
        with RunDirectory(folder).lock(create=create), \
                contextlib.nullcontext() if resume else RunDirectory(folder).transaction():
            yield
    except KeyboardInterrupt as err:
        if RunDirectory(folder).listing() == before:
            raise Interrupted(f"interrupted; {folder} is unchanged") from err
        if resume and any(folder.glob(progress)):
            raise Interrupted(f"interrupted; resume with {resume}") from err
        raise Interrupted(f"interrupted; {folder} is partly written") from err


def cmd_train(args) -> None:
    from condiff.config import load_config
    from condiff.lifecycle.training import run_directory, train_run

    overrides = dict(parse_override(s) for s in args.set)
    source = Path(args.config)
    if source.is_dir():   # a run directory: resume it from its own stored config, wherever it now lies
        if not args.resume:
            raise RunDirectoryError(f"{source}: a directory; give a config file, or --resume to continue this run")
        source, overrides = source / "config.toml", {**overrides, "output_dir": str(source)}
        if not source.is_file():
            raise RunDirectoryError(f"{args.config}: not a condiff run directory (config.toml missing)")
    config = load_config(source, overrides)
    run = run_directory(config)
    with writing(run, create=True, resume=f"condiff train {run} --resume"):
        run_dir = train_run(config, resume=args.resume, overwrite=args.overwrite)
    print(f"trained: {run_dir}")


def cmd_autoencoder(args) -> None:
    from condiff.config import config_from_dict, read_config_table
    from condiff.lifecycle.training import train_autoencoder_for

    # The autoencoder is what this command makes: the config's [latent] section, which names it,
    # is set aside rather than checked for a folder that does not exist yet.
    table = read_config_table(args.config, dict(parse_override(s) for s in args.set))
    latent = table.pop("latent", {})
    output = args.output or (latent.get("autoencoder") if isinstance(latent, dict) else None)
    config = config_from_dict(table, args.config)
    path = train_autoencoder_for(config, Path(output or f"runs/{config.name}-autoencoder"), steps=args.steps,
                                 overwrite=args.overwrite, block_out_channels=tuple(args.block_out_channels),
                                 latent_channels=args.latent_channels)
    print(f"autoencoder: {path}")


def cmd_sample(args) -> None:
    from condiff.lifecycle.sampling import sample_run

    with writing(Path(args.run)):
        path = sample_run(Path(args.run), num_samples=args.num_samples, method=args.method, steps=args.steps,
                          seed=args.seed, batch_size=args.batch_size, record_x0=args.record_x0,
                          class_label=getattr(args, "class"), guidance=args.guidance,
                          guidance_kind=args.guidance_kind, device=args.device)
    print(f"samples: {path} and {path.with_suffix('.png')}")


def cmd_noise_classifier(args) -> None:
    from condiff.lifecycle.sampling import train_noise_classifier_run

    with writing(Path(args.run)):
        accuracy = train_noise_classifier_run(Path(args.run), steps=args.steps, overwrite=args.overwrite,
                                              device=args.device)
    print("held-out accuracy at t = " + ", ".join(f"{t}: {a:.3f}" for t, a in accuracy.items()))


def cmd_evaluate(args) -> None:
    from condiff.lifecycle.evaluation import evaluate_run

    with writing(Path(args.run)):
        # The command redraws samples of another drawing (and says so): the run is the user's to evaluate.
        result = evaluate_run(Path(args.run), num_samples=args.num_samples, device=args.device, resample=True)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.to_dict().items()
                   if v is not None and not isinstance(v, (list, dict))))


def cmd_attribute(args) -> None:
    from condiff.audit.attribute import attribute_run
    from condiff.audit.results import AttributionSettings

    try:
        steps = tuple(int(t) for t in args.timesteps.split(","))
    except ValueError:
        raise ConfigError(f"--timesteps: expected timesteps like 900,500,100, got {args.timesteps!r}") from None
    settings = AttributionSettings(output=args.output_function, steps=steps, num_targets=args.samples, seed=args.seed,
                                   top=args.top, train_timesteps=args.train_timesteps, resamplings=args.resamplings,
                                   projection=args.projection, dimension=args.dimension, ridge=args.ridge,
                                   samples_file=args.samples_file, checkpoints=args.checkpoints,
                                   models=tuple(args.models), target_class=getattr(args, "class"),
                                   journey_every=args.journey_every)
    # Resumable, like training: a killed or interrupted attribution keeps the training features it computed.
    with writing(Path(args.run), resume="the same condiff attribute command with --resume",
                 progress="attribution/done-*"):
        result = attribute_run(Path(args.run), settings, resume=args.resume, overwrite=args.overwrite,
                               device=args.device)
    if result is not None:   # None: a torchrun process other than the main one
        print(f"report: {result.directory / 'report.md'}")


def cmd_demo(args) -> None:
    from condiff.papers.demo import run_demo

    with writing(Path(args.output), create=True):
        report = run_demo(Path(args.output), overwrite=args.overwrite, steps=args.steps, seed=args.seed,
                          device=args.device)
    print(f"report: {report}")


def cmd_guidance_lab(args) -> None:
    from functools import partial

    from condiff.labs.guidance.lab import run_guidance_lab
    from condiff.labs.guidance.learned import FULL_LEARNED, QUICK_LEARNED, learned_sections
    from condiff.labs.guidance.settings import FULL_SIZES, QUICK_SIZES

    learned = None if args.exact_only else partial(learned_sections, sizes=QUICK_LEARNED if args.quick else FULL_LEARNED)
    with writing(Path(args.output), create=True):
        report = run_guidance_lab(Path(args.output), overwrite=args.overwrite, extra_sections=learned,
                                  sizes=QUICK_SIZES if args.quick else FULL_SIZES)
    print(f"report: {report}")


def cmd_reproduce(args) -> None:
    from condiff.papers.reproduce import reproduce

    output = Path(args.output or f"runs/{args.experiment}-{args.scale}")
    again = f"condiff reproduce {args.experiment} --scale {args.scale} --output {output} --seed {args.seed}"
    with writing(output, create=True, resume=f"{again}{' --coupled' if args.coupled else ''} --resume"):
        report = reproduce(args.experiment, output, scale=args.scale, overwrite=args.overwrite, resume=args.resume,
                           device=args.device, seed=args.seed, coupled=args.coupled)
    print(f"report: {report}")


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


def check_device(name: str) -> None:
    """Refuse a --device this machine cannot compute on: torch knows more names (meta, mps, xla...) than it has."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch's deprecation notes on old names: the refusal says it all
        device = resolve_device(name)   # a name torch does not know, or CUDA missing: refused there
        try:
            torch.ones(1, device=device).cpu()
        except Exception as err:   # each backend fails its own way (NotImplementedError, RuntimeError, ...)
            reason = (str(err).splitlines() or [type(err).__name__])[0][:100]
            raise ConfigError(f"--device {name}: this machine cannot compute on it ({reason})") from None


def check_flags(args) -> None:
    """Refuse the command line's out-of-range numbers and unusable devices before the command starts."""
    for name in ("num_samples", "steps", "batch_size", "latent_channels"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}: must be positive, got {value}")
    if any(width <= 0 for width in getattr(args, "block_out_channels", None) or []):
        raise ConfigError(f"--block-out-channels: must be positive, got {args.block_out_channels}")
    if getattr(args, "seed", None) is not None:
        check_seed(args.seed, "--seed")
    if getattr(args, "device", None) is not None:
        check_device(args.device)


def flag(argument: str, command: str | None) -> str:
    """The command line's flag for a library function's argument under `command`."""
    return FLAGS.get(command, {}).get(argument, "--" + argument.replace("_", "-"))


def one_line(err: BaseException, command: str | None = None) -> str:
    """What main prints of an error it catches: an OSError names its file(s), an interruption what it left."""
    if isinstance(err, KeyboardInterrupt):
        text = str(err) or "interrupted"
    elif isinstance(err, OSError) and err.filename is not None:
        files = " -> ".join(str(name) for name in (err.filename, err.filename2) if name is not None)
        text = f"error: {files}: {err.strerror or err}"
    elif isinstance(err, ArgumentError):
        text = "error: " + err.spelled(lambda argument: flag(argument, command))
    else:
        text = f"error: {err}"
    return "condiff: " + " ".join(text.split())   # one line, whatever the message


def main(argv: list[str] | None = None) -> int:
    debug, command = os.environ.get("CONDIFF_DEBUG") == "1", None
    try:
        args = build_parser().parse_args(argv)
        debug, command = debug or args.debug, args.command
        check_flags(args)
        args.func(args)
        end_processes()
    # What a user or the system can cause: one line each, the traceback only when asked for.
    except (ConfigError, RunDirectoryError, InfeasibleConstraints, TrainingDiverged, OSError, UnicodeDecodeError,
            KeyboardInterrupt) as err:
        close_progress_bars()
        if debug:
            traceback.print_exc()
        print(one_line(err, command), file=sys.stderr)
        return 130 if isinstance(err, KeyboardInterrupt) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
