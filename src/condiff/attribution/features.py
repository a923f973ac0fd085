"""Gradient features for TRAK: per-example gradients of an output function of a diffusers denoiser,
averaged over timesteps or re-noisings, then projected. The gradients come from one forward and one
backward over all of a batch's rows (`per_example`), or for a model with a layer that has no rule there,
from torch.func (vmap over a batch).

Output functions (D-TRAK's names in brackets):
- `dtrak`: ||eps_theta(x_t, t)||^2 / d [mean-squared-l2-norm], the default: it attributes better;
- `loss`: ||eps_theta(x_t, t) - eps||^2 / d, the denoising loss (TRAK, Journey-TRAK).
Training side: K fixed timesteps, noise seeded per example, averaged before the projection. Target
side (Journey-TRAK): the x0 prediction at a sampling step re-noised to that step R times.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor
from torch.func import functional_call, grad, vmap

from condiff.attribution.per_example import HookedGradients, has_rules_for
from condiff.config import ConfigError
from condiff.sampling.generate import sample_generators

OUTPUT_FUNCTIONS = ("dtrak", "loss")

# Whether the hook rules hold is a property of the architecture (which layers use which weights), not of the
# weights: checked once per architecture, output and device kind, not once per checkpoint or ensemble member.
_HOOKS_AGREE: dict[tuple, bool] = {}


def checked_output(name: str) -> str:
    """`name`, refused unless it is one of the output functions."""
    if name not in OUTPUT_FUNCTIONS:
        raise ConfigError(f"output={name!r}: unknown output function; choose one of {', '.join(OUTPUT_FUNCTIONS)}")
    return name


def output_values(name: str, predictions: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """(N,): the output function of each row's noise prediction."""
    if checked_output(name) == "dtrak":
        return predictions.pow(2).flatten(1).mean(1)
    return (predictions - noise).pow(2).flatten(1).mean(1)


def output_value(name: str, prediction: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The output function of one example's noise prediction (a scalar)."""
    return output_values(name, prediction[None], noise[None])[0]


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
    generators = sample_generators(seed, range(first_index, first_index + len(clean)))   # per example, any batch
    for t in timesteps:
        noise = torch.stack([torch.randn(clean.shape[1:], generator=g) for g in generators]).to(clean.device)
        abar = alphas_cumprod[t].to(clean.device, torch.float32)
        yield abar.sqrt() * clean + (1 - abar).sqrt() * noise, torch.full((len(clean),), t, device=clean.device), noise


@torch.no_grad()
def denoising_losses(model: torch.nn.Module, alphas_cumprod: torch.Tensor, clean: torch.Tensor,
                     timesteps: Sequence[int], *, seed: int, batch_size: int = 256,
                     class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """(N,): each example's denoising loss ||eps_theta(x_t, t) - eps||^2 / d averaged over `timesteps`, under
    the noise `GradientFeaturizer` draws with the same seed: what counterfactual validation measures;
    `class_labels` (N,) for a class-conditional model."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(clean), batch_size):
        batch, total = clean[start:start + batch_size].to(device), 0
        labels = None if class_labels is None else class_labels[start:start + batch_size].to(device)
        for noisy, t, noise in noised_batches(batch, timesteps, alphas_cumprod, seed=seed, first_index=start):
            total = total + output_values("loss", model(noisy, t, class_labels=labels).sample, noise)
        out.append((total / len(timesteps)).cpu())
    return torch.cat(out)


@contextlib.contextmanager
def plain_attention(model: torch.nn.Module) -> Iterator[None]:
    """diffusers attention in plain matmuls inside (torch.func has no batching rule for fused CPU attention),
    its own processors after."""
    layers = [module for module in model.modules() if isinstance(module, Attention)]
    processors = [layer.processor for layer in layers]
    for layer in layers:
        layer.set_processor(AttnProcessor())
    try:
        yield
    finally:
        for layer, processor in zip(layers, processors):
            layer.set_processor(processor)


class GradientFeaturizer:
    """Projected per-example gradients of `output` for `model` (a diffusers UNet2DModel or condiff's MLP),
    under the noise schedule `alphas_cumprod`."""

    def __init__(self, model: torch.nn.Module, alphas_cumprod: torch.Tensor, projector, *, output: str = "dtrak",
                 batch_size: int = 32):
        self.model, self.projector, self.output = model.eval(), projector, checked_output(output)
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.alphas_cumprod = alphas_cumprod.to(self.device, torch.float32)
        self.hooked = HookedGradients(model) if has_rules_for(model) else None
        self.checked = self.hooked is None
        self.num_params = sum(p.numel() for p in model.parameters())

    def gradients(self, noisy: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
                  class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """(B, p): the gradient of each example's output at x_t (noised with `noise`; `class_labels` (B,) for
        a class-conditional model)."""
        return self.mean_gradients(noisy, timesteps, noise, class_labels, rows_per_example=1)

    def mean_gradients(self, noisy: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
                       class_labels: torch.Tensor | None, *, rows_per_example: int) -> torch.Tensor:
        """(B, p): per example, the mean gradient of its `rows_per_example` consecutive rows (example-major)."""
        labels = None if class_labels is None else class_labels.to(self.device)
        if not self.checked:
            self.check_hooks(noisy[:rows_per_example], timesteps[:rows_per_example], noise[:rows_per_example],
                             None if labels is None else labels[:rows_per_example])
        if self.hooked is None:
            return self.functional_gradients(noisy, timesteps, noise, labels, rows_per_example)

        def total_output():
            predictions = self.model(noisy, timesteps, class_labels=labels).sample
            return output_values(self.output, predictions, noise).sum() / rows_per_example

        return self.hooked(total_output, len(noisy) // rows_per_example)

    def functional_gradients(self, noisy: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
                             labels: torch.Tensor | None, rows_per_example: int) -> torch.Tensor:
        """`mean_gradients` by torch.func, one row of every example at a time (all rows at once would hold
        B * K * p floats)."""
        params = {name: p.detach() for name, p in self.model.named_parameters()}

        def one(params, x, t, eps, label):
            labels = None if label is None else label[None]
            prediction = functional_call(self.model, params, (x[None], t[None]), {"class_labels": labels}).sample
            return output_values(self.output, prediction, eps[None])[0]

        total = 0
        with plain_attention(self.model):
            for row in range(rows_per_example):
                rows = slice(row, None, rows_per_example)
                per_example = vmap(grad(one), in_dims=(None, 0, 0, 0, None if labels is None else 0))(
                    params, noisy[rows], timesteps[rows], noise[rows], None if labels is None else labels[rows])
                total = total + torch.cat([g.flatten(1) for g in per_example.values()], dim=1)
        return total / rows_per_example

    def check_hooks(self, noisy, timesteps, noise, labels) -> None:
        """Compare the hook rules with torch.func on one example, once per architecture: a model that uses a
        layer's weights outside that layer's forward would fool the rules, so it falls back to torch.func (with
        a warning). Each parameter's gradient must agree within 5% of its norm or 1e-4 of the whole gradient's:
        TF32 arithmetic (cuDNN's default on GPUs) differs by ~1e-3, a missed use of a weight by its whole share."""
        self.checked = True
        key = (type(self.model).__module__, type(self.model).__qualname__, self.output, labels is None,
               self.device.type, tuple((name, tuple(p.shape)) for name, p in self.model.named_parameters()))
        if key not in _HOOKS_AGREE:
            hooked = self.mean_gradients(noisy, timesteps, noise, labels, rows_per_example=len(noisy))
            reference = self.functional_gradients(noisy, timesteps, noise, labels, len(noisy))
            floor = 1e-4 * float(reference.norm())
            _HOOKS_AGREE[key] = all(
                float((hooked[:, columns] - reference[:, columns]).norm()) <= 0.05 * float(reference[:, columns].norm())
                + floor for columns in self.hooked.slices.values())
        if not _HOOKS_AGREE[key]:
            warnings.warn(f"{type(self.model).__name__}: per-example gradients from layer hooks differ from "
                          "torch.func's; using torch.func (slower)", RuntimeWarning, stacklevel=3)
            self.hooked = None

    def train_features(self, data: torch.Tensor, timesteps: Sequence[int], *, seed: int = 0,
                       first_index: int = 0, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """(N, k): per example, the gradient averaged over `timesteps` (noise from (seed, example index)),
        then projected; `class_labels` (N,) for a class-conditional model."""
        out, count = [], len(timesteps)
        for start in range(0, len(data), self.batch_size):
            clean = data[start:start + self.batch_size].to(self.device)
            # One row per (example, timestep), example-major: each example's rows are summed in one contraction.
            noisy, steps, noise = (torch.stack(parts, 1).flatten(0, 1) for parts in zip(*noised_batches(
                clean, timesteps, self.alphas_cumprod, seed=seed, first_index=first_index + start)))
            labels = None if class_labels is None else \
                class_labels[start:start + self.batch_size].repeat_interleave(count)
            gradients = self.mean_gradients(noisy, steps, noise, labels, rows_per_example=count)
            out.append(self.projector.project(gradients).cpu())
        return torch.cat(out)

    def target_features(self, x0_predictions: torch.Tensor, timestep: int, *, resamplings: int = 20,
                        seed: int = 0, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """(M, k): per target, the gradient at its x0 prediction re-noised to `timestep`, averaged over
        `resamplings` fresh noises, then projected; `class_labels` (M,): the class each target was sampled as."""
        return self.train_features(x0_predictions, [timestep] * resamplings, seed=target_seed(seed),
                                   class_labels=class_labels)
