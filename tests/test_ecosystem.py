"""Ecosystem conventions (issue 11): a model card in every saved model, accelerate trackers beside
metrics.jsonl (TensorBoard, offline), and progress bars that do not flood a log file."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from diffusers import DDPMPipeline

import condiff
from condiff.rundir import read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_saved_model_has_a_model_card(tmp_path, tiny_config):
    run = condiff.train(tiny_config(tmp_path / "run")).path
    card = (run / "model" / "README.md").read_text()
    summary = json.loads((run / "summary.json").read_text())
    multiplier = summary["multipliers"]["class 2"]
    assert card.startswith("---\nlibrary_name: diffusers")
    assert f"| class 2 | 0 | 0.3 | {multiplier:.4f} |" in card
    assert f"2: {summary['data_class_shares'][2]:.3f} -> {summary['predicted_class_shares'][2]:.3f}" in card
    assert f'DDPMPipeline.from_pretrained("{run.resolve() / "model"}")' in card
    assert DDPMPipeline.from_pretrained(run / "model").unet.config.num_class_embeds is None


def test_tensorboard_logs_the_metrics_offline(tmp_path, tiny_config):
    pytest.importorskip("tensorboard", reason="the tensorboard extra (pip install 'condiff[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = condiff.train(tiny_config(tmp_path / "run", train={"log_with": "tensorboard"})).path
    events = EventAccumulator(str(run / "trackers")).Reload()
    records = read_metrics(run / "metrics.jsonl")
    logged = events.Scalars("multiplier/class 2")
    assert [event.step for event in logged] == [r["step"] for r in records]
    np.testing.assert_allclose([event.value for event in logged], [r["multipliers"]["class 2"] for r in records],
                               rtol=1e-6)
    assert {"objective_loss", "lagrangian", "lr", "slack/class 2"} <= set(events.Tags()["scalars"])


@pytest.mark.slow
def test_progress_bars_write_a_few_lines_into_a_log_not_one_per_step(tmp_path, tiny_toml):
    config = tiny_toml(tmp_path / "tiny.toml", tmp_path / "run", train={"steps": 200})
    done = subprocess.run([sys.executable, "-m", "condiff", "train", config], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    redraws = done.stderr.count("train:")
    assert 1 <= redraws <= 4, f"{redraws} progress lines for 200 steps"
