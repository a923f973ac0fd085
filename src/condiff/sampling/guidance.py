"""Guidance for learned models: classifier-free guidance, and classifier guidance with a noise-aware
classifier that condiff trains (condiff.sampling.noise_classifier).

Both turn the model's noise prediction at (x_t, t) into the guided one that the scheduler steps
with, so they work with any diffusers scheduler (DDPM, DDIM). With the score s = -eps / sqrt(1 - abar_t),
guidance of strength eta for class y is (Wu et al. 2024; `condiff.gmm.guidance` has its exact form)

    s_guided = grad log p_t(x | y) + eta grad log p_t(y | x),

so that eta = 0 samples the class-conditional distribution and eta > 0 sharpens it.
- Classifier-free (a class-conditional model trained with label dropout): grad log p_t(y | x) =
  s(x | y) - s(x), hence eps_guided = (1 + eta) eps(x, t, y) - eta eps(x, t, no class).
- Classifier (a noise-aware classifier p_phi(y | x_t, t)): eps_guided = eps_base - w sqrt(1 - abar_t)
  grad_x log p_phi(y | x_t, t). For a class-conditional model eps_base = eps(x, t, y) and w = eta; for an
  unconditional one, whose eps(x, t) is the marginal score, grad log p_t(x | y) is itself s(x) + grad log
  p_phi(y | x), so w = 1 + eta.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from condiff.models import null_class_label
from condiff.sampling.noise_classifier import NoiseAwareClassifier

GUIDANCE_KINDS = ("cfg", "classifier")


@runtime_checkable
class Guidance(Protocol):
    """What `generate(guidance=...)` calls in place of the model: the guided noise prediction at (x_t, t) for
    the samples' classes `labels`, which the scheduler then steps with."""

    def noise(self, model: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None
              ) -> torch.Tensor: ...


class ClassifierFreeGuidance:
    """(1 + eta) eps(x, t, y) - eta eps(x, t, no class), both halves in one batched forward pass."""

    def __init__(self, scale: float):
        self.scale = float(scale)

    def noise(self, model: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        null = null_class_label(model)
        if null is None:
            raise ValueError("classifier-free guidance needs a class-conditional model (model.class_conditional = true)")
        unconditional = torch.full_like(labels, null)
        both = model(torch.cat([x, x]), torch.cat([timesteps, timesteps]),
                     class_labels=torch.cat([labels, unconditional])).sample
        conditional, marginal = both.chunk(2)
        return conditional + self.scale * (conditional - marginal)


class ClassifierGuidance:
    """eps_base - w sqrt(1 - abar_t) grad_x log p_phi(y | x_t, t), with a noise-aware classifier."""

    def __init__(self, classifier: NoiseAwareClassifier, scale: float, alphas_cumprod: torch.Tensor):
        self.classifier = classifier.eval()
        self.scale = float(scale)
        self.alphas_cumprod = alphas_cumprod

    def noise(self, model: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        conditional = null_class_label(model) is not None
        base = model(x, timesteps, class_labels=labels if conditional else None).sample
        weight = self.scale if conditional else 1.0 + self.scale
        with torch.enable_grad():  # sampling runs under no_grad; the classifier's input gradient is the point
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(self.classifier(x_in, timesteps).float(), dim=1)
            chosen = log_probs.gather(1, labels.view(-1, 1)).sum()
            gradient, = torch.autograd.grad(chosen, x_in)
        abar = self.alphas_cumprod.to(x.device, torch.float64)[timesteps.long()]
        sigma = (1.0 - abar).sqrt().view(-1, *[1] * (x.ndim - 1))
        return base - weight * sigma.to(base.dtype) * gradient.to(base.dtype)
