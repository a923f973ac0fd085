"""Exact guidance on isotropic Gaussian mixtures (Wu, Chen, Li, Wang, Wei, ICML 2024, arXiv 2403.01639).

On a mixture p(x) = sum_k pi_k N(mu_k, s^2 I) every quantity guidance needs is known in closed form
at every noise level: the noisy classifier p_t(k|x), the conditional, marginal and classifier scores,
the guided score and its divergence. With them the reverse ODE (DDIM-like) and SDE (DDPM-like) can be
run with exact scores, so the only errors left are the sampler's discretisation and Monte Carlo
error. That is what makes the paper's claims checkable here: guidance (i) raises the classification
confidence and (ii) lowers the differential entropy of the output, and (iii) a coarse discretisation
with strong guidance can split the centre component of three collinear ones into two clusters. The guidance
lab (condiff.labs.guidance) measures them: the literature's reference table, the phase-shift example.

Time is Ornstein-Uhlenbeck time t in [0, T]: dX = -X dt + sqrt(2) dB, a_t = exp(-t). This is the
variance-preserving process of `condiff.gmm.GaussianMixture` with alpha_bar = a_t^2, so every
component of X_t is N(a_t mu_k, v_t I) with v_t = a_t^2 s^2 + 1 - a_t^2 (v_t = 1 when s = 1, the
paper's setting). All formulas below hold for general s; everything is float64 torch.

Sign conventions of the samplers: tau = T - t runs forward, the reverse ODE is
dY = [Y + s_t(Y)] dtau and the reverse SDE dY = [Y + 2 s_t(Y)] dtau + sqrt(2) dB, where s is the
guided score. "eta" is always the guidance strength; the DDIM method is the deterministic one
(DDIM's own eta = 0) and the DDPM method the ancestral one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from condiff.gmm.mixture import GaussianMixture

ODE_METHODS = ("ode_euler", "ode_exponential", "ddim")
SDE_METHODS = ("sde_euler", "sde_exponential", "ddpm")
METHODS = ODE_METHODS + SDE_METHODS
STARTS = ("exact", "standard")


# ----------------------------------------------------------------------------------------------------
# Closed-form noisy quantities
# ----------------------------------------------------------------------------------------------------

def ou_scale(t: float) -> float:
    """a_t = exp(-t): the signal scale of the Ornstein-Uhlenbeck process at time t."""
    return math.exp(-t)


def noisy_variance(mixture: GaussianMixture, t: float) -> float:
    """v_t = a_t^2 s^2 + 1 - a_t^2: the per-coordinate variance of every component of X_t."""
    return mixture.noisy_components(ou_scale(t) ** 2)[1]


def _labels(y, n: int, device) -> torch.Tensor:
    """A target class per row: an int (one class for all rows) or a (n,) integer tensor."""
    y = torch.as_tensor(y, dtype=torch.long, device=device)
    return y.expand(n) if y.dim() == 0 else y


def _column(eta, n: int, device) -> torch.Tensor:
    """Guidance strength as an (n, 1) column: a float or one value per row (used to sweep etas)."""
    eta = torch.as_tensor(eta, dtype=torch.float64, device=device)
    return eta.expand(n).reshape(n, 1) if eta.dim() == 0 else eta.reshape(n, 1)


def noisy_posterior(mixture: GaussianMixture, x: torch.Tensor, t: float) -> torch.Tensor:
    """p_t(k | x) for every component k, shape (N, K): the noisy classifier guidance differentiates.

    softmax_k(log pi_k + (<m_k, x> - ||m_k||^2 / 2) / v_t) with (m_k, v_t) = (a_t mu_k, v_t) from
    `GaussianMixture.noisy_components`: the same posterior as `GaussianMixture.log_posterior`, whose
    ||x||^2 / (2 v_t) term is common to all k and cancels. Inner products instead of pairwise distances
    make this several times faster, and the samplers call it once per step on every sample."""
    means_t, var = mixture.noisy_components(ou_scale(t) ** 2)
    x = x.to(torch.float64).flatten(1)
    # Logits laid out (K, N): torch's softmax over a short last axis is ~10x slower than over the first.
    bias = torch.log(mixture.weights) - 0.5 * means_t.pow(2).sum(1) / var
    logits = torch.addmm(bias.unsqueeze(1), means_t / var, x.T)
    return torch.softmax(logits, dim=0).T


def _moments(mixture: GaussianMixture, x: torch.Tensor, t: float):
    """(mubar_t(x), tr Cov_{k ~ p_t(.|x)}[mu_k]): the posterior mean of the clean component means
    and its total variance, the only x-dependent pieces of the guided score and its divergence."""
    post = noisy_posterior(mixture, x, t)
    mubar = post @ mixture.means
    # E||mu||^2 - ||mubar||^2 rather than the centred sum: an (N, K, D) temporary is the slowest part of a
    # sampler step, and the cancellation costs only ~1e-16 ||mu||^2 in absolute terms (clamped at 0).
    # Row sums as matrix-vector products: reductions over a short last axis are slow on CPU.
    ones = torch.ones(mixture.means.shape[1], dtype=torch.float64, device=x.device)
    trace_cov = torch.addmv(post @ (mixture.means.pow(2) @ ones), mubar.pow(2), ones, alpha=-1.0).clamp_min_(0.0)
    return mubar, trace_cov


def conditional_score(mixture: GaussianMixture, x: torch.Tensor, t: float, y) -> torch.Tensor:
    """grad_x log p_t(x | y) = -(x - a_t mu_y) / v_t."""
    x = x.to(torch.float64)
    means_t, var = mixture.noisy_components(ou_scale(t) ** 2)
    return (means_t[_labels(y, len(x), x.device)] - x) / var


def marginal_score(mixture: GaussianMixture, x: torch.Tensor, t: float) -> torch.Tensor:
    """grad_x log p_t(x) = -(x - a_t mubar_t(x)) / v_t."""
    return mixture.score(x.to(torch.float64), ou_scale(t) ** 2)


def classifier_score(mixture: GaussianMixture, x: torch.Tensor, t: float, y) -> torch.Tensor:
    """grad_x log p_t(y | x) = a_t (mu_y - mubar_t(x)) / v_t (the log-softmax gradient)."""
    x = x.to(torch.float64)
    a, var = ou_scale(t), noisy_variance(mixture, t)
    mubar, _ = _moments(mixture, x, t)
    return a * (mixture.means[_labels(y, len(x), x.device)] - mubar) / var


def guided_score(mixture: GaussianMixture, x: torch.Tensor, t: float, y, eta) -> torch.Tensor:
    """grad log p_t(x|y) + eta grad log p_t(y|x) = (1 + eta) grad log p_t(x|y) - eta grad log p_t(x).

    Classifier guidance with strength eta equals classifier-free guidance with weight w = eta.
    `eta` is a float or one value per row."""
    x = x.to(torch.float64)
    return conditional_score(mixture, x, t, y) + _column(eta, len(x), x.device) * classifier_score(mixture, x, t, y)


def guided_score_divergence(mixture: GaussianMixture, x: torch.Tensor, t: float, y, eta) -> torch.Tensor:
    """div_x of the guided score, shape (N,):  -d / v_t - eta a_t^2 / v_t^2 tr Cov_{k~p_t(.|x)}[mu_k].

    Why: the Jacobian of mubar_t is (a_t / v_t) Cov_{p_t(.|x)}[mu], because
    grad_x p_t(k|x) = p_t(k|x) a_t (mu_k - mubar_t(x)) / v_t. With s = 1 (v_t = 1) this is the paper's
    -d - eta a_t^2 tr Cov. It does not depend on y: the conditional score is linear in x."""
    x = x.to(torch.float64)
    a, var = ou_scale(t), noisy_variance(mixture, t)
    _, trace_cov = _moments(mixture, x, t)
    return -x.shape[1] / var - _column(eta, len(x), x.device).squeeze(1) * a * a / var ** 2 * trace_cov


# ----------------------------------------------------------------------------------------------------
# Exact-score samplers
# ----------------------------------------------------------------------------------------------------

@dataclass
class SamplerNoise:
    """The randomness of one sampler run, so that runs at different eta can share it pathwise.

    initial: (N, D) standard normal draws of the start; steps: (steps, N, D) standard normal draws of
    the SDE steps (None for ODE methods)."""
    initial: torch.Tensor
    steps: torch.Tensor | None = None


def draw_noise(num_samples: int, dim: int, steps: int, *, stochastic: bool = True,
               generator: torch.Generator | None = None) -> SamplerNoise:
    """All the noise of a run drawn up front, exactly as the samplers draw it on the fly from the same
    generator: the initial (N, D) block, then one (N, D) block per step. (One (steps, N, D) call would
    give other numbers: torch's CPU normal sampler does not split into consecutive calls.)"""
    initial = torch.randn(num_samples, dim, generator=generator, dtype=torch.float64)
    if not stochastic:
        return SamplerNoise(initial)
    per_step = torch.stack([torch.randn(num_samples, dim, generator=generator, dtype=torch.float64)
                            for _ in range(steps)])
    return SamplerNoise(initial, per_step)


@dataclass
class GuidedSamples:
    """The output of one exact-score sampler run.

    divergence_integral (ODE methods only): per sample, the integral over the path of div_y of the ODE
    drift, int_0^T [d + div s_{T-tau}(Y_tau)] dtau. By Liouville, d/dtau log p(Y_tau) = -div(drift), so
    the output entropy is start_entropy + divergence_integral.mean() (see `ode_output_entropy`)."""
    samples: torch.Tensor
    eta: float
    method: str
    start: str
    T: float
    steps: int
    start_entropy: float
    divergence_integral: torch.Tensor | None = None


def gaussian_entropy(dim: int, variance: float = 1.0) -> float:
    """h(N(m, variance I_dim)) = dim/2 log(2 pi e variance), in nats."""
    return 0.5 * dim * math.log(2.0 * math.pi * math.e * variance)


def sample_guided(mixture: GaussianMixture, y: int, eta: float, num_samples: int, *, T: float = 8.0,
                  steps: int = 1000, method: str = "ode_euler", start: str = "exact",
                  generator: torch.Generator | None = None, noise: SamplerNoise | None = None) -> GuidedSamples:
    """Sample the eta-guided reverse process of class y from t = T to 0 with exact scores.

    method: "ode_euler" / "sde_euler" (Euler(-Maruyama) on a uniform grid in t), "ode_exponential" /
    "sde_exponential" (exponential integrator: the linear drift Y is integrated exactly, the score held
    at its value at the start of the step), "ddim" / "ddpm" (the discrete updates of the VP chain with
    alpha_bar = a_t^2 on the same grid). start: "exact" = p_T(.|y) = N(a_T mu_y, v_T I), "standard" =
    N(0, I). Noise comes from `noise` if given, else from `generator`: the initial draw first, then
    one (N, D) draw per step for SDE methods, so the same seed gives the same noise at every eta."""
    return sample_guided_sweep(mixture, y, [eta], num_samples, T=T, steps=steps, method=method, start=start,
                               generator=generator, noise=noise)[0]


def _check_sweep(method: str, start: str, noise: SamplerNoise | None, shape: tuple[int, int, int]) -> None:
    """Refuse an unknown method or start, and noise of the wrong shape (shape: steps, samples, D)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    steps, n, dim = shape
    if noise is not None and (noise.initial.shape != (n, dim) or (method in SDE_METHODS and (
            noise.steps is None or noise.steps.shape != (steps, n, dim)))):
        raise ValueError("noise must hold initial (num_samples, D) and, for SDE methods, steps (steps, num_samples, D)")


def _sampler_step(method: str, x: torch.Tensor, score: torch.Tensor, g: torch.Tensor, *, h: float, a: float,
                  a_next: float, var: float, s2: float, noise) -> torch.Tensor:
    """One step of `method` from the time of scale a to the one of scale a_next (h apart) at the guided score,
    G its guided mean term; `noise()` gives the step's noise to the stochastic methods."""
    if method == "ode_euler":
        return torch.add(x, x + score, alpha=h)
    if method == "sde_euler":
        return torch.add(x * (1.0 + h), score, alpha=2.0 * h).add_(noise(), alpha=math.sqrt(2.0 * h))
    if method == "ode_exponential":
        return math.exp(h) * x + math.expm1(h) * score
    if method == "sde_exponential":
        # int_0^h e^{h-u} du = e^h - 1 and int_0^h 2 e^{2(h-u)} du = e^{2h} - 1.
        return math.exp(h) * x + 2.0 * math.expm1(h) * score + math.sqrt(math.expm1(2.0 * h)) * noise()
    # Tweedie: x0_hat = (x + (1 - a^2) score) / a, here = (a s^2 x + (1 - a^2) G) / v: the same value
    # without dividing by a (a_T = e^{-T} is tiny; the direct form cancels digits).
    # The noise prediction is eps_hat = -sqrt(1 - a^2) score.
    x0_hat = (a * s2 * x + (1.0 - a * a) * g) / var
    if method == "ddim":
        return a_next * x0_hat - math.sqrt((1.0 - a_next ** 2) * (1.0 - a * a)) * score
    # Gaussian posterior q(x_{t'} | x_t, x_0) of the VP chain, one step with alpha = (a / a')^2.
    beta = 1.0 - (a / a_next) ** 2
    mean = (a_next * beta * x0_hat + (a / a_next) * (1.0 - a_next ** 2) * x) / (1.0 - a * a)
    return mean + math.sqrt(max(beta * (1.0 - a_next ** 2) / (1.0 - a * a), 0.0)) * noise()


def sample_guided_sweep(mixture: GaussianMixture, y: int, etas: Sequence[float], num_samples: int, *,
                        T: float = 8.0, steps: int = 1000, method: str = "ode_euler", start: str = "exact",
                        generator: torch.Generator | None = None,
                        noise: SamplerNoise | None = None) -> list[GuidedSamples]:
    """`sample_guided` at several etas with the same noise for every eta (pathwise comparable), run as
    one batch: row block i holds eta_i, and every block gets the same initial and per-step noise."""
    stochastic = method in SDE_METHODS
    etas = [float(e) for e in etas]
    n, dim, blocks = num_samples, mixture.means.shape[1], len(etas)
    _check_sweep(method, start, noise, (steps, n, dim))

    def step_noise(i: int) -> torch.Tensor:
        xi = noise.steps[i] if noise is not None else \
            torch.randn(n, dim, generator=generator, dtype=torch.float64)
        return xi.to(mixture.means.device, torch.float64).repeat(blocks, 1)

    initial = noise.initial if noise is not None else torch.randn(n, dim, generator=generator, dtype=torch.float64)
    initial = initial.to(mixture.means.device, torch.float64).repeat(blocks, 1)
    rows = n * blocks
    target = _labels(y, rows, mixture.means.device)
    eta_col = torch.repeat_interleave(torch.tensor(etas, dtype=torch.float64, device=mixture.means.device), n)
    eta_col = eta_col.reshape(rows, 1)

    means_T, var_T = mixture.noisy_components(ou_scale(T) ** 2)
    if start == "exact":
        x = means_T[target] + var_T ** 0.5 * initial
        start_entropy = gaussian_entropy(dim, var_T)
    else:
        x = initial.clone()
        start_entropy = gaussian_entropy(dim)

    times = torch.linspace(T, 0.0, steps + 1, dtype=torch.float64).tolist()
    # The guided score (conditional + eta classifier score, as in guided_score) is (a_t G - x) / v_t with
    # G = (1 + eta) mu_y - eta mubar_t(x): (1 + eta) mu_y is fixed over the path, so each step needs one
    # posterior evaluation and a few fused passes over the samples.
    guided_mean = (1.0 + eta_col) * mixture.means[target]
    s2 = mixture.std ** 2
    eta_vec = eta_col.squeeze(1)
    guidance = None if stochastic else torch.zeros(rows, dtype=torch.float64, device=x.device)
    for i in range(steps):
        t, t_next = times[i], times[i + 1]
        h, a, a_next = t - t_next, ou_scale(t), ou_scale(t_next)
        var = noisy_variance(mixture, t)
        mubar, trace_cov = _moments(mixture, x, t)
        g = torch.addcmul(guided_mean, eta_col, mubar, value=-1.0)
        score = (a * g - x).div_(var)
        if guidance is not None:
            # Left Riemann sum of the path-dependent part of the drift's divergence, eta a^2 / v^2 tr Cov,
            # evaluated where the step evaluates the score; the deterministic part d (1 - 1/v_t) is
            # integrated exactly after the loop.
            guidance.addcmul_(eta_vec, trace_cov, value=h * a * a / var ** 2)
        x = _sampler_step(method, x, score, g, h=h, a=a, a_next=a_next, var=var, s2=s2,
                          noise=lambda i=i: step_noise(i))

    divergence = None
    if guidance is not None:
        # int_0^T d (1 - 1/v_t) dt = d/2 log(v_0 / v_T): the entropy change of the eta = 0 flow.
        divergence = 0.5 * dim * math.log(noisy_variance(mixture, 0.0) / var_T) - guidance
    results = []
    for b, eta in enumerate(etas):
        rows_b = slice(b * n, (b + 1) * n)   # row block b holds eta_b
        results.append(GuidedSamples(
            samples=x[rows_b].clone(), eta=eta, method=method, start=start, T=T, steps=steps,
            start_entropy=start_entropy,
            divergence_integral=None if divergence is None else divergence[rows_b].clone()))
    return results


# ----------------------------------------------------------------------------------------------------
# Entropy and confidence
# ----------------------------------------------------------------------------------------------------

def ode_output_entropy(result: GuidedSamples) -> float:
    """Differential entropy (nats) of an ODE sampler's output by the divergence (Liouville) identity:
    h(Y_T) = h(Y_0) + E int_0^T div(drift)(Y_tau) dtau, i.e. with s = 1
    h(Y_0) - eta int_0^T a_{T-tau}^2 E[tr Cov_{p(.|Y_tau)}(mu)] dtau. Exact for the continuous flow up to
    the Riemann sum along the sampled paths and Monte Carlo error."""
    if result.divergence_integral is None:
        raise ValueError(f"{result.method} is stochastic: the divergence identity needs an ODE method")
    return result.start_entropy + result.divergence_integral.mean().item()


def knn_entropy(samples: torch.Tensor, k: int = 3) -> float:
    """Kozachenko-Leonenko k-nearest-neighbour estimate of differential entropy (nats):
    h = psi(N) - psi(k) + log V_d + d/N sum_i log r_i, r_i = distance from x_i to its k-th neighbour and
    V_d = pi^{d/2} / Gamma(d/2 + 1) the volume of the unit ball."""
    # A k-d tree rather than condiff.evaluate.knn_radii's blocked all-pairs distances: O(N log N) in
    # these low dimensions, and the lab calls this on tens of 20000-sample sets.
    from scipy.spatial import cKDTree
    from scipy.special import digamma, gammaln

    x = np.asarray(torch.as_tensor(samples).detach().to(torch.float64).cpu().numpy())
    x = x.reshape(len(x), -1)
    n, d = x.shape
    if n <= k:
        raise ValueError(f"need more than k = {k} samples, got {n}")
    dist, _ = cKDTree(x).query(x, k=k + 1)   # the first neighbour is the point itself
    r = np.maximum(dist[:, k], np.finfo(np.float64).tiny)   # duplicates would give log 0
    log_unit_ball = 0.5 * d * math.log(math.pi) - gammaln(0.5 * d + 1.0)
    return float(digamma(n) - digamma(k) + log_unit_ball + d * np.mean(np.log(r)))


def mean_confidence(mixture: GaussianMixture, samples: torch.Tensor, y: int) -> float:
    """E[p_0(y | Y)]: the clean mixture's posterior of the target class, averaged over the samples."""
    return mixture.log_posterior(samples).exp()[:, y].mean().item()
