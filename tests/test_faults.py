"""Faults a long run meets (issue 10, items 8 and 9): divergence stops training with one line and keeps
the last finite checkpoint; a torn metrics line, a moved run directory and a damaged checkpoint are
resumed from; metrics.jsonl is strict JSON."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

import condiff
from condiff.cli import main
from condiff.training.loop import StopTraining

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAULTS_TRAIN = {"steps": 20, "warmup_steps": 1, "checkpoint_every": 4, "keep_checkpoints": 1}


def crash_at(step):
    def on_step(record):
        if record["step"] == step:
            raise StopTraining(f"simulated crash after step {step}")
    return on_step


def strict_records(path):
    def refuse(token):
        raise AssertionError(f"{path}: bare {token} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def error_line(capsys) -> str:
    """The one `condiff: error:` line on stderr (the rest is progress bars), without a traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("condiff:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def weights(run_dir):
    return load_file(run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors")


def assert_same_run(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()


@pytest.fixture(scope="session")
def faults_config(tiny_config):
    """The tiny run, 20 steps with a checkpoint every 4 (and only the last kept, unless said)."""
    return lambda output_dir, **train: tiny_config(output_dir, train={**FAULTS_TRAIN, **train})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, faults_config):
    return condiff.train(faults_config(tmp_path_factory.mktemp("reference") / "run")).path


def test_divergence_stops_with_one_line_and_resume_continues_with_a_smaller_rate(tmp_path, capsys, faults_config):
    run = tmp_path / "run"
    with pytest.raises(StopTraining):
        condiff.train(faults_config(run), on_step=crash_at(9)).path     # checkpoint step-8 is healthy
    assert main(["train", str(run), "--resume", "--set", "train.lr=1e30"]) == 2
    line = error_line(capsys)
    assert line.startswith("condiff: error: step 10: ") and "not finite" in line, line
    assert "step-0000008" in line and "resume its training (--resume) with a smaller train.lr" in line, line
    assert (run / "checkpoints" / "latest").read_text() == "step-0000008"
    checkpoint = load_file(run / "checkpoints" / "step-0000008" / "model" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(t).all() for t in checkpoint.values())
    strict_records(run / "metrics.jsonl")

    assert main(["train", str(run), "--resume", "--set", "train.lr=5e-4"]) == 0   # half the rate it ran with
    records = strict_records(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 21))
    cosine = 0.5 * (1 + math.cos(math.pi * (8 - 1) / (20 - 1)))   # the schedule's factor after 8 steps
    assert records[8]["lr"] == pytest.approx(5e-4 * cosine)        # the resumed steps follow the new rate
    assert all(torch.isfinite(t).all() for t in weights(run).values())


def test_a_diverging_dual_ascent_stops_before_a_non_finite_multiplier_is_written(tmp_path, capsys, tiny_toml):
    """With a huge dual step the multipliers overflow; once they reached `NaN` in metrics.jsonl and the
    next mixture draw died with `invalid multinomial distribution`."""
    config = tiny_toml(tmp_path / "c.toml", tmp_path / "run", train=FAULTS_TRAIN)
    code = main(["train", config, "--set", "dual.lr=1e308", "--set", "dual.estimator=\"mixture\""])
    assert code == 2
    line = error_line(capsys)
    assert "not finite" in line and line.startswith("condiff: error: step "), line
    strict_records(tmp_path / "run" / "metrics.jsonl")


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, reference, faults_config):
    run = tmp_path / "run"
    config = faults_config(run)
    with pytest.raises(StopTraining):
        condiff.train(config, on_step=crash_at(10)).path
    with open(run / "metrics.jsonl", "a") as file:
        file.write('{"step": 11, "lr": 0.0')     # what a kill during the write leaves
    condiff.train(config, resume=True).path
    assert_same_run(run, reference)


def test_a_moved_run_resumes_from_its_own_config(tmp_path, reference, capsys, faults_config):
    with pytest.raises(StopTraining):
        condiff.train(faults_config(tmp_path / "first"), on_step=crash_at(10)).path
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(tmp_path / "first", moved)
    assert main(["train", str(moved), "--resume"]) == 0, capsys.readouterr().err
    assert_same_run(moved, reference)
    assert not (tmp_path / "first").exists()


def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path, reference, faults_config):
    run = tmp_path / "run"
    config = faults_config(run, keep_checkpoints=2)
    with pytest.raises(StopTraining):
        condiff.train(config, on_step=crash_at(10)).path
    state = run / "checkpoints" / "step-0000008" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])           # half-written
    with pytest.warns(UserWarning, match="step-0000008: damaged checkpoint skipped"):
        condiff.train(config, resume=True).path
    assert_same_run(run, reference)


def test_the_reported_diverging_digits_run_stops_with_one_line(tmp_path, capsys, monkeypatch):
    """`condiff train configs/digits-minority.toml --set train.lr=50.0` once wrote `NaN` multipliers and died
    with a raw `invalid multinomial distribution` traceback."""
    from condiff.rundir import PROJECT_ROOT

    config = PROJECT_ROOT / "configs" / "digits-minority.toml"
    if not config.is_file():
        pytest.skip("runs from condiff's checkout")
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(config), "--set", "train.lr=50.0", "--set", "train.steps=12"]) == 2
    line = error_line(capsys)
    assert "not finite" in line and "train again (--overwrite) with a smaller train.lr" in line, line
    strict_records(tmp_path / "runs" / "digits-minority" / "metrics.jsonl")
