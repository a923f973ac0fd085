"""The command line: user errors give exit code 2 and one line `condiff: error: ...` naming the field
or file, having written nothing; a tiny Gaussian-mixture run trains, samples, evaluates and loads
back as a diffusers pipeline."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from condiff.cli import main

os.environ["HF_HUB_OFFLINE"] = "1"

TINY_GMM = """
name = "tiny-gmm"
output_dir = {output_dir}

[data]
dataset = "gmm"
means = [[-2.0, -2.0], [2.0, -2.0], [0.0, 2.0]]
std = 0.3
per_class = 100

[model]
kind = "mlp"
hidden = 32
layers = 1

[train]
steps = 30
batch_size = 32
warmup_steps = 5
checkpoint_every = 10

[sample]
num_samples = 200
steps = 10
batch_size = 200
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py


def toml_path(path) -> str:
    return json.dumps(str(path))  # a JSON string is a valid TOML basic string


def write_config(directory, text: str, output_dir) -> str:
    """Write `text` (with `output_dir = ...` prepended) to directory/config.toml; returns its path."""
    path = directory / "config.toml"
    path.write_text(f"output_dir = {toml_path(output_dir)}\n{text}")
    return str(path)


def tiny_gmm_config(directory, output_dir, extra: str = "") -> str:
    path = directory / "tiny-gmm.toml"
    path.write_text(TINY_GMM.format(output_dir=toml_path(output_dir)) + extra)
    return str(path)


def error_line(capsys) -> str:
    """The single line the CLI printed on stderr, which must be a `condiff: error:` line."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith("condiff: error: ")
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# bad configs: exit 2, one line naming the field, nothing written

BAD_CONFIGS = {
    "unknown key": ("[train]\nbacth_size = 4\n", "train.bacth_size: unknown key"),
    "wrong type": ('[train]\nsteps = "many"\n', "train.steps: expected int"),
    "negative batch size": ("[train]\nbatch_size = -4\n", "train.batch_size: must be positive, got -4"),
    "bad choice": ('[dual]\nestimator = "foo"\n', "dual.estimator"),
    "missing class": ("[constraints]\nclasses = [12]\ngamma = 0.1\n", "constraints.classes[0]"),
    "infeasible kl bounds": ("[constraints]\nclasses = [4, 5]\nkl_bounds = [0.1, 0.2]\n",
                             "constraints.kl_bounds: infeasible"),
    "invalid toml": ("[train\nsteps = 5\n", "not valid TOML"),
}


@pytest.mark.parametrize("text,expected", list(BAD_CONFIGS.values()), ids=list(BAD_CONFIGS))
def test_train_with_bad_config_exits_2_naming_the_field_and_writes_nothing(tmp_path, monkeypatch, capsys,
                                                                          text, expected):
    monkeypatch.chdir(tmp_path)  # a stray default runs/<name> would land here
    out = tmp_path / "out"
    config = write_config(tmp_path, text, out)
    assert main(["train", config]) == 2
    line = error_line(capsys)
    assert expected in line and config in line
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]


def test_train_with_missing_config_exits_2_naming_the_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "missing.toml")
    assert main(["train", missing]) == 2
    line = error_line(capsys)
    assert missing in line and "not found" in line
    assert list(tmp_path.iterdir()) == []


BAD_AFTER_VALIDATION = {
    # each passes config validation and is only found once train_run builds data, model or constraints
    "more samples than the class has": ('[data]\nclass_counts = {4 = 500}\n', "data.class_counts.4"),
    "unet on vector data": (TINY_GMM.split("\n", 3)[3].replace('"mlp"', '"unet8"'), "model.kind"),
    "target shares summing past 1": ("[constraints]\nclasses = [4, 5]\ntarget_shares = [0.6, 0.6]\n",
                                     "constraints.target_shares"),
}


@pytest.mark.parametrize("text,expected", list(BAD_AFTER_VALIDATION.values()), ids=list(BAD_AFTER_VALIDATION))
def test_errors_found_while_building_the_run_also_write_nothing(tmp_path, capsys, text, expected):
    out = tmp_path / "out"
    assert main(["train", write_config(tmp_path, text, out)]) == 2
    line = error_line(capsys)
    assert not out.exists(), "a failed train left a run directory (a retry now needs --overwrite)"
    assert expected in line


# ---------------------------------------------------------------------------------------------------
# --set overrides


def test_set_overrides_the_config(tmp_path):
    run = tmp_path / "run"
    config = tiny_gmm_config(tmp_path, run)
    argv = ["train", config, "--set", "train.steps=3", "--set", "train.checkpoint_every=3",
            "--set", "name=overridden", "--set", "sample.method=ddpm"]  # bare words are strings
    assert main(argv) == 0
    import tomllib
    stored = tomllib.loads((run / "config.toml").read_text())
    assert stored["name"] == "overridden"
    assert stored["train"]["steps"] == 3 and stored["sample"]["method"] == "ddpm"
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


BAD_OVERRIDES = {
    "negative steps": ("train.steps=-1", "train.steps: must be positive, got -1"),
    "unknown key": ("train.bacth_size=4", "train.bacth_size: unknown key"),
    "wrong type": ("train.lr=fast", "train.lr: expected float, got str"),
    "unknown section": ("trian.steps=4", "trian: unknown key"),
    "no value": ("train.steps", "expected KEY=VALUE"),
    "no key": ("=5", "expected KEY=VALUE"),
}


@pytest.mark.parametrize("override,expected", list(BAD_OVERRIDES.values()), ids=list(BAD_OVERRIDES))
def test_bad_override_exits_2_naming_the_field_and_writes_nothing(tmp_path, capsys, override, expected):
    run = tmp_path / "run"
    assert main(["train", tiny_gmm_config(tmp_path, run), "--set", override]) == 2
    assert expected in error_line(capsys)
    assert not run.exists()


def test_override_below_a_scalar_is_a_user_error(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", tiny_gmm_config(tmp_path, run), "--set", "name.first=1"]) == 2
    assert "name" in error_line(capsys)
    assert not run.exists()


# ---------------------------------------------------------------------------------------------------
# run directories


def test_existing_run_directory_is_not_overwritten_without_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "marker.txt").write_text("precious")
    config = tiny_gmm_config(tmp_path, run)
    assert main(["train", config]) == 2
    line = error_line(capsys)
    assert "--overwrite" in line and str(run) in line
    assert (run / "marker.txt").read_text() == "precious"
    assert sorted(p.name for p in run.iterdir()) == ["marker.txt"]


def test_overwrite_replaces_a_run_directory_condiff_made(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".condiff").write_text('{"kind": "run"}')   # made by condiff: --overwrite may replace it
    (run / "marker.txt").write_text("stale")
    assert main(["train", tiny_gmm_config(tmp_path, run), "--overwrite", "--set", "train.steps=2"]) == 0
    assert not (run / "marker.txt").exists()
    assert (run / "config.toml").is_file() and (run / "model" / "model_index.json").is_file()


@pytest.mark.parametrize("state", ["missing", "empty", "config only"])
def test_resume_without_a_checkpoint_exits_2(tmp_path, capsys, state):
    run = tmp_path / "run"
    config = tiny_gmm_config(tmp_path, run)
    if state != "missing":
        run.mkdir()
    if state == "config only":
        (run / "config.toml").write_text((tmp_path / "tiny-gmm.toml").read_text())
    assert main(["train", config, "--resume"]) == 2
    assert "no checkpoint to resume from" in error_line(capsys)
    assert run.exists() == (state != "missing")
    if state == "config only":
        assert sorted(p.name for p in run.iterdir()) == ["config.toml"]


@pytest.mark.parametrize("command", ["sample", "evaluate"])
@pytest.mark.parametrize("state", ["missing", "empty"])
def test_sample_and_evaluate_refuse_a_directory_that_is_not_a_run(tmp_path, capsys, command, state):
    target = tmp_path / "not-a-run"
    if state == "empty":
        target.mkdir()
    assert main([command, str(target)]) == 2
    line = error_line(capsys)
    assert "not a condiff run directory" in line and str(target) in line
    assert not target.exists() or list(target.iterdir()) == []


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_sample_and_evaluate_refuse_a_run_that_was_never_trained(tmp_path, capsys, command):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(TINY_GMM.format(output_dir=toml_path(run)))
    assert main([command, str(run)]) == 2
    assert "no trained model" in error_line(capsys)
    assert sorted(p.name for p in run.iterdir()) == ["config.toml"]


@pytest.mark.parametrize("option", ["--num-samples", "--steps", "--batch-size"])
def test_sample_refuses_non_positive_counts(tmp_path, capsys, option):
    assert main(["sample", str(tmp_path), option, "0"]) == 2
    assert f"{option}: must be positive, got 0" in error_line(capsys)


def test_gmm_config_with_only_class_counts_trains(tmp_path, capsys):
    run = tmp_path / "run"
    text = TINY_GMM.format(output_dir=toml_path(run))
    config = tmp_path / "counts.toml"
    config.write_text(text.replace("per_class = 100", "class_counts = {0 = 60, 1 = 60, 2 = 20}"))
    assert main(["train", str(config), "--set", "train.steps=2"]) == 0, capsys.readouterr().err
    assert json.loads((run / "summary.json").read_text())["data_class_shares"] == pytest.approx([60 / 140, 60 / 140, 20 / 140])


# ---------------------------------------------------------------------------------------------------
# end to end: a tiny Gaussian-mixture run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    run = root / "run"
    config = tiny_gmm_config(root, run)
    assert main(["train", config]) == 0
    return run, config


def test_train_writes_a_complete_run(trained_run):
    run, _ = trained_run
    assert (run / "config.toml").is_file() and (run / "model" / "model_index.json").is_file()
    assert json.loads((run / "summary.json").read_text())["steps"] == 30
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 30
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000030"
    # checkpoints every 10 steps, the default keep_checkpoints = 2 keeps the newest two
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-0000020", "step-0000030"]


def test_sample_writes_samples_npz_and_png(trained_run, capsys):
    run, _ = trained_run
    assert main(["sample", str(run)]) == 0
    assert "samples.npz" in capsys.readouterr().out
    samples = np.load(run / "samples.npz")["samples"]
    assert samples.shape == (200, 2) and np.isfinite(samples).all()
    assert (run / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trained_model_loads_as_a_diffusers_pipeline(trained_run):
    from diffusers import DDPMPipeline

    from condiff.models import MLPDenoiser

    run, _ = trained_run
    pipeline = DDPMPipeline.from_pretrained(run / "model")
    assert isinstance(pipeline.unet, MLPDenoiser)
    assert pipeline.scheduler.config.num_train_timesteps == 1000
    final = load_file(run / "checkpoints" / "step-0000030" / "model" / "diffusion_pytorch_model.safetensors")
    loaded = pipeline.unet.state_dict()
    assert set(loaded) == set(final)
    assert all(torch.equal(loaded[k], final[k]) for k in final)


def test_evaluate_a_gmm_run(trained_run, capsys):
    run, _ = trained_run
    assert main(["evaluate", str(run)]) == 0
    assert "tv_to_uniform=" in capsys.readouterr().out
    result = json.loads((run / "evaluation.json").read_text())
    assert result["num_samples"] == 200
    assert result["classifier_accuracy"] > 0.95  # the exact Bayes classifier of well-separated components
    assert len(result["class_frequencies"]) == 3 and sum(result["class_frequencies"]) == pytest.approx(1.0)
    assert np.isfinite(result["frechet_distance"])
    assert (run / "report.md").is_file() and (run / "class_frequencies.png").is_file()


def test_resume_refuses_a_different_config(trained_run, capsys):
    run, config = trained_run
    assert main(["train", config, "--resume", "--set", "train.batch_size=7"]) == 2
    line = error_line(capsys)
    assert "cannot resume with a different config" in line and "train.batch_size" in line


@pytest.mark.parametrize("error", ["argument", "switch", "config", "run directory"])
def test_condiffs_errors_cross_from_a_worker_process_whole(error):
    """`condiff demo` trains in worker processes: an error raised there is pickled to the parent, which must
    still spell the arguments it names as flags (ArgumentError's __init__ takes other arguments than its args)."""
    import pickle

    from condiff.config import ArgumentError, ConfigError
    from condiff.errors import SwitchError
    from condiff.rundir import RunDirectoryError

    made = {"argument": lambda: ArgumentError("num_samples", "must be positive, not {overwrite}"),
            "switch": lambda: SwitchError("runs/demo exists; pass {overwrite}"),
            "config": lambda: ConfigError("train.steps: must be positive"),
            "run directory": lambda: RunDirectoryError("runs/x: not finished; pass {resume}")}[error]()
    crossed = pickle.loads(pickle.dumps(made))
    assert type(crossed) is type(made) and str(crossed) == str(made) and crossed.args == made.args
    assert vars(crossed) == vars(made)
    if hasattr(made, "spelled"):
        flags = lambda name: "--" + name.replace("_", "-")   # noqa: E731
        assert crossed.spelled(flags) == made.spelled(flags) and "--" in crossed.spelled(flags)
