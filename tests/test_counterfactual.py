"""Counterfactual validation (issue 12): retraining on subsets with common random numbers, the measured
target losses, the attribution baselines, and the whole LDS / remove-top-k protocol on a Gaussian mixture,
where it runs in seconds and TRAK must beat random scores with non-overlapping intervals."""

import json

import numpy as np
import pytest
import torch

from condiff.attribution.baselines import cosine_similarity, gradient_dot_product, random_scores
from condiff.attribution.features import GradientFeaturizer, denoising_losses, output_value, target_seed
from condiff.data.datasets import LabelledDataset
from condiff.models import build_model
from condiff.training.terms import DatasetTerm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Identity:
    def project(self, gradients):
        return gradients


def test_weighted_dataset_term_draws_the_same_stream_and_averages_over_kept_examples():
    from diffusers import DDPMScheduler

    data = LabelledDataset(torch.randn(10, 2), torch.arange(10) % 2, 2, "points")
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    keep = torch.tensor([1.0, 0, 1, 1, 0, 1, 1, 1, 0, 1])
    plain = DatasetTerm("data", data, scheduler).draw(6, torch.Generator().manual_seed(0))
    weighted = DatasetTerm("data", data, scheduler, example_weights=keep).draw(6, torch.Generator().manual_seed(0))
    torch.testing.assert_close(weighted.noisy, plain.noisy)                   # common random numbers
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))[:6]   # the sampler's first draw
    expected = keep[order] * 6 / keep[order].sum()
    torch.testing.assert_close(weighted.weights, expected)
    model = build_model("mlp", (2,), hidden=8, layers=1)
    from condiff.training.terms import per_sample_loss

    losses = per_sample_loss(model, plain)
    torch.testing.assert_close(per_sample_loss(model, weighted).mean(), (losses * keep[order]).sum() / keep[order].sum())
    with pytest.raises(ValueError, match="example weights"):
        DatasetTerm("data", data, scheduler, example_weights=torch.zeros(10))


def test_denoising_losses_see_the_noise_the_features_see():
    """The loss measured on a retrained model is the target function whose gradient the features take: with
    the identity projection, the `loss` output's value at the same noise equals the measured loss."""
    torch.manual_seed(0)
    model = build_model("mlp", (2,), hidden=16, layers=1)
    alphas = torch.linspace(0.99, 0.01, 1000)
    clean, timesteps = torch.randn(5, 2), [100, 600, 900]
    measured = denoising_losses(model, alphas, clean, timesteps, seed=target_seed(3), batch_size=2)
    from condiff.attribution.features import noised_batches

    direct = torch.zeros(5)
    for noisy, t, noise in noised_batches(clean, timesteps, alphas, seed=target_seed(3)):
        with torch.no_grad():
            prediction = model(noisy, t).sample
        direct += torch.stack([output_value("loss", prediction[i], noise[i]) for i in range(5)]) / 3
    torch.testing.assert_close(measured, direct)
    # ... and the features are the gradient of exactly that loss: example 0's, by autograd.
    model.zero_grad()
    total = 0
    for noisy, t, noise in noised_batches(clean[:1], timesteps, alphas, seed=target_seed(3)):
        total = total + output_value("loss", model(noisy, t).sample[0], noise[0]) / 3
    total.backward()
    featurizer = GradientFeaturizer(model, alphas, Identity(), output="loss")
    torch.testing.assert_close(featurizer.train_features(clean[:1], timesteps, seed=target_seed(3))[0],
                               torch.cat([p.grad.flatten() for p in model.parameters()]), rtol=1e-4, atol=1e-6)


def test_baselines_score_like_trak():
    train, targets = np.eye(3), np.array([[2.0, 0, 0], [0, 1, 1]])
    similarity = cosine_similarity(train, targets)
    np.testing.assert_allclose(similarity, [[1, 0], [0, 2 ** -0.5], [0, 2 ** -0.5]])
    phi, g = torch.randn(4, 3), torch.randn(2, 3)
    np.testing.assert_allclose(gradient_dot_product(phi, g), (phi.double() @ g.double().T).numpy())
    assert random_scores(5, 2, seed=1).shape == (5, 2)
    np.testing.assert_array_equal(random_scores(5, 2, seed=1), random_scores(5, 2, seed=1))


def test_train_run_on_a_subset_records_it_and_refuses_a_bad_mask(tiny_config, tmp_path):
    from condiff.config import ConfigError
    from condiff.experiments.training import train_run

    config = tiny_config(tmp_path / "run", train={"steps": 5})
    keep = np.zeros(90, dtype=bool)
    keep[::2] = True
    run = train_run(config, keep=keep)
    recorded = json.loads((run / "train_subset.json").read_text())
    assert recorded["kept"] == list(range(0, 90, 2)) and recorded["coupled"]
    with pytest.raises(ConfigError, match="keep"):
        train_run(tiny_config(tmp_path / "other", train={"steps": 5}), keep=np.ones(3, dtype=bool))
    assert not (tmp_path / "other").exists()


MIXTURE = {"constraints": None,
           "data": {"means": [[-2.0, -2.0], [2.0, -2.0], [-2.0, 2.0], [2.0, 2.0]], "std": 0.5, "per_class": 50,
                    "class_counts": {}},
           "model": {"hidden": 64, "layers": 2},
           "train": {"steps": 400, "batch_size": 64, "lr": 2e-3, "warmup_steps": 40, "checkpoint_every": 400,
                     "ema_decay": 0.0}}


@pytest.mark.slow
def test_lds_protocol_on_a_mixture_ranks_trak_above_random(tiny_config, tmp_path):
    """The whole protocol on four 2-D components (200 points, 12 coupled half-subset models x 2 seeds, TRAK
    ensembled over 2 models): the better TRAK output's LDS interval lies above random scores', the removal
    table holds a row per target, step and kind, and the report shows the table, the chart and the journeys."""
    from condiff.experiments.attribution_reproduce import reproduce_attribution
    from condiff.experiments.counterfactual import TRAK_METHODS, ValidationSettings

    settings = ValidationSettings(num_subsets=12, seeds=2, ensemble=2, num_targets=24, held_out_targets=12,
                                  steps=(700, 300), dimension=512, projection="gaussian", removal_targets=1,
                                  resamplings=10)
    config = tiny_config(tmp_path / "validation" / "full", **MIXTURE)
    report = reproduce_attribution(tmp_path / "validation", config=config, settings=settings, progress=False)
    saved = json.loads((tmp_path / "validation" / "lds.json").read_text())
    sample = {row["method"]: row for row in saved["lds"] if row["quantity"] == "sample"}
    best = max((sample[m] for m in TRAK_METHODS), key=lambda row: row["mean"])
    assert best["mean"] > 0.2 and best["low"] > sample["random"]["high"], (best, sample["random"])
    assert best["ridge"] in settings.ridges
    assert all(-1 <= value <= 1 for value in saved["test_retest"].values())   # two seeds: measured
    assert (tmp_path / "validation" / "full-seed-1" / "model").is_dir()       # the TRAK ensemble's second model
    removals = saved["removals"]
    assert {r["removed"] for r in removals} == {"top-k D-TRAK", "nearest k, pixels", "nearest k, classifier features",
                                                "random k (1)", "random k (2)"}
    assert len(removals) == 2 * 3 + 2 * 2        # 2 steps x 3 targeted kinds, 2 random draws x 2 steps
    text = report.read_text()
    assert "## Linear datamodeling score" in text and "lds.png" in text and "journey-0.png" in text
    assert (tmp_path / "validation" / "lds.png").is_file()
