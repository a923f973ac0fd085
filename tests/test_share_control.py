"""Measured share control (issue 21): multipliers that follow the class shares the model generates.

The controller alone against a simulated model whose shares are a distorted Theorem 1 mixture (the
multipliers that reach the targets are known); the whole loop on a Gaussian mixture with an under-capacity
denoiser, where held multipliers miss the requested shares and measured control must reach them, labelled
by the mixture's exact Bayes classifier; exact resume; configs that cannot be honoured are refused."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline
from scipy.stats import binomtest

import condiff
from condiff.config import ConfigError, config_from_dict
from condiff.data.datasets import class_shares
from condiff.lifecycle.build import build_data
from condiff.sampling.generate import generate, sampling_scheduler
from condiff.training.control import ShareController, wilson_interval
from condiff.training.dual import multipliers_for_target_shares, predicted_shares
from condiff.training.loop import StopTraining

from conftest import tiny_table

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("count,total", [(0, 50), (7, 50), (50, 50), (123, 1000)])
def test_wilson_interval_is_scipys(count, total):
    expected = binomtest(count, total).proportion_ci(method="wilson")
    np.testing.assert_allclose(wilson_interval(count, total), (expected.low, expected.high), atol=1e-12)


def simulated_model_shares(multipliers, data_shares, classes, distortion):
    """A model that realises only `distortion` times each multiplier: Theorem 1's mixture of the distorted
    multipliers (what an under- or over-fitting model does to the constrained classes)."""
    return predicted_shares(data_shares, dict(zip(classes, np.asarray(multipliers) * distortion)))


@pytest.mark.parametrize("proportional", [0.0, 0.25])
def test_controller_finds_the_multipliers_a_distorted_model_needs(proportional):
    """Ground truth: the model realises lambda * a, so the targets need lambda* / a. From Theorem 1's start the
    controller reaches them through binomial measurement noise (1000 samples a step; 20 noise seeds, so that the
    check is of the rule, not of one draw), with or without the proportional term (it damps the approach; the
    fixed point is the integral's)."""
    pi = np.array([0.4, 0.4, 0.1, 0.1])
    classes, targets, distortion = [2, 3], [0.25, 0.2], np.array([0.5, 2.0])
    closed_form = multipliers_for_target_shares(pi, classes, targets)
    assert np.abs(simulated_model_shares(closed_form, pi, classes, distortion)[classes] - targets).max() > 0.05
    errors, multipliers = [], []
    for seed in range(20):
        controller = ShareController(targets, closed_form, pi[classes], rate=0.5, smoothing=0.5, bound=4.0,
                                     proportional=proportional)
        rng = np.random.default_rng(seed)
        for step in range(40):
            shares = simulated_model_shares(controller.multipliers, pi, classes, distortion)
            controller.update(step, rng.multinomial(1000, shares)[classes], 1000)
        reached = simulated_model_shares(controller.multipliers, pi, classes, distortion)[classes]
        errors.append(np.abs(reached - targets).max())
        multipliers.append(controller.multipliers)
        assert controller.at_bound == [False, False]
    assert np.mean(errors) < 0.008 and np.quantile(errors, 0.9) < 0.015, errors
    np.testing.assert_allclose(np.median(multipliers, axis=0), closed_form / distortion, rtol=0.05)


def biased_reading(rng, shares, bias, samples, paired):
    """Control counts of a few-step sampler that reads each class `bias` above the evaluation's `shares`, and
    the paired difference on its first `paired` noises: per class, the evaluation's label, changed by the few-step
    sampler into or out of the class at the rate that makes the bias (one class at a time, as the controller
    sees them)."""
    counts, difference = [], []
    for share, b in zip(shares, bias):
        reference = rng.random(samples) < share
        into, out_of = max(b, 0) / (1 - share), max(-b, 0) / share
        flip = rng.random(samples) < np.where(reference, out_of, into)
        fast = reference ^ flip
        counts.append(int(fast.sum()))
        difference.append(int(reference[:paired].sum()) - int(fast[:paired].sum()))
    return counts, difference


@pytest.mark.parametrize("paired", [0, 200])
def test_paired_reference_draws_remove_the_control_samplers_bias(paired):
    """Ground truth: the model generates Theorem 1's mixture of its multipliers (the evaluation's reading), the
    control sampler reads the two classes 0.03 high and 0.02 low. Steered by its own reading the controller
    lands that far off; with 200 of its 1,000 samples also drawn by the evaluation's sampler it lands on the
    targets (20 noise seeds)."""
    pi = np.array([0.4, 0.4, 0.1, 0.1])
    classes, targets, bias = [2, 3], np.array([0.25, 0.2]), np.array([0.03, -0.02])
    closed_form = multipliers_for_target_shares(pi, classes, targets)
    errors = []
    for seed in range(20):
        controller = ShareController(targets, 0.5 * closed_form, pi[classes], rate=0.5, smoothing=0.5, bound=4.0)
        rng = np.random.default_rng(seed)
        for step in range(40):
            shares = predicted_shares(pi, dict(zip(classes, controller.multipliers)))[classes]
            counts, difference = biased_reading(rng, shares, bias, 1000, paired)
            controller.update(step, counts, 1000, difference, paired)
        errors.append(predicted_shares(pi, dict(zip(classes, controller.multipliers)))[classes] - targets)
    errors = np.asarray(errors)
    if paired:
        assert np.abs(errors.mean(axis=0)).max() < 0.004 and np.quantile(np.abs(errors), 0.9) < 0.015, errors
        assert controller.history[-1].paired == paired and len(controller.history[-1].difference) == 2
    else:
        np.testing.assert_allclose(errors.mean(axis=0), -bias, atol=0.005)


def test_the_bound_keeps_every_class_weight_within_its_factor_of_theorem_1():
    """A model that needs more than the bound allows (distortion 0.2 and 5): the multipliers stop exactly where
    pi + lambda is Theorem 1's weight times or over the bound, the steered shares as close as that allows."""
    pi = np.array([0.4, 0.4, 0.1, 0.1])
    classes, targets, distortion = [2, 3], [0.25, 0.2], np.array([0.2, 5.0])
    closed_form = multipliers_for_target_shares(pi, classes, targets)
    controller = ShareController(targets, closed_form, pi[classes], rate=0.5, smoothing=0.5, bound=1.5)
    for step in range(40):
        shares = simulated_model_shares(controller.multipliers, pi, classes, distortion)
        controller.update(step, np.round(1000 * shares[classes]), 1000)
    weights, theorem_1 = pi[classes] + controller.multipliers, pi[classes] + closed_form
    np.testing.assert_allclose(weights, [theorem_1[0] * 1.5, theorem_1[1] / 1.5], rtol=1e-9)
    assert max(m.multipliers[0] for m in controller.history) <= weights[0] - pi[2] + 1e-12
    assert controller.at_bound == [True, True]


def test_the_proportional_term_holds_a_share_that_is_still_rising():
    """The rule by hand: the first step is the integral's alone; the second adds proportional * the change of the
    error, so a share rising from 0.05 to 0.07 towards 0.1 moves its multiplier less than the integral would."""
    integral = ShareController([0.1], [0.2], [0.05], rate=0.25, smoothing=0.0, bound=1e6)
    damped = ShareController([0.1], [0.2], [0.05], rate=0.25, smoothing=0.0, bound=1e6, proportional=0.5)
    for controller in (integral, damped):
        controller.update(1, [49.5], 1000)    # s_hat = (49.5 + 0.5) / 1001
        controller.update(2, [69.5], 1000)
    first, second = (0.1 * 1001) / 50, (0.1 * 1001) / 70
    np.testing.assert_allclose(np.log(integral.multipliers), np.log(0.2) + 0.25 * np.log([first * second]))
    np.testing.assert_allclose(np.log(damped.multipliers),
                               np.log(0.2) + 0.25 * np.log(first * second) - 0.5 * np.log(70 / 50))
    assert damped.multipliers[0] < integral.multipliers[0]


def test_controller_state_resumes_exactly_and_keeps_multipliers_positive():
    controller = ShareController([0.3], [0.2], [0.1], rate=0.5, smoothing=0.5, bound=1e6, proportional=0.5)
    for step, count in enumerate([90, 95, 100]):
        controller.update(step, [count], 100)   # a share of ~1 pushes the multiplier down, never below 0
    assert controller.multipliers[0] > 0 and controller.history[-1].multipliers == controller.multipliers.tolist()
    restored = ShareController([0.3], [0.2], [0.1], rate=0.5, smoothing=0.5, bound=1e6, proportional=0.5)
    restored.load_state_dict(json.loads(json.dumps(controller.state_dict())))
    assert restored.update(3, [10], 100) == controller.update(3, [10], 100)


@pytest.mark.parametrize("change,field", [
    ({"control": "measured", "target_shares": None, "gamma": 0.3}, "constraints.control"),
    ({"control": "measured", "control_smoothing": 1.0}, "constraints.control_smoothing"),
    ({"control": "measured", "control_start": 1.5}, "constraints.control_start"),
    ({"control": "measured", "control_bound": 0.9}, "constraints.control_bound"),
    ({"control": "measured", "control_proportional": -0.1}, "constraints.control_proportional"),
    ({"control": "measured", "control_reference_samples": 300}, "constraints.control_reference_samples"),
    ({"control": "steered"}, "constraints.control"),
    ({"control_every": 0}, "constraints.control_every")])
def test_control_settings_that_cannot_work_are_refused_naming_the_field(tmp_path, change, field):
    table = tiny_table(tmp_path / "run", constraints={"classes": [2], "target_shares": [0.3], "gamma": None, **change})
    with pytest.raises(ConfigError, match=f"{field}:"):
        config_from_dict(table)


MEASURED = {"classes": [2], "target_shares": [0.3], "gamma": None, "control": "measured", "control_every": 10,
            "control_samples": 20, "control_steps": 3, "control_start": 0.0, "control_reference_samples": 5}


def measured_tiny(output_dir, **train):
    return config_from_dict(tiny_table(output_dir, train=train, constraints=MEASURED))


def test_a_killed_run_under_measured_control_resumes_exactly(tmp_path):
    reference = condiff.train(measured_tiny(tmp_path / "reference")).path
    config = measured_tiny(tmp_path / "interrupted")

    def crash(record):
        if record["step"] == 25:
            raise StopTraining("simulated crash after step 25")
    with pytest.raises(StopTraining):
        condiff.train(config, on_step=crash).path
    resumed = condiff.train(config, resume=True).path
    summaries = [json.loads((run / "summary.json").read_text()) for run in (reference, resumed)]
    assert all(s.pop("train_seconds") > 0 for s in summaries)    # wall-clock time: the one thing that differs
    assert summaries[0] == summaries[1]
    assert summaries[0]["constraint_mode"] == "measured share control"
    assert summaries[0]["control"]["control_steps"] == 4 and summaries[0]["control"]["samples"] == 20
    assert summaries[0]["control"]["paired_reference_samples"] == 5
    assert (resumed / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    card = (resumed / "model" / "README.md").read_text()
    assert "measured share control" in card and "for a target of 0.3" in card
    result = condiff.Run(resumed).evaluate()
    row = f"| 2 | 0.3 | {summaries[0]['control']['smoothed'][0]:.4g} | "   # the control's last reading ...
    report = (resumed / "report.md").read_text()
    assert "corrected by 5 of their noises" in report
    assert row in report and report.split(row)[1].split("\n")[0].endswith(f"| {result.class_frequencies[2]:.4g} |")


MEANS = [[-2.0, -2.0], [2.0, -2.0], [-2.0, 2.0], [2.0, 2.0]]


def mixture_run(tmp_path, control):
    """Four components, two at a fifth of the others, requested at 0.25 each; an MLP of width 8 cannot
    represent the mixture Theorem 1's multipliers ask for."""
    return config_from_dict({
        "name": control, "output_dir": str(tmp_path / control),
        "data": {"dataset": "gmm", "means": MEANS, "std": 0.3, "per_class": 1000,
                 "class_counts": {"0": 1000, "1": 1000, "2": 200, "3": 200}},
        "model": {"kind": "mlp", "hidden": 8, "layers": 1},
        "train": {"steps": 3000, "batch_size": 128, "lr": 2e-3, "warmup_steps": 50, "checkpoint_every": 3000},
        "dual": {"estimator": "mixture"},
        "constraints": {"classes": [2, 3], "target_shares": [0.25, 0.25], "control": control,
                        "control_every": 100, "control_samples": 1000}})


@pytest.mark.slow
def test_measured_control_reaches_the_shares_held_multipliers_miss_on_a_mixture(tmp_path):
    shares = {}
    for control in ("held", "measured"):
        config = mixture_run(tmp_path, control)
        pipeline = DDPMPipeline.from_pretrained(condiff.train(config).path / "model")
        out = generate(pipeline.unet, sampling_scheduler(pipeline.scheduler, "ddim"), 6000, num_inference_steps=50,
                       batch_size=6000, seed=0, progress=False)
        labels = build_data(config).mixture.classify(out.samples)
        shares[control] = class_shares(labels, 4)[[2, 3]]
    assert np.abs(shares["held"] - 0.25).max() > 0.04, shares        # the model misses Theorem 1's mixture
    assert np.abs(shares["measured"] - 0.25).max() <= 0.02, shares
    summary = json.loads((tmp_path / "measured" / "summary.json").read_text())
    assert summary["control"]["control_steps"] == 25 and torch.tensor(summary["control"]["shares"]).sum() < 1
