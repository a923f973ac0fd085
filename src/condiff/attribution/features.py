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

    def gradients(self, clean: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """(B, p): the gradient of each example's output at x_t = sqrt(abar) x_0 + sqrt(1 - abar) noise."""
        abar = self.alphas_cumprod[timesteps].view(-1, *[1] * (clean.ndim - 1))
        noisy = abar.sqrt() * clean + (1 - abar).sqrt() * noise

        def one(params, x, t, eps):
            prediction = functional_call(self.model, params, (x[None], t[None])).sample[0]
            return output_value(self.output, prediction, eps)

        per_example = vmap(grad(one), in_dims=(None, 0, 0, 0))(self.params, noisy, timesteps, noise)
        return torch.cat([g.flatten(1) for g in per_example.values()], dim=1)

    def train_features(self, data: torch.Tensor, timesteps: Sequence[int], *, seed: int = 0,
                       first_index: int = 0) -> torch.Tensor:
        """(N, k): per example, the gradient averaged over `timesteps` (noise from (seed, example index)),
        then projected."""
        out = []
        for start in range(0, len(data), self.batch_size):
            clean = data[start:start + self.batch_size].to(self.device)
            generators = [example_generator(seed, first_index + start + i) for i in range(len(clean))]
            total = 0
            for t in timesteps:
                noise = torch.stack([torch.randn(clean.shape[1:], generator=g) for g in generators]).to(self.device)
                total = total + self.gradients(clean, torch.full((len(clean),), t, device=self.device), noise)
            out.append(self.projector.project(total / len(timesteps)).cpu())
        return torch.cat(out)

    def target_features(self, x0_predictions: torch.Tensor, timestep: int, *, resamplings: int = 20,
                        seed: int = 0) -> torch.Tensor:
        """(M, k): per target, the gradient at its x0 prediction re-noised to `timestep`, averaged over
        `resamplings` fresh noises, then projected."""
        return self.train_features(x0_predictions, [timestep] * resamplings, seed=seed + 1_000_003)
