"""What `condiff attribute` is asked and what it answers: its settings (`AttributionSettings`, whose fields are
the command line's options, and the defaults a counterfactual validation chose), its result per step and
target and each target's journey (`AttributionResult`, RUN/attribution/attribution.json), and the names of
the training features files it keeps, which a validation's features share so that each finds the other's."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from condiff.attribution.features import OUTPUT_FUNCTIONS
from condiff.attribution.projector import PROJECTORS
from condiff.config import SEED_LIMIT, ArgumentError, refuse_first_problem

# The defaults of AttributionSettings that a counterfactual validation chose, and which validation that was:
# the one place to change them (report.md says which were overridden).
VALIDATION = ("`condiff reproduce attribution-digits --scale cpu` (independent LDS on the generated samples, "
              "every choice on 32 held-out targets: 0.280 [0.174, 0.368] with 4 models, +0.120 [0.016, 0.230] "
              "over the gradient dot product)")
VALIDATED = {"output": "loss", "train_timesteps": 100, "ridge": 1.0, "checkpoints": 1, "ensemble": 4}


@dataclass
class AttributionSettings:
    output: str = VALIDATED["output"]           # dtrak (D-TRAK's ||eps||^2 / d) | loss (Journey-TRAK's)
    steps: tuple[int, ...] = (900, 700, 500, 300, 100)   # sampling timesteps to attribute (nearest taken)
    num_targets: int = 4                        # samples generated (or taken from samples_file) to be explained
    seed: int = 0                               # of the targets and of every noise
    top: int = 6                                # helpful and harmful examples shown per step
    train_timesteps: int = VALIDATED["train_timesteps"]   # K: training-side timesteps, evenly spread
    resamplings: int = 20                       # R: re-noisings of x0_hat(t) per target
    projection: str = "sparse"                  # sparse | gaussian
    dimension: int = 2048                       # k
    ridge: float = VALIDATED["ridge"]           # c of lambda = c trace(Phi^T Phi) / k
    sampling_steps: int = 50                    # DDIM steps of the targets
    batch_size: int = 32
    samples_file: str | None = None             # targets from a `condiff sample --record-x0` file instead
    checkpoints: int = VALIDATED["checkpoints"]   # models averaged per run: its final one and newest checkpoints - 1
    models: tuple[str, ...] = ()                # other runs of the same data and architecture (other seeds)
                                                # whose scores are averaged in: the ensemble TRAK needs
    target_class: int | None = None             # generate targets of this class (class-conditional models)
    journey_every: int = 1                      # score every n-th visited step for the journeys (0: none)

    @property
    def ensemble(self) -> int:
        """Independently trained runs averaged: the attributed one and `models`."""
        return 1 + len(self.models)

    def overridden(self) -> dict[str, tuple]:
        """The validated settings given other values: name -> (value, validated value)."""
        return {name: (getattr(self, name), value) for name, value in VALIDATED.items() if getattr(self, name) != value}

    def validated(self) -> AttributionSettings:
        """These settings, or ArgumentError naming the first one refused."""
        problems = {"output": self.output not in OUTPUT_FUNCTIONS, "projection": self.projection not in PROJECTORS,
                    "steps": not self.steps or not all(0 <= t < 1000 for t in self.steps),
                    "target_class": self.target_class is not None and self.target_class < 0,
                    "seed": not 0 <= self.seed < SEED_LIMIT,
                    "journey_every": self.journey_every < 0}
        problems.update({name: getattr(self, name) <= 0 for name in (
            "num_targets", "top", "train_timesteps", "resamplings", "dimension", "ridge", "sampling_steps",
            "batch_size", "checkpoints")})
        refuse_first_problem(self, problems, lambda name, value: ArgumentError(name, f"{value!r} is not allowed"))
        return self


@dataclass
class StepAttribution:
    timestep: int
    helpful: list[list[int]] = field(default_factory=list)        # per target: top-K training indices
    helpful_scores: list[list[float]] = field(default_factory=list)
    harmful: list[list[int]] = field(default_factory=list)        # per target: bottom-K
    harmful_scores: list[list[float]] = field(default_factory=list)
    class_sums: list[list[float]] = field(default_factory=list)   # per target: per class, the summed scores
    class_positive_shares: list[list[float]] = field(default_factory=list)   # per target: per class, its
                                                                  # share of the target's positive scores
    constraint_set: list[dict[str, float]] | None = None          # per target (constrained runs): sum,
                                                                  # rest_sum, positive_share of the set


@dataclass
class TargetJourney:
    timesteps: list[int]            # every step followed, from noisy to clean
    posteriors: list[list[float]]   # per step: p(class | x0_hat(t)) (evaluation classifier; exact for mixtures)
    examples: list[int]             # the training examples followed: the top helpful ones at each attributed step
    scores: list[list[float]]       # per example, per step: its TRAK score
    spread: list[float]             # per step: the standard deviation of the target's scores over the training set


@dataclass
class AttributionResult:
    settings: AttributionSettings
    steps: list[StepAttribution]
    target_classes: list[int] | None            # for Gaussian mixtures: each target's exact component
    directory: Path
    class_names: list[str]
    training_class_shares: list[float]          # each class's share of the training set, to compare with
    constraint_classes: list[int]               # the run's constrained classes (empty: unconstrained)
    checkpoint_steps: list[int]                 # the checkpoints averaged with the final model
    targets_provenance: dict | None             # how the targets of a samples file were drawn
    training_set: str = ""                      # what the training set is (fine-tuning data, latents, subset...)
    train_indices: list[int] | None = None      # a retrained subset: the training-set index of each scores.npy row
    conditional: bool = False                   # a class-conditional model
    target_class: int | None = None             # the class the targets were drawn as (None: unconditional)
    ensemble: list[str] = field(default_factory=list)   # every model whose scores are averaged
    validation: str = VALIDATION                # which validation chose the defaults
    journeys: list[TargetJourney] = field(default_factory=list)   # per target: every step's posterior and scores
    posterior_source: str = ""                  # what gives the journeys' posteriors over classes

    def to_dict(self) -> dict:
        values = asdict(self)
        del values["directory"]
        # Paths given from Python: JSON takes their text.
        samples_file = self.settings.samples_file
        values["settings"]["samples_file"] = None if samples_file is None else str(samples_file)
        values["settings"]["models"] = [str(run) for run in self.settings.models]
        return values


def features_file(output: str, train_timesteps: int, dimension: int, projection: str, *, at_step: int | None = None,
                  run_tag: str = "", checkpoint_step: int | None = None) -> str:
    """`features-OUTPUT-K*-k*-PROJECTION[-runDIGEST][-stepSTEP].npy`: the training features of one model (another
    run's by its weights' digest, a checkpoint by its step); a validation's `t=T` quantity adds `-tT` to K."""
    grid = f"K{train_timesteps}" + ("" if at_step is None else f"-t{at_step}")
    step = "" if checkpoint_step is None else f"-step{checkpoint_step:07d}"
    return f"features-{output}-{grid}-k{dimension}-{projection}{run_tag}{step}.npy"
