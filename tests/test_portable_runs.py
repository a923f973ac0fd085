"""Portable runs and honest evaluation inputs (issue 10, items 6 and 7): a finished run samples and
evaluates without the data or the pretrained run it was trained from, from any working directory;
relative paths in a config file are resolved against its folder; evaluation reuses samples only when
they record exactly the drawing it would make."""

import json
import shutil
import tomllib

import numpy as np
import pytest

from condiff.cli import main
from condiff.sampling.generate import load_samples

pytestmark = pytest.mark.usefixtures("one_torch_thread")

def run_cli(capsys, *argv) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    return err


def test_a_finetuned_run_outlives_its_pretrained_run_and_its_working_directory(tmp_path, capsys, monkeypatch,
                                                                                 tiny_toml):
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    monkeypatch.chdir(project)
    tiny_toml(project / "configs" / "pre.toml", "runs/pre", name="pre")
    # Relative to the config file's folder, not to where condiff runs.
    tiny_toml(project / "configs" / "tune.toml", "runs/tune", name="tune",
              finetune={"pretrained": "../runs/pre", "threshold": 0.5, "inputs": "gaussian"})
    run_cli(capsys, "train", "configs/pre.toml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run_cli(capsys, "train", str(project / "configs" / "tune.toml"), "--set", f'output_dir="{project / "runs/tune"}"')
    stored = tomllib.loads((project / "runs" / "tune" / "config.toml").read_text())
    assert stored["finetune"]["pretrained"] == str(project / "runs" / "pre")
    assert stored["output_dir"] == str(project / "runs" / "tune")

    shutil.move(project / "runs" / "pre", tmp_path / "moved-away")
    shutil.move(project / "runs" / "tune", tmp_path / "tune-copy")
    run_cli(capsys, "sample", str(tmp_path / "tune-copy"))
    run_cli(capsys, "evaluate", str(tmp_path / "tune-copy"))
    assert json.loads((tmp_path / "tune-copy" / "evaluation.json").read_text())["num_samples"] == 40


def test_an_image_run_evaluates_without_its_data_files(tmp_path, capsys, monkeypatch):
    from test_datasets import write_idx

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 30).astype(np.uint8)
    images = (rng.random((90, 8, 8)) * 80 + labels[:, None, None] * 80).astype(np.uint8)
    data = tmp_path / "data"
    data.mkdir()
    write_idx(data / "images.idx", images)
    write_idx(data / "labels.idx", labels)
    (tmp_path / "c.toml").write_text(
        'name = "idx"\n[data]\ndataset = "idx"\npath = "data/images.idx"\nlabels_path = "data/labels.idx"\n'
        'held_out_per_class = 5\n[model]\nkind = "unet8"\nblock_out_channels = [8, 16]\n'
        '[train]\nsteps = 2\nbatch_size = 8\nwarmup_steps = 1\n[sample]\nnum_samples = 16\nbatch_size = 16\nsteps = 2\n'
        '[evaluate]\nclassifier_epochs = 1\n')
    run_cli(capsys, "train", "c.toml")
    shutil.rmtree(data)
    run_cli(capsys, "evaluate", "runs/idx")
    result = json.loads((tmp_path / "runs" / "idx" / "evaluation.json").read_text())
    assert result["num_reference"] == 90 and len(result["class_frequencies"]) == 3


def test_relative_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "c.toml").write_text('[data]\ndataset = "idx"\npath = "../d/i.idx"\nlabels_path = "l.idx"\n')
    from condiff.config import config_from_dict, read_config_table

    monkeypatch.chdir(tmp_path / "configs")
    table = read_config_table(tmp_path / "configs" / "c.toml", {"data.labels_path": "x/l.idx"})
    config = config_from_dict(table)
    assert config.data.path == str(tmp_path / "d" / "i.idx")
    assert config.data.labels_path == str(tmp_path / "configs" / "x" / "l.idx")   # --set: from the cwd


def test_evaluate_redraws_samples_drawn_differently_and_says_so(tmp_path, capsys, monkeypatch, tiny_toml):
    """`condiff sample RUN --steps 1` followed by `condiff evaluate RUN` once evaluated the 1-step samples."""
    monkeypatch.chdir(tmp_path)
    tiny_toml(tmp_path / "c.toml", "run")
    run_cli(capsys, "train", "c.toml")
    run_cli(capsys, "sample", "run", "--steps", "1")
    assert load_samples(tmp_path / "run" / "samples.npz")[1]["steps"] == 1
    err = run_cli(capsys, "evaluate", "run")
    assert "differs from what evaluation draws" in err and "steps 1 (wanted 4)" in err
    result = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert {k: result["samples"][k] for k in ("method", "steps", "seed", "num_samples", "model_step")} == \
        {"method": "ddim", "steps": 4, "seed": 1234, "num_samples": 40, "model_step": 40}
    samples, provenance = load_samples(tmp_path / "run" / "samples.npz")
    assert provenance == result["samples"] and len(samples) == 40
    before = (tmp_path / "run" / "samples.npz").read_bytes()
    assert "redrawing" not in run_cli(capsys, "evaluate", "run")     # the right samples are reused
    assert (tmp_path / "run" / "samples.npz").read_bytes() == before
