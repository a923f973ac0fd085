"""Latent diffusion as a dataset transform: train, save, load and apply a diffusers AutoencoderKL.

Why a dataset transform and not a new kind of model: in latent diffusion (Rombach et al.; the paper's
ImageNet experiment uses Stable Diffusion's VAE) the autoencoder is trained first and then frozen.
The diffusion model never sees pixels: it is trained on the encoded latents exactly as it would be
on images (same noise scheduler, same constrained Lagrangian, same per-class datasets), and only
sampling needs one extra step, decoding the generated latents. So condiff encodes every dataset of
an experiment once with `encode_dataset` (deterministically: the posterior mean, scaled to unit
variance as in Stable Diffusion), trains on the resulting `LabelledDataset`s unchanged, and maps
samples back to images with `decode_latents`. Nothing in the trainer, the samplers or the dual
updates has to know that it works in a latent space.

The autoencoder is any diffusers `AutoencoderKL` saved with `save_pretrained` in safetensors (e.g.
Stable Diffusion's VAE folder); `build_small_autoencoder` / `train_autoencoder` make a tiny one for
8x8 digits and 28x28 images so that the whole path can be tested on CPU without downloading weights.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from condiff.data.datasets import EpochSampler, LabelledDataset
from condiff.fit import fit, seeded_model
from condiff.rundir import save_pretrained_atomic


class AutoencoderLoadError(ValueError):
    """A path that does not hold a diffusers AutoencoderKL saved in safetensors."""


def build_small_autoencoder(sample_shape: tuple[int, ...], latent_channels: int = 4,
                            block_out_channels: tuple[int, ...] = (16, 32),
                            layers_per_block: int = 1, mid_block_attention: bool = False) -> AutoencoderKL:
    """A small AutoencoderKL for images of `sample_shape` (C, H, W).

    Each block after the first halves the resolution (8x8 with two blocks -> 4x4 latents; 28x28 with
    two blocks -> 14x14, with three -> 7x7). Group norms use the largest group count up to 32 that
    divides every width. The mid-block attention of Stable Diffusion's VAE is off by default: on
    4x4 latent maps it adds parameters and CPU time for no measurable gain.
    """
    if len(sample_shape) != 3:
        raise ValueError(f"an autoencoder needs images (C, H, W), not samples of shape {tuple(sample_shape)}")
    channels, height, width = sample_shape
    if height != width:
        raise ValueError(f"square images only, not {height}x{width}")
    factor = 2 ** (len(block_out_channels) - 1)
    if height % factor:
        raise ValueError(f"{len(block_out_channels)} blocks downsample by {factor}, "
                         f"which does not divide the image size {height}")
    blocks = len(block_out_channels)
    return AutoencoderKL(
        in_channels=channels, out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        latent_channels=latent_channels, norm_num_groups=math.gcd(32, *block_out_channels),
        sample_size=height, scaling_factor=1.0, mid_block_add_attention=mid_block_attention,
        force_upcast=False)


def latent_shape(vae: AutoencoderKL, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one latent of an image of `sample_shape`."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (vae.config.latent_channels, sample_shape[1] // factor, sample_shape[2] // factor)


def _device_of(vae: AutoencoderKL) -> torch.device:
    return next(vae.parameters()).device


def _dtype_of(vae: AutoencoderKL) -> torch.dtype:
    return next(vae.parameters()).dtype


def _shift(vae: AutoencoderKL) -> float:
    """SD3/Flux VAEs also shift latents (`shift_factor`); Stable Diffusion's and ours do not."""
    return getattr(vae.config, "shift_factor", None) or 0.0


def _posterior_means(vae: AutoencoderKL, data: torch.Tensor, batch_size: int) -> torch.Tensor:
    device, dtype = _device_of(vae), _dtype_of(vae)
    out = [vae.encode(data[i:i + batch_size].to(device, dtype)).latent_dist.mode().float().cpu()
           for i in range(0, len(data), batch_size)]
    return torch.cat(out)


def train_autoencoder(dataset: LabelledDataset, *, steps: int, batch_size: int = 128, lr: float = 2e-3,
                      kl_weight: float = 1e-4, seed: int = 0, progress: bool = True,
                      latent_channels: int = 4, block_out_channels: tuple[int, ...] = (16, 32),
                      device: str | torch.device | None = None) -> AutoencoderKL:
    """Train a small AutoencoderKL on `dataset`'s images on `device` (default: the accelerator's) and
    return it there, in eval mode.

    Loss: per-pixel MSE of the decode of a posterior sample plus `kl_weight` times the KL to N(0, I)
    per latent element. AdamW with a cosine learning-rate decay; batches come from an EpochSampler.
    Everything random (initial weights, batches, posterior noise) derives from `seed`, so two calls
    give identical weights on the same device. Finally `config.scaling_factor` is set to 1/std of
    the training set's latents (posterior means), the Stable Diffusion convention under which
    `latents * scaling_factor` has unit variance.
    """
    vae, device = seeded_model(
        lambda: build_small_autoencoder(dataset.sample_shape, latent_channels, tuple(block_out_channels)), seed, device)
    generator = torch.Generator().manual_seed(seed)
    noise_generator = torch.Generator().manual_seed(seed + 1)   # CPU noise: the same on every device
    sampler = EpochSampler(len(dataset))

    def step_loss():
        x = dataset.data[sampler.draw(batch_size, generator)].to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=noise_generator)).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        return mse + kl_weight * kl, {"mse": mse.detach(), "kl": kl.detach()}

    fit(vae, step_loss, steps=steps, lr=lr, desc="autoencoder", progress=progress)
    with torch.no_grad():
        latents = _posterior_means(vae, dataset.data, batch_size=max(batch_size, 256))
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


def save_autoencoder(vae: AutoencoderKL, path: str | os.PathLike) -> Path:
    """save_pretrained (safetensors) into `path`, atomically (see `save_pretrained_atomic`)."""
    return save_pretrained_atomic(vae, path)


def load_autoencoder(path: str | os.PathLike) -> AutoencoderKL:
    """AutoencoderKL.from_pretrained from a local folder, safetensors only, never from the Hub."""
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise AutoencoderLoadError(f"{path}: no autoencoder here (missing {config.name})")
    try:
        class_name = json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError) as error:
        raise AutoencoderLoadError(f"{path}: unreadable config.json ({error})") from None
    if class_name != "AutoencoderKL":
        raise AutoencoderLoadError(f"{path}: config.json describes {class_name!r}, not an AutoencoderKL")
    try:
        vae = AutoencoderKL.from_pretrained(path, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        message = " ".join(str(error).split())
        raise AutoencoderLoadError(f"{path}: cannot load the autoencoder ({message[:300]})") from None
    return vae.eval()


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, dataset: LabelledDataset, batch_size: int = 256) -> LabelledDataset:
    """The dataset of (shifted and) scaled posterior means, labels kept, name suffixed "-latent".

    Posterior means rather than samples: the latent dataset is a deterministic function of the
    images, so runs, resumes and processes agree on it without sharing a generator.
    """
    latents = (_posterior_means(vae, dataset.data, batch_size) - _shift(vae)) * vae.config.scaling_factor
    return LabelledDataset(latents, dataset.labels.clone(), dataset.num_classes, f"{dataset.name}-latent")


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Images in [-1, 1] (float32, on the CPU) of scaled latents such as encode_dataset's."""
    device, dtype = _device_of(vae), _dtype_of(vae)
    out = []
    for i in range(0, len(latents), batch_size):
        z = latents[i:i + batch_size].to(device, dtype) / vae.config.scaling_factor + _shift(vae)
        out.append(vae.decode(z).sample.float().clamp(-1.0, 1.0).cpu())
    if not out:
        raise ValueError("no latents to decode")
    return torch.cat(out)
