"""Guidance for learned models (condiff.sampling.guidance) against exact ground truth.

On a Gaussian mixture the exact noise predictor is known for every class and for the mixture, and the
exact noisy classifier is the mixture's posterior: classifier-free and classifier guidance applied to
them must give exactly the guided score of condiff.gmm_guidance. Learned models (a class-conditional
MLP trained with label dropout, constrained or not; a noise-aware classifier; a class-conditional
digits UNet) must then show what the exact ones do.
"""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

import condiff
from condiff.cli import main
from condiff.config import ConfigError, config_from_dict
from condiff.data.datasets import class_shares, gaussian_mixture_dataset
from condiff.lifecycle.build import build_data
from condiff.lifecycle.build import evaluation_classifier
from condiff.gmm.guidance import guided_score
from condiff.gmm.mixture import ExactNoisePredictor, GaussianMixture
from condiff.sampling.generate import generate, sampling_scheduler
from condiff.sampling.guidance import ClassifierFreeGuidance, ClassifierGuidance
from condiff.sampling.noise_classifier import noisy_accuracy, train_noise_aware_classifier

pytestmark = pytest.mark.slow   # trains class-conditional models

MEANS = [[-2.0, -2.0], [2.0, -2.0], [-2.0, 2.0], [2.0, 2.0]]
MIXTURE = GaussianMixture.from_lists(MEANS, weights=[0.4, 0.3, 0.2, 0.1], std=0.5)


def training_scheduler():
    return DDPMScheduler(num_train_timesteps=1000, clip_sample=False)


class ExactNoisyClassifier(torch.nn.Module):
    """p_t(k | x_t) of the mixture at the VP chain's abar_t: a perfect noise-aware classifier."""

    def __init__(self, mixture, alphas_cumprod):
        super().__init__()
        self.mixture, self.alphas_cumprod = mixture, alphas_cumprod.double()

    def forward(self, x, timesteps):
        return self.mixture.log_posterior(x, self.alphas_cumprod[timesteps[0]].item())


class MarginalOnly(torch.nn.Module):
    """The exact predictor without its class embedding: an unconditional model."""

    def __init__(self, exact):
        super().__init__()
        self.exact = exact
        self.sample_shape = exact.sample_shape

    def forward(self, sample, timestep, class_labels=None):
        return self.exact(sample, timestep)


def exact_guided_noise(x, t, labels, eta, scheduler):
    """-sqrt(1 - abar_t) times the guided score, in OU time t_OU with exp(-2 t_OU) = abar_t."""
    abar = scheduler.alphas_cumprod[t].item()
    return -math.sqrt(1 - abar) * guided_score(MIXTURE, x, -0.5 * math.log(abar), labels, eta)


@pytest.mark.parametrize("t", [20, 300, 800])
@pytest.mark.parametrize("eta", [0.0, 1.0, 4.0])
def test_both_guidance_kinds_on_the_exact_model_give_the_exact_guided_score(t, eta):
    scheduler = training_scheduler()
    exact = ExactNoisePredictor(MIXTURE, scheduler.alphas_cumprod)
    x = 2.5 * torch.randn(64, 2, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
    labels = torch.arange(64) % 4
    timesteps = torch.full((64,), t)
    expected = exact_guided_noise(x, t, labels, eta, scheduler)
    cfg = ClassifierFreeGuidance(eta).noise(exact, x, timesteps, labels)
    torch.testing.assert_close(cfg.double(), expected, atol=1e-9, rtol=1e-7)
    classifier = ExactNoisyClassifier(MIXTURE, scheduler.alphas_cumprod)
    for model in (exact, MarginalOnly(exact)):   # conditional base (weight eta), marginal base (1 + eta)
        guided = ClassifierGuidance(classifier, eta, scheduler.alphas_cumprod).noise(model, x, timesteps, labels)
        # The exact posterior's gradient goes through torch.cdist, whose round-off is ~1e-8 here.
        torch.testing.assert_close(guided.double(), expected, atol=1e-6, rtol=1e-6)


def test_classifier_free_guidance_needs_a_class_conditional_model():
    with pytest.raises(ValueError, match="class-conditional"):
        ClassifierFreeGuidance(1.0).noise(MarginalOnly(ExactNoisePredictor(MIXTURE, training_scheduler().alphas_cumprod)),
                                          torch.zeros(2, 2), torch.tensor([5, 5]), torch.tensor([0, 1]))


def test_exact_conditional_sampling_returns_the_class_gaussian_and_guidance_sharpens_it():
    """eta = 0 with a class label samples N(mu_y, s^2 I) (DDIM on the exact scores); guidance from the same initial
    noise moves the samples towards confident regions: the other classes' posterior down, the spread down."""
    scheduler = training_scheduler()
    exact = ExactNoisePredictor(MIXTURE, scheduler.alphas_cumprod)
    labels = torch.full((4000,), 3)
    doubts, spreads = [], []
    for eta in (0.0, 1.0, 3.0):
        out = generate(exact, sampling_scheduler(scheduler, "ddim"), 4000, num_inference_steps=250, batch_size=4000,
                       seed=0, class_labels=labels, guidance=ClassifierFreeGuidance(eta) if eta else None,
                       progress=False).samples.double()
        if eta == 0:
            torch.testing.assert_close(out.mean(0), MIXTURE.means[3], atol=0.02, rtol=0)
            torch.testing.assert_close(out.T.cov(), 0.25 * torch.eye(2, dtype=torch.float64), atol=0.02, rtol=0)
        # The class's posterior is within 1e-4 of 1 already; the log posterior of the others still tells apart.
        doubts.append(MIXTURE.log_posterior(out)[:, :3].logsumexp(1).mean().item())
        spreads.append(out.T.cov().trace().item())
    assert doubts[0] > doubts[1] + 1 > doubts[2] + 2, doubts
    assert spreads[0] > spreads[1] > spreads[2], spreads


def gmm_config(tmp_path, name, **sections):
    table = {
        "name": name, "output_dir": str(tmp_path / name),
        "data": {"dataset": "gmm", "means": MEANS, "std": 0.5, "per_class": 1000,
                 "class_counts": {"0": 1000, "1": 1000, "2": 200, "3": 200}},
        "model": {"kind": "mlp", "hidden": 128, "layers": 3, "class_conditional": True},
        "train": {"steps": 1500, "batch_size": 128, "lr": 2e-3, "warmup_steps": 50, "checkpoint_every": 1500,
                  "label_dropout": 0.2},
        "dual": {"batch_size": 64, "primal_steps_per_dual": 2, "lr": 250.0, "lr_relative": True},
        "sample": {"num_samples": 200, "steps": 20, "batch_size": 200},
    }
    for key, value in sections.items():
        table[key] = {**table.get(key, {}), **value}
    return config_from_dict(table)


@pytest.fixture(scope="module")
def conditional_gmm_run(tmp_path_factory):
    """A class-conditional MLP, constrained (minority components 2 and 3) and trained with label dropout."""
    config = gmm_config(tmp_path_factory.mktemp("cfg"), "conditional", constraints={"classes": [2, 3], "gamma": 0.5})
    return config, condiff.train(config).path


def test_conditional_constrained_model_samples_each_class_and_theorem_1_without_a_label(conditional_gmm_run):
    config, run = conditional_gmm_run
    pipeline = DDPMPipeline.from_pretrained(run / "model")
    mixture = build_data(config).mixture
    scheduler = sampling_scheduler(pipeline.scheduler, "ddim")
    summary = json.loads((run / "summary.json").read_text())
    unconditional = generate(pipeline.unet, scheduler, 6000, num_inference_steps=50, batch_size=6000, progress=False)
    shares = class_shares(mixture.classify(unconditional.samples), 4)
    assert all(c["multiplier"] > 0.05 for c in summary["constraints"])
    # 0.04 rather than the unconditional models' 0.03: the "no class" half learns from a fifth of the labels.
    assert np.abs(shares - np.array(summary["predicted_class_shares"])).max() <= 0.04, (shares, summary)
    for k in range(4):
        out = generate(pipeline.unet, scheduler, 500, num_inference_steps=50, batch_size=500,
                       class_labels=torch.full((500,), k), progress=False)
        assert (mixture.classify(out.samples) == k).float().mean() > 0.95, k


def test_classifier_free_guidance_of_the_learned_model_follows_the_exact_one(conditional_gmm_run):
    """Mean confidence p_0(y | x) of the minority class 3 over a sweep of eta: rising for both, and the
    learned model within 0.03 of the exact predictor run through the same sampler and noise. The
    learned unconditional half is Theorem 1's mixture, so the exact model has its shares as weights."""
    config, run = conditional_gmm_run
    pipeline = DDPMPipeline.from_pretrained(run / "model")
    data_mixture = build_data(config).mixture
    shares = json.loads((run / "summary.json").read_text())["predicted_class_shares"]
    exact = ExactNoisePredictor(GaussianMixture.from_lists(MEANS, weights=shares, std=0.5),
                                pipeline.scheduler.alphas_cumprod)
    labels = torch.full((3000,), 3)
    curves = {}
    for name, model in (("learned", pipeline.unet), ("exact", exact)):
        curves[name] = []
        for eta in (0.0, 1.0, 3.0):
            out = generate(model, sampling_scheduler(pipeline.scheduler, "ddim"), 3000, num_inference_steps=50,
                           batch_size=3000, seed=1, class_labels=labels, guidance=ClassifierFreeGuidance(eta),
                           progress=False).samples
            curves[name].append(data_mixture.log_posterior(out).exp()[:, 3].mean().item())
    for curve in curves.values():
        assert curve[0] < curve[1] < curve[2], curves
    assert np.abs(np.array(curves["learned"]) - np.array(curves["exact"])).max() < 0.03, curves


def test_noise_aware_classifier_guides_an_unconditional_model_to_the_class():
    scheduler = training_scheduler()
    data = gaussian_mixture_dataset(MEANS, 0.5, [400, 300, 200, 100], seed=0)
    classifier = train_noise_aware_classifier(data, scheduler, steps=600, batch_size=128, seed=0, progress=False)
    held_out = gaussian_mixture_dataset(MEANS, 0.5, [250] * 4, seed=1)
    accuracy = noisy_accuracy(classifier, held_out, scheduler, [0, 500, 900])
    # Clean samples are separable; by t = 900 (abar ~ 1e-4) the noise has erased the class: chance, 1/4.
    assert accuracy[0] > 0.98 and accuracy[0] > accuracy[500] > accuracy[900] - 0.02, accuracy
    assert abs(accuracy[900] - 0.25) < 0.05, accuracy
    marginal = MarginalOnly(ExactNoisePredictor(MIXTURE, scheduler.alphas_cumprod))
    in_class = []
    for eta in (0.0, 2.0):
        out = generate(marginal, sampling_scheduler(scheduler, "ddim"), 2000, num_inference_steps=50, batch_size=2000,
                       class_labels=torch.full((2000,), 3), progress=False,
                       guidance=ClassifierGuidance(classifier, eta, scheduler.alphas_cumprod)).samples
        in_class.append((MIXTURE.classify(out) == 3).float().mean().item())
    # Without guidance the marginal model gives class 3 a tenth of its samples; eta = 0 already selects it.
    assert in_class[0] > 0.9 and in_class[1] >= in_class[0], in_class


def test_guidance_raises_the_digit_classifiers_confidence_monotonically(tmp_path):
    """A class-conditional digits UNet trained with label dropout; classifier-free guidance sweep:
    the evaluation classifier's mean probability of the requested digit rises with every eta."""
    table = {"name": "digits-cfg", "output_dir": str(tmp_path / "digits"),
             "data": {"dataset": "digits", "held_out_per_class": 30},
             "model": {"kind": "unet8", "class_conditional": True},
             "train": {"steps": 250, "batch_size": 32, "lr": 2e-3, "warmup_steps": 25, "checkpoint_every": 250,
                       "label_dropout": 0.15}}
    config = config_from_dict(table)
    run = condiff.train(config).path
    pipeline = DDPMPipeline.from_pretrained(run / "model")
    classifier, _ = evaluation_classifier(config, build_data(config))
    labels = torch.arange(10).repeat_interleave(10)   # the same noises at every eta: measured 0.60, 0.74, 0.84, 0.88
    confidence = []
    for eta in (0.0, 0.5, 1.5, 4.0):
        out = generate(pipeline.unet, sampling_scheduler(pipeline.scheduler, "ddim", guided=True), 100,
                       num_inference_steps=10, batch_size=100, seed=0, class_labels=labels,
                       guidance=ClassifierFreeGuidance(eta), progress=False).samples.clamp(-1, 1)
        with torch.no_grad():
            probs = torch.softmax(classifier(out), dim=1)
        confidence.append(probs[torch.arange(100), labels].mean().item())
    assert all(a < b for a, b in zip(confidence, confidence[1:])), confidence
    assert confidence[0] > 0.5, confidence   # the conditional model already draws the requested digit


def test_label_dropout_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.label_dropout: .*class-conditional"):
        gmm_config(tmp_path, "x", model={"class_conditional": False})
    with pytest.raises(ConfigError, match=r"train\.label_dropout: must be below 1"):
        gmm_config(tmp_path, "x", train={"label_dropout": 1.0})
    with pytest.raises(ConfigError, match=r"train\.label_dropout: must be non-negative"):
        gmm_config(tmp_path, "x", train={"label_dropout": -0.1})


def test_sample_command_with_class_and_guidance(tmp_path, capsys):
    conditional = condiff.train(gmm_config(tmp_path, "c", train={"steps": 20, "checkpoint_every": 20})).path
    unconditional = condiff.train(gmm_config(tmp_path, "u", model={"class_conditional": False},
                                         train={"steps": 20, "checkpoint_every": 20, "label_dropout": 0.0})).path
    assert main(["sample", str(conditional), "--class", "2", "--guidance", "1.5"]) == 0
    saved = np.load(conditional / "samples-class2-cfg1.5.npz")["samples"]
    assert saved.shape == (200, 2) and (conditional / "samples-class2-cfg1.5.png").is_file()
    assert not (conditional / "samples.npz").exists()          # the unconditional samples stay separate

    errors = {
        ("sample", str(conditional), "--guidance", "2"): "--guidance: needs --class",
        ("sample", str(conditional), "--class", "7"): "--class: .* has classes 0-3, not 7",
        ("sample", str(unconditional), "--class", "1", "--guidance-kind", "cfg"): "not class-conditional",
        ("sample", str(unconditional), "--class", "1"): "no noise-aware classifier; train one with `condiff noise-classifier",
    }
    import re
    for args, message in errors.items():
        assert main(list(args)) == 2, args
        assert re.search(message, capsys.readouterr().err), (args, message)

    assert main(["noise-classifier", str(unconditional), "--steps", "30"]) == 0
    assert "held-out accuracy at t = 0:" in capsys.readouterr().out
    assert main(["noise-classifier", str(unconditional), "--steps", "30"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["sample", str(unconditional), "--class", "1", "--guidance", "2"]) == 0
    assert (unconditional / "samples-class1-classifier2.npz").is_file()
    accuracy = json.loads((unconditional / "noise_classifier" / "accuracy.json").read_text())
    assert set(accuracy) == {"0", "250", "500", "750"}
