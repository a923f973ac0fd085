"""Trained models against exact ground truth on an imbalanced 2-D Gaussian mixture.

Unconstrained training must reproduce the data's component shares; constrained training (one
resilient constraint per minority component) must generate the mixture Theorem 1 predicts from the
model's own final multipliers, (pi_c + lambda_c) / (1 + sum lambda), with either estimator; requested
target shares must be reached, whatever the constraint losses. Samples
are labelled by the exact posterior of the mixture, so the only errors are the model's.
"""

import json

import numpy as np
import pytest
from diffusers import DDPMPipeline

import condiff
from condiff.config import config_from_dict
from condiff.data.datasets import class_shares
from condiff.evaluation.metrics import total_variation
from condiff.lifecycle.build import build_data
from condiff.sampling.generate import generate, sampling_scheduler

pytestmark = pytest.mark.slow   # trains to Theorem 1's optimum

MEANS = [[-2.0, -2.0], [2.0, -2.0], [-2.0, 2.0], [2.0, 2.0]]
COUNTS = {"0": 1000, "1": 1000, "2": 200, "3": 200}
NUM_SAMPLES = 6000


def gmm_config(tmp_path, name, estimator="stratified", constraints=None, steps=1000):
    """1,000 steps leave the shares within half of the tests' tolerance of 0.03 (largest errors 0.016 unconstrained,
    0.016 and 0.010 against Theorem 1, 2026-12-07); the target-shares test's 0.02 needs 1,500."""
    table = {
        "name": name, "output_dir": str(tmp_path / name),
        "data": {"dataset": "gmm", "means": MEANS, "std": 0.3, "per_class": 1000, "class_counts": COUNTS},
        "model": {"kind": "mlp", "hidden": 128, "layers": 3},
        "train": {"steps": steps, "batch_size": 128, "lr": 2e-3, "warmup_steps": 50, "checkpoint_every": steps},
        "dual": {"estimator": estimator, "batch_size": 64, "primal_steps_per_dual": 2, "lr": 250.0,
                 "lr_relative": True},
    }
    if constraints:
        table["constraints"] = constraints
    return config_from_dict(table)


def sampled_shares(config, num_samples=NUM_SAMPLES):
    """(sampled class shares, summary.json, run directory) of a freshly trained run."""
    run_dir = condiff.train(config).path
    pipeline = DDPMPipeline.from_pretrained(run_dir / "model")
    out = generate(pipeline.unet, sampling_scheduler(pipeline.scheduler, "ddim"), num_samples,
                   num_inference_steps=50, batch_size=num_samples, seed=0, progress=False)
    labels = build_data(config).mixture.classify(out.samples)
    return class_shares(labels, 4), json.loads((run_dir / "summary.json").read_text()), run_dir


@pytest.fixture(scope="module")
def unconstrained(tmp_path_factory):
    return sampled_shares(gmm_config(tmp_path_factory.mktemp("gt"), "unconstrained"))


@pytest.fixture(scope="module", params=["stratified", "mixture"])
def constrained(request, tmp_path_factory):
    """One constrained run per estimator, trained once for every test that checks it."""
    root = tmp_path_factory.mktemp("gt")
    return request.param, sampled_shares(gmm_config(root, f"constrained-{request.param}", request.param,
                                                    {"classes": [2, 3], "gamma": 0.5}))


def test_unconstrained_model_reproduces_the_component_shares(unconstrained):
    shares, summary, _ = unconstrained
    data_shares = np.array([1000, 1000, 200, 200]) / 2400
    assert np.allclose(summary["data_class_shares"], data_shares)
    assert np.abs(shares - data_shares).max() <= 0.03, shares


def test_constrained_model_generates_the_theorem_1_mixture(unconstrained, constrained):
    _, (shares, summary, _) = constrained
    multipliers = [c["multiplier"] for c in summary["constraints"]]
    pi = np.array(summary["data_class_shares"])
    lam = np.array([0.0, 0.0, *multipliers])
    theorem_1 = (pi + lam) / (1 + lam.sum())
    assert np.allclose(summary["predicted_class_shares"], theorem_1)
    assert all(m > 0.05 for m in multipliers), multipliers  # the constraints are active
    assert np.abs(shares - theorem_1).max() <= 0.03, (shares, theorem_1)
    uniform = np.full(4, 0.25)
    assert total_variation(shares, uniform) < total_variation(unconstrained[0], uniform)


def test_both_estimators_settle_at_the_resilient_fixed_point(constrained):
    """lambda = l / (2 gamma) at convergence: the logged constraint losses and multipliers agree."""
    estimator, (_, _, run_dir) = constrained
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tail = [r for r in records[-300:] if r["dual_step"]]
    losses = np.mean([list(r["constraint_losses"].values()) for r in tail], axis=0)
    lam = np.mean([list(r["multipliers"].values()) for r in tail], axis=0)
    assert np.allclose(lam, losses / (2 * 0.5), rtol=0.15), (estimator, lam, losses)


def test_requested_target_shares_are_reached_without_a_reference_loss(tmp_path):
    """Theorem 1's multipliers for the requested shares, held fixed, give exactly those shares; the other
    components keep their data proportions, pi_c / (1 + sum lambda). Unequal requests for two components of
    equal data share (an equal request, 0.25 each, was retired to keep `make test` within its budget: it
    asks less of the multipliers than this one)."""
    targets = [0.15, 0.35]
    config = gmm_config(tmp_path, "targets", "mixture", {"classes": [2, 3], "target_shares": targets}, steps=1500)
    shares, summary, _ = sampled_shares(config, num_samples=20000)
    rest = 1 - sum(targets)
    expected = np.array([rest / 2, rest / 2, *targets])
    assert np.allclose(summary["predicted_class_shares"], expected)
    assert np.abs(shares - expected).max() <= 0.02, (shares, expected)
