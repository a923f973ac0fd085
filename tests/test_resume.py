"""A run killed mid-training and resumed ends exactly where an uninterrupted run does."""

import json

import pytest
import torch
from safetensors.torch import load_file

import condiff
from condiff.config import ConfigError
from condiff.rundir import RunDirectoryError
from condiff.training.loop import StopTraining


def weights(run_dir):
    return load_file(run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors")


def crash_at(step):
    def on_step(record):
        if record["step"] == step:
            raise StopTraining(f"simulated crash after step {step}")
    return on_step


@pytest.mark.parametrize("estimator", ["stratified", "mixture"])
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path, estimator, tiny_config):
    reference = condiff.train(tiny_config(tmp_path / "reference", dual={"estimator": estimator})).path
    config = tiny_config(tmp_path / "interrupted", dual={"estimator": estimator})
    # step 25 is mid-window (N = 3) and after the step-20 checkpoint: steps 21-25 are redone
    with pytest.raises(StopTraining):
        condiff.train(config, on_step=crash_at(25)).path
    assert (tmp_path / "interrupted" / "checkpoints" / "latest").read_text() == "step-0000020"
    resumed = condiff.train(config, resume=True).path

    ref_summary = json.loads((reference / "summary.json").read_text())
    res_summary = json.loads((resumed / "summary.json").read_text())
    assert res_summary["constraints"][0]["multiplier"] == ref_summary["constraints"][0]["multiplier"] > 0
    ref_w, res_w = weights(reference), weights(resumed)
    assert ref_w.keys() == res_w.keys()
    assert all(torch.equal(ref_w[k], res_w[k]) for k in ref_w)
    assert (resumed / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()


def test_resume_refuses_a_changed_config(tmp_path, tiny_config):
    config = tiny_config(tmp_path / "run", dual={"estimator": "stratified"})
    with pytest.raises(StopTraining):
        condiff.train(config, on_step=crash_at(12)).path
    config.train.batch_size = 32
    files = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"cannot resume with a different config \(changed: train.batch_size\)"):
        condiff.train(config, resume=True).path
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == files


def test_existing_run_directory_is_never_overwritten_silently(tmp_path, tiny_config):
    config = tiny_config(tmp_path / "run", dual={"estimator": "stratified"})
    config.train.steps = 5
    condiff.train(config).path
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(RunDirectoryError, match="overwrite=True"):
        condiff.train(config).path
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    condiff.train(config, overwrite=True).path


def test_an_unfinished_checkpoint_write_leaves_the_previous_one_in_use(tmp_path, tiny_config):
    config = tiny_config(tmp_path / "run", dual={"estimator": "mixture"})
    with pytest.raises(StopTraining):
        condiff.train(config, on_step=crash_at(15)).path
    # a crash while writing step 20 leaves a temporary folder, never a half-written step-0000020
    (tmp_path / "run" / "checkpoints" / ".step-0000020.x1y2z3.tmp").mkdir()
    condiff.train(config, resume=True).path
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-0000040"


def test_one_concatenated_pass_gives_each_constraint_its_own_loss(tiny_config):
    """The trainer sends data and constraint batches through the network together; each part's
    loss must equal the constraint's loss on its batch alone."""
    from condiff.lifecycle.build import build_constraints, build_data, build_noise_scheduler
    from condiff.models import build_model
    from condiff.training.terms import DenoisingBatch, per_sample_loss

    config = tiny_config("unused", dual={"estimator": "stratified"})
    config.constraints.classes, config.constraints.gamma = [0, 2], 0.3
    data = build_data(config)
    constraints = build_constraints(config, data.train, build_noise_scheduler(config, False))
    model = build_model("mlp", (2,), hidden=32, layers=1)
    generator = torch.Generator().manual_seed(0)
    batches = [c.term.draw(n, generator) for c, n in zip(constraints, (5, 9))]
    joint = per_sample_loss(model, DenoisingBatch.concatenate(batches)).split([5, 9])
    for constraint, batch, part in zip(constraints, batches, joint):
        assert torch.allclose(per_sample_loss(model, batch).mean(), part.mean(), rtol=1e-5)
