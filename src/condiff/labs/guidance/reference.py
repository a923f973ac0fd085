"""The reference run of the literature (docs/guidance-reference.md): its setting (two components at +-(1, 0),
target +(1, 0), T = 8, exact start), the table it reports, and that run with exact scores, ODE and SDE."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from condiff.gmm.guidance import GuidedSamples, mean_confidence, ode_output_entropy, sample_guided_sweep
from condiff.gmm.mixture import GaussianMixture


class ReferenceRow(NamedTuple):
    ode_confidence: float    # E[p_0(y | Y)], probability-flow ODE, Euler
    ode_entropy: float       # nats, by the divergence identity
    sde_confidence: float    # E[p_0(y | Y)], reverse SDE, Euler-Maruyama


# Two components at +-(1, 0), equal weights, s = 1, target +(1, 0), T = 8, exact start, 2,000 Euler
# steps, 20,000 samples (docs/guidance-reference.md). The variance orthogonal to the means stays 1.00.
REFERENCE_TABLE: dict[float, ReferenceRow] = {
    0.0: ReferenceRow(0.776, 2.838, 0.776),
    1.0: ReferenceRow(0.920, 2.557, 0.894),
    2.0: ReferenceRow(0.968, 2.390, 0.937),
    4.0: ReferenceRow(0.991, 2.224, 0.966),
    8.0: ReferenceRow(0.999, 2.094, 0.983),
}
REFERENCE_TARGET = 0
REFERENCE_T = 8.0


def reference_mixture() -> GaussianMixture:
    """Components +(1, 0) (the target, index 0) and -(1, 0), equal weights, identity covariance."""
    return GaussianMixture.from_lists([[1.0, 0.0], [-1.0, 0.0]])


def reference_samples(etas: Sequence[float], num_samples: int = 20000, steps: int = 2000, *,
                      generator: torch.Generator | None = None) -> tuple[list[GuidedSamples], list[GuidedSamples]]:
    """ODE (Euler) and SDE (Euler-Maruyama) runs of the reference setting at every eta, noise shared
    across etas; the ODE draws its noise from `generator` first, then the SDE."""
    kwargs = dict(T=REFERENCE_T, steps=steps, start="exact", generator=generator)
    ode = sample_guided_sweep(reference_mixture(), REFERENCE_TARGET, etas, num_samples, method="ode_euler", **kwargs)
    sde = sample_guided_sweep(reference_mixture(), REFERENCE_TARGET, etas, num_samples, method="sde_euler", **kwargs)
    return ode, sde


def reference_row(ode: GuidedSamples, sde: GuidedSamples) -> ReferenceRow:
    mixture = reference_mixture()
    return ReferenceRow(mean_confidence(mixture, ode.samples, REFERENCE_TARGET), ode_output_entropy(ode),
                        mean_confidence(mixture, sde.samples, REFERENCE_TARGET))
