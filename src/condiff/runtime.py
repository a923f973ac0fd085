"""Where and how work runs: one device for training, sampling, evaluation and every auxiliary network,
the process state, and progress bars.

The default device is accelerate's choice for this process (its CUDA device under a multi-GPU launch,
else the CPU; `ACCELERATE_USE_CPU=true` forces the CPU), so that nothing is hard-coded to "cpu" or "cuda".
"""

from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from condiff.config import ConfigError


def process_state():
    """accelerate's state of this process (rank, number of processes, device), set up as `Accelerator()`
    sets it up: without `cpu=True`, processes that torchrun starts on CPUs would each run alone as rank 0."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` when given (checked to exist here), else the accelerator's device of this process."""
    if device is None:
        return process_state().device
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r}: not a device name (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    return device


def progress_bar(iterable=None, *, desc: str, enabled: bool = True, **options) -> tqdm:
    """A tqdm bar that redraws freely on a terminal but writes a line at most every 30 s into a log
    file or pipe (a carriage-return redraw per step would flood it)."""
    interactive = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, disable=not enabled, dynamic_ncols=interactive,
                mininterval=0.1 if interactive else 30.0, **options)


def end_processes() -> None:
    """Leave the process group together at the end of a command: a rank that exits while the group is
    still open can abort ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
