"""Noise predictors: diffusers UNet2DModel presets for small images and an MLP for vector data.

Both are diffusers `ModelMixin`s called as `model(x_t, t, class_labels=None).sample`, so the trainer,
the samplers and `save_pretrained` / `from_pretrained` treat them alike.

A class-conditional model of K classes has K + 1 class embeddings (diffusers' `num_class_embeds`): label
K means "no class". Training replaces labels by it at random (label dropout), so that one network is
both the conditional and the unconditional model that classifier-free guidance combines.
"""

from __future__ import annotations

import math

import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

# Image presets: resolution -> (block_out_channels, down blocks, up blocks). Two downsamplings on
# 8x8 would leave 2x2 maps, so the 8x8 preset has two levels; no attention keeps CPU steps cheap.
UNET_PRESETS: dict[str, dict] = {
    "unet8": dict(sample_size=8, block_out_channels=(32, 64),
                  down_block_types=("DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D")),
    "unet28": dict(sample_size=28, block_out_channels=(32, 64, 64),
                   down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D")),
    "unet32": dict(sample_size=32, block_out_channels=(32, 64, 64),
                   down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D")),
}


def build_unet(preset: str, in_channels: int = 1, num_class_embeds: int | None = None,
               block_out_channels: tuple[int, ...] | None = None, sample_size: int | None = None) -> UNet2DModel:
    """A UNet2DModel from a preset, or for preset "unet" one sized to `sample_size` (latents, say, whose
    size no preset has) with one down and one up block per width in `block_out_channels` (default
    (32, 64)). Group norms use up to 16 groups, as many as divide every width."""
    if preset == "unet":
        widths = tuple(block_out_channels or (32, 64))
        levels = len(widths)
        if sample_size is None or sample_size % 2 ** (levels - 1):
            raise ValueError(f"a unet with {levels} levels halves the resolution {levels - 1} times, "
                             f"which needs a size divisible by {2 ** (levels - 1)}, not {sample_size}")
        spec = dict(sample_size=sample_size, block_out_channels=widths,
                    down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels)
    else:
        spec = dict(UNET_PRESETS[preset])
        if block_out_channels is not None:
            if len(block_out_channels) != len(spec["block_out_channels"]):
                raise ValueError(f"{preset} needs {len(spec['block_out_channels'])} block_out_channels")
            spec["block_out_channels"] = tuple(block_out_channels)
    groups = math.gcd(16, *spec["block_out_channels"])
    return UNet2DModel(in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
                       norm_num_groups=groups, num_class_embeds=num_class_embeds, **spec)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPDenoiser(ModelMixin, ConfigMixin):
    """Noise predictor for vectors: residual SiLU MLP with a sinusoidal timestep embedding and, with
    `num_class_embeds`, a class embedding whose last index means "no class" (used when no labels are given)."""

    @register_to_config
    def __init__(self, dim: int = 2, hidden: int = 128, layers: int = 3, time_embed_dim: int = 64,
                 num_class_embeds: int | None = None):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embedding = nn.Embedding(num_class_embeds, hidden) if num_class_embeds else None
        self.input = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(layers))
        self.output = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int,
                class_labels: torch.Tensor | None = None) -> UNet2DOutput:
        if not torch.is_tensor(timestep) or timestep.ndim == 0:
            timestep = torch.full((len(sample),), float(timestep), device=sample.device)
        cond = self.time_mlp(timestep_embedding(timestep, self.config.time_embed_dim))
        if self.class_embedding is not None:
            if class_labels is None:
                class_labels = torch.full((len(sample),), self.config.num_class_embeds - 1, device=sample.device)
            cond = cond + self.class_embedding(class_labels)
        h = self.input(sample)
        for block in self.blocks:
            h = h + block(h + cond)
        return UNet2DOutput(sample=self.output(h))


def build_model(kind: str, sample_shape: tuple[int, ...], **options) -> ModelMixin:
    """The noise predictor named by `kind` for samples of `sample_shape`: "mlp" for vectors, a UNet
    preset for images of its size, or "unet" for square images (or latents) of any size."""
    if kind == "mlp":
        if len(sample_shape) != 1:
            raise ValueError(f"the mlp model is for vector data, not samples of shape {sample_shape}")
        return MLPDenoiser(dim=sample_shape[0], **options)
    if kind != "unet" and kind not in UNET_PRESETS:
        raise ValueError(f"unknown model kind {kind!r}; choose mlp, unet or one of {sorted(UNET_PRESETS)}")
    if kind == "unet":
        size = sample_shape[-1] if len(sample_shape) == 3 else None
        if size is None or sample_shape[1] != size:
            raise ValueError(f"unet expects square images (C, H, H), not samples of shape {sample_shape}")
        return build_unet(kind, in_channels=sample_shape[0], sample_size=size, **options)
    size = UNET_PRESETS[kind]["sample_size"]
    if len(sample_shape) != 3 or sample_shape[1:] != (size, size):
        raise ValueError(f"{kind} expects images of {size}x{size}, not samples of shape {sample_shape}")
    return build_unet(kind, in_channels=sample_shape[0], **options)


def null_class_label(model: torch.nn.Module) -> int | None:
    """The "no class" label of a class-conditional model (its last class embedding); None for an
    unconditional one. Accepts a model wrapped by DDP."""
    from accelerate.utils import extract_model_from_parallel

    # Called at every training step: accelerate's general unwrapping (about 0.5 ms) only when the model or
    # DDP's `module` has no config of its own (torch.compile, DeepSpeed).
    config = getattr(getattr(model, "module", model), "config", None)
    if config is None:
        config = getattr(extract_model_from_parallel(model), "config", {})
    embeds = config.get("num_class_embeds")
    return embeds - 1 if embeds else None


def sample_shape_of(model: ModelMixin) -> tuple[int, ...]:
    """The shape of one sample the model denoises."""
    if isinstance(model, MLPDenoiser):
        return (model.config.dim,)
    if not isinstance(model, UNet2DModel):
        return tuple(model.sample_shape)
    size = model.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (model.config.in_channels, *size)

