"""`condiff attribute` options: targets read from a `condiff sample --record-x0` file (the same scores as
generating them; refused in one line, writing nothing, when the file lacks what attribution needs), the
scores summed per class and over the constraint set, and TRAK averaged over saved checkpoints (each one
featurized under its own weights, into its own resumable features file)."""

import json
import shutil

import numpy as np
import pytest
import torch

import condiff
from condiff.attribution.features import GradientFeaturizer
from condiff.attribution.trak import trak_scores
from condiff.cli import main
from condiff.audit.attribute import attribute_run, class_sums
from condiff.audit.results import AttributionSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"num_targets": 2, "steps": (900, 100), "top": 4, "train_timesteps": 4, "resamplings": 5, "dimension": 128,
         "batch_size": 16}
FEATURES = f"features-{AttributionSettings().output}-K4-k128-sparse"   # under the validated output


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_config):
    """The constrained tiny run (class 2 the constraint set), EMA on: checkpoints at steps 10 and 20."""

    return condiff.train(tiny_config(tmp_path_factory.mktemp("attribute") / "run", train={"steps": 20})).path


@pytest.fixture(scope="module")
def run_without_ema(tmp_path_factory, tiny_config):
    """EMA off: its last checkpoint (step 20) holds the final model's very weights."""

    return condiff.train(tiny_config(tmp_path_factory.mktemp("attribute-plain") / "run",
                                 train={"steps": 20, "ema_decay": 0.0})).path


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the tiny run with no attribution/ yet, to see that a refusal writes nothing."""
    return shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("attribution"))


@pytest.fixture(scope="module")
def recorded_samples(tiny_run):
    """RUN/samples.npz of 3 DDIM-50 samples (seed 0) with their x0 predictions at every step."""
    from condiff.lifecycle.sampling import sample_run

    return sample_run(tiny_run, num_samples=3, method="ddim", steps=50, seed=0, record_x0=True, progress=False)


def rewritten(path, destination, drop=(), **replace):
    """A copy of the samples file `path` without the arrays `drop` and with `replace`d ones."""
    with np.load(path, allow_pickle=False) as arrays:
        kept = {name: arrays[name] for name in arrays.files if name not in drop}
    np.savez(destination, **{**kept, **replace})
    return destination


def test_targets_from_a_samples_file_score_as_the_same_samples_generated(tiny_run, recorded_samples):
    generated = attribute_run(tiny_run, AttributionSettings(**SMALL), overwrite=True, progress=False)
    generated_scores = np.load(generated.directory / "scores.npy").copy()
    from_file = attribute_run(tiny_run, AttributionSettings(**SMALL, samples_file=str(recorded_samples)),
                              overwrite=True, progress=False)
    np.testing.assert_allclose(np.load(from_file.directory / "scores.npy"), generated_scores, rtol=1e-4, atol=1e-6)
    assert from_file.targets_provenance["steps"] == 50 and from_file.targets_provenance["method"] == "ddim"
    saved = json.loads((from_file.directory / "attribution.json").read_text())
    assert saved["settings"]["samples_file"] == str(recorded_samples)
    assert str(recorded_samples) in (from_file.directory / "report.md").read_text()
    assert all((from_file.directory / f"journey-{t}.png").is_file() for t in range(SMALL["num_targets"]))


def test_only_the_first_samples_of_a_file_are_targets(tiny_run, recorded_samples):
    result = attribute_run(tiny_run, AttributionSettings(**{**SMALL, "num_targets": 2},
                                                         samples_file=str(recorded_samples)),
                           overwrite=True, progress=False)
    assert np.load(result.directory / "scores.npy").shape == (90, 2, 2)


@pytest.mark.parametrize("case,expected", [
    ("final samples only", "x0_predictions"),
    ("no timesteps", "timesteps"),
    ("pickled arrays", "unreadable"),
    ("too few samples", "holds 3 samples"),
    ("another model", "drawn by another model"),
    ("missing file", "unreadable"),
])
def test_an_unusable_samples_file_is_refused_in_one_line_writing_nothing(run_copy, recorded_samples, tmp_path,
                                                                         capsys, case, expected):
    file = tmp_path / "samples.npz"
    if case == "final samples only":   # what `condiff sample` writes without --record-x0
        rewritten(recorded_samples, file, drop=["x0_predictions"])
    elif case == "no timesteps":
        rewritten(recorded_samples, file, drop=["timesteps"])
    elif case == "pickled arrays":     # reading it would run pickle: never done
        rewritten(recorded_samples, file, provenance=np.array([{"model_sha256": "x"}], dtype=object))
    elif case == "too few samples":
        shutil.copy(recorded_samples, file)
    elif case == "another model":
        provenance = {"model_step": 20, "model_sha256": "0123456789abcdef"}
        rewritten(recorded_samples, file, provenance=np.array(json.dumps(provenance)))
    samples = "4" if case == "too few samples" else "2"
    assert main(["attribute", str(run_copy), "--samples", samples, "--samples-file", str(file)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("condiff: error:") and expected in error[0]
    assert case == "too few samples" or str(file) in error[0]
    assert not (run_copy / "attribution").exists()


def test_class_sums_add_each_class_and_share_only_the_positive_scores():
    scores = np.array([[1.0, -1.0], [3.0, -2.0], [-2.0, -1.0], [4.0, -5.0]])   # 4 examples x 2 targets
    sums, shares = class_sums(scores, np.array([0, 0, 1, 1]), 3)
    np.testing.assert_allclose(sums, [[4.0, 2.0, 0.0], [-3.0, -6.0, 0.0]])
    np.testing.assert_allclose(shares, [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])   # 4 of 8; no positive score


def test_attribution_json_and_the_report_sum_the_scores_per_class_and_constraint_set(tiny_run):
    result = attribute_run(tiny_run, AttributionSettings(**SMALL), overwrite=True, progress=False)
    folder = result.directory
    scores = np.load(folder / "scores.npy")
    from condiff.lifecycle.build import build_data, load_run_config

    labels = build_data(load_run_config(tiny_run)).train.labels.numpy()
    saved = json.loads((folder / "attribution.json").read_text())
    assert saved["constraint_classes"] == [2]
    np.testing.assert_allclose(saved["training_class_shares"], [40 / 90, 40 / 90, 10 / 90])
    for column, step in enumerate(saved["steps"]):
        for target in range(SMALL["num_targets"]):
            per_class = [scores[labels == c, target, column].sum() for c in range(3)]
            np.testing.assert_allclose(step["class_sums"][target], per_class, rtol=1e-4, atol=1e-6)
            positive = [np.clip(scores[labels == c, target, column], 0, None).sum() for c in range(3)]
            np.testing.assert_allclose(step["class_positive_shares"][target], np.array(positive) / sum(positive),
                                       rtol=1e-4)
            constraint = step["constraint_set"][target]
            assert constraint["sum"] == pytest.approx(per_class[2], rel=1e-4, abs=1e-6)
            assert constraint["rest_sum"] == pytest.approx(per_class[0] + per_class[1], rel=1e-4, abs=1e-6)
            assert constraint["positive_share"] == pytest.approx(positive[2] / sum(positive), rel=1e-4)
    report = (folder / "report.md").read_text()
    assert "## Classes" in report and "constraint set" in report and "share" in report
    assert (folder / "classes.png").is_file()


def test_an_unconstrained_run_has_class_sums_but_no_constraint_set(tmp_path, tiny_config):

    run = condiff.train(tiny_config(tmp_path / "run", constraints=None, train={"steps": 10})).path
    result = attribute_run(run, AttributionSettings(**SMALL), progress=False)
    assert result.constraint_classes == [] and all(step.constraint_set is None for step in result.steps)
    assert all(len(sums) == 3 for step in result.steps for sums in step.class_sums)
    assert "constraint set" not in (result.directory / "report.md").read_text()


def test_checkpoint_ensemble_averages_each_models_own_trak_scores(tiny_run, monkeypatch):
    """Three models (final, steps 20 and 10), each featurized into its own file; the scores are the plain
    mean of the three models' TRAK scores on their own features (one kernel solve per model for every
    visited step and target, columns step-major)."""
    from condiff.audit import attribute

    ensembles, ensemble = [], attribute.ensemble_scores
    monkeypatch.setattr(attribute, "ensemble_scores",
                        lambda models, coefficient: ensembles.append(models) or ensemble(models, coefficient))
    result = attribute_run(tiny_run, AttributionSettings(**SMALL, checkpoints=3), overwrite=True, progress=False)
    folder = result.directory
    assert result.checkpoint_steps == [20, 10]
    files = [folder / f"{FEATURES}.npy", folder / f"{FEATURES}-step0000020.npy", folder / f"{FEATURES}-step0000010.npy"]
    [models] = ensembles
    assert len(models) == 3
    for (phi, _), file in zip(models, files):
        np.testing.assert_array_equal(phi.numpy(), np.load(file))
    mean = torch.stack([trak_scores(phi, targets, result.settings.ridge) for phi, targets in models]).mean(0)
    per_step = mean.float().numpy().reshape(90, -1, SMALL["num_targets"])   # examples x visited steps x targets
    columns = [result.journeys[0].timesteps.index(step.timestep) for step in result.steps]
    np.testing.assert_allclose(np.load(folder / "scores.npy"), per_step[:, columns].transpose(0, 2, 1),
                               rtol=1e-5, atol=1e-7)
    final, *others = (np.load(file) for file in files)
    assert all(not np.allclose(final, other) for other in others)   # each under its own weights
    assert "checkpoint(s) of step(s) 20, 10" in (folder / "report.md").read_text()


def test_a_checkpoint_equal_to_the_final_model_is_not_counted(run_without_ema, tmp_path, capsys):
    result = attribute_run(run_without_ema, AttributionSettings(**SMALL, checkpoints=2), progress=False)
    assert result.checkpoint_steps == [10]   # step 20 is the final model itself
    copy = shutil.copytree(run_without_ema, tmp_path / "run", ignore=shutil.ignore_patterns("attribution"))
    assert main(["attribute", str(copy), "--checkpoints", "3"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--checkpoints: 3" in error[0] and "1 checkpoint(s) besides the final model" in error[0]
    assert not (copy / "attribution").exists()


@pytest.mark.slow   # featurizes an ensemble twice, killed between
def test_a_killed_ensemble_resumes_each_checkpoints_features(tiny_run, monkeypatch):
    """Killed while featurizing the first checkpoint: the resumed run redoes none of the final model's
    batches nor the checkpoint's finished one, and scores as an uninterrupted run."""
    settings = AttributionSettings(**SMALL, checkpoints=2)
    expected = np.load(attribute_run(tiny_run, settings, overwrite=True, progress=False).directory / "scores.npy").copy()

    calls, kill_after, original = [], [7], GradientFeaturizer.train_features   # the final model's 6 batches
                                                                               # and the checkpoint's first

    def counted(self, data, timesteps, **kwargs):
        if "first_index" in kwargs:   # training-side batches, not targets
            calls.append(kwargs["first_index"])
            if kill_after and len(calls) > kill_after[0]:
                raise KeyboardInterrupt
        return original(self, data, timesteps, **kwargs)

    monkeypatch.setattr(GradientFeaturizer, "train_features", counted)
    with pytest.raises(KeyboardInterrupt):
        attribute_run(tiny_run, settings, overwrite=True, progress=False)
    calls.clear()
    kill_after.clear()
    attribute_run(tiny_run, settings, resume=True, progress=False)
    assert calls == [16, 32, 48, 64, 80]   # only the checkpoint's unfinished batches
    np.testing.assert_allclose(np.load(tiny_run / "attribution" / "scores.npy"), expected, rtol=1e-5, atol=1e-7)


def test_the_command_line_takes_a_samples_file_and_checkpoints(tiny_run, recorded_samples, capsys):
    assert main(["attribute", str(tiny_run), "--overwrite", "--samples", "2", "--samples-file", str(recorded_samples),
                 "--checkpoints", "2", "--timesteps", "500", "--train-timesteps", "2", "--resamplings", "2",
                 "--dimension", "64"]) == 0
    saved = json.loads((tiny_run / "attribution" / "attribution.json").read_text())
    assert saved["checkpoint_steps"] == [20] and saved["settings"]["samples_file"] == str(recorded_samples)
    assert np.load(tiny_run / "attribution" / "scores.npy").shape == (90, 2, 1)
    assert main(["attribute", str(tiny_run), "--overwrite", "--checkpoints", "0"]) == 2
    assert "--checkpoints: 0" in capsys.readouterr().err


@pytest.mark.parametrize("noisy", [True, False])
def test_image_journeys_show_x_t_only_when_the_targets_were_generated(noisy, drawn, tmp_path):
    """Generated targets keep every step's x_t; a samples file does not, so its journeys start at x0_hat."""
    from condiff.audit.results import AttributionResult, StepAttribution
    from condiff.audit.report import plot_journey
    from condiff.sampling.generate import SampleOutput

    top, train = 2, torch.zeros(6, 1, 8, 8)
    steps = [StepAttribution(t, helpful=[[0, 1]], harmful=[[4, 5]]) for t in (900, 100)]
    result = AttributionResult(AttributionSettings(num_targets=1, steps=(900, 100), top=top), steps, None, tmp_path,
                               class_names=["0"], training_class_shares=[1.0], constraint_classes=[],
                               checkpoint_steps=[], targets_provenance=None)
    targets = SampleOutput(torch.zeros(1, 1, 8, 8), torch.tensor([900, 100]), torch.zeros(2, 1, 1, 8, 8))
    noisy_inputs = {900: torch.zeros(1, 1, 8, 8), 100: torch.zeros(1, 1, 8, 8)} if noisy else None
    plot_journey(result, 0, train, targets, [0, 1], noisy_inputs, tmp_path / "journey.png")
    titles = [axes.get_title() for axes in drawn[0].axes if axes.get_title()]
    assert titles == (["x_t"] if noisy else []) + ["x0_hat"] + ["+"] * top + ["-"] * top


def test_journeys_follow_every_step_with_the_exact_posterior_and_the_top_examples(tiny_run):
    """Per target: all 50 DDIM steps, the mixture's exact posterior of x0_hat(t) at each, and the scores of the
    union of the top 3 helpful examples at the attributed steps, equal to scores.npy there."""
    from condiff.lifecycle.build import build_data, load_pipeline, load_run_config
    from condiff.sampling.generate import generate, sampling_scheduler

    result = attribute_run(tiny_run, AttributionSettings(**SMALL), overwrite=True, progress=False)
    pipeline, data = load_pipeline(tiny_run), build_data(load_run_config(tiny_run))
    targets = generate(pipeline.unet, sampling_scheduler(pipeline.scheduler, "ddim"), 3, num_inference_steps=50,
                       seed=0, record_x0=True, progress=False)
    scores = np.load(result.directory / "scores.npy")
    saved = json.loads((result.directory / "attribution.json").read_text())
    assert len(result.journeys) == SMALL["num_targets"]
    assert result.posterior_source == "the exact posterior of the mixture"
    for target, journey in enumerate(result.journeys):
        assert journey.timesteps == targets.timesteps.tolist()
        exact = data.mixture.log_posterior(targets.x0_predictions[:, target].double()).exp().numpy()
        np.testing.assert_allclose(journey.posteriors, exact, rtol=1e-5, atol=1e-8)
        expected = list(dict.fromkeys(i for step in result.steps for i in step.helpful[target][:3]))
        assert journey.examples == expected and saved["journeys"][target]["examples"] == expected
        for column, step in enumerate(result.steps):
            at = journey.timesteps.index(step.timestep)
            np.testing.assert_allclose([row[at] for row in journey.scores], scores[expected, target, column],
                                       rtol=1e-5, atol=1e-7)
            assert journey.spread[at] == pytest.approx(float(scores[:, target, column].std()), rel=1e-4)
        assert (result.directory / f"journey-steps-{target}.png").is_file()
    report = (result.directory / "report.md").read_text()
    assert "journey-steps-0.png" in report and "exact posterior of the mixture" in report


def test_journeys_thin_to_every_nth_step_or_none(tiny_run):
    thinned = attribute_run(tiny_run, AttributionSettings(**SMALL, journey_every=10), overwrite=True, progress=False)
    timesteps = thinned.journeys[0].timesteps
    assert len(timesteps) == 8 and {step.timestep for step in thinned.steps} <= set(timesteps)   # 5, the last, 2 chosen
    none = attribute_run(tiny_run, AttributionSettings(**SMALL, journey_every=0), overwrite=True, progress=False)
    assert none.journeys == [] and not (none.directory / "journey-steps-0.png").exists()
    assert "journey-steps" not in (none.directory / "report.md").read_text()


def test_the_report_says_which_validation_chose_the_defaults_and_what_was_overridden(tiny_run):
    from condiff.audit.results import VALIDATED, VALIDATION

    defaults = AttributionSettings()
    settable = {name: value for name, value in VALIDATED.items() if name != "ensemble"}   # other runs: the user's
    assert {name: getattr(defaults, name) for name in settable} == settable   # the defaults are the validated
    result = attribute_run(tiny_run, AttributionSettings(**SMALL), overwrite=True, progress=False)
    settings = (result.directory / "report.md").read_text().split("## Top examples")[0]
    assert VALIDATION in settings and f"train_timesteps = 4 (validated: {VALIDATED['train_timesteps']})" in settings
    assert f"ensemble = 1 (validated: {VALIDATED['ensemble']})" in settings   # one run where the validation used more
    assert "ridge" not in result.settings.overridden()
    other = VALIDATED["ridge"] * 10
    result = attribute_run(tiny_run, AttributionSettings(**SMALL, ridge=other), overwrite=True, progress=False)
    assert f"ridge = {other} (validated: {VALIDATED['ridge']})" in (result.directory / "report.md").read_text()
    assert json.loads((result.directory / "attribution.json").read_text())["validation"] == VALIDATION


@pytest.mark.parametrize("args,expected", [(["--journey-every", "-1"], "--journey-every: -1"),
                                           (["--class", "-2"], "--class: -2")])
def test_bad_journey_and_class_options_are_refused_in_one_line(run_copy, capsys, args, expected):
    assert main(["attribute", str(run_copy), *args]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and expected in error[0]
    assert not (run_copy / "attribution").exists()
