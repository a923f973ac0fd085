"""Where models run: one device for training, sampling, evaluation and every auxiliary network.

The default is accelerate's choice for this process (its CUDA device under a multi-GPU launch, else
the CPU; `ACCELERATE_USE_CPU=true` forces the CPU), so that nothing is hard-coded to "cpu" or "cuda".
"""

from __future__ import annotations

import torch

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
