"""Counterfactual validation (issues 12 and 20): retraining on subsets (coupled or fresh), measured losses
whose noise is independent of the features', seeds disjoint between the scoring and the measured models,
choices that never read a reported outcome, and the whole independent protocol (LDS and per-step removals)
on a Gaussian mixture, where TRAK must beat random scores by a paired interval."""

import json

import numpy as np
import pytest
import torch

from condiff.attribution.baselines import cosine_similarity, gradient_dot_product, random_scores
from condiff.attribution.features import GradientFeaturizer, denoising_losses, noised_batches, output_value, target_seed
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
    from condiff.lifecycle.training import train_run

    config = tiny_config(tmp_path / "run", train={"steps": 5})
    keep = np.zeros(90, dtype=bool)
    keep[::2] = True
    run = train_run(config, keep=keep)
    recorded = json.loads((run / "train_subset.json").read_text())
    assert recorded["kept"] == list(range(0, 90, 2)) and recorded["coupled"]
    with pytest.raises(ConfigError, match="keep"):
        train_run(tiny_config(tmp_path / "other", train={"steps": 5}), keep=np.ones(3, dtype=bool))
    assert not (tmp_path / "other").exists()


def test_validation_measures_with_noise_independent_of_the_features():
    """The protocol's measured loss is not the loss under the targets' feature noise (else the `loss` output
    would partly predict one noise realisation): same model, same inputs, different values."""
    from condiff.validation.counterfactual import measurement_seed

    torch.manual_seed(0)
    model = build_model("mlp", (2,), hidden=16, layers=1)
    alphas = torch.linspace(0.99, 0.01, 1000)
    clean = torch.randn(6, 2)
    measured = denoising_losses(model, alphas, clean, [300] * 4, seed=measurement_seed(0))
    under_features = denoising_losses(model, alphas, clean, [300] * 4, seed=target_seed(0))
    assert measurement_seed(0) not in (0, target_seed(0))
    assert (measured - under_features).abs().min() > 1e-4


def test_scoring_and_measured_models_have_disjoint_seeds(tiny_config, tmp_path, monkeypatch):
    """Every subset model trains fresh (uncoupled) with a seed offset no TRAK model uses; the full models keep
    checkpoints along training; the workers share out all the jobs exactly once."""
    import condiff.validation.counterfactual as counterfactual
    from condiff.runtime import IndependentWorkers

    calls = []
    monkeypatch.setattr(IndependentWorkers, "barrier", lambda self, name: None)   # ranks called one after another
    monkeypatch.setattr(counterfactual, "retrain", lambda config, out, keep, coupled, seed=0, overrides=None:
                        calls.append((out, keep is None, coupled, seed, overrides)))
    settings = counterfactual.ValidationSettings(num_subsets=5, seeds=3, ensemble=4, checkpoints=4)
    config = tiny_config(tmp_path / "run")
    for rank in range(2):
        models = counterfactual.train_models(config, 90, tmp_path, settings, IndependentWorkers(rank, 2, "t"), False)
    assert len(calls) == 4 + 5 * 3 and len({c[0] for c in calls}) == len(calls)
    full = {c[3] for c in calls if c[1]}
    subset = {c[3] for c in calls if not c[1]}
    assert full == {0, 1, 2, 3} and subset == {1000, 1001, 1002} and not any(c[2] for c in calls)
    assert all(c[4] == {"checkpoint_every": 10, "keep_checkpoints": 4} for c in calls if c[1])
    assert models.full[0] == tmp_path / "full" and len(models.subset_runs) == 5


def test_settings_the_protocol_cannot_honour_are_refused_naming_them():
    from condiff.config import ConfigError
    from condiff.validation.counterfactual import ValidationSettings

    for bad, name in ((dict(fraction=1.0), "fraction"), (dict(ensemble=1000), "ensemble"),
                      (dict(removal_share=0.0), "removal_share"), (dict(train_timesteps=()), "train_timesteps"),
                      (dict(outputs=("margin",)), "outputs"), (dict(steps=(1200,)), "steps"),
                      (dict(removal_steps=(500,)), "removal_steps"), (dict(journeys=0), "journeys")):
        with pytest.raises(ConfigError, match=f"^{name}:"):
            ValidationSettings(**bad).validated(500)


MIXTURE = {"constraints": None,
           "data": {"means": [[-2.0, -2.0], [2.0, -2.0], [-2.0, 2.0], [2.0, 2.0]], "std": 0.5, "per_class": 50,
                    "class_counts": {}},
           "model": {"hidden": 64, "layers": 2},
           "train": {"steps": 150, "batch_size": 64, "lr": 2e-3, "warmup_steps": 15, "checkpoint_every": 150,
                     "ema_decay": 0.0}}


@pytest.mark.slow
def test_independent_protocol_on_a_mixture_ranks_trak_above_random_and_no_choice_reads_a_reported_target(
        tiny_config, tmp_path, monkeypatch):
    """The whole protocol on four 2-D components (200 points; 8 fresh half-subset models x 2 seeds; TRAK's
    2-model ensemble): the chosen TRAK's LDS on samples beats random scores by a paired interval above 0; the
    removal table has every kind; and re-scoring with the reported targets' outcomes replaced by noise
    chooses exactly the same configurations and ridges (and replacing the held-out ones does not)."""
    from condiff.attribution.validation import paired_difference
    from condiff.validation.reproduce import reproduce_attribution
    from condiff.lifecycle.build import build_data
    from condiff.validation.counterfactual import ValidationSettings
    from condiff.validation.methods import RANDOM, FeatureBank
    from condiff.validation import reproduce
    from condiff.validation.lds import linear_datamodeling_scores, score_quantities

    validations = []   # the validation the report was written from, recorded rather than computed again

    def recording(*args, **kwargs):
        validations.append(linear_datamodeling_scores(*args, **kwargs))
        return validations[-1]
    monkeypatch.setattr(reproduce, "linear_datamodeling_scores", recording)
    settings = ValidationSettings(num_subsets=8, seeds=2, ensemble=2, num_targets=24, held_out_targets=12,
                                  steps=(700, 300), train_timesteps=(10,), dimensions=(512,), checkpoints=2,
                                  projection="gaussian", removal_targets=4, removal_draws=2, resamples=200,
                                  journeys=1)
    config = tiny_config(tmp_path / "validation" / "full", **MIXTURE)
    report = reproduce_attribution(tmp_path / "validation", config=config, settings=settings, progress=False)
    saved = json.loads((tmp_path / "validation" / "lds.json").read_text())
    sample = next(r for r in saved["results"] if r["quantity"] == "sample")
    assert sample["trak"]["lds"]["mean"] > 0.2, sample["trak"]
    assert sample["trak"]["ridge"] in settings.ridges
    kinds = {e["kind"] for e in saved["removals"]["effects"]}
    assert {"top-k TRAK", "random k", "second full model (noise floor)"} <= kinds and len(kinds) == 4
    text = report.read_text()
    assert "## Headline" in text and "lds-curves.png" in text and "journey-0.png" in text

    data = build_data(config)
    [validation] = validations
    choice = validation.choices["sample"]
    outcomes = validation.measured["sample"].mean(0)
    part = validation.targets.reported_slice
    random = choice.per_method[RANDOM].scores
    assert paired_difference(choice.trak.scores[:, part], random[:, part], validation.models.subsets,
                             outcomes[:, part], resamples=200).low > 0

    def choices_with(columns):
        measured = {q: m.copy() for q, m in validation.measured.items()}
        for values in measured.values():
            values[:, :, columns] = np.random.default_rng(7).normal(size=values[:, :, columns].shape)
        bank = FeatureBank(validation.models.full, data, validation.targets, settings, "cpu", False)
        return {q: [(c.label, c.ridge) for c in (ch.trak, ch.baseline, *ch.per_method.values())]
                for q, ch in score_quantities(bank, data, config, validation.models.subsets, measured, "cpu").items()}

    original = {q: [(c.label, c.ridge) for c in (ch.trak, ch.baseline, *ch.per_method.values())]
                for q, ch in validation.choices.items()}
    assert choices_with(part) == original
    assert choices_with(validation.targets.held_out_slice) != original
