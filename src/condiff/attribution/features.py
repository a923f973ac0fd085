"""Gradient features for TRAK: per-example gradients of an output function of a diffusers denoiser,
computed with torch.func (vmap over a batch), averaged over timesteps or re-noisings, then projected.

Output functions (D-TRAK's names in brackets):
- `dtrak`: ||eps_theta(x_t, t)||^2 / d [mean-squared-l2-norm], the default: it attributes better;
- `loss`: ||eps_theta(x_t, t) - eps||^2 / d, the denoising loss (TRAK, Journey-TRAK).
Training side: K fixed timesteps, noise seeded per example, averaged before the projection. Target
side (Journey-TRAK): the x0 prediction at a sampling step re-noised to that step R times.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor
from torch.func import functional_call, grad, vmap

OUTPUT_FUNCTIONS = ("dtrak", "loss")


def output_value(name: str, prediction: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The output function of one example's noise prediction (a scalar)."""
    if name == "dtrak":
        return prediction.pow(2).mean()
    if name == "loss":
        return (prediction - noise).pow(2).mean()
    raise ValueError(f"unknown output function {name!r}; choose one of {', '.join(OUTPUT_FUNCTIONS)}")


def example_generator(seed: int, index: int) -> torch.Generator:
    """The noise of example `index`, whatever the batch it falls in."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]))


def timestep_grid(count: int, num_train_timesteps: int = 1000) -> list[int]:
    """K evenly spread timesteps, the middles of K equal bins. (D-TRAK's range(0, T, T // K) starts at t = 0,
    where the noise is all but invisible in x_t: its loss there is noise, and it dominates a mean over t.)"""
    return [int((i + 0.5) * num_train_timesteps / count) for i in range(count)]


def target_seed(seed: int) -> int:
    """The noise seed of target-side features, kept apart from the training side's."""
    return seed + 1_000_003


def noised_batches(clean: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: torch.Tensor, *, seed: int,
                   first_index: int = 0):
    """Per timestep: (x_t, t, noise) of every example, its noise drawn from (seed, example index) in
    timestep order, so that features and measured losses see the same noise whatever the batching."""
    generators = [example_generator(seed, first_index + i) for i in range(len(clean))]
    for t in timesteps:
        noise = torch.stack([torch.randn(clean.shape[1:], generator=g) for g in generators]).to(clean.device)
        abar = alphas_cumprod[t].to(clean.device, torch.float32)
        yield abar.sqrt() * clean + (1 - abar).sqrt() * noise, torch.full((len(clean),), t, device=clean.device), noise


@torch.no_grad()
def denoising_losses(model: torch.nn.Module, alphas_cumprod: torch.Tensor, clean: torch.Tensor,
                     timesteps: Sequence[int], *, seed: int, batch_size: int = 256) -> torch.Tensor:
    """(N,): each example's denoising loss ||eps_theta(x_t, t) - eps||^2 / d averaged over `timesteps`, under
    the noise `GradientFeaturizer` draws with the same seed: what counterfactual validation measures."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(clean), batch_size):
        batch, total = clean[start:start + batch_size].to(device), 0
        for noisy, t, noise in noised_batches(batch, timesteps, alphas_cumprod, seed=seed, first_index=start):
            total = total + (model(noisy, t).sample - noise).pow(2).flatten(1).mean(1)
        out.append((total / len(timesteps)).cpu())
    return torch.cat(out)


class GradientFeaturizer:
    """Projected per-example gradients of `output` for `model` (a diffusers UNet2DModel or condiff's MLP),
    under the noise schedule `alphas_cumprod`."""

    def __init__(self, model: torch.nn.Module, alphas_cumprod: torch.Tensor, projector, *, output: str = "dtrak",
                 batch_size: int = 32):
        if output not in OUTPUT_FUNCTIONS:
            raise ValueError(f"unknown output function {output!r}; choose one of {', '.join(OUTPUT_FUNCTIONS)}")
        for module in model.modules():
            if isinstance(module, Attention):
                # The same attention in plain matmuls: torch.func has no batching rule for fused CPU attention.
                module.set_processor(AttnProcessor())
        self.model, self.projector, self.output, self.batch_size = model.eval(), projector, output, batch_size
        self.device = next(model.parameters()).device
        self.params = {name: p.detach() for name, p in model.named_parameters()}
        self.alphas_cumprod = alphas_cumprod.to(self.device, torch.float32)
        self.num_params = sum(p.numel() for p in self.params.values())

    def gradients(self, noisy: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
                  class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """(B, p): the gradient of each example's output at x_t (noised with `noise`; `class_labels` (B,) for
        a class-conditional model)."""

        def one(params, x, t, eps, label):
            labels = None if label is None else label[None]
            prediction = functional_call(self.model, params, (x[None], t[None]), {"class_labels": labels}).sample[0]
            return output_value(self.output, prediction, eps)

        labels = None if class_labels is None else class_labels.to(self.device)
        per_example = vmap(grad(one), in_dims=(None, 0, 0, 0, None if labels is None else 0))(
            self.params, noisy, timesteps, noise, labels)
        return torch.cat([g.flatten(1) for g in per_example.values()], dim=1)

    def train_features(self, data: torch.Tensor, timesteps: Sequence[int], *, seed: int = 0,
                       first_index: int = 0, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """(N, k): per example, the gradient averaged over `timesteps` (noise from (seed, example index)),
        then projected; `class_labels` (N,) for a class-conditional model."""
        out = []
        for start in range(0, len(data), self.batch_size):
            clean, total = data[start:start + self.batch_size].to(self.device), 0
            for noisy, t, noise in noised_batches(clean, timesteps, self.alphas_cumprod, seed=seed,
                                                  first_index=first_index + start):
                labels = None if class_labels is None else class_labels[start:start + self.batch_size]
                total = total + self.gradients(noisy, t, noise, labels)
            out.append(self.projector.project(total / len(timesteps)).cpu())
        return torch.cat(out)

    def target_features(self, x0_predictions: torch.Tensor, timestep: int, *, resamplings: int = 20,
                        seed: int = 0, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """(M, k): per target, the gradient at its x0 prediction re-noised to `timestep`, averaged over
        `resamplings` fresh noises, then projected; `class_labels` (M,): the class each target was sampled as."""
        return self.train_features(x0_predictions, [timestep] * resamplings, seed=target_seed(seed),
                                   class_labels=class_labels)
