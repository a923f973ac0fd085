"""Experiment configuration: TOML files validated into dataclasses.

Every error names the offending field (`train.batch_size: must be positive, got -4`) so a user can
fix a config without reading a traceback; the CLI prints it on one line and exits with code 2.

Validation checks values only, declared beside the fields, without touching a file, so a stored run's
config always loads; the files a config names are checked where they are used (condiff.lifecycle).
Relative input paths in a config file are resolved against the file's folder (relative `--set` values
against the working directory) and stored resolved; `output_dir` is relative to the working directory.
"""

from condiff.config.schema import (
    DATASET_CLASSES,
    IDX_DATASETS,
    IMAGE_DATASETS,
    INT_LIMIT,
    SEED_LIMIT,
    ArgumentError,
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
    refuse_first_problem,
)
from condiff.config.validation import (
    CONFIG_DIR,
    ExperimentConfig,
    check_classes,
    config_from_dict,
    describe_constraints,
    image_channels,
    known_num_classes,
    resolve_input_paths,
)
from condiff.config.files import load_config, read_config_table
