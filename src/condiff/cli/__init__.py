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

import os
import sys
import traceback
import warnings

from condiff.config import ConfigError, InfeasibleConstraints, check_seed
from condiff.errors import NamesArguments
from condiff.rundir import RunDirectoryError
from condiff.runtime import close_progress_bars, end_processes, resolve_device
from condiff.training.metrics_log import TrainingDiverged

from condiff.cli.parser import build_parser

# Per command, the flag of each library argument whose flag is not its name with dashes (condiff.errors: the
# library's refusals name arguments, never flags).
FLAGS = {"sample": {"class_label": "--class"}, "reproduce": {"name": "EXPERIMENT"},
         "attribute": {"target_class": "--class", "num_targets": "--samples", "output": "--output-function",
                       "steps": "--timesteps"}}


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
    elif isinstance(err, NamesArguments):
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
