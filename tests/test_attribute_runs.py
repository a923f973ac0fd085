"""`condiff attribute` on every kind of run condiff trains, against what the run was trained on: a
class-conditional run (each training example under its own label, targets under the class they were drawn
as), a latent run (attributed in its autoencoder's latent space, pictured decoded), a fine-tuned run (its own
fine-tuning data) and an ensemble of independently trained runs (refused, in one line and writing nothing,
when their data or architecture differ)."""

import json
import shutil

import numpy as np
import pytest
import torch

import condiff
from condiff.attribution.features import GradientFeaturizer, timestep_grid
from condiff.attribution.projector import PROJECTORS
from condiff.attribution.trak import trak_scores
from condiff.cli import main
from condiff.config import config_from_dict
from condiff.audit.attribute import attribute_run
from condiff.audit.results import AttributionSettings
from condiff.lifecycle.build import build_data, load_pipeline, load_run_config
from condiff.lifecycle.training import train_run
from condiff.sampling.generate import generate, sampling_scheduler

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"num_targets": 2, "steps": (900, 100), "top": 3, "train_timesteps": 4, "resamplings": 3, "dimension": 64,
         "batch_size": 16, "journey_every": 10}
FEATURES = f"features-{AttributionSettings().output}-K4-k64-sparse"   # under the validated output


def featurizer_of(run, settings: AttributionSettings):
    """The run's pipeline and a featurizer of its final model projected as `condiff attribute` projects."""
    pipeline = load_pipeline(run)
    projector = PROJECTORS[settings.projection](sum(p.numel() for p in pipeline.unet.parameters()),
                                                settings.dimension, seed=settings.seed, device=torch.device("cpu"))
    return pipeline, GradientFeaturizer(pipeline.unet, pipeline.scheduler.alphas_cumprod, projector,
                                        output=settings.output, batch_size=settings.batch_size)


def targets_of(pipeline, labels=None, count=2):
    return generate(pipeline.unet, sampling_scheduler(pipeline.scheduler, "ddim"), count, num_inference_steps=50,
                    seed=0, record_x0=True, class_labels=labels, progress=False)


def assert_scores(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-4 * float(np.abs(expected).max()))


def refused(argv, capsys, run, *expected):
    """The command fails in one line naming each of `expected`, and writes no RUN/attribution."""
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and all(text in error[0] for text in expected), error
    assert not (run / "attribution").exists()


def copy_of(run, tmp_path):
    return shutil.copytree(run, tmp_path / "copy", ignore=shutil.ignore_patterns("attribution"))


# Class-conditional runs

@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory, tiny_config):
    return condiff.train(tiny_config(tmp_path_factory.mktemp("conditional") / "run", constraints=None,
                                 model={"class_conditional": True}, train={"steps": 20, "label_dropout": 0.2})).path


@pytest.mark.parametrize("chosen", [None, 1])
def test_a_conditional_run_takes_each_examples_label_and_the_targets_class(conditional_run, chosen):
    """Training features under each example's own label (not "no class"); targets drawn and featurized
    under class `chosen`, or the "no class" label 3 by default: the scores are TRAK's on exactly those."""
    settings = AttributionSettings(**SMALL, target_class=chosen)
    result = attribute_run(conditional_run, settings, overwrite=True, progress=False)
    pipeline, featurizer = featurizer_of(conditional_run, settings)
    train = build_data(load_run_config(conditional_run)).train
    phi = np.load(result.directory / f"{FEATURES}.npy")
    own = featurizer.train_features(train.data, timestep_grid(4), seed=0, class_labels=train.labels).numpy()
    np.testing.assert_allclose(phi, own, rtol=1e-4, atol=1e-6)
    no_class = featurizer.train_features(train.data, timestep_grid(4), seed=0,
                                         class_labels=torch.full_like(train.labels, 3)).numpy()
    assert not np.allclose(phi, no_class, rtol=1e-2, atol=1e-4)
    labels = torch.full((2,), 3 if chosen is None else chosen)
    targets = targets_of(pipeline, labels)
    scores = np.load(result.directory / "scores.npy")
    for column, timestep in enumerate(settings.steps):
        index = targets.step_index(timestep)
        features = featurizer.target_features(targets.x0_predictions[index], int(targets.timesteps[index]),
                                              resamplings=3, seed=0, class_labels=labels)
        assert_scores(scores[:, :, column], trak_scores(torch.from_numpy(phi), features, settings.ridge).numpy())
    assert result.conditional and result.target_class == chosen
    report = (result.directory / "report.md").read_text()
    assert ("of class 1" if chosen == 1 else 'unconditional (the model\'s "no class" label)') in report
    assert "each training example's gradients take its own label" in report


def test_a_samples_file_gives_the_class_its_samples_were_drawn_as(conditional_run, tmp_path, capsys):
    from condiff.lifecycle.sampling import sample_run

    path = sample_run(conditional_run, num_samples=2, method="ddim", steps=50, seed=0, record_x0=True, class_label=2,
                      progress=False)
    from_file = attribute_run(conditional_run, AttributionSettings(**SMALL, samples_file=str(path)), overwrite=True,
                              progress=False)
    assert from_file.target_class == 2
    file_scores = np.load(from_file.directory / "scores.npy").copy()
    generated = attribute_run(conditional_run, AttributionSettings(**SMALL, target_class=2), overwrite=True,
                              progress=False)
    assert_scores(file_scores, np.load(generated.directory / "scores.npy"))
    copy = copy_of(conditional_run, tmp_path)
    refused(["attribute", str(copy), "--samples", "2", "--samples-file", str(path), "--class", "1"], capsys, copy,
            "--class: 1", "drawn as class 2")
    refused(["attribute", str(copy), "--class", "3"], capsys, copy, "--class", "classes 0-2, not 3")


def test_a_class_is_refused_for_an_unconditional_model(ensemble_runs, tmp_path, capsys):
    copy = copy_of(ensemble_runs["seed 0"], tmp_path)
    refused(["attribute", str(copy), "--class", "1"], capsys, copy, "--class: 1", "not class-conditional",
            "--samples-file")


def test_a_conditional_unet_on_digits_is_attributed(tmp_path):
    """diffusers' UNet2DModel refuses a class embedding without labels: its training side takes the images'
    labels, its targets "no class"; the journeys' posteriors come from condiff's evaluation classifier."""
    config = config_from_dict({
        "name": "conditional-digits", "output_dir": str(tmp_path / "run"),
        "data": {"dataset": "digits", "per_class": 6, "held_out_per_class": 20},
        "model": {"kind": "unet8", "block_out_channels": [8, 16], "class_conditional": True},
        "train": {"steps": 4, "batch_size": 16, "label_dropout": 0.2, "warmup_steps": 1, "checkpoint_every": 4},
        "evaluate": {"classifier_epochs": 1}})
    result = attribute_run(condiff.train(config).path, AttributionSettings(**{**SMALL, "journey_every": 25}), progress=False)
    assert np.load(result.directory / "scores.npy").shape == (60, 2, 2)
    assert result.posterior_source.startswith("condiff's evaluation classifier")
    for journey in result.journeys:
        np.testing.assert_allclose(np.sum(journey.posteriors, axis=1), 1.0, rtol=1e-6)
        assert len(journey.posteriors[0]) == 10
    assert (result.directory / "journey-steps-1.png").is_file()


# Latent runs

@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """A run on 4x4x4 latents of a briefly trained autoencoder, which is then deleted: attribution must
    use the run's own copy of it."""
    from condiff.data.datasets import load_digits_dataset, take_per_class
    from condiff.data.latent import save_autoencoder, train_autoencoder

    root = tmp_path_factory.mktemp("latent")
    digits = load_digits_dataset()
    vae = train_autoencoder(take_per_class(digits, [20] * 10, 0), steps=20, batch_size=64, seed=0, progress=False)
    autoencoder = save_autoencoder(vae, root / "vae")
    run = condiff.train(config_from_dict({
        "name": "latent", "output_dir": str(root / "run"), "latent": {"autoencoder": str(autoencoder)},
        "data": {"dataset": "digits", "per_class": 6, "held_out_per_class": 20},
        "model": {"kind": "unet", "block_out_channels": [16, 32]},
        "train": {"steps": 4, "batch_size": 16, "warmup_steps": 1, "checkpoint_every": 4},
        "evaluate": {"classifier_epochs": 1}})).path
    shutil.rmtree(autoencoder)
    return run


def test_a_latent_run_is_attributed_in_latent_space_and_pictured_decoded(latent_run, drawn):
    from condiff.data.latent import decode_latents, encode_dataset, load_autoencoder
    from condiff.audit.journey import class_posteriors
    from condiff.lifecycle.build import evaluation_classifier

    settings = AttributionSettings(**SMALL)
    result = attribute_run(latent_run, settings, progress=False)
    pipeline, featurizer = featurizer_of(latent_run, settings)
    config = load_run_config(latent_run)
    data = build_data(config)
    vae = load_autoencoder(latent_run / "autoencoder")
    latents = encode_dataset(vae, data.train).data
    assert latents.shape[1:] == (4, 4, 4)
    expected = featurizer.train_features(latents, timestep_grid(4), seed=0).numpy()
    np.testing.assert_allclose(np.load(result.directory / f"{FEATURES}.npy"), expected, rtol=1e-4, atol=1e-6)

    targets = targets_of(pipeline)
    index = targets.step_index(900)
    decoded = decode_latents(vae, targets.x0_predictions[index])
    strip = drawn[0]   # journey-0.png: no x_t column (a latent x_t pictures nothing), x0_hat then the examples
    first_row = [axes for axes in strip.axes if axes.images][:1 + 2 * settings.top]
    np.testing.assert_allclose(first_row[0].images[0].get_array(), ((decoded[0] + 1) / 2).squeeze(0), atol=1e-5)
    helpful = result.steps[0].helpful[0][0]
    np.testing.assert_allclose(first_row[1].images[0].get_array(), ((data.train.data[helpful] + 1) / 2).squeeze(0))
    classifier, _ = evaluation_classifier(config, data)
    at = result.journeys[0].timesteps.index(int(targets.timesteps[index]))
    np.testing.assert_allclose(result.journeys[0].posteriors[at], class_posteriors(classifier, decoded)[0], rtol=1e-4)
    assert "attributed in latent space" in (result.directory / "report.md").read_text()


# Fine-tuned runs

def test_a_fine_tuned_run_is_attributed_to_its_own_fine_tuning_data(ensemble_runs, tmp_path, tiny_config):
    """Pretrained on the three components, fine-tuned on 30 points of component 2: those 30 are its
    training set, not the pretrained run's 90."""
    pretrained = ensemble_runs["seed 0"]
    run = condiff.train(tiny_config(tmp_path / "finetuned", constraints=None, train={"steps": 10},
                                data={"class_counts": {"0": 0, "1": 0, "2": 30}},
                                finetune={"pretrained": str(pretrained)})).path
    settings = AttributionSettings(**SMALL)
    result = attribute_run(run, settings, progress=False)
    _, featurizer = featurizer_of(run, settings)
    train = build_data(load_run_config(run)).train
    assert len(train) == 30 and set(train.labels.tolist()) == {2}
    np.testing.assert_allclose(np.load(result.directory / f"{FEATURES}.npy"),
                               featurizer.train_features(train.data, timestep_grid(4), seed=0).numpy(),
                               rtol=1e-4, atol=1e-6)
    assert np.load(result.directory / "scores.npy").shape == (30, 2, 2)
    assert result.training_class_shares == [0.0, 0.0, 1.0]
    assert all(index < 30 for step in result.steps for top in step.helpful + step.harmful for index in top)
    report = (result.directory / "report.md").read_text()
    assert f"fine-tuned from `{pretrained}`" in report
    assert "pretrained run's own training data are not attributed" in report


# Ensembles of independently trained runs

@pytest.fixture(scope="module")
def ensemble_runs(tmp_path_factory, tiny_config):
    """Two seeds of the unconstrained tiny run, and runs that may not join their ensemble: other data,
    another architecture, a subset of the training set."""
    root = tmp_path_factory.mktemp("ensemble")
    tiny = {"constraints": None}
    runs = {f"seed {seed}": condiff.train(tiny_config(root / f"seed{seed}", **tiny, train={"steps": 20, "seed": seed})).path
            for seed in (0, 1)}
    runs["other data"] = condiff.train(tiny_config(root / "data", **tiny, train={"steps": 20, "seed": 2},
                                               data={"per_class": 30})).path
    runs["other architecture"] = condiff.train(tiny_config(root / "model", **tiny, train={"steps": 20, "seed": 2},
                                                       model={"hidden": 16})).path
    keep = np.ones(90, dtype=bool)
    keep[::3] = False
    runs["subset"] = train_run(tiny_config(root / "subset", **tiny, train={"steps": 20, "seed": 2}), keep=keep,
                               coupled=False)
    return runs


def test_an_ensemble_averages_each_runs_own_trak_scores(ensemble_runs):
    """Two runs, each with its newest checkpoint: four models, each featurized into its own file (the
    other run's tagged by its weights' digest), the scores their plain mean."""
    from condiff.lifecycle.sampling import model_provenance

    first, second = ensemble_runs["seed 0"], ensemble_runs["seed 1"]
    settings = AttributionSettings(**SMALL, models=(second,), checkpoints=2)
    result = attribute_run(first, settings, overwrite=True, progress=False)
    assert result.ensemble == [str(first), f"{first} (step 20)", str(second), f"{second} (step 20)"]
    digest = model_provenance(second)["model_sha256"]
    files = [f"{FEATURES}.npy", f"{FEATURES}-step0000020.npy", f"{FEATURES}-run{digest}.npy",
             f"{FEATURES}-run{digest}-step0000020.npy"]
    assert all((result.directory / name).is_file() for name in files)
    targets = targets_of(load_pipeline(first))
    index = targets.step_index(100)
    expected = []
    for run, name in ((first, files[0]), (second, files[2])):
        _, featurizer = featurizer_of(run, settings)
        features = featurizer.target_features(targets.x0_predictions[index], int(targets.timesteps[index]),
                                              resamplings=3, seed=0)
        expected.append(trak_scores(torch.from_numpy(np.load(result.directory / name)), features, settings.ridge))
    two_finals = attribute_run(first, AttributionSettings(**SMALL, models=(second,)), overwrite=True, progress=False)
    assert_scores(np.load(two_finals.directory / "scores.npy")[:, :, 1], torch.stack(expected).mean(0).numpy())
    saved = json.loads((two_finals.directory / "attribution.json").read_text())
    assert saved["settings"]["models"] == [str(second)]
    assert "an ensemble of 2 independently trained runs" in (two_finals.directory / "report.md").read_text()


@pytest.mark.parametrize("other,expected", [
    ("other data", ["trained under another config", "data.per_class"]),
    ("other architecture", ["trained under another config", "model.hidden"]),
    ("subset", ["another training set"]),
    ("seed 0", ["the same model as"]),
])
def test_a_run_of_other_data_or_architecture_is_refused_from_the_ensemble(ensemble_runs, tmp_path, capsys, other,
                                                                          expected):
    copy = copy_of(ensemble_runs["seed 0"], tmp_path)
    refused(["attribute", str(copy), "--models", str(ensemble_runs["seed 1"]), str(ensemble_runs[other])], capsys,
            copy, f"--models: {ensemble_runs[other]}", *expected)


# Against ground truth: a class-conditional model of four Gaussian components

@pytest.mark.slow
def test_targets_of_a_class_are_guided_late_by_that_class_and_end_in_it(tmp_path, tiny_config):
    """Trained well enough to generate each class: targets drawn as class 2 end in component 2 by the exact
    posterior, and their top-20 training examples at t = 100 come from class 2 (measured: 0.95)."""
    config = tiny_config(tmp_path / "run", constraints=None,
                         data={"means": [[-2.0, -2.0], [2.0, -2.0], [-2.0, 2.0], [2.0, 2.0]], "std": 0.5,
                               "per_class": 100, "class_counts": {}},
                         model={"hidden": 64, "layers": 2, "class_conditional": True},
                         train={"steps": 1000, "batch_size": 128, "lr": 2e-3, "warmup_steps": 50,
                                "checkpoint_every": 1000, "ema_decay": 0.0, "label_dropout": 0.2})
    result = attribute_run(condiff.train(config).path, AttributionSettings(
        num_targets=4, steps=(100,), top=20, resamplings=10, dimension=512, target_class=2, journey_every=5),
        progress=False)
    assert result.target_classes == [2] * 4
    labels = build_data(config).train.labels
    purity = float((labels[torch.tensor(result.steps[0].helpful)] == 2).float().mean())
    assert purity >= 0.8, purity
    assert all(journey.posteriors[-1][2] > 0.9 for journey in result.journeys)
