"""The experiment config (`ExperimentConfig`: the schema's sections together) and the validation of TOML
tables into it: types, ranges, choices and the consistency of fields with each other, every error naming its
field. Also a config's constraints in words (`describe_constraints`) and the shipped configs (`CONFIG_DIR`)."""

from __future__ import annotations

import math
import os
import types
import typing
import unicodedata
import warnings
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from condiff.config.schema import (
    DATA_FIELDS,
    DATASET_CLASSES,
    IDX_DATASETS,
    IMAGE_DATASETS,
    INPUT_PATHS,
    INT_LIMIT,
    REQUIRED_FIELDS,
    ConfigError,
    ConstraintsConfig,
    DataConfig,
    DiffusionConfig,
    DualConfig,
    EvaluateConfig,
    FinetuneConfig,
    InfeasibleConstraints,
    LatentConfig,
    ModelConfig,
    SampleConfig,
    TrainConfig,
    check_kl_feasibility,
    check_seed,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"    # the shipped configs (package data)


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
        def drop_none(d):   # keys as strings: TOML's (class_counts' integer keys read back as they were)
            return {str(k): drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}
        return drop_none(asdict(self))


def describe_constraints(config: ExperimentConfig) -> str:
    """A config's constraints in words, for reports: per class, what sets its multipliers (ConstraintsConfig's
    `mode`); for fine-tuning, the start and the distance to the pretrained model."""
    parts = []
    cons = config.constraints
    if cons.classes:
        mode = next(f"{key.replace('_', ' ')} {getattr(cons, key)}" for key in ("gamma", "thresholds", "target_shares",
                                                                             "kl_bounds") if getattr(cons, key) is not None)
        parts.append(f"one constraint per class {cons.classes}, {mode}: {cons.mode} ({config.dual.estimator} estimator)")
    if config.finetune.pretrained:
        parts.append("starts from the pretrained model")
    if config.finetune.threshold is not None:
        parts.append(f"distance to the pretrained model <= {config.finetune.threshold:g} "
                     f"(x_t: {config.finetune.inputs})")
    return ", ".join(parts) or "unconstrained"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_key(key, tp, where: str):
    """A table's key as `tp`: integer keys are written as TOML strings ("4" = 35) or given as ints from Python."""
    if tp is int:
        text = str(key)
        if isinstance(key, bool) or not (text.isascii() and text.isdigit()):   # int() takes other digits ("²")
            raise ConfigError(f"{where}.{key}: not a class number")
        return int(text)
    return str(key)


def _check_type(value, tp, where: str):
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, typing.get_args(tp)))}")
        return value
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
        key_type, value_type = typing.get_args(tp)
        return {_check_key(k, key_type, where): _check_type(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if tp in (int, float) and isinstance(value, int) and not -INT_LIMIT <= value < INT_LIMIT:
        raise ConfigError(f"{where}: {value} is beyond TOML's 64-bit integers")
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


def _non_finite(value) -> bool:
    """Whether a float, or a list of them at any depth, holds a NaN or an infinity (TOML allows both)."""
    if isinstance(value, list):
        return any(_non_finite(item) for item in value)
    return isinstance(value, float) and not math.isfinite(value)


def _check_ranges(config: ExperimentConfig) -> None:
    for section in fields(config):
        sub = getattr(config, section.name)
        if not is_dataclass(sub):
            continue
        for f in fields(sub):
            where, value, check = f"{section.name}.{f.name}", getattr(sub, f.name), f.metadata
            if value is None:
                continue
            if _non_finite(value):
                raise ConfigError(f"{where}: must be finite, got {value}")
            if check.get("check") == "seed":
                check_seed(value, where)
            if check.get("check") == "positive" and value <= 0:
                raise ConfigError(f"{where}: must be positive, got {value}")
            if check.get("at_most") is not None and value > check["at_most"]:
                raise ConfigError(f"{where}: must be at most {check['at_most']}, got {value}")
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
        missing = [k for k in range(len(data.means)) if k not in data.class_counts]
        if data.per_class is None and missing:
            raise ConfigError(f"data.per_class: required for the gmm dataset (samples per component; "
                              f"data.class_counts leaves component {missing[0]} without a count)")
    for key, count in data.class_counts.items():
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
    if cons.control == "measured" and cons.target_shares is None:
        raise ConfigError("constraints.control: \"measured\" steers the shares of constraints.target_shares; set them")
    for key in ("control_smoothing", "control_start"):
        if not getattr(cons, key) < 1:
            raise ConfigError(f"constraints.{key}: must be below 1, got {getattr(cons, key)}")
    if cons.control_reference_samples > cons.control_samples:
        raise ConfigError(f"constraints.control_reference_samples: at most constraints.control_samples "
                          f"({cons.control_samples}), got {cons.control_reference_samples}")
    if cons.control_bound < 1:
        raise ConfigError(f"constraints.control_bound: must be at least 1 (1 holds Theorem 1's multipliers), "
                          f"got {cons.control_bound}")
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
    for key in ("label_dropout", "ema_decay"):   # both non-negative already
        if not getattr(config.train, key) < 1:
            raise ConfigError(f"train.{key}: must be below 1, got {getattr(config.train, key)}")
    if config.train.label_dropout > 0 and not config.model.class_conditional:
        raise ConfigError("train.label_dropout: drops the labels of a class-conditional model; "
                          "set model.class_conditional = true")


def _check_schedule(config: ExperimentConfig) -> None:
    """0 < beta_start < beta_end < 1, and alphas_cumprod (float32, as training computes them) positive to
    the last timestep: where they reach 0, x0 predictions divide by 0 and training and sampling give NaN."""
    d = config.diffusion
    if d.beta_end <= d.beta_start:
        raise ConfigError("diffusion.beta_end: must exceed diffusion.beta_start")
    if not d.beta_end < 1:
        raise ConfigError(f"diffusion.beta_end: a noise variance per step, must be below 1, got {d.beta_end}")
    from diffusers import DDPMScheduler   # the real schedule, imported late: `import condiff.config` stays light

    alphas_cumprod = DDPMScheduler(num_train_timesteps=d.num_train_timesteps, beta_schedule=d.beta_schedule,
                                   beta_start=d.beta_start, beta_end=d.beta_end).alphas_cumprod
    if not alphas_cumprod[-1] > 0:
        where = "num_train_timesteps" if d.beta_schedule == "squaredcos_cap_v2" else "beta_end"   # cos ignores betas
        raise ConfigError(f"diffusion.{where}: the {d.beta_schedule} schedule's alphas_cumprod reach 0 at timestep "
                          f"{int((alphas_cumprod > 0).sum())} of {d.num_train_timesteps} (float32), where training and "
                          "sampling give NaN; lower diffusion.beta_end or diffusion.num_train_timesteps")


# Samplers that space their steps over the training schedule, which has num_train_timesteps of them at most.
INFERENCE_STEPS = (("sample", "steps"), ("constraints", "control_steps"), ("finetune", "trajectory_steps"))


def _check_samplers(config: ExperimentConfig) -> None:
    """Sampling steps within the training schedule; evaluations of more samples than their k-NN's k."""
    timesteps = config.diffusion.num_train_timesteps
    for section, key in INFERENCE_STEPS:
        steps = getattr(getattr(config, section), key)
        if steps is not None and steps > timesteps:
            raise ConfigError(f"{section}.{key}: {steps} steps, more than the {timesteps} timesteps of the training "
                              "schedule (diffusion.num_train_timesteps)")
    evaluation = config.evaluate
    if evaluation.num_samples is not None and evaluation.num_samples <= evaluation.nearest_neighbours:
        raise ConfigError(f"evaluate.num_samples: {evaluation.num_samples} samples, precision and recall need more "
                          f"than evaluate.nearest_neighbours = {evaluation.nearest_neighbours}")


def _check_name(name: str) -> None:
    """The run's folder under runs/ by default: one visible path component, so that it stays inside runs/."""
    if (not name or name.startswith(".") or "/" in name or "\\" in name
            or any(unicodedata.category(c) == "Cc" for c in name)):
        raise ConfigError(f"name: {name!r} is not a folder name (the run's runs/NAME): one path component, not "
                          "empty, without /, \\ or control characters, not starting with a dot")


def check_classes(config: ExperimentConfig, num_classes: int) -> None:
    data = config.data
    for key in data.class_counts:
        if key >= num_classes:
            raise ConfigError(f"data.class_counts.{key}: dataset {data.dataset} has no class {key} "
                              f"(classes 0-{num_classes - 1})")
    for i, label in enumerate(config.constraints.classes):
        if not 0 <= label < num_classes:
            raise ConfigError(f"constraints.classes[{i}]: dataset {data.dataset} has no class {label} "
                              f"(classes 0-{num_classes - 1})")


def expand_user(path: str, where: str) -> Path:
    """`path` with a leading ~ or ~USER expanded; refused naming `where` when it holds a NUL (no file system takes
    one) or names a user without a home directory."""
    if "\x00" in path:
        raise ConfigError(f"{where}: {path!r}: a path cannot hold a NUL character")
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise ConfigError(f"{where}: {path!r}: no home directory to expand {path.split('/')[0]!r} to") from None


def resolve_input_paths(table: dict, base: Path) -> None:
    """Make the table's relative input paths absolute against `base` (in place)."""
    for dotted in INPUT_PATHS:
        section, leaf = dotted.split(".")
        value = table.get(section, {}).get(leaf) if isinstance(table.get(section), dict) else None
        if isinstance(value, str) and value.strip() and not expand_user(value, dotted).is_absolute():
            table[section][leaf] = os.path.normpath(base / value)


def config_from_dict(table: dict, source: str = "config") -> ExperimentConfig:
    """Validate a parsed TOML table into an ExperimentConfig without reading any file; errors name
    `source` and the field. Relative input paths left in the table are taken from the working directory."""
    try:
        config = _build(ExperimentConfig, table, "")
        _check_name(config.name)
        _check_ranges(config)
        _check_consistency(config)
        _check_schedule(config)
        _check_samplers(config)
        for dotted in INPUT_PATHS:
            section, leaf = dotted.split(".")
            value = getattr(getattr(config, section), leaf)
            if value and value.strip():
                setattr(getattr(config, section), leaf, os.path.abspath(expand_user(value, dotted)))
        if config.output_dir:   # ~ expanded, but left relative to the working directory
            config.output_dir = str(expand_user(config.output_dir, "output_dir"))
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    if not config.output_dir:
        config.output_dir = str(Path("runs") / config.name)
    return config
