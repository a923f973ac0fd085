"""Closed-loop control of the class shares a model generates (docs/share-control.md).

Theorem 1's multipliers make the requested mixture the Lagrangian's minimiser, which a finite model trained
for finite steps does not reach. Measured control treats the request as a constraint on what the model
generates, share_c(p_theta) >= s_c, and takes dual steps on a measurement of it: every `every` steps the
model draws `samples` samples with a few solver steps (split across processes), a classifier labels them, and
log lambda_c += rate (log s_c - log s_hat_c), s_hat the share smoothed over control steps, with each class's
weight pi_c + lambda_c kept within a factor `bound` of Theorem 1's (anti-windup: a minority class the model
learns late reads low early at any multiplier, and an unbounded integral of those readings overshoots).
With `reference` draws, some of those noises are also drawn with the evaluation's sampler, and the
paired difference of their labels corrects the few-step reading (a control variate):
s_hat then estimates the share the evaluation will see, whatever the few-step solver's bias on the data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.stats import norm

from condiff.sampling.generate import generate

FLOOR = 1e-4      # multipliers stay above it: at 0 a multiplicative step could never move one again
MAX_STEP = 0.5    # |change of log lambda| per control step: one unlucky draw moves a multiplier by <= 65%


def wilson_interval(count: float, total: float, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial share count / total."""
    if total <= 0:
        return 0.0, 1.0
    z = float(norm.ppf(0.5 + level / 2))
    share = count / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class ShareMeasurement:
    """One control step: the constrained classes' counts among `samples` draws, the smoothed shares the
    step used, the raw shares' 95% Wilson intervals, the multipliers after the step and, with paired reference
    draws, their number and the per-class difference of counts (reference sampler minus control sampler)."""
    step: int
    samples: int
    counts: list[int]
    smoothed: list[float]
    low: list[float]
    high: list[float]
    multipliers: list[float]
    paired: int = 0
    difference: list[int] = field(default_factory=list)

    @property
    def shares(self) -> list[float]:
        return [c / self.samples for c in self.counts]


class ShareController:
    """The dual rule on measured shares, pure arithmetic on counts. The smoothed share is (counts + w *
    earlier counts) / (samples + w * earlier samples), w = `smoothing`, so its effective sample size grows
    to samples / (1 - w) while an old model's draws fade; half a count is added to every class, so that a
    class absent from one draw gives a finite log share. `initial` are Theorem 1's multipliers for the
    classes' data shares `data_shares`: every class's Theorem 1 weight pi + lambda (its share is proportional
    to it) stays within [w / bound, w * bound] of theirs, so the step is an ascent projected on a box.
    `proportional` > 0 makes the rule a PI controller in velocity form, step = rate * e_k + proportional *
    (e_k - e_(k-1)), e = log s - log s_hat: a share still rising towards its target (a class the model is still
    learning) moves its multiplier less, the damping that the PID Lagrangian (Stooke et al. 2020) adds to the
    integral rule; summed over steps, the term is proportional * (e_k - e_1), so measurement noise does not
    accumulate in it. A paired `difference` (reference sampler's counts minus the control sampler's on the same
    `paired` noises) is smoothed alike and its share added to s_hat: the reading's sampler bias, removed
    without bias at the cost of its noise. The last step's s_hat is in `history`, so a resumed run steps the same."""

    def __init__(self, targets: Sequence[float], initial: Sequence[float], data_shares: Sequence[float], *,
                 rate: float, smoothing: float, bound: float, proportional: float = 0.0):
        self.targets = np.asarray(targets, dtype=float)
        self.log_multipliers = np.log(np.maximum(np.asarray(initial, dtype=float), FLOOR))
        pi = np.asarray(data_shares, dtype=float)
        weight = pi + np.exp(self.log_multipliers)
        self.log_low = np.log(np.maximum(weight / bound - pi, FLOOR))
        self.log_high = np.log(np.maximum(weight * bound - pi, FLOOR))
        self.rate, self.smoothing, self.proportional = rate, smoothing, proportional
        self.counts, self.total = np.zeros(len(self.targets)), 0.0
        self.difference, self.paired = np.zeros(len(self.targets)), 0.0
        self.history: list[ShareMeasurement] = []

    @property
    def multipliers(self) -> np.ndarray:
        return np.exp(self.log_multipliers)

    @property
    def at_bound(self) -> list[bool]:
        """Per class, whether its multiplier sits on the edge of its box (the bound, not the shares, stopped it)."""
        edges = np.isclose(self.log_multipliers, self.log_low) | np.isclose(self.log_multipliers, self.log_high)
        return edges.tolist()

    def update(self, step: int, counts: Sequence[int], samples: int, difference: Sequence[int] = (),
               paired: int = 0) -> ShareMeasurement:
        counts = np.asarray(counts, dtype=float)
        self.counts = counts + self.smoothing * self.counts
        self.total = samples + self.smoothing * self.total
        smoothed = (self.counts + 0.5) / (self.total + 1.0)
        if paired:
            self.difference = np.asarray(difference, dtype=float) + self.smoothing * self.difference
            self.paired = paired + self.smoothing * self.paired
            # the correction can take a share below 0: its floor is the half count a class absent from a draw gets
            smoothed = np.maximum(smoothed + self.difference / self.paired, 0.5 / (self.total + 1.0))
        change = self.rate * (np.log(self.targets) - np.log(smoothed))
        if self.history:
            change -= self.proportional * (np.log(smoothed) - np.log(self.history[-1].smoothed))   # e_k - e_(k-1)
        change = np.clip(change, -MAX_STEP, MAX_STEP)
        self.log_multipliers = np.clip(self.log_multipliers + change, self.log_low, self.log_high)
        intervals = [wilson_interval(c, samples) for c in counts]
        measurement = ShareMeasurement(step, samples, [int(c) for c in counts], smoothed.tolist(),
                                       [lo for lo, _ in intervals], [hi for _, hi in intervals],
                                       self.multipliers.tolist(), paired, [int(d) for d in difference])
        self.history.append(measurement)
        return measurement

    def state_dict(self) -> dict:
        return {"log_multipliers": self.log_multipliers.tolist(), "counts": self.counts.tolist(),
                "total": self.total, "difference": self.difference.tolist(), "paired": self.paired,
                "history": [asdict(m) for m in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.log_multipliers = np.asarray(state["log_multipliers"], dtype=float)
        self.counts, self.total = np.asarray(state["counts"], dtype=float), float(state["total"])
        # checkpoints from before the paired reference have none
        self.difference = np.asarray(state.get("difference", np.zeros(len(self.targets))), dtype=float)
        self.paired = float(state.get("paired", 0.0))
        self.history = [ShareMeasurement(**m) for m in state["history"]]


class MeasuredShareControl:
    """What the training loop calls: when `due(step)`, draw `samples` samples from the model (each process its
    part; noise seeded by (seed, step), so a resumed run draws the same), label them with `label` (samples ->
    class indices, on the decoded images when `decode` is given), sum the counts over processes and step
    the controller; every process then holds the same multipliers. `reference = (scheduler, steps, n)` also
    draws n of those noises (each process its part) with the evaluation's sampler, for the paired correction."""

    def __init__(self, controller: ShareController, classes: Sequence[int], label: Callable[[torch.Tensor], torch.Tensor],
                 scheduler, *, every: int, first_step: int, samples: int, steps: int, seed: int,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None, reference: tuple | None = None):
        self.controller, self.classes, self.label, self.decode = controller, list(classes), label, decode
        self.scheduler, self.every, self.first_step = scheduler, every, first_step
        self.samples, self.steps, self.seed = samples, steps, seed
        self.reference_scheduler, self.reference_steps, self.paired = reference or (None, 0, 0)

    def due(self, step: int) -> bool:
        return step >= self.first_step and step % self.every == 0

    def class_counts(self, labels: torch.Tensor, device) -> torch.Tensor:
        return torch.stack([(labels == c).sum() for c in self.classes]).to(device)

    def labels_of(self, samples: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.label(samples if self.decode is None else self.decode(samples))

    def counts(self, model: torch.nn.Module, accelerator, step: int) -> tuple[list[int], list[int], int]:
        """Per constrained class, its count among all processes' samples at this step; the paired difference
        (reference sampler's count minus the control sampler's on the same noises; zeros without); their number."""
        rank, size = accelerator.process_index, accelerator.num_processes
        first, last = rank * self.samples // size, (rank + 1) * self.samples // size
        seed = int(np.random.SeedSequence([self.seed, step]).generate_state(1)[0] >> 1)
        drawn = generate(model, self.scheduler, last - first, num_inference_steps=self.steps, batch_size=self.samples,
                         seed=seed, first_index=first, device=accelerator.device, progress=False).samples
        labels = self.labels_of(drawn)
        local = self.class_counts(labels, accelerator.device)
        difference = torch.zeros_like(local)
        paired = min((rank + 1) * self.paired // size - rank * self.paired // size, last - first)   # this process's part
        if paired:
            reference = generate(model, self.reference_scheduler, paired, num_inference_steps=self.reference_steps,
                                 batch_size=paired, seed=seed, first_index=first, device=accelerator.device,
                                 progress=False).samples
            difference = (self.class_counts(self.labels_of(reference), accelerator.device)
                          - self.class_counts(labels[:paired], accelerator.device))
        paired = torch.tensor([paired], device=accelerator.device, dtype=local.dtype)
        total = accelerator.reduce(torch.cat([local, difference, paired]), "sum").cpu().tolist()
        k = len(self.classes)
        return total[:k], total[k:2 * k], total[-1]

    def __call__(self, model: torch.nn.Module, accelerator, step: int) -> ShareMeasurement:
        counts, difference, paired = self.counts(model, accelerator, step)
        return self.controller.update(step, counts, self.samples, difference, paired)
