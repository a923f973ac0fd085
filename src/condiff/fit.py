"""One small training loop for the auxiliary networks: the evaluation classifier, the noise-aware
classifier and the autoencoder. AdamW with a cosine decay to zero, a progress bar, eval mode at the end.

The diffusion trainer (condiff.training.loop) is not this loop: it adds accelerate, the EMA, the dual
steps and exactly resumable checkpoints, which none of these small networks needs.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from condiff.runtime import progress_bar, resolve_device


def seeded_model(build: Callable[[], torch.nn.Module], seed: int, device: str | torch.device | None = None
                 ) -> tuple[torch.nn.Module, torch.device]:
    """(`build()` with its initial weights drawn from `seed`, the device it was moved to: default the
    accelerator's). A seeded copy of the global RNG: the caller's global seed neither matters nor moves."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    device = resolve_device(device)
    return model.to(device), device


StepLoss = Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]   # (loss, values to show)


def fit(model: torch.nn.Module, step_loss: StepLoss, *, steps: int, lr: float, weight_decay: float = 0.0,
        desc: str, progress: bool = True) -> torch.nn.Module:
    """Take `steps` optimiser steps on `step_loss()` (which draws its own batch) and return the model in
    eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)   # as training's
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1))))
    model.train()
    bar = progress_bar(range(steps), desc=desc, enabled=progress)
    for _ in bar:
        loss, shown = step_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress:
            bar.set_postfix({name: f"{float(value):.4f}" for name, value in shown.items()}, refresh=False)
    return model.eval()
