"""What the exact guidance lab measures and at what size: the guidance strengths, step counts,
sample sizes (full and quick) and the shared seed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ETAS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
SCATTER_ETAS = (0.0, 1.0, 4.0, 8.0)
PHASE_SHIFT_STEPS = (10, 20, 30, 40, 50, 100, 200)
DRIFT_TIMES = (0.0, 1.0)          # noise levels at which the sign of the guidance drift is mapped
REFERENCE_TOLERANCE = 0.01
KNN_NEIGHBOURS = 3
SEED = 0

ExtraSections = Callable[[Path], list[tuple[str, str]]]


@dataclass(frozen=True)
class LabSizes:
    """Sample and step counts of every part; `FULL_SIZES` is the report's setting."""
    sweep_samples: int = 20000     # reference setting: the doc's table used 20,000 samples ...
    sweep_steps: int = 2000        # ... and 2,000 Euler steps
    geometry_samples: int = 10000
    geometry_steps: int = 2000
    drift_samples: int = 100000    # draws from the target component to measure where drifts are negative
    phase_samples: int = 20000
    scatter_points: int = 2000     # points per scatter panel (a subset of the sweep's samples)
    paths_shown: int = 8           # shared-noise paths drawn in the pathwise figure


FULL_SIZES = LabSizes()
# For tests and smoke runs: the same parts and figures in seconds, with ~4x the Monte Carlo error and
# 10x coarser steps.
QUICK_SIZES = LabSizes(sweep_samples=1000, sweep_steps=200, geometry_samples=800, geometry_steps=200,
                       drift_samples=4000, phase_samples=2000, scatter_points=500, paths_shown=6)
