"""`condiff reproduce`: the shipped configs are valid, and the whole flow (train, evaluate, report;
refuse to clobber; resume keeps finished runs) works, on tiny digits stand-ins of the experiments."""

import json
from pathlib import Path

import numpy as np
import pytest

from condiff.cli import main
from condiff.config import CONFIG_DIR, ExperimentConfig, load_config
import condiff.papers.reproduce as reproduce_module
from condiff.papers.reproduce import EXPERIMENTS, SCALES, old_class_coverage, reproduce
from condiff.rundir import RunDirectoryError, read_metrics
from condiff.lifecycle import training

TINY = """
name = "{name}"
[data]
dataset = "digits"
held_out_per_class = 30
{data}
[model]
kind = "unet8"
block_out_channels = [16, 16]
[train]
steps = 6
batch_size = 16
warmup_steps = 1
checkpoint_every = 3
[dual]
batch_size = 4
{extra}
[sample]
steps = 3
num_samples = 40
batch_size = 40
[evaluate]
classifier_epochs = 1
"""
MINORITY = TINY.format(name="m", data="per_class = 40\nclass_counts = { 4 = 10 }",
                       extra="[constraints]\nclasses = [4]\ngamma = 0.5")
SHARES = TINY.format(name="s", data="per_class = 40\nclass_counts = { 4 = 10 }",
                     extra="[constraints]\nclasses = [4]\ntarget_shares = [0.1]\ncontrol_every = 2\n"
                           "control_samples = 8\ncontrol_steps = 2")
PRETRAIN = TINY.format(name="p", data="class_counts = { 9 = 0 }", extra="")
FINETUNE = TINY.format(name="f", data="class_counts = { " + ", ".join(f"{c} = 0" for c in range(9)) + " }",
                       extra='[finetune]\nthreshold = 0.01\ninputs = "gaussian"')


@pytest.fixture
def tiny_configs(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    for file, text in {"mnist-minority.toml": MINORITY, "fashion-minority.toml": SHARES,
                       "mnist-pretrain-without-9.toml": PRETRAIN,
                       "mnist-finetune.toml": FINETUNE}.items():
        (folder / file).write_text(text)
    monkeypatch.setitem(SCALES, "cpu", folder)
    # in this process, so that the tests' patches reach the models (test_run_directories.py's side-by-side test
    # runs real workers)
    monkeypatch.setattr(reproduce_module, "run_side_by_side", run_one_after_the_other)
    return folder


def run_one_after_the_other(job, arguments):
    return {name: job(*args) for name, args in arguments.items()}


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_every_shipped_config_is_valid(scale, tmp_path):
    fake_run = tmp_path / "pretrained"
    (fake_run / "model").mkdir(parents=True)
    (fake_run / "model" / "model_index.json").write_text("{}")
    for experiment in (e for e in EXPERIMENTS.values() if scale in e.scales):
        for file in filter(None, [experiment.config, experiment.pretrain_config]):
            config = load_config(SCALES[scale] / file, {"finetune.pretrained": str(fake_run)}
                                 if "finetune" in file else None)
            assert config.name == Path(file).stem


def test_minority_experiment_trains_evaluates_and_reports(tiny_configs, tmp_path):
    out = tmp_path / "out"
    report = reproduce("mnist-minority", out, progress=False)
    text = report.read_text()
    summary = json.loads((out / "summary.json").read_text())
    # every figure of the summary is its run's, and the ratios are computed from them
    for name in ("unconstrained", "constrained"):
        evaluation = json.loads((out / name / "evaluation.json").read_text())
        for key in ("tv_to_uniform", "frechet_distance", "precision", "recall"):
            assert summary[name][key] == pytest.approx(evaluation[key])
        assert summary[name]["multipliers"] == json.loads((out / name / "summary.json").read_text())["multipliers"]
    assert summary["tv_ratio"] == pytest.approx(summary["constrained"]["tv_to_uniform"]
                                                / summary["unconstrained"]["tv_to_uniform"])
    assert summary["fd_ratio"] == pytest.approx(summary["constrained"]["frechet_distance"]
                                                / summary["unconstrained"]["frechet_distance"])
    assert f"{summary['tv_ratio']:.3f}" in text and "not Inception FID" in text
    assert summary["unconstrained"]["multipliers"] == {} and len(summary["constrained"]["multipliers"]) == 1
    for png in ("class_frequencies.png", "training_curves.png", "constrained/samples.png"):
        assert (out / png).stat().st_size > 0

    with pytest.raises(RunDirectoryError, match="exists"):
        reproduce("mnist-minority", out, progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    reproduce("mnist-minority", out, resume=True, progress=False)          # finished runs are kept
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}


def test_a_share_request_reproduces_four_models_the_papers_calibrated_on_the_held_run(tiny_configs, tmp_path,
                                                                                      monkeypatch):
    """Four models, two at a time on one process (side by side): the paper's resilient model, calibrated on the
    held run, starts only once held has finished."""
    out, stages = tmp_path / "shares", []

    def record(job, arguments):
        stages.append({name: (out / "held" / "summary.json").is_file() for name in arguments})
        return run_one_after_the_other(job, arguments)
    monkeypatch.setattr(reproduce_module, "run_side_by_side", record)
    text = reproduce("fashion-minority", out, progress=False).read_text()
    assert stages == [{"unconstrained": False, "held": False}, {"resilient": True, "measured": True}]
    summary = json.loads((out / "summary.json").read_text())
    models = ["unconstrained", "resilient", "held", "measured"]
    assert [n for n in summary if n in models] == models and summary["paper_model"] == "resilient"
    assert all(summary[n]["train_seconds"] > 0 for n in models)
    for name in models[1:]:   # each model's ratios against the unconstrained model's own figures
        assert summary[name]["tv_ratio"] == pytest.approx(summary[name]["tv_to_uniform"]
                                                          / summary["unconstrained"]["tv_to_uniform"])
    assert summary["tv_ratio"] == summary["resilient"]["tv_ratio"]
    assert "share of class 4 [95%]" in text and "training (s)" in text
    held = json.loads((out / "held" / "summary.json").read_text())
    name, multiplier = held["constraints"][0]["name"], held["constraints"][0]["multiplier"]
    assert held["constraint_mode"] == "held multipliers (Theorem 1)"
    # the resilient rule's fixed point l / (2 gamma) put at Theorem 1's multiplier, l from the held run's end
    losses = [r["constraint_losses"][name] for r in read_metrics(out / "held" / "metrics.jsonl")]
    resilient = load_config(out / "resilient" / "config.toml")
    assert resilient.constraints.gamma == pytest.approx(np.mean(losses[len(losses) * 3 // 4:]) / (2 * multiplier))
    assert resilient.constraints.target_shares is None and resilient.dual.estimator == "stratified"
    assert resilient.dual.lr * resilient.train.lr == pytest.approx(0.1)    # the authors' peak dual step
    resilient_summary = json.loads((out / "resilient" / "summary.json").read_text())
    assert resilient_summary["constraint_mode"] == "resilient dual ascent"
    assert not resilient_summary["constraints"][0]["fixed"]
    measured = json.loads((out / "measured" / "summary.json").read_text())
    assert measured["constraint_mode"] == "measured share control" and measured["control"]["classes"] == [4]


def test_resume_continues_an_interrupted_run(tiny_configs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_train_run = training.train_run

    def crash_in_constrained(config, **kwargs):
        if config.name == "m" and not config.constraints.classes:
            return real_train_run(config, **kwargs)
        from condiff.training.loop import StopTraining
        raise StopTraining("killed")
    monkeypatch.setattr(training, "train_run", crash_in_constrained)   # what reproduce's finish_run calls
    with pytest.raises(Exception, match="killed"):
        reproduce("mnist-minority", out, progress=False)
    monkeypatch.setattr(training, "train_run", real_train_run)
    reproduce("mnist-minority", out, resume=True, progress=False)
    assert (out / "constrained" / "evaluation.json").is_file() and (out / "report.md").is_file()


def test_finetune_experiment_reports_new_class_share_and_old_class_coverage(tiny_configs, tmp_path):
    out = tmp_path / "ft"
    assert main(["reproduce", "mnist-finetune", "--output", str(out), "--seed", "2"]) == 0
    for name in ("pretrained", "unconstrained", "constrained"):   # every model's seeds moved by --seed
        run = load_config(out / name / "config.toml")
        assert (run.train.seed, run.sample.seed) == (ExperimentConfig().train.seed + 2, ExperimentConfig().sample.seed + 2)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"pretrained", "unconstrained", "constrained"}
    for name in ("pretrained", "unconstrained", "constrained"):
        assert 0 <= summary[name]["new_class_share"] <= 1 and 0 <= summary[name]["old_class_coverage"] <= 1
    assert summary["pretrained"]["old_class_coverage"] == 1.0
    assert json.loads((out / "constrained" / "summary.json").read_text())["constraints"][0]["name"] == "pretrained"
    assert "45.9" in (out / "report.md").read_text()


def test_old_class_coverage():
    pre = [0.5, 0.5, 0.0]
    assert old_class_coverage([0.5, 0.5, 0.0], pre, [2]) == 1.0
    assert old_class_coverage([0.0, 0.0, 1.0], pre, [2]) == 0.0
    assert old_class_coverage([0.8, 0.0, 0.2], pre, [2]) == 0.5     # collapsed onto one old class
    assert old_class_coverage([0.25, 0.25, 0.5], pre, [2]) == 0.5


def test_unknown_experiment_is_refused(capsys):
    assert main(["reproduce", "cifar-minority"]) == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["unconstrained", "resilient", "held", "measured", "constrained"])
def test_a_variant_is_a_new_config_and_leaves_its_argument_as_it_was(variant, tmp_path):
    """Functions whose names do not say they change their argument do not (issue 23)."""
    from condiff.lifecycle.training import with_seed_offset
    from condiff.papers.reproduce import variant_config

    config = load_config(CONFIG_DIR / "digits-minority.toml")
    before = config.to_dict()
    held = tmp_path / "held"   # what the resilient variant calibrates on: a held run's summary and metrics
    held.mkdir()
    (held / "summary.json").write_text(json.dumps({"constraints": [{"name": "class 4", "multiplier": 0.1}]}))
    (held / "metrics.jsonl").write_text(json.dumps({"step": 1, "constraint_losses": {"class 4": 0.2}}) + "\n")
    made = variant_config(variant, config, tmp_path)
    moved = with_seed_offset(config, 3)
    assert config.to_dict() == before and made is not config and moved is not config
    assert (moved.train.seed, moved.sample.seed) == (config.train.seed + 3, config.sample.seed + 3)
    assert made.constraints.classes == ([] if variant == "unconstrained" else [4, 5, 7])
    if variant in ("held", "measured"):
        assert made.constraints.control == variant
    for copy in (made, moved):   # copies all the way down: changing one leaves the argument as it was
        copy.train.steps += 1
        copy.data.class_counts[0] = 1
    assert config.to_dict() == before
