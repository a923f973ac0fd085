"""Experiment configuration: TOML files validated into dataclasses.

Every error names the offending field (`train.batch_size: must be positive, got -4`) so a user can
fix a config without reading a traceback; the CLI prints it on one line and exits with code 2.

Validation checks values only, declared beside the fields, without touching a file, so a stored run's
config always loads; the files a config names are checked where they are used (condiff.experiments).
Relative input paths in a config file are resolved against the file's folder (relative `--set` values
against the working directory) and stored resolved; `output_dir` is relative to the working directory.
"""

from __future__ import annotations

import math
import os
import tomllib
import types
import typing
import warnings
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


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


# Checks declared beside the fields they check (dataclass field metadata), applied by `_check_ranges`.
def positive(default=None):
    return field(default=default, metadata={"check": "positive"})


def non_negative(default):
    return field(default=default, metadata={"check": "non-negative"})


def one_of(default, *others):
    return field(default=default, metadata={"choices": (default, *others)})


@dataclass
class DataConfig:
    dataset: str = one_of("digits", "gmm", "mnist", "fashion-mnist", "idx", "image-folder", "image-csv")
    per_class: int | None = positive(None)      # training samples of every class (default: all)
    class_counts: dict[str, int] = field(default_factory=dict)  # per-class overrides, e.g. {"4" = 40}
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
    seed: int = 0


@dataclass
class ModelConfig:
    kind: str = one_of("unet8", "unet28", "unet32", "unet", "mlp")   # unet: sized to the data; mlp: vectors
    block_out_channels: list[int] | None = None  # UNet widths, one level each (default: the preset's;
                                                # unet: [32, 64])
    hidden: int = 128                           # mlp width
    layers: int = 3                             # mlp residual blocks
    class_conditional: bool = False             # a class embedding (+ "no class"): for guidance


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = positive(1000)
    beta_schedule: str = one_of("linear", "scaled_linear", "squaredcos_cap_v2")
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
    mixed_precision: str = one_of("no", "fp16", "bf16")
    channels_last: bool = False                 # NHWC weights and activations (faster convolutions on GPUs)
    compile: bool = False                       # torch.compile the network (accelerate's inductor backend)
    log_with: str | None = one_of(None, "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")
                                                # an accelerate tracker beside metrics.jsonl (logs in RUN/trackers)
    log_every: int = positive(50)               # steps between metrics.jsonl writes (one host sync each)
    checkpoint_every: int = positive(500)
    keep_checkpoints: int = positive(2)
    seed: int = 0


@dataclass
class ConstraintsConfig:
    classes: list[int] = field(default_factory=list)   # one constraint per class: its loss on its samples
    gamma: float | None = positive(None)        # resilient relaxation cost (paper: 0.085)
    thresholds: list[float] | None = None       # fixed thresholds in loss units, one per class
    target_shares: list[float] | None = None    # class shares to reach: multipliers fixed by Theorem 1 ...
    kl_bounds: list[float] | None = None        # ... or by KL bounds via Theorem 2


@dataclass
class FinetuneConfig:
    """Adapt a pretrained run to the data while staying close to it (fine-tuning without forgetting)."""
    pretrained: str = ""                        # run directory of the pretrained model: the starting point
    threshold: float | None = non_negative(None)    # bound on E||eps_pre - eps_theta||^2; unset: unconstrained
    inputs: str = one_of("gaussian", "trajectory")  # x_t of that distance: pure noise, or the pretrained
                                                    # model's own ancestral sampling paths
    trajectory_samples: int = positive(256)     # trajectory: ancestral sampling paths of the pretrained model
    states_per_trajectory: int = positive(50)   # trajectory: states kept per path (timesteps spread evenly)
    trajectory_steps: int | None = positive(None)   # trajectory: ancestral steps of those paths (default:
                                                    # every training timestep; fewer approximate the same
                                                    # marginals faster)


@dataclass
class DualConfig:
    estimator: str = one_of("stratified", "mixture")
    batch_size: int = positive(16)              # stratified: samples of every constraint set per step
    floor: float = positive(0.1)                # mixture: constraint i is drawn with weight max(lambda_i, floor)
    primal_steps_per_dual: int = positive(2)    # N
    lr: float = positive(1000.0)                # dual step size ...
    lr_relative: bool = True                    # ... times the current primal lr when true


@dataclass
class SampleConfig:
    method: str = one_of("ddim", "ddpm")
    steps: int = positive(50)
    num_samples: int = positive(1000)
    batch_size: int = positive(500)
    seed: int = 1234
    mixed_precision: str = one_of("no", "fp16", "bf16")   # autocast the network while sampling
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


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    output_dir: str = ""                        # default: runs/<name> (relative to the working directory)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    constraints: ConstraintsConfig = field(default_factory=ConstraintsConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    dual: DualConfig = field(default_factory=DualConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def validated(self, source: str = "config") -> "ExperimentConfig":
        """A checked copy (as if loaded from TOML): one-line ConfigError naming the field otherwise."""
        return config_from_dict(self.to_dict(), source)

    def to_dict(self) -> dict:
        """A TOML-serialisable dict (None values dropped, as TOML has no null)."""
        def drop_none(d):
            return {k: drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}
        return drop_none(asdict(self))


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


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_type(value, tp, where: str):
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        return _check_type(value, options[0], where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_check_type(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
        _, value_type = typing.get_args(tp)
        return {str(k): _check_type(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


# Keys earlier versions wrote into run directories: ignored with a warning, so that those runs still load.
RETIRED_KEYS = {"constraints.reference_loss": "target_shares and kl_bounds now fix the multipliers"}


def _build(cls, table: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in [k for k in table if prefix + k in RETIRED_KEYS]:
        warnings.warn(f"{prefix}{key}: no longer used and ignored ({RETIRED_KEYS[prefix + key]})", stacklevel=2)
    table = {k: v for k, v in table.items() if prefix + k not in RETIRED_KEYS}
    for key in table:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key (expected one of {', '.join(sorted(known))})")
    values = {}
    for f in fields(cls):
        if f.name not in table:
            continue
        where = f"{prefix}{f.name}"
        if is_dataclass(hints[f.name]):
            if not isinstance(table[f.name], dict):
                raise ConfigError(f"{where}: expected a table [{where}]")
            values[f.name] = _build(hints[f.name], table[f.name], f"{where}.")
        else:
            values[f.name] = _check_type(table[f.name], hints[f.name], where)
    return cls(**values)


def _check_ranges(config: ExperimentConfig) -> None:
    for section in fields(config):
        sub = getattr(config, section.name)
        if not is_dataclass(sub):
            continue
        for f in fields(sub):
            where, value, check = f"{section.name}.{f.name}", getattr(sub, f.name), f.metadata
            if value is None:
                continue
            if "choices" in check and value not in check["choices"]:
                options = ", ".join(str(choice) for choice in check["choices"] if choice is not None)
                raise ConfigError(f"{where}: {value!r} is not one of {options}")
            if check.get("check") == "positive" and value <= 0:
                raise ConfigError(f"{where}: must be positive, got {value}")
            if check.get("check") == "non-negative" and value < 0:
                raise ConfigError(f"{where}: must be non-negative, got {value}")


def known_num_classes(data: DataConfig) -> int | None:
    """Classes of the configured dataset when the config alone says (None: its files do)."""
    if data.dataset == "gmm":
        return len(data.means)
    return DATASET_CLASSES.get(data.dataset)


def _check_data_fields(data: DataConfig) -> None:
    """Real datasets need their paths; fields that the dataset would ignore are refused."""
    for name, meaning in REQUIRED_FIELDS.get(data.dataset, {}).items():
        if not getattr(data, name):
            raise ConfigError(f"data.{name}: required for the {data.dataset} dataset ({meaning})")
    allowed = set(REQUIRED_FIELDS.get(data.dataset, {}))
    if data.dataset == "fashion-mnist":
        allowed.add("path")
    if data.dataset in IDX_DATASETS | IMAGE_DATASETS:
        allowed.add("resolution")
    if data.dataset in IMAGE_DATASETS:
        allowed.add("channels")
    if data.channels not in (None, 1, 3):
        raise ConfigError(f"data.channels: must be 1 (grayscale) or 3 (RGB), got {data.channels}")
    for name in DATA_FIELDS:
        if getattr(data, name) is not None and name not in allowed:
            raise ConfigError(f"data.{name}: not used by the {data.dataset} dataset"
                              + (" (IDX images are grayscale)" if name == "channels" and data.dataset in IDX_DATASETS
                                 else ""))


def image_channels(data: DataConfig) -> int | None:
    """Channels of the configured dataset's images (None for vector data)."""
    return None if data.dataset == "gmm" else (data.channels or 3) if data.dataset in IMAGE_DATASETS else 1


def _check_latent(config: ExperimentConfig) -> None:
    path = config.latent.autoencoder
    if path is None:
        return
    if not path.strip():
        raise ConfigError("latent.autoencoder: empty path (leave it out to train on pixels)")
    if image_channels(config.data) is None:
        raise ConfigError(f"latent.autoencoder: latent diffusion needs images, the {config.data.dataset} data are vectors")


def _check_consistency(config: ExperimentConfig) -> None:
    data, cons = config.data, config.constraints
    _check_data_fields(data)
    if data.dataset == "gmm":
        if not data.means:
            raise ConfigError("data.means: required for the gmm dataset")
        if len({len(m) for m in data.means}) != 1:
            raise ConfigError("data.means: every mean must have the same dimension")
        missing = [k for k in range(len(data.means)) if str(k) not in data.class_counts]
        if data.per_class is None and missing:
            raise ConfigError(f"data.per_class: required for the gmm dataset (samples per component; "
                              f"data.class_counts leaves component {missing[0]} without a count)")
    for key, count in data.class_counts.items():
        if not key.isdigit():
            raise ConfigError(f"data.class_counts.{key}: not a class number")
        if count < 0:
            raise ConfigError(f"data.class_counts.{key}: must be non-negative, got {count}")
    num_classes = known_num_classes(data)
    if num_classes is not None:
        check_classes(config, num_classes)
    if len(set(cons.classes)) != len(cons.classes):
        raise ConfigError("constraints.classes: a class is listed twice")
    modes = [k for k in ("gamma", "thresholds", "target_shares", "kl_bounds") if getattr(cons, k) is not None]
    if cons.classes and len(modes) != 1:
        raise ConfigError("constraints: give exactly one of gamma, thresholds, target_shares, kl_bounds "
                          f"(got {', '.join(modes) or 'none'})")
    for key in ("thresholds", "target_shares", "kl_bounds"):
        value = getattr(cons, key)
        if value is not None and len(value) != len(cons.classes):
            raise ConfigError(f"constraints.{key}: {len(value)} values for {len(cons.classes)} classes")
    if cons.target_shares is not None and (min(cons.target_shares) <= 0 or sum(cons.target_shares) >= 1):
        raise ConfigError(f"constraints.target_shares: each share must be positive and together below 1 "
                          f"(they sum to {sum(cons.target_shares):.4g})")
    if cons.kl_bounds is not None:
        try:
            check_kl_feasibility(cons.kl_bounds)
        except InfeasibleConstraints as err:
            raise ConfigError(f"constraints.kl_bounds: {err}") from None
    if config.finetune.threshold is not None and not config.finetune.pretrained:
        raise ConfigError("finetune.threshold: constrains the distance to a pretrained model; "
                          "set finetune.pretrained to its run directory")
    _check_latent(config)
    if config.evaluate.inception_weights is not None and not config.evaluate.inception_weights.strip():
        raise ConfigError("evaluate.inception_weights: empty path (leave it out to skip Inception FID)")
    if config.diffusion.beta_end <= config.diffusion.beta_start:
        raise ConfigError("diffusion.beta_end: must exceed diffusion.beta_start")
    for key in ("label_dropout", "ema_decay"):   # both non-negative already
        if not getattr(config.train, key) < 1:
            raise ConfigError(f"train.{key}: must be below 1, got {getattr(config.train, key)}")
    if config.train.label_dropout > 0 and not config.model.class_conditional:
        raise ConfigError("train.label_dropout: drops the labels of a class-conditional model; "
                          "set model.class_conditional = true")


def check_classes(config: ExperimentConfig, num_classes: int) -> None:
    data = config.data
    for key in data.class_counts:
        if int(key) >= num_classes:
            raise ConfigError(f"data.class_counts.{key}: dataset {data.dataset} has no class {key} "
                              f"(classes 0-{num_classes - 1})")
    for i, label in enumerate(config.constraints.classes):
        if not 0 <= label < num_classes:
            raise ConfigError(f"constraints.classes[{i}]: dataset {data.dataset} has no class {label} "
                              f"(classes 0-{num_classes - 1})")


def resolve_input_paths(table: dict, base: Path) -> None:
    """Make the table's relative input paths absolute against `base` (in place)."""
    for dotted in INPUT_PATHS:
        section, leaf = dotted.split(".")
        value = table.get(section, {}).get(leaf) if isinstance(table.get(section), dict) else None
        if isinstance(value, str) and value.strip() and not Path(value).expanduser().is_absolute():
            table[section][leaf] = os.path.normpath(base / value)


def config_from_dict(table: dict, source: str = "config") -> ExperimentConfig:
    """Validate a parsed TOML table into an ExperimentConfig without reading any file; errors name
    `source` and the field. Relative input paths left in the table are taken from the working directory."""
    try:
        config = _build(ExperimentConfig, table, "")
        _check_ranges(config)
        _check_consistency(config)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    for dotted in INPUT_PATHS:
        section, leaf = dotted.split(".")
        value = getattr(getattr(config, section), leaf)
        if value and value.strip():
            setattr(getattr(config, section), leaf, os.path.abspath(Path(value).expanduser()))
    if not config.output_dir:
        config.output_dir = str(Path("runs") / config.name)
    return config


def read_config_table(path: str | Path, overrides: dict | None = None) -> dict:
    """The TOML table of a config file with dotted `overrides` applied, not yet validated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        table = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    resolve_input_paths(table, path.resolve().parent)
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = table
        for depth, key in enumerate(parents):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: --set {dotted}: {'.'.join(parents[:depth + 1])} is not a table")
        node[leaf] = value
    return table


def load_config(path: str | Path, overrides: dict | None = None) -> ExperimentConfig:
    """Read and validate a TOML experiment config (optionally with nested overrides applied). The files
    it names are checked where they are used (`condiff.experiments.build.check_inputs`)."""
    return config_from_dict(read_config_table(path, overrides), str(path))
