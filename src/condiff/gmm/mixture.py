"""Exact formulas for isotropic Gaussian mixtures p(x) = sum_k pi_k N(mu_k, s^2 I).

Under the variance-preserving forward process x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps, every
component stays Gaussian: N(sqrt(abar) mu_k, (abar s^2 + 1 - abar) I). Posteriors and scores are
therefore known in closed form at every noise level: the ground truth condiff's tests check against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GaussianMixture:
    means: torch.Tensor      # (K, D)
    weights: torch.Tensor    # (K,), sums to 1
    std: float               # per-coordinate standard deviation s of every component

    @classmethod
    def from_lists(cls, means, weights=None, std: float = 1.0) -> "GaussianMixture":
        mu = torch.as_tensor(means, dtype=torch.float64)
        w = torch.full((len(mu),), 1.0 / len(mu), dtype=torch.float64) if weights is None \
            else torch.as_tensor(weights, dtype=torch.float64)
        return cls(mu, w / w.sum(), float(std))

    def noisy_components(self, alpha_bar: float) -> tuple[torch.Tensor, float]:
        """(means, variance) of every component of x_t when x_0 follows the mixture."""
        return self.means * alpha_bar ** 0.5, alpha_bar * self.std ** 2 + 1.0 - alpha_bar

    def log_posterior(self, x: torch.Tensor, alpha_bar: float = 1.0) -> torch.Tensor:
        """log p(k | x_t = x) for every component k: shape (N, K)."""
        means, var = self.noisy_components(alpha_bar)
        x = x.to(torch.float64).flatten(1)
        logits = torch.log(self.weights) - torch.cdist(x, means).pow(2) / (2.0 * var)
        return torch.log_softmax(logits, dim=1)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable component of each clean sample (the Bayes classifier)."""
        return self.log_posterior(x).argmax(dim=1)

    def score(self, x: torch.Tensor, alpha_bar: float = 1.0) -> torch.Tensor:
        """grad_x log p_t(x) = (sum_k p(k|x) m_k - x) / v."""
        means, var = self.noisy_components(alpha_bar)
        posterior = self.log_posterior(x, alpha_bar).exp()
        return (posterior @ means - x.to(torch.float64)) / var

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means[labels] + self.std * noise, labels


class ExactNoisePredictor(torch.nn.Module):
    """The optimal noise predictor of a mixture, eps*(x_t, t) = -sqrt(1 - abar_t) grad log p_t(x_t),
    called like a condiff model: ground truth for the samplers and a reference for trained models.

    Class-conditional like condiff's models: label k < K gives component k's noise predictor (the
    score of N(sqrt(abar) mu_k, v I)), label K ("no class", also used without labels) the mixture's;
    so guidance (condiff.sampling.guidance) applies to it exactly as to a learned model."""

    def __init__(self, mixture: GaussianMixture, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.mixture = mixture
        self.sample_shape = (mixture.means.shape[1],)
        self.config = {"num_class_embeds": len(mixture.means) + 1}
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels=None):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        abar = self.alphas_cumprod[torch.as_tensor(timestep).long().flatten()[0]].item()
        score = self.mixture.score(sample, abar)
        if class_labels is not None:
            means, var = self.mixture.noisy_components(abar)
            conditional = class_labels < len(self.mixture.means)
            component = class_labels.clamp(max=len(self.mixture.means) - 1)
            component_score = (means[component] - sample.to(torch.float64)) / var
            score = torch.where(conditional.unsqueeze(1), component_score, score)
        return UNet2DOutput(sample=(-(1.0 - abar) ** 0.5 * score).to(sample.dtype))
