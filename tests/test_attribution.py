"""Attribution against ground truth (issue 12, first part): the TRAK estimator equals its formula, the
projections preserve inner products, per-example gradients equal one-at-a-time autograd, and on a
Gaussian mixture the training examples that guide a sample's late steps come from its own component
while those of the noisiest steps do not."""

import json

import numpy as np
import pytest
import torch

import condiff
from condiff.attribution.features import GradientFeaturizer, output_value
from condiff.attribution.projector import GaussianProjector, SparseProjector
from condiff.attribution.trak import RidgePath, choose_ridge, ensemble_scores, ridge, trak_scores
from condiff.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_trak_scores_equal_the_formula_computed_directly():
    generator = torch.Generator().manual_seed(0)
    phi, targets = torch.randn(50, 8, generator=generator), torch.randn(3, 8, generator=generator)
    coefficient = 0.1
    lam = coefficient * float((phi.double() ** 2).sum()) / 8
    assert ridge(phi, coefficient) == pytest.approx(lam)
    direct = phi.double() @ torch.linalg.inv(phi.double().T @ phi.double() + lam * torch.eye(8, dtype=torch.float64)) \
        @ targets.double().T
    torch.testing.assert_close(trak_scores(phi, targets, coefficient), direct, rtol=1e-10, atol=1e-12)
    # The relative ridge makes the scores independent of the gradients' scale.
    torch.testing.assert_close(trak_scores(3 * phi.double(), 3 * targets.double(), coefficient), direct,
                               rtol=1e-9, atol=1e-12)
    # An ensemble is the plain mean of its models' scores.
    other = (torch.randn(50, 8, generator=generator), torch.randn(3, 8, generator=generator))
    torch.testing.assert_close(ensemble_scores([(phi, targets), other], coefficient),
                               (direct + trak_scores(*other, coefficient)) / 2)


def direct_scores(phi: torch.Tensor, targets: torch.Tensor, coefficient: float) -> torch.Tensor:
    """Phi (Phi^T Phi + lambda I)^-1 G^T by an explicit k x k inverse, whatever the shapes."""
    phi, targets = phi.double(), targets.double()
    kernel = phi.T @ phi + ridge(phi, coefficient) * torch.eye(phi.shape[1], dtype=torch.float64)
    return phi @ torch.linalg.inv(kernel) @ targets.T


@pytest.mark.parametrize("n,k", [(40, 8), (12, 30)], ids=["primal", "dual"])
def test_the_smaller_kernel_is_factorised_and_gives_the_formulas_scores(n, k, monkeypatch):
    generator = torch.Generator().manual_seed(5)
    phi, targets = torch.randn(n, k, generator=generator), torch.randn(3, k, generator=generator)
    factorised, cholesky = [], torch.linalg.cholesky
    monkeypatch.setattr(torch.linalg, "cholesky", lambda kernel: factorised.append(kernel.shape) or cholesky(kernel))
    for coefficient in (1e-3, 0.1, 10.0):
        torch.testing.assert_close(trak_scores(phi, targets, coefficient), direct_scores(phi, targets, coefficient),
                                   rtol=1e-9, atol=1e-12)
    assert set(factorised) == {(min(n, k), min(n, k))}


@pytest.mark.parametrize("n,k", [(40, 8), (12, 30)], ids=["primal", "dual"])
def test_one_factorisation_gives_the_scores_of_every_ridge(n, k):
    generator = torch.Generator().manual_seed(6)
    models = [(torch.randn(n, k, generator=generator), torch.randn(4, k, generator=generator)) for _ in range(2)]
    path = RidgePath(*models[0])
    for coefficient in (1e-4, 1e-2, 1.0, 100.0):
        torch.testing.assert_close(path.scores(coefficient), direct_scores(*models[0], coefficient),
                                   rtol=1e-8, atol=1e-11)
    # choose_ridge picks what measuring every coefficient's ensemble scores directly picks.
    wanted = ensemble_scores(models, 0.3)
    measure = lambda scores: -float((scores - wanted).abs().sum())   # noqa: E731
    coefficients = (1e-3, 0.03, 0.1, 0.3, 1.0, 10.0)
    assert choose_ridge(models, measure, coefficients) == 0.3
    assert choose_ridge(models, measure, coefficients) == max(
        coefficients, key=lambda c: measure(ensemble_scores(models, c)))


def test_scores_equal_trakers_when_fed_the_same_projected_features():
    """traker's score computer (0.3.2, no ridge) on the same features: the same scores once its division of
    the kernel inverse by that inverse's mean absolute entry (a per-model scale condiff does not copy) is
    undone. (Its single-block computer cannot be instantiated in 0.3.2: an abstract __init__.)"""
    score_computers = pytest.importorskip("trak.score_computers", reason="traker (pip install 'condiff[dev]')")
    generator = torch.Generator().manual_seed(4)
    phi, targets = torch.randn(200, 16, generator=generator), torch.randn(5, 16, generator=generator)
    ours = trak_scores(phi, targets, 1e-12).float()
    computer = score_computers.BasicScoreComputer(dtype=torch.float32, device="cpu")
    xtx = computer.get_xtx(phi)
    theirs = torch.zeros(200, 5)
    computer.get_scores(computer.get_x_xtx_inv(phi, xtx), targets, accumulator=theirs)   # adds in place
    torch.testing.assert_close(ours, theirs * float(torch.linalg.inv(xtx).abs().mean()), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("projector", [GaussianProjector, SparseProjector])
def test_projections_preserve_inner_products(projector):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(20, 5000, generator=generator)
    projected = projector(5000, 4096, seed=3).project(x)
    exact, approximate = x @ x.T, projected @ projected.T
    assert torch.allclose(approximate.diagonal(), exact.diagonal(), rtol=0.1)
    assert (approximate - exact).abs().max() < 0.1 * exact.diagonal().mean()
    torch.testing.assert_close(projector(5000, 4096, seed=3).project(x), projected)   # seeded: the same matrix


def test_sparse_projection_is_the_product_with_its_seeded_matrix():
    """Each coordinate to 4 seeded rows with seeded signs / 2: the scatter-add equals the explicit product (and
    the draws are those of earlier versions, so stored features stay valid)."""
    generator = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 16, (4, 300), generator=generator)
    signs = torch.randint(0, 2, (4, 300), generator=generator) * 2 - 1
    matrix = torch.zeros(300, 16)
    for nonzero in range(4):
        matrix[torch.arange(300), rows[nonzero]] += signs[nonzero] / 2
    x = torch.randn(5, 300)
    torch.testing.assert_close(SparseProjector(300, 16, seed=3).project(x), x @ matrix)


def test_gaussian_projector_is_seeded():
    x = torch.randn(4, 1000)
    torch.testing.assert_close(GaussianProjector(1000, 64, seed=2).project(x),
                               GaussianProjector(1000, 64, seed=2).project(x))
    assert not torch.allclose(GaussianProjector(1000, 64, seed=3).project(x), GaussianProjector(1000, 64, seed=2).project(x))


class Identity:
    def project(self, gradients):
        return gradients


@pytest.mark.parametrize("output", ["dtrak", "loss"])
@pytest.mark.parametrize("kind,shape,classes", [("mlp", (2,), None), ("unet8", (1, 8, 8), None),
                                                ("mlp", (2,), 3), ("unet8", (1, 8, 8), 3)])
def test_per_example_gradients_equal_one_at_a_time_autograd(output, kind, shape, classes):
    torch.manual_seed(0)
    options = {"hidden": 16, "layers": 1} if kind == "mlp" else {"block_out_channels": [8, 16]}
    model = build_model(kind, shape, num_class_embeds=classes, **options)
    alphas = torch.linspace(0.99, 0.01, 1000)
    featurizer = GradientFeaturizer(model, alphas, Identity(), output=output)
    clean, noise = torch.randn(3, *shape), torch.randn(3, *shape)
    timesteps = torch.tensor([10, 500, 990])
    labels = None if classes is None else torch.tensor([2, 0, 2])
    abar = alphas[timesteps].view(-1, *[1] * len(shape))
    noisy = abar.sqrt() * clean + (1 - abar).sqrt() * noise
    batched = featurizer.gradients(noisy, timesteps, noise, labels)
    assert featurizer.hooked is not None          # the hook rules, not the torch.func fallback, computed them
    for i in range(3):
        model.zero_grad()
        label = None if labels is None else labels[i:i + 1]
        output_value(output, model(noisy[i:i + 1], timesteps[i:i + 1], class_labels=label).sample[0],
                     noise[i]).backward()
        single = torch.cat([p.grad.flatten() for p in model.parameters()])
        torch.testing.assert_close(batched[i], single, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def mixture_attribution(tmp_path_factory, tiny_config):
    """A model of four equal Gaussian components, 40 samples with their x0 predictions at every DDIM step,
    and the D-TRAK features of its 400 training points (K = 10 timesteps)."""
    from condiff.lifecycle.build import build_data, load_pipeline
    from condiff.sampling.generate import generate, sampling_scheduler

    config = tiny_config(tmp_path_factory.mktemp("attribution") / "run", constraints=None,
                         data={"means": [[-2.0, -2.0], [2.0, -2.0], [-2.0, 2.0], [2.0, 2.0]], "std": 0.5,
                               "per_class": 100, "class_counts": {}},
                         model={"hidden": 64, "layers": 2},
                         train={"steps": 2000, "batch_size": 128, "lr": 2e-3, "warmup_steps": 50,
                                "checkpoint_every": 2000, "ema_decay": 0.0})
    pipeline = load_pipeline(condiff.train(config).path)
    data = build_data(config)
    samples = generate(pipeline.unet, sampling_scheduler(pipeline.scheduler, "ddim"), 40, num_inference_steps=50,
                       record_x0=True, seed=0, progress=False)
    featurizer = GradientFeaturizer(pipeline.unet, pipeline.scheduler.alphas_cumprod, None)
    featurizer.projector = GaussianProjector(featurizer.num_params, 1024, seed=0)
    train_features = featurizer.train_features(data.train.data, list(range(0, 1000, 100)))
    return featurizer, samples, torch.as_tensor(data.mixture.classify(samples.samples)), data.train.labels, train_features


@pytest.mark.slow
@pytest.mark.parametrize("timestep,low,high", [(100, 0.8, 1.0), (900, 0.1, 0.4)])
def test_late_steps_are_guided_by_the_samples_own_component_and_the_noisiest_by_none(mixture_attribution, timestep,
                                                                                     low, high):
    """Top-20 attributed training points of each sample: from its own component at t = 100 (measured here:
    0.97), near chance (0.25) at t = 900, where the sample's component is not yet decided (measured: 0.29;
    the band excludes both an all-own-component and an all-other-component top 20)."""
    featurizer, samples, components, train_labels, train_features = mixture_attribution
    step = int((samples.timesteps - timestep).abs().argmin())
    targets = featurizer.target_features(samples.x0_predictions[step], int(samples.timesteps[step]), resamplings=20)
    top = trak_scores(train_features, targets, 0.1).topk(20, dim=0).indices
    purity = (train_labels[top] == components[None]).float().mean().item()
    assert low <= purity <= high, purity


SMALL = dict(num_targets=2, steps=(900, 100), top=4, train_timesteps=4, resamplings=5, dimension=128,
             batch_size=16)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_config):

    return condiff.train(tiny_config(tmp_path_factory.mktemp("attribute") / "run", train={"steps": 20})).path


def test_attribute_writes_scores_tops_journeys_and_a_report(tiny_run):
    from condiff.audit.attribute import attribute_run
    from condiff.audit.results import AttributionSettings

    result = attribute_run(tiny_run, AttributionSettings(**SMALL), overwrite=True, progress=False)
    folder = tiny_run / "attribution"
    scores = np.load(folder / "scores.npy", mmap_mode="r")
    assert scores.shape == (90, 2, 2)                   # 40 + 40 + 10 training points, 2 targets, 2 steps
    saved = json.loads((folder / "attribution.json").read_text())
    assert saved["settings"]["steps"] == [900, 100] and len(saved["target_classes"]) == 2
    for column, step in enumerate(result.steps):
        for target in range(2):   # the listed examples are the highest and lowest scores, in order
            order = np.argsort(-scores[:, target, column])
            assert step.helpful[target] == order[:4].tolist() and step.harmful[target] == order[::-1][:4].tolist()
    assert all((folder / f"journey-{t}.png").is_file() for t in range(2))
    assert "## Journeys" in (folder / "report.md").read_text()


def test_featurization_resumes_after_a_kill(tiny_run, tmp_path, monkeypatch):
    """A run killed while featurizing keeps its finished batches; the resumed features equal a fresh run's."""
    from condiff.audit.attribute import attribute_run
    from condiff.audit.results import AttributionSettings

    settings = AttributionSettings(**SMALL)
    fresh = attribute_run(tiny_run, settings, overwrite=True, progress=False).directory
    expected = np.load(fresh / f"features-{settings.output}-K4-k128-sparse.npy").copy()

    calls, original = [], GradientFeaturizer.train_features

    def killed_after_two_batches(self, data, timesteps, **kwargs):
        calls.append(kwargs.get("first_index"))
        if len(calls) > 2:
            raise KeyboardInterrupt
        return original(self, data, timesteps, **kwargs)

    monkeypatch.setattr(GradientFeaturizer, "train_features", killed_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        attribute_run(tiny_run, settings, overwrite=True, progress=False)
    monkeypatch.setattr(GradientFeaturizer, "train_features", original)
    calls.clear()
    monkeypatch.setattr(GradientFeaturizer, "train_features",
                        lambda self, data, timesteps, **kw: calls.append(kw.get("first_index")) or original(
                            self, data, timesteps, **kw))
    attribute_run(tiny_run, settings, resume=True, progress=False)
    resumed = np.load(tiny_run / "attribution" / f"features-{settings.output}-K4-k128-sparse.npy")
    assert 0 not in calls and 16 not in calls         # the two finished batches were not redone
    np.testing.assert_array_equal(resumed, expected)


def test_attribute_refuses_bad_timesteps_in_one_line(tiny_run, capsys):
    from condiff.cli import main

    assert main(["attribute", str(tiny_run), "--timesteps", "900,late"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "condiff: error: --timesteps: expected timesteps like 900,500,100, got '900,late'"]


def test_attributes_old_flag_names_still_work_for_one_release_and_say_so(tiny_run, capsys):
    from condiff.cli import build_parser, main

    args = build_parser().parse_args(["attribute", "RUN", "--output", "dtrak", "--steps", "500,100"])
    assert (args.output_function, args.timesteps) == ("dtrak", "500,100")
    assert capsys.readouterr().err.splitlines() == [
        "condiff: --output is deprecated, use --output-function (the old name goes in the next release)",
        "condiff: --steps is deprecated, use --timesteps (the old name goes in the next release)"]
    assert main(["attribute", str(tiny_run), "--steps", "900,late"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("condiff: error: --timesteps:")


def test_library_errors_name_arguments_and_the_command_line_its_flags(tiny_run, capsys):
    """AttributionSettings speaks of its fields; `condiff attribute` of the flags those fields are."""
    from condiff.audit.results import AttributionSettings
    from condiff.cli import main
    from condiff.config import ArgumentError

    with pytest.raises(ArgumentError, match=r"^num_targets: 0 is not allowed$"):
        AttributionSettings(num_targets=0).validated()
    with pytest.raises(ArgumentError, match=r"^output: 'x' is not allowed$"):
        AttributionSettings(output="x").validated()
    assert main(["attribute", str(tiny_run), "--samples", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "condiff: error: --samples: 0 is not allowed"
