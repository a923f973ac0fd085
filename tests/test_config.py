"""Experiment configs: the shipped ones load; every bad one is refused with a ConfigError that names
the offending field (and the file), so that a user can fix it without reading a traceback."""

import tomllib
from pathlib import Path

import pytest
import tomli_w

from condiff.config import ConfigError, ExperimentConfig, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.toml"))

GMM = """
[data]
dataset = "gmm"
means = [[-2.0, -2.0], [2.0, -2.0], [0.0, 2.0]]
per_class = 50
[model]
kind = "mlp"
"""


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------
# the shipped configs


def test_the_configs_users_read_are_the_ones_the_commands_run():
    """configs/ (what a user reads and passes to `condiff train`) is the package's copy (what `condiff demo` and
    `condiff reproduce` read from an installed wheel), file for file and byte for byte."""
    package = REPO / "src" / "condiff" / "configs"
    names = sorted(p.relative_to(REPO / "configs") for p in (REPO / "configs").rglob("*.toml"))
    assert len(SHIPPED) >= 8 and names == sorted(p.relative_to(package) for p in package.rglob("*.toml"))
    assert all((REPO / "configs" / n).read_bytes() == (package / n).read_bytes() for n in names)


def load_shipped(path: Path, tmp_path: Path):
    """A shipped config, with stand-ins for the runs it builds on: the pretrained run of a fine-tuning
    config, the autoencoder (as `condiff autoencoder` makes it by default) of a latent one."""
    table = tomllib.loads(path.read_text())
    overrides = {}
    if "finetune" in table:
        fake_run = tmp_path / "pretrained"
        (fake_run / "model").mkdir(parents=True, exist_ok=True)
        (fake_run / "model" / "model_index.json").write_text("{}")
        overrides["finetune.pretrained"] = str(fake_run)
    if "latent" in table:
        from condiff.data.latent import build_small_autoencoder, save_autoencoder

        overrides["latent.autoencoder"] = str(save_autoencoder(build_small_autoencoder((1, 8, 8)), tmp_path / "vae"))
    return load_config(path, overrides)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path, tmp_path):
    config = load_shipped(path, tmp_path)
    assert config.name == path.stem
    assert config.output_dir == f"runs/{path.stem}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_builds_its_data_model_and_constraints(path, tmp_path):
    """Validation is not the last word: what train_run builds from the config must also succeed."""
    from condiff.data.latent import latent_shape
    from condiff.lifecycle.build import (
        MissingData,
        build_constraints,
        build_data,
        build_noise_scheduler,
        load_latent_autoencoder,
    )
    from condiff.models import build_model

    config = load_shipped(path, tmp_path)
    try:
        data = build_data(config)
    except MissingData as err:   # optional data (make data) never decides whether the suite passes
        pytest.skip(str(err))
    autoencoder = load_latent_autoencoder(config)
    shape = data.train.sample_shape if autoencoder is None else latent_shape(autoencoder, data.train.sample_shape)
    build_model(config.model.kind, shape, block_out_channels=config.model.block_out_channels)
    constraints = build_constraints(config, data.train, build_noise_scheduler(config, pixels=True))
    assert [c.name for c in constraints] == [f"class {k}" for k in config.constraints.classes]
    # every constraint acts: a resilient relaxation cost, or a multiplier fixed by the requested shares
    assert all(c.relaxation_cost > 0 or (c.fixed_multiplier or 0) > 0 for c in constraints)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_a_share_request_constrains_exactly_the_reduced_classes(path, tmp_path):
    """A config that asks for shares constrains the classes it keeps below the others, each to at least its
    data share: a request that lowered a class or left a reduced one out would not be the paper's experiment."""
    config = load_shipped(path, tmp_path)
    if config.constraints.target_shares is None:
        pytest.skip("no share request")
    reduced = sorted(k for k, n in config.data.class_counts.items() if n < config.data.per_class)
    assert config.constraints.classes == reduced
    data_share = [config.data.class_counts[c] / (config.data.per_class * 10 - sum(
        config.data.per_class - n for n in config.data.class_counts.values())) for c in reduced]
    assert all(target > share for target, share in zip(config.constraints.target_shares, data_share))


def test_every_config_the_commands_read_is_package_data():
    """`condiff demo` and `condiff reproduce` read their configs from inside the installed package; a wheel
    carries only what pyproject's package-data names, so each of them must exist there and be named."""
    from fnmatch import fnmatch

    from condiff.config import CONFIG_DIR
    from condiff.papers.demo import DEMO_CONFIGS
    from condiff.papers.reproduce import EXPERIMENTS, SCALES

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["condiff"]
    read = [CONFIG_DIR / name for name in DEMO_CONFIGS.values()] + [
        SCALES[scale] / name for e in EXPERIMENTS.values() for scale in e.scales
        for name in (e.config, e.pretrain_config) if name]
    for path in read:
        relative = path.relative_to(CONFIG_DIR.parent).as_posix()
        assert path.is_file(), relative
        assert any(fnmatch(relative, pattern) for pattern in patterns), (relative, patterns)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_config_survives_a_toml_round_trip(path, tmp_path):
    """A run stores its config as TOML and --resume compares it with the given one field by field."""
    config = load_shipped(path, tmp_path)
    again = config_from_dict(tomllib.loads(tomli_w.dumps(config.to_dict())))
    assert again == config


def test_omitted_sections_take_their_defaults(tmp_path):
    config = load_config(write(tmp_path, 'name = "minimal"\n'))
    assert config.data.dataset == "digits" and config.train.batch_size > 0
    assert config.output_dir == "runs/minimal"


def test_int_is_accepted_where_a_float_is_expected(tmp_path):
    config = load_config(write(tmp_path, "[train]\nlr = 1\n"))
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)


def test_overrides_are_applied_before_validation(tmp_path):
    path = write(tmp_path, "[train]\nsteps = 10\n")
    assert load_config(path, {"train.steps": 7, "sample.steps": 3}).train.steps == 7
    with pytest.raises(ConfigError, match=r"train\.steps: must be positive, got -1"):
        load_config(path, {"train.steps": -1})


# ---------------------------------------------------------------------------------------------------
# bad configs: (TOML text, a substring the error message must contain)

BAD_CONFIGS = {
    # unknown keys, at every level
    "unknown top-level key": ('nmae = "typo"\n', "nmae: unknown key"),
    "unknown section": ("[trian]\nsteps = 5\n", "trian: unknown key"),
    "unknown nested key": ("[train]\nbacth_size = 4\n", "train.bacth_size: unknown key"),
    "unknown key lists the known ones": ("[train]\nbacth_size = 4\n", "batch_size"),
    # wrong types
    "str for int": ('[train]\nsteps = "many"\n', "train.steps: expected int, got str"),
    "bool for float": ("[train]\nlr = true\n", "train.lr: expected float, got bool"),
    "bool for int": ("[train]\nsteps = true\n", "train.steps: expected int, got bool"),
    "float for int": ("[train]\nsteps = 1.5\n", "train.steps: expected int, got float"),
    "value for a section": ("train = 5\n", "train: expected a table"),
    "scalar for a list": ("[constraints]\nclasses = 4\ngamma = 0.1\n", "constraints.classes: expected a list"),
    "bad list item": ('[constraints]\nclasses = [4, "five"]\ngamma = 0.1\n', "constraints.classes[1]: expected int"),
    "bad table value": ('[data]\nclass_counts = {4 = "few"}\n', "data.class_counts.4: expected int"),
    # out of range
    "negative batch size": ("[train]\nbatch_size = -4\n", "train.batch_size: must be positive, got -4"),
    "zero dual batch size": ("[dual]\nbatch_size = 0\n", "dual.batch_size: must be positive, got 0"),
    "zero steps": ("[train]\nsteps = 0\n", "train.steps: must be positive"),
    "negative warmup": ("[train]\nwarmup_steps = -1\n", "train.warmup_steps: must be non-negative"),
    "ema decay of one": ("[train]\nema_decay = 1.0\n", "train.ema_decay: must be below 1"),
    "beta_end below beta_start": ("[diffusion]\nbeta_start = 0.02\nbeta_end = 0.01\n", "diffusion.beta_end"),
    "negative class count": ("[data]\nclass_counts = {4 = -1}\n", "data.class_counts.4: must be non-negative"),
    # bad choices
    "unknown estimator": ('[dual]\nestimator = "foo"\n', "dual.estimator: 'foo' is not one of"),
    "choice lists the options": ('[dual]\nestimator = "foo"\n', "is not one of stratified, mixture"),
    "unknown dataset": ('[data]\ndataset = "cifar"\n', "data.dataset: 'cifar' is not one of"),
    "unknown model": ('[model]\nkind = "transformer"\n', "model.kind: 'transformer' is not one of"),
    "unknown sampler": ('[sample]\nmethod = "euler"\n', "sample.method: 'euler' is not one of"),
    # classes the dataset lacks
    "constraint on a digit that does not exist": ("[constraints]\nclasses = [12]\ngamma = 0.1\n",
                                                  "constraints.classes[0]: dataset digits has no class 12"),
    "negative constraint class": ("[constraints]\nclasses = [4, -1]\ngamma = 0.1\n",
                                  "constraints.classes[1]: dataset digits has no class -1"),
    "count for a digit that does not exist": ("[data]\nclass_counts = {12 = 5}\n",
                                              "data.class_counts.12: dataset digits has no class 12"),
    "constraint on a gmm component that does not exist": (GMM + "[constraints]\nclasses = [3]\ngamma = 0.1\n",
                                                          "constraints.classes[0]: dataset gmm has no class 3"),
    "count for a gmm component that does not exist": (GMM.replace("per_class = 50", "per_class = 50\n"
                                                                  "class_counts = {3 = 5}"),
                                                      "data.class_counts.3: dataset gmm has no class 3"),
    # gmm needs its means and sizes
    "gmm without means": ('[data]\ndataset = "gmm"\nper_class = 5\n', "data.means: required"),
    "gmm with ragged means": ('[data]\ndataset = "gmm"\nper_class = 5\nmeans = [[0.0, 0.0], [1.0]]\n',
                              "data.means: every mean must have the same dimension"),
    "gmm without sizes": ('[data]\ndataset = "gmm"\nmeans = [[0.0], [1.0]]\n', "data.per_class: required"),
    # inconsistent constraints
    "class listed twice": ("[constraints]\nclasses = [4, 4]\ngamma = 0.1\n",
                           "constraints.classes: a class is listed twice"),
    "gamma and thresholds": ("[constraints]\nclasses = [4, 5]\ngamma = 0.1\nthresholds = [0.1, 0.1]\n",
                             "constraints: give exactly one of gamma, thresholds, target_shares, kl_bounds "
                             "(got gamma, thresholds)"),
    "no constraint mode": ("[constraints]\nclasses = [4, 5]\n", "constraints: give exactly one of"),
    "too few thresholds": ("[constraints]\nclasses = [4, 5]\nthresholds = [0.1]\n",
                           "constraints.thresholds: 1 values for 2 classes"),
    "too many target shares": ("[constraints]\nclasses = [4]\ntarget_shares = [0.1, 0.1]\n",
                               "constraints.target_shares: 2 values for 1 classes"),
    "negative gamma": ("[constraints]\nclasses = [4]\ngamma = -0.1\n", "constraints.gamma: must be positive"),
    # KL bounds (Theorem 2): feasible only when sum exp(-b_i) < 1
    "infeasible kl bounds": ("[constraints]\nclasses = [4, 5]\nkl_bounds = [0.1, 0.2]\n",
                             "constraints.kl_bounds: infeasible KL bounds"),
    "zero kl bound": ("[constraints]\nclasses = [4, 5]\nkl_bounds = [0.0, 3.0]\n",
                      "constraints.kl_bounds: KL bounds must be positive"),
}


@pytest.mark.parametrize("text,expected", list(BAD_CONFIGS.values()), ids=list(BAD_CONFIGS))
def test_bad_config_is_refused_naming_the_field(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert expected in message
    assert message.startswith(f"{path}: "), "the message names the file first"
    assert "\n" not in message, "the CLI prints the message as one line"


@pytest.mark.parametrize("kl_bounds", [[1.0, 2.0], [1.5, 1.5, 1.5], [5.0]])
def test_feasible_kl_bounds_are_accepted(tmp_path, kl_bounds):
    classes = [4, 5, 7][:len(kl_bounds)]
    path = write(tmp_path, f"[constraints]\nclasses = {classes}\nkl_bounds = {kl_bounds}\n")
    assert load_config(path).constraints.kl_bounds == kl_bounds


def test_a_retired_key_of_an_older_run_is_ignored_with_a_warning(tmp_path):
    path = write(tmp_path, "[constraints]\nclasses = [4]\ntarget_shares = [0.1]\nreference_loss = 0.07\n")
    with pytest.warns(UserWarning, match="constraints.reference_loss: no longer used"):
        assert load_config(path).constraints.target_shares == [0.1]


def test_missing_config_file_names_the_path(tmp_path):
    path = tmp_path / "no-such-config.toml"
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_a_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path)


@pytest.mark.parametrize("text", ["[train\nsteps = 5\n", "[train]\nsteps = \n", "name = 'a'\nname = 'b'\n"])
def test_invalid_toml_is_refused_naming_the_path(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_the_shipped_configs_pass_without_the_optional_data(tmp_path, monkeypatch):
    """`make test` once failed on a machine without Debian's dataset-fashion-mnist (issue 10, item 1): the
    shipped Fashion-MNIST config's build test skips, naming what is missing, where the data is absent."""
    monkeypatch.setenv("CONDIFF_FASHION_MNIST", str(tmp_path / "absent"))
    fashion = next(path for path in SHIPPED if path.stem.startswith("fashion"))
    with pytest.raises(pytest.skip.Exception, match="not found"):
        test_shipped_config_builds_its_data_model_and_constraints(fashion, tmp_path)


def test_class_counts_have_integer_keys_whether_written_in_toml_or_python(tmp_path):
    """TOML keys are strings; the config's are class numbers, from a file or set in Python, and stored back."""
    from_file = load_config(write(tmp_path, '[data]\nclass_counts = { 4 = 35, "5" = 30 }\n'))
    assert from_file.data.class_counts == {4: 35, 5: 30}
    in_python = ExperimentConfig()
    in_python.data.class_counts = {7: 20}
    assert in_python.validated().data.class_counts == {7: 20}
    assert tomllib.loads(tomli_w.dumps(from_file.to_dict()))["data"]["class_counts"] == {"4": 35, "5": 30}


def test_choices_are_literal_types_that_a_type_checker_sees():
    import typing

    from condiff.config import ConstraintsConfig, SampleConfig
    hints = typing.get_type_hints(SampleConfig)
    assert typing.get_args(hints["method"]) == ("ddim", "ddpm")
    assert typing.get_args(typing.get_type_hints(ConstraintsConfig)["control"]) == ("held", "measured")
    with pytest.raises(ConfigError, match=r"sample.method: 'euler' is not one of ddim, ddpm"):
        config_from_dict({"sample": {"method": "euler"}})
