"""What each command does once its flags are parsed: a thin layer over the library, holding the run's lock and
putting back what a failed command wrote (`writing`)."""

from __future__ import annotations

import contextlib
import tomllib
from pathlib import Path
from typing import Iterator

from condiff.config import ConfigError
from condiff.rundir import RunDirectory, RunDirectoryError

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
        source, overrides = RunDirectory(source).config_file, {**overrides, "output_dir": str(source)}
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
