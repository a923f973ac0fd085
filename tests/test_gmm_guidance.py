"""Exact guidance on Gaussian mixtures (condiff.gmm.guidance) against ground truth.

Scores and divergences are checked against autograd derivatives of log densities written here from
scratch; samplers against Gaussian algebra (eta = 0 must return the target component); the guidance
claims of Wu et al. (ICML 2024) against the reference table of docs/guidance-reference.md and their
pathwise form (shared noise); the phase-shift example against its recorded behaviour.
"""

import math

import pytest
import torch
from scipy import integrate

from condiff.gmm.guidance import (
    METHODS,
    ODE_METHODS,
    SamplerNoise,
    classifier_score,
    conditional_score,
    draw_noise,
    gaussian_entropy,
    guided_score,
    guided_score_divergence,
    knn_entropy,
    marginal_score,
    mean_confidence,
    noisy_posterior,
    ode_output_entropy,
    ou_scale,
    sample_guided,
    sample_guided_sweep,
)
from condiff.gmm.mixture import GaussianMixture
from condiff.labs.guidance.phase_shift import (
    PHASE_SHIFT_EXAMPLE,
    SPLIT_THRESHOLD,
    centre_dip_ratio,
    collinear_mixture,
    phase_shift_samples,
)
from condiff.labs.guidance.reference import REFERENCE_TABLE, reference_mixture, reference_row, reference_samples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# Independent ground truth: log densities of the noisy mixture, written from the Gaussian density
# ----------------------------------------------------------------------------------------------------

def log_normal(x, mean, var):
    d = x.shape[1]
    return -((x - mean) ** 2).sum(1) / (2 * var) - 0.5 * d * math.log(2 * math.pi * var)


def log_component(mixture, x, t, k):
    """log p_t(x | k): X_t = e^{-t} X_0 + sqrt(1 - e^{-2t}) Z with X_0 ~ N(mu_k, s^2 I)."""
    a = math.exp(-t)
    return log_normal(x, a * mixture.means[k], a * a * mixture.std ** 2 + 1 - a * a)


def log_marginal(mixture, x, t):
    terms = [torch.log(mixture.weights[k]) + log_component(mixture, x, t, k) for k in range(len(mixture.means))]
    return torch.logsumexp(torch.stack(terms, 1), 1)


def log_classifier(mixture, x, t, y):
    """log p_t(y | x) by Bayes' rule."""
    return torch.log(mixture.weights[y]) + log_component(mixture, x, t, y) - log_marginal(mixture, x, t)


def grad(f, x):
    x = x.detach().clone().requires_grad_(True)
    return torch.autograd.grad(f(x).sum(), x)[0]


def laplacian(f, x):
    x = x.detach().clone().requires_grad_(True)
    g = torch.autograd.grad(f(x).sum(), x, create_graph=True)[0]
    return sum(torch.autograd.grad(g[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(x.shape[1]))


@pytest.fixture(scope="module")
def mixture3d():
    """Three unequal components in 3-D with s != 1, so the general-s formulas are exercised."""
    means = torch.randn(3, 3, generator=gen(0), dtype=torch.float64) * 1.5
    return GaussianMixture.from_lists(means, weights=[0.5, 0.3, 0.2], std=0.7)


TIMES = [0.02, 0.4, 1.5, 5.0]


@pytest.mark.parametrize("t", TIMES)
def test_noisy_posterior_is_bayes_rule_on_gaussian_densities(mixture3d, t):
    x = torch.randn(200, 3, generator=gen(1), dtype=torch.float64) * 2
    expected = torch.stack([log_classifier(mixture3d, x, t, k) for k in range(3)], 1).exp()
    assert torch.allclose(noisy_posterior(mixture3d, x, t), expected, atol=1e-12)
    assert torch.allclose(noisy_posterior(mixture3d, x, t), mixture3d.log_posterior(x, ou_scale(t) ** 2).exp(),
                          atol=1e-12)


@pytest.mark.parametrize("t", TIMES)
def test_scores_are_gradients_of_the_log_densities(mixture3d, t):
    x = torch.randn(200, 3, generator=gen(2), dtype=torch.float64) * 2
    y, eta = 1, 2.5
    cond = grad(lambda z: log_component(mixture3d, z, t, y), x)
    marg = grad(lambda z: log_marginal(mixture3d, z, t), x)
    clf = grad(lambda z: log_classifier(mixture3d, z, t, y), x)
    assert torch.allclose(conditional_score(mixture3d, x, t, y), cond, atol=1e-10)
    assert torch.allclose(marginal_score(mixture3d, x, t), marg, atol=1e-10)
    assert torch.allclose(classifier_score(mixture3d, x, t, y), clf, atol=1e-10)
    guided = guided_score(mixture3d, x, t, y, eta)
    assert torch.allclose(guided, cond + eta * clf, atol=1e-10)
    assert torch.allclose(guided, (1 + eta) * cond - eta * marg, atol=1e-10)   # classifier-free form


def test_scores_take_one_class_and_one_guidance_strength_per_row(mixture3d):
    x = torch.randn(6, 3, generator=gen(3), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    eta = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    rowwise = torch.cat([guided_score(mixture3d, x[i:i + 1], 0.3, int(y[i]), float(eta[i])) for i in range(6)])
    assert torch.allclose(guided_score(mixture3d, x, 0.3, y, eta), rowwise, atol=1e-14)


@pytest.mark.parametrize("t", TIMES)
@pytest.mark.parametrize("eta", [0.0, 3.0])
def test_guided_score_divergence_is_the_laplacian_of_the_guided_log_density(mixture3d, t, eta):
    x = torch.randn(100, 3, generator=gen(4), dtype=torch.float64) * 2
    y = 2
    trace = laplacian(lambda z: log_component(mixture3d, z, t, y) + eta * log_classifier(mixture3d, z, t, y), x)
    assert torch.allclose(guided_score_divergence(mixture3d, x, t, y, eta), trace, atol=1e-9)


def test_divergence_is_the_paper_formula_when_s_is_one():
    mixture = reference_mixture()
    x = torch.randn(50, 2, generator=gen(5), dtype=torch.float64)
    t, eta = 0.7, 3.0
    p = noisy_posterior(mixture, x, t)
    mu = mixture.means
    trace_cov = (p * (mu.pow(2).sum(1))).sum(1) - (p @ mu).pow(2).sum(1)
    expected = -2 - eta * math.exp(-2 * t) * trace_cov
    assert torch.allclose(guided_score_divergence(mixture, x, t, 0, eta), expected, atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------

def test_noise_drawn_on_the_fly_is_the_noise_passed_in_and_shared_across_etas(mixture3d):
    """Same seed = same noise at every eta, whether drawn by the sampler, passed in, or swept."""
    n, steps = 300, 30
    for method in ("sde_euler", "ddpm", "ode_euler"):
        noise = draw_noise(n, 3, steps, stochastic=method not in ODE_METHODS, generator=gen(6))
        drawn = sample_guided(mixture3d, 0, 2.0, n, steps=steps, method=method, generator=gen(6))
        passed = sample_guided(mixture3d, 0, 2.0, n, steps=steps, method=method, noise=noise)
        swept = sample_guided_sweep(mixture3d, 0, [0.0, 2.0], n, steps=steps, method=method, generator=gen(6))
        assert torch.equal(drawn.samples, passed.samples)
        assert torch.allclose(swept[1].samples, drawn.samples, atol=1e-12)
        assert torch.allclose(swept[0].samples, sample_guided(mixture3d, 0, 0.0, n, steps=steps, method=method,
                                                              noise=noise).samples, atol=1e-12)


@pytest.mark.parametrize("method", ["ode_euler", "ode_exponential", "sde_euler", "sde_exponential"])
@pytest.mark.parametrize("std", [1.0, 0.7])
def test_eta_zero_from_the_exact_start_returns_the_target_component(method, std):
    """Without guidance the exact reverse process ends in N(mu_y, s^2 I): only O(h) and sampling error."""
    mixture = GaussianMixture.from_lists([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, -2.0, 1.0]], weights=[0.2, 0.3, 0.5],
                                         std=std)
    n, y = 8000, 2
    out = sample_guided(mixture, y, 0.0, n, T=8.0, steps=1000, method=method, generator=gen(7))
    x = out.samples
    # Sampling error: 4 standard errors of a mean (s / sqrt(n)) and of a variance ratio (sqrt(2 / n)),
    # plus 0.02 for the discretisation at h = 0.008.
    assert (x.mean(0) - mixture.means[y]).abs().max() < 4 * std / n ** 0.5 + 0.02
    assert (torch.cov(x.T) / std ** 2 - torch.eye(3, dtype=torch.float64)).abs().max() < 4 * (2 / n) ** 0.5 + 0.02
    if method in ODE_METHODS:
        # The divergence identity integrates the eta = 0 part exactly: h(N(mu_y, s^2 I)).
        assert ode_output_entropy(out) == pytest.approx(gaussian_entropy(3, std ** 2), abs=1e-12)


def test_ddim_and_ddpm_at_eta_zero_follow_their_gaussian_recursions():
    """With s = 1 and eta = 0, x_t = a_t mu + z and the updates are affine in z (derived by hand):
    DDIM z' = (a a' + sqrt((1 - a^2)(1 - a'^2))) z;  DDPM z' = (a / a') z + sigma xi with
    sigma^2 = (1 - a'^2)(1 - a^2 / a'^2) / (1 - a^2). So the output is known path by path."""
    mixture = reference_mixture()
    n, steps, T = 500, 25, 8.0
    a = [math.exp(-t) for t in torch.linspace(T, 0, steps + 1, dtype=torch.float64).tolist()]
    noise = draw_noise(n, 2, steps, generator=gen(8))

    ddim = sample_guided(mixture, 0, 0.0, n, T=T, steps=steps, method="ddim", noise=noise).samples
    factor = math.prod(a[i] * a[i + 1] + math.sqrt((1 - a[i] ** 2) * (1 - a[i + 1] ** 2)) for i in range(steps))
    assert torch.allclose(ddim, mixture.means[0] + factor * noise.initial, atol=1e-10)

    ddpm = sample_guided(mixture, 0, 0.0, n, T=T, steps=steps, method="ddpm", noise=noise).samples
    z = noise.initial.clone()
    for i in range(steps):
        sigma2 = (1 - a[i + 1] ** 2) * (1 - a[i] ** 2 / a[i + 1] ** 2) / (1 - a[i] ** 2)
        z = a[i] / a[i + 1] * z + math.sqrt(max(sigma2, 0.0)) * noise.steps[i]
    assert torch.allclose(ddpm, mixture.means[0] + z, atol=1e-10)


def test_standard_start_differs_from_the_exact_start_by_the_vanished_signal():
    """N(0, I) instead of N(a_T mu_y, I) (s = 1): without guidance the Euler ODE translates every path by
    the same amount, so the outputs differ by exactly a_T mu_y; with guidance the gap contracts."""
    mixture = reference_mixture()
    noise = draw_noise(500, 2, 100, stochastic=False, generator=gen(13))
    runs = {start: sample_guided_sweep(mixture, 0, [0.0, 4.0], 500, T=3.0, steps=100, start=start, noise=noise)
            for start in ("exact", "standard")}
    shift = math.exp(-3.0) * mixture.means[0]
    assert torch.allclose(runs["exact"][0].samples - runs["standard"][0].samples, shift.expand(500, 2), atol=1e-12)
    gap = (runs["exact"][1].samples - runs["standard"][1].samples).norm(dim=1)
    assert (gap <= shift.norm() + 1e-12).all()
    assert runs["standard"][0].start_entropy == pytest.approx(gaussian_entropy(2))


def test_samplers_reject_unknown_methods_and_entropy_needs_an_ode(mixture3d):
    with pytest.raises(ValueError):
        sample_guided(mixture3d, 0, 1.0, 10, steps=5, method="heun")
    with pytest.raises(ValueError):
        sample_guided(mixture3d, 0, 1.0, 10, steps=5, start="zero")
    with pytest.raises(ValueError):
        sample_guided(mixture3d, 0, 1.0, 10, steps=5, method="ddpm", noise=SamplerNoise(torch.zeros(10, 3)))
    with pytest.raises(ValueError):
        ode_output_entropy(sample_guided(mixture3d, 0, 1.0, 10, steps=5, method="sde_euler"))


# ----------------------------------------------------------------------------------------------------
# Entropy estimator
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [1, 2, 3])
def test_knn_entropy_matches_the_gaussian_closed_form(dim):
    """Kozachenko-Leonenko on 20,000 draws of N(0, A A^T): 0.5 log det(2 pi e A A^T) within 0.04 nats
    (its standard deviation at this size is ~0.01-0.02)."""
    a = torch.randn(dim, dim, generator=gen(9), dtype=torch.float64) + 2 * torch.eye(dim, dtype=torch.float64)
    x = torch.randn(20000, dim, generator=gen(10), dtype=torch.float64) @ a.T
    exact = 0.5 * dim * math.log(2 * math.pi * math.e) + torch.linalg.slogdet(a)[1].item()
    assert knn_entropy(x) == pytest.approx(exact, abs=0.04)


# ----------------------------------------------------------------------------------------------------
# The reference run (docs/guidance-reference.md): 2 components at +-(1, 0), T = 8, 2,000 Euler steps
# ----------------------------------------------------------------------------------------------------

REFERENCE_ETAS = (0.0, 1.0, 2.0, 4.0, 8.0)


@pytest.fixture(scope="module")
def reference():
    """The doc's setting at full size: 20,000 samples, 2,000 steps, all five etas in one batch."""
    return reference_samples(REFERENCE_ETAS, num_samples=20000, steps=2000, generator=gen(0))


@pytest.mark.slow
def test_reference_table_is_reproduced_within_001(reference):
    ode, sde = reference
    for o, s in zip(ode, sde):
        row, expected = reference_row(o, s), REFERENCE_TABLE[o.eta]
        assert row.ode_confidence == pytest.approx(expected.ode_confidence, abs=0.01), (o.eta, row)
        assert row.ode_entropy == pytest.approx(expected.ode_entropy, abs=0.01), (o.eta, row)
        assert row.sde_confidence == pytest.approx(expected.sde_confidence, abs=0.01), (o.eta, row)


def test_unguided_reference_matches_its_closed_form(reference):
    """eta = 0: Y ~ N(mu_y, I), so E[p_0(y|Y)] = E[sigmoid(2 Y_1)], Y_1 ~ N(1, 1), and h = log(2 pi e)."""
    ode, sde = reference
    density = lambda z: math.exp(-(z - 1) ** 2 / 2) / math.sqrt(2 * math.pi) / (1 + math.exp(-2 * z))
    exact = integrate.quad(density, -30, 30)[0]
    for out in (ode[0], sde[0]):
        # Standard error of the mean of p_0(y|Y) (sd ~0.27) over 20,000 samples: ~0.002.
        assert mean_confidence(reference_mixture(), out.samples, 0) == pytest.approx(exact, abs=0.006)
    assert ode_output_entropy(ode[0]) == pytest.approx(math.log(2 * math.pi * math.e), abs=1e-12)


def test_knn_entropy_agrees_with_the_divergence_identity(reference):
    """Two independent entropy estimates of the guided ODE output: Liouville along the paths and
    k-NN on the samples, within 0.04 nats (k-NN's sd ~0.02 here, Euler bias ~0.01)."""
    ode, _ = reference
    for out in ode:
        assert knn_entropy(out.samples) == pytest.approx(ode_output_entropy(out), abs=0.04), out.eta


def test_variance_orthogonal_to_the_means_stays_one_at_every_eta(reference):
    """Guidance acts only along mu_y - mu_k; the orthogonal coordinate keeps its N(0, 1) law.
    (The ODE uses the same noise at every eta, so its orthogonal coordinate is identical.)"""
    for runs in reference:
        for out in runs:
            assert out.samples[:, 1].var().item() == pytest.approx(1.0, abs=0.04), (out.method, out.eta)
        assert all(torch.equal(runs[0].samples[:, 1], out.samples[:, 1]) for out in runs)


def test_guidance_lowers_the_entropy_of_the_sde_output_too(reference):
    """No divergence identity for the SDE: k-NN estimates, non-increasing up to their error (0.03)."""
    _, sde = reference
    entropies = [knn_entropy(out.samples) for out in sde]
    assert all(b <= a + 0.03 for a, b in zip(entropies, entropies[1:])), entropies
    assert entropies[-1] < entropies[0] - 0.25, entropies


# ----------------------------------------------------------------------------------------------------
# Two components, shared noise: pathwise monotone in eta
# ----------------------------------------------------------------------------------------------------

SWEEP_ETAS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)


@pytest.mark.parametrize("method", METHODS)
def test_two_components_confidence_is_pathwise_nondecreasing_in_eta(method):
    """With the same noise at every eta, every sample's p_0(y | Y) grows with eta (ODE and SDE samplers;
    the step h = 0.02 keeps every discrete step monotone, h eta ||mu_y - mu_k||^2 < 2)."""
    mixture = GaussianMixture.from_lists([[1.0, 0.5, 0.0], [-0.5, -0.5, 0.5]], weights=[0.3, 0.7])
    runs = sample_guided_sweep(mixture, 0, SWEEP_ETAS, 2000, T=8.0, steps=400, method=method, generator=gen(11))
    conf = torch.stack([mixture.log_posterior(out.samples).exp()[:, 0] for out in runs])
    assert (conf[1:] >= conf[:-1] - 1e-12).all()
    assert conf[-1].mean() > conf[0].mean() + 0.1
    if method in ODE_METHODS:
        entropy = [ode_output_entropy(out) for out in runs]
        assert all(b < a for a, b in zip(entropy, entropy[1:])), entropy


# ----------------------------------------------------------------------------------------------------
# Three collinear components: the discretised phase shift
# ----------------------------------------------------------------------------------------------------

def test_centre_dip_ratio_tells_one_cluster_from_two():
    z = torch.randn(4000, 2, generator=gen(12), dtype=torch.float64)
    assert centre_dip_ratio(z) > 0.9
    assert centre_dip_ratio(0.2 * z) > 0.9          # scale-free: a narrow unimodal law is not split
    two = z.clone()
    two[:, 0] += torch.where(torch.arange(4000) % 2 == 0, 3.0, -3.0)
    assert centre_dip_ratio(two) < 0.2


def test_strong_guidance_with_few_steps_splits_the_centre_component():
    ex = PHASE_SHIFT_EXAMPLE
    mixture = collinear_mixture(ex.m)
    few = phase_shift_samples(ex, ex.few_steps, 2000, generator=gen(0))
    many = phase_shift_samples(ex, ex.many_steps, 2000, generator=gen(0))
    assert centre_dip_ratio(few) < 0.2 < SPLIT_THRESHOLD < 0.9 < centre_dip_ratio(many)
    # Two symmetric clusters, beyond the side components even, instead of one at the favoured centre.
    right, left = (few[:, 0] > ex.m).double().mean().item(), (few[:, 0] < -ex.m).double().mean().item()
    assert right > 0.4 and left > 0.4 and abs(right - left) < 0.1
    assert (many[:, 0].abs() < ex.m / 2).double().mean().item() > 0.99
    assert mean_confidence(mixture, few, 1) < 0.1 < 0.9 < mean_confidence(mixture, many, 1)
    # The same few steps without guidance do not split: the split is guidance's, not the grid's.
    unguided = sample_guided(mixture, 1, 0.0, 2000, T=ex.T, steps=ex.few_steps, method=ex.method,
                             generator=gen(0)).samples
    assert centre_dip_ratio(unguided) >= SPLIT_THRESHOLD
