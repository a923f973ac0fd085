"""Samplers against ground truth: with the exact noise predictor of a Gaussian mixture, DDIM and
DDPM must return the mixture; seeds must reproduce; the per-step x0 record must be consistent."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from condiff.gmm.mixture import ExactNoisePredictor, GaussianMixture
from condiff.models import MLPDenoiser
from condiff.sampling.generate import generate, sampling_scheduler

MIXTURE = GaussianMixture.from_lists([[-2.0, -2.0], [2.0, -2.0], [0.0, 2.0]], weights=[0.5, 0.3, 0.2], std=0.3)


def training_scheduler():
    return DDPMScheduler(num_train_timesteps=1000, clip_sample=False)


@pytest.mark.parametrize("method,steps", [("ddim", 100), ("ddpm", 250)])
def test_exact_score_sampling_returns_the_mixture(method, steps):
    scheduler = training_scheduler()
    model = ExactNoisePredictor(MIXTURE, scheduler.alphas_cumprod)
    out = generate(model, sampling_scheduler(scheduler, method), 4000, num_inference_steps=steps,
                   batch_size=4000, seed=0, progress=False)
    labels = MIXTURE.classify(out.samples)
    shares = np.bincount(labels.numpy(), minlength=3) / 4000
    assert np.allclose(shares, [0.5, 0.3, 0.2], atol=0.025)
    # within-component spread is the component's std (0.3), per coordinate
    spread = torch.stack([(out.samples[labels == k] - MIXTURE.means[k].float()).std(0) for k in range(3)])
    assert torch.allclose(spread, torch.full_like(spread, 0.3), atol=0.04)


def test_same_seed_same_samples_and_different_seed_different_samples():
    model = MLPDenoiser(dim=2)
    scheduler = sampling_scheduler(training_scheduler(), "ddpm")
    a = generate(model, scheduler, 64, num_inference_steps=10, batch_size=32, seed=3, progress=False).samples
    b = generate(model, scheduler, 64, num_inference_steps=10, batch_size=32, seed=3, progress=False).samples
    c = generate(model, scheduler, 64, num_inference_steps=10, batch_size=32, seed=4, progress=False).samples
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_recorded_x0_predictions_end_at_the_ddim_sample(tmp_path):
    model = MLPDenoiser(dim=2)
    out = generate(model, sampling_scheduler(training_scheduler(), "ddim"), 10, num_inference_steps=8,
                   batch_size=4, seed=0, record_x0=True, progress=False)
    assert out.x0_predictions.shape == (8, 10, 2)
    assert out.timesteps.tolist() == sorted(out.timesteps.tolist(), reverse=True)
    # DDIM's last step goes to alpha_bar = 1, where the sample is the x0 prediction itself
    assert torch.allclose(out.x0_predictions[-1], out.samples, atol=1e-6)
    out.save_npz(tmp_path / "s.npz")
    assert np.load(tmp_path / "s.npz")["x0_predictions"].shape == (8, 10, 2)


def test_a_trajectory_resumed_from_its_own_midpoint_ends_where_it_did():
    """`resume_from = (step, x_T)`: DDIM from a state of the model's own path retraces the rest of it exactly
    (x0 predictions and samples), and from another state it ends elsewhere."""
    scheduler = training_scheduler()
    model = MLPDenoiser(dim=2, hidden=16, layers=1)
    kept = {}
    full = generate(model, sampling_scheduler(scheduler, "ddim"), 6, num_inference_steps=20, seed=3, record_x0=True,
                    progress=False, on_step=lambda first, t, x: kept.setdefault(t, x.clone()))
    step = 7
    state = kept[int(full.timesteps[step])]
    resumed = generate(model, sampling_scheduler(scheduler, "ddim"), 6, num_inference_steps=20, record_x0=True,
                       progress=False, resume_from=(step, state), batch_size=4)
    torch.testing.assert_close(resumed.samples, full.samples)
    torch.testing.assert_close(resumed.x0_predictions, full.x0_predictions[step:])
    assert resumed.timesteps.tolist() == full.timesteps[step:].tolist()
    moved = generate(model, sampling_scheduler(scheduler, "ddim"), 6, num_inference_steps=20, progress=False,
                     resume_from=(step, state + 0.5))
    assert (moved.samples - full.samples).abs().max() > 0.1
    with pytest.raises(ValueError, match="resume_from"):
        generate(model, sampling_scheduler(scheduler, "ddim"), 5, progress=False, resume_from=(step, state))


@pytest.mark.parametrize("method", ["ddim", "ddpm", "dpm++"])
def test_a_seed_gives_the_same_samples_whatever_the_batch_size(method):
    """DPM-Solver++ keeps its earlier outputs between steps: each batch must start it afresh, or the second batch
    would continue the first one's solver state (measured share control samples with it)."""
    torch.manual_seed(0)
    model, scheduler = MLPDenoiser(dim=2, hidden=16, layers=1), DDPMScheduler(num_train_timesteps=100)
    def draw(batch_size):
        return generate(model, sampling_scheduler(scheduler, method), 12, num_inference_steps=6, seed=5,
                        batch_size=batch_size, progress=False).samples
    torch.testing.assert_close(draw(5), draw(12))
