"""Fine-tuning without forgetting, against exact ground truth on a 2-D Gaussian mixture.

A model pretrained on components 0-2 is adapted to component 3. Unconstrained, it forgets the old
components; constrained by KL(p_pre || p_theta) <= b, with x_t from the pretrained model's own
trajectories, it generates Theorem 1's mixture (q_new + lambda p_pre) / (1 + lambda) with its own
final multiplier. The paper's pure-noise shortcut is not that KL, but it must still hold the old
components. Samples are labelled by the exact posterior, so the only errors are the models'.
"""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline

import condiff
from condiff.config import ConfigError, config_from_dict
from condiff.data.datasets import class_shares
from condiff.lifecycle.build import build_data, check_inputs
from condiff.models import build_model
from condiff.sampling.generate import generate, sampling_scheduler
from condiff.training.terms import PretrainedModelTerm, per_sample_loss

pytestmark = pytest.mark.slow   # pretrains and fine-tunes

MEANS = [[-2.0, -2.0], [2.0, -2.0], [-2.0, 2.0], [2.0, 2.0]]
NEW_DATA = {"0": 0, "1": 0, "2": 0}          # only component 3 (500 samples) to adapt to


def gmm_config(tmp_path, name, counts, steps, finetune=None):
    table = {
        "name": name, "output_dir": str(tmp_path / name),
        "data": {"dataset": "gmm", "means": MEANS, "std": 0.3, "per_class": 500, "class_counts": counts},
        "model": {"kind": "mlp", "hidden": 128, "layers": 3},
        "train": {"steps": steps, "batch_size": 128, "lr": 2e-3, "warmup_steps": 50, "checkpoint_every": steps},
        "dual": {"batch_size": 128, "primal_steps_per_dual": 2, "lr": 0.5, "lr_relative": False},
    }
    if finetune:
        table["finetune"] = finetune
    return config_from_dict(table)


def sampled_shares(config):
    run_dir = condiff.train(config).path
    pipeline = DDPMPipeline.from_pretrained(run_dir / "model")
    out = generate(pipeline.unet, sampling_scheduler(pipeline.scheduler, "ddim"), 4000, num_inference_steps=50,
                   batch_size=4000, seed=0, progress=False)
    labels = build_data(config).mixture.classify(out.samples)
    return class_shares(labels, 4), json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    shares, _ = sampled_shares(gmm_config(root, "pretrained", {"3": 0}, 1500))
    return root, root / "pretrained", shares


def test_pretrained_model_lacks_the_new_component(pretrained):
    _, _, shares = pretrained
    assert shares[3] < 0.01 and np.abs(shares[:3] - 1 / 3).max() < 0.04, shares


def test_unconstrained_finetuning_forgets_the_old_components(pretrained):
    root, pre_dir, _ = pretrained
    shares, summary = sampled_shares(gmm_config(root, "unconstrained", NEW_DATA, 500,    # 500 steps: 0.9995 new
                                                {"pretrained": str(pre_dir)}))
    assert summary["constraints"] == []
    assert shares[3] > 0.95, shares


def test_constrained_finetuning_generates_the_theorem_1_mixture(pretrained):
    root, pre_dir, _ = pretrained
    shares, summary = sampled_shares(gmm_config(root, "trajectory", NEW_DATA, 1500, {
        "pretrained": str(pre_dir), "threshold": 0.02, "inputs": "trajectory", "trajectory_samples": 256}))
    (constraint,) = summary["constraints"]
    lam = constraint["multiplier"]
    pre_shares = np.array(json.loads((pre_dir / "summary.json").read_text())["predicted_class_shares"])
    theorem_1 = (np.eye(4)[3] + lam * pre_shares) / (1 + lam)
    assert np.allclose(summary["predicted_class_shares"], theorem_1)
    assert lam > 0.5, lam                                  # the constraint is active
    assert 0.05 < shares[3] < 0.9, shares                  # adapted, and not only to the new data
    assert np.abs(shares - theorem_1).max() <= 0.04, (shares, theorem_1)


def test_pure_noise_shortcut_still_holds_the_old_components(pretrained):
    root, pre_dir, _ = pretrained
    shares, summary = sampled_shares(gmm_config(root, "gaussian", NEW_DATA, 600, {
        "pretrained": str(pre_dir), "threshold": 0.02, "inputs": "gaussian"}))
    assert summary["constraints"][0]["multiplier"] > 0.5
    assert shares[:3].min() > 0.2, shares


@pytest.mark.parametrize("inputs", ["gaussian", "trajectory"])
def test_pretrained_constraint_passes_gradient_to_the_trained_model_only(inputs):
    torch.manual_seed(0)
    frozen, trained = build_model("mlp", (2,), hidden=16, layers=1), build_model("mlp", (2,), hidden=16, layers=1)
    from diffusers import DDPMScheduler
    term = PretrainedModelTerm("pretrained", frozen, DDPMScheduler(num_train_timesteps=100), (2,), inputs=inputs,
                               trajectory_samples=8, keep_per_trajectory=10, progress=False)
    batch = term.draw(16, torch.Generator().manual_seed(0))
    per_sample_loss(trained, batch).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.parameters() if p.requires_grad)
    assert all(p.grad is None for p in frozen.parameters())
    if inputs == "trajectory":  # the pool covers the whole chain evenly: 10 states per path, all t spread
        assert len(term.pool_inputs) == 8 * 10
        assert term.pool_timesteps.min() < 10 and term.pool_timesteps.max() >= 90


def test_threshold_without_a_pretrained_run_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="finetune.threshold: .*finetune.pretrained"):
        gmm_config(tmp_path, "x", {}, 10, {"threshold": 0.1})
    with pytest.raises(ConfigError, match="finetune.pretrained: .* is not a trained condiff run"):
        check_inputs(gmm_config(tmp_path, "x", {}, 10, {"pretrained": str(tmp_path / "missing"), "threshold": 0.1}))
    with pytest.raises(ConfigError, match="finetune.inputs"):
        gmm_config(tmp_path, "x", {}, 10, {"inputs": "uniform"})


def test_trajectory_pool_with_fewer_steps_spreads_every_path_over_the_visited_timesteps():
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    frozen = build_model("mlp", (2,), hidden=16, layers=1)
    scheduler = DDPMScheduler(num_train_timesteps=100)
    term = PretrainedModelTerm("pretrained", frozen, scheduler, (2,), inputs="trajectory", trajectory_samples=8,
                               keep_per_trajectory=5, trajectory_steps=20, progress=False)
    scheduler.set_timesteps(20)
    visited = scheduler.timesteps.tolist()                     # 20 of the 100 training timesteps
    assert len(term.pool_inputs) == 8 * 5 == len(term.pool_timesteps)
    assert set(term.pool_timesteps.tolist()) <= set(visited)
    # A path keeps every 4th of its 20 states: both ends of the chain are in the pool.
    assert term.pool_timesteps.max() >= visited[3] and term.pool_timesteps.min() <= visited[-4]
