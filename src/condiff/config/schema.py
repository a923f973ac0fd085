"""The configuration's schema: condiff's config errors, the sections as dataclasses with their checks
declared beside the fields, and the constants the validation uses. `condiff.config.validation` puts the
sections together (`ExperimentConfig`) and turns TOML tables into them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from condiff.errors import NamesArguments


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class ArgumentError(NamesArguments, ConfigError):
    """An argument of a condiff function is refused: `argument` names it, and `{other}` in the message names
    another argument. str() says Python's names; the command line says its flags instead (`spelled`)."""

    def __init__(self, argument: str, message: str):
        self.argument = argument
        super().__init__("{%s}: %s" % (argument, message))


def refuse_first_problem(settings, problems: dict[str, bool], error: Callable[[str, object], Exception]) -> None:
    """How a settings object checks itself (`validated`): `problems` maps each field's name to whether its value
    is refused; the first refused field raises `error(name, value)`."""
    for name, refused in problems.items():
        if refused:
            raise error(name, getattr(settings, name))


class InfeasibleConstraints(ValueError):
    """The requested constraints cannot all hold at once."""


def check_kl_feasibility(kl_bounds) -> None:
    """Refuse KL bounds b_i (nats) with sum_i exp(-b_i) >= 1 (Theorem 2: no model can meet them)."""
    if any(b <= 0 for b in kl_bounds):
        raise InfeasibleConstraints("KL bounds must be positive (nats)")
    total = sum(math.exp(-b) for b in kl_bounds)
    if total >= 1.0:
        raise InfeasibleConstraints(
            f"infeasible KL bounds {list(kl_bounds)}: sum of exp(-b_i) = {total:.4f} must be < 1 "
            "(loosen the bounds: raise some b_i)")


SEED_LIMIT = 2**32   # numpy's legacy range: every generator condiff seeds takes it, derived seeds (seed * 7919 + i) too


def check_seed(seed: int, where: str) -> None:
    """Refuse a seed outside 0 .. 2**32 - 1, naming `where` (a field, an argument or an option)."""
    if not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"{where}: a seed must be an integer from 0 to {SEED_LIMIT - 1}, got {seed}")


INT_LIMIT = 2**63    # TOML's integers are 64-bit: a config refuses any beyond (tomllib itself reads them whole)
MAX_TIMESTEPS = 10**6   # validation builds the whole noise schedule, in memory: a bound far above any use (1000)


# Checks declared beside the fields they check (dataclass field metadata), applied by `_check_ranges`.
def positive(default=None, *, at_most=None):
    return field(default=default, metadata={"check": "positive", "at_most": at_most})


def non_negative(default):
    return field(default=default, metadata={"check": "non-negative"})


def seed_value(default):
    return field(default=default, metadata={"check": "seed"})


@dataclass
class DataConfig:
    dataset: Literal["digits", "gmm", "mnist", "fashion-mnist", "idx", "image-folder", "image-csv"] = "digits"
    per_class: int | None = positive(None)      # training samples of every class (default: all)
    class_counts: dict[int, int] = field(default_factory=dict)  # per-class overrides: {4: 40} (TOML: { 4 = 40 })
    held_out_per_class: int = non_negative(30)  # image datasets: kept out of training, for the classifier
    max_per_class: int | None = positive(None)  # image datasets: use at most this many samples of every class
                                                # (drawn at random before anything else; default: all)
    means: list[list[float]] = field(default_factory=list)      # gmm: component means
    std: float = positive(0.1)                  # gmm: component standard deviation
    # Real datasets. Relative paths are relative to the config file's folder.
    path: str | None = None                     # idx: images file; image-folder: root (one sub-folder per
                                                # class); image-csv: image directory; fashion-mnist: directory
                                                # of its IDX files (default: Debian's dataset-fashion-mnist)
    labels_path: str | None = None              # idx: labels file; image-csv: the attribute CSV
    column: str | None = None                   # image-csv: the attribute (0/1 or -1/1) that is the label
    resolution: int | None = positive(None)     # resize images to this; default: 28 for the IDX datasets
                                                # (mnist, fashion-mnist, idx: native), 32 for image-folder/-csv
    channels: int | None = None                 # image-folder/-csv: 1 (grayscale) or 3 (RGB, the default)
    seed: int = seed_value(0)


@dataclass
class ModelConfig:
    kind: Literal["unet8", "unet28", "unet32", "unet", "mlp"] = "unet8"   # unet: sized to the data; mlp: vectors
    block_out_channels: list[int] | None = None  # UNet widths, one level each (default: the preset's;
                                                # unet: [32, 64])
    hidden: int = 128                           # mlp width
    layers: int = 3                             # mlp residual blocks
    class_conditional: bool = False             # a class embedding (+ "no class"): for guidance


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = positive(1000, at_most=MAX_TIMESTEPS)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = positive(1e-4)
    beta_end: float = positive(0.02)
    clip_sample: bool | None = None             # clip predicted x0 to [-1, 1]; default: for pixels
                                                # (not vectors, not latents)


@dataclass
class LatentConfig:
    """Latent diffusion: the model is trained on the images' latents under a frozen autoencoder."""
    autoencoder: str | None = None              # a diffusers AutoencoderKL folder (safetensors), e.g. Stable
                                                # Diffusion's vae/ or one from `condiff autoencoder`; unset: pixels


@dataclass
class TrainConfig:
    steps: int = positive(1000)
    batch_size: int = positive(64)              # primal batch: samples of the data per step
    lr: float = positive(1e-3)
    warmup_steps: int = non_negative(100)
    weight_decay: float = non_negative(0.0)
    grad_clip: float = non_negative(1.0)
    ema_decay: float = non_negative(0.0)        # 0 disables the EMA
    label_dropout: float = non_negative(0.0)    # class-conditional models: share of labels replaced by
                                                # "no class" (trains the unconditional half of
                                                # classifier-free guidance; 0.1-0.2 is usual)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    channels_last: bool = False                 # NHWC weights and activations (faster convolutions on GPUs)
    compile: bool = False                       # torch.compile the network (accelerate's inductor backend)
    log_with: Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive"] | None = None
                                                # an accelerate tracker beside metrics.jsonl (logs in RUN/trackers)
    log_every: int = positive(50)               # steps between metrics.jsonl writes (one host sync each)
    checkpoint_every: int = positive(500)
    keep_checkpoints: int = positive(2)
    seed: int = seed_value(0)


@dataclass
class ConstraintsConfig:
    classes: list[int] = field(default_factory=list)   # one constraint per class: its loss on its samples
    gamma: float | None = positive(None)        # resilient relaxation cost (paper: 0.085)
    thresholds: list[float] | None = None       # fixed thresholds in loss units, one per class
    target_shares: list[float] | None = None    # class shares to reach: multipliers fixed by Theorem 1 ...
    kl_bounds: list[float] | None = None        # ... or by KL bounds via Theorem 2
    # target_shares: "held" keeps Theorem 1's multipliers; "measured" starts there and steers them by the shares
    # the model generates (docs/share-control.md): every control_every steps, control_samples samples of
    # control_steps solver steps (control_method), labelled by the evaluation classifier, then
    # log lambda += rate (log s - log s_hat)
    control: Literal["held", "measured"] = "held"
    control_every: int = positive(100)
    control_samples: int = positive(200)
    control_steps: int = positive(10)
    # the control samples' sampler: closer to DDIM-50 than DDIM on digits, not on Fashion-MNIST (docs/share-control.md)
    control_method: Literal["dpm++", "ddim"] = "dpm++"
    control_rate: float = positive(0.25)
    control_smoothing: float = non_negative(0.5)   # weight of the earlier counts in the smoothed share
    control_start: float = non_negative(0.2)    # share of training before the first control step
    control_bound: float = positive(1.5)   # each class's weight pi + lambda stays within this factor of Theorem 1's
    # a proportional term (PI in velocity form): + control_proportional * (change of the error log s - log s_hat since
    # the last step), so a share still rising towards its target moves its multiplier less (the PID Lagrangian of
    # Stooke et al. 2020 damps the integral rule's overshoot; 0: the integral rule alone)
    control_proportional: float = non_negative(0.0)
    # of each step's control samples, this many are also drawn with the evaluation's sampler (sample.method,
    # sample.steps) from the same noises; their paired difference corrects the few-step sampler's bias on the data
    # (docs/share-control.md; 0: off, as it costs sample.steps network evaluations a sample)
    control_reference_samples: int = non_negative(0)

    @property
    def mode(self) -> str:
        """What the class constraints' multipliers do, in words (summaries, model cards, reports)."""
        if not self.classes:
            return "no class constraints"
        if self.target_shares is not None:
            return "measured share control" if self.control == "measured" else "held multipliers (Theorem 1)"
        if self.kl_bounds is not None:
            return "held multipliers (Theorem 2)"
        return "resilient dual ascent" if self.gamma is not None else "dual ascent on thresholds"


@dataclass
class FinetuneConfig:
    """Adapt a pretrained run to the data while staying close to it (fine-tuning without forgetting)."""
    pretrained: str = ""                        # run directory of the pretrained model: the starting point
    threshold: float | None = non_negative(None)    # bound on E||eps_pre - eps_theta||^2; unset: unconstrained
    inputs: Literal["gaussian", "trajectory"] = "gaussian"  # x_t of that distance: pure noise, or the pretrained
                                                    # model's own ancestral sampling paths
    trajectory_samples: int = positive(256)     # trajectory: ancestral sampling paths of the pretrained model
    states_per_trajectory: int = positive(50)   # trajectory: states kept per path (timesteps spread evenly)
    trajectory_steps: int | None = positive(None)   # trajectory: ancestral steps of those paths (default:
                                                    # every training timestep; fewer approximate the same
                                                    # marginals faster)


@dataclass
class DualConfig:
    estimator: Literal["stratified", "mixture"] = "stratified"
    batch_size: int = positive(16)              # stratified: samples of every constraint set per step
    floor: float = positive(0.1)                # mixture: constraint i is drawn with weight max(lambda_i, floor)
    primal_steps_per_dual: int = positive(2)    # N
    lr: float = positive(1000.0)                # dual step size ...
    lr_relative: bool = True                    # ... times the current primal lr when true


@dataclass
class SampleConfig:
    method: Literal["ddim", "ddpm"] = "ddim"
    steps: int = positive(50)
    num_samples: int = positive(1000)
    batch_size: int = positive(500)
    seed: int = seed_value(1234)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"   # autocast the network while sampling
    channels_last: bool = False                 # NHWC weights and activations while sampling


@dataclass
class EvaluateConfig:
    """`condiff evaluate`: class shares, FD and precision/recall in a learned classifier's feature
    space, and optionally Inception FID."""
    classifier_epochs: int = positive(30)
    num_samples: int | None = positive(None)    # generated samples to evaluate (default: sample.num_samples;
                                                # the paper evaluates 15,000)
    reference_samples: int | None = positive(None)  # cap on the real reference set, kept class-balanced
                                                # (default: all of it)
    nearest_neighbours: int = positive(3)       # k of the k-NN manifolds of precision and recall
    inception_weights: str | None = None        # pt_inception-2015-12-05-6726825d.pth: also report Inception
                                                # FID (needs pip install 'condiff[fid]'); unset: skipped


DATASET_CLASSES = {"digits": 10, "mnist": 10, "fashion-mnist": 10, "image-csv": 2}
IDX_DATASETS = {"mnist", "fashion-mnist", "idx"}           # grayscale, 28x28 unless resized
IMAGE_DATASETS = {"image-folder", "image-csv"}
# The fields each real dataset needs ("path" of fashion-mnist is optional) and what each is.
REQUIRED_FIELDS = {
    "idx": {"path": "the IDX images file", "labels_path": "the IDX labels file"},
    "image-folder": {"path": "the image folder (one sub-folder of images per class)"},
    "image-csv": {"path": "the image directory", "labels_path": "the attribute CSV (e.g. list_attr_celeba.csv)",
                  "column": "the CSV column that is the 0/1 label"},
}
DATA_FIELDS = ("path", "labels_path", "column", "resolution", "channels")
INPUT_PATHS = ("data.path", "data.labels_path", "latent.autoencoder", "finetune.pretrained", "evaluate.inception_weights")
