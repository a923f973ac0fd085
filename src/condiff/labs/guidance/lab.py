"""`condiff guidance-lab`, exact-score part: the guidance claims of Wu et al. (ICML 2024) measured on
Gaussian mixtures, with figures and a Markdown report.

On a Gaussian mixture the scores are known exactly (`condiff.gmm.guidance`), so what the report shows
is the guidance itself, not a learned model's errors: only the sampler's discretisation and Monte
Carlo error remain, and both are stated beside the numbers. Four parts, one function each to sample,
to measure (plain dataclasses, also written to guidance_lab.json) and to draw:

1. the reference setting (two components at +-(1, 0), target +(1, 0)): confidence rises and entropy
   falls with the guidance strength eta, for the ODE and the SDE, and pathwise with shared noise;
2. three components: a target at the end of a line, in its centre, or at a triangle's corner, and
   where the guidance drift along mu_y - mu_k is negative;
3. the discretisation phase shift of `PHASE_SHIFT_EXAMPLE` against the number of steps;
4. the reference table of docs/guidance-reference.md beside the measured values.

`extra_sections` lets other parts of the lab (learned models) add sections to the same report.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from condiff.labs.guidance.geometry import (
    GEOMETRIES,
    geometry_section,
    plot_drift_maps,
    plot_geometry_sweep,
    run_geometries,
)
from condiff.labs.guidance.phase_shift import (
    PHASE_SHIFT_EXAMPLE,
    measure_phase_shift,
    phase_shift_section,
    plot_phase_shift_curve,
    plot_phase_shift_histograms,
    sample_phase_shift,
)
from condiff.labs.guidance.reference import reference_samples
from condiff.labs.guidance.settings import (
    ETAS,
    FULL_SIZES,
    PHASE_SHIFT_STEPS,
    SCATTER_ETAS,
    SEED,
    ExtraSections,
    LabSizes,
)
from condiff.labs.guidance.sweep import (
    compare_with_reference,
    eta_sweep_section,
    measure_eta_sweep,
    plot_confidence_entropy,
    plot_guided_scatter,
    plot_pathwise_confidence,
    reference_section,
)
from condiff.report import image_md, write_report
from condiff.rundir import create_output_directory, write_json_atomic


def run_guidance_lab(output: Path, *, overwrite: bool = False, progress: bool = True,
                     extra_sections: ExtraSections | None = None, sizes: LabSizes = FULL_SIZES) -> Path:
    """Measure the guidance claims with exact scores, write figures, guidance_lab.json and report.md into
    `output` (refused if it exists and is not empty, unless `overwrite`); returns the report's path.

    `extra_sections(output)` is called after the exact-score work; its (heading, Markdown) sections are
    appended to the report. `sizes` trades Monte Carlo error for time (`QUICK_SIZES` for tests)."""
    output = Path(output)
    create_output_directory(output, "guidance-lab", overwrite=overwrite)
    started = time.perf_counter()
    generators = {part: torch.Generator().manual_seed(SEED + offset)
                  for offset, part in enumerate(("sweep", "geometry", "phase_shift"))}

    ode, sde = reference_samples(ETAS, sizes.sweep_samples, sizes.sweep_steps, generator=generators["sweep"])
    sweep = measure_eta_sweep(ode, sde, paths_shown=sizes.paths_shown)
    reference = compare_with_reference(sweep)
    plot_confidence_entropy(sweep, output / "confidence_entropy.png")
    plot_pathwise_confidence(sweep, output / "pathwise_confidence.png")
    plot_guided_scatter(ode, sde, SCATTER_ETAS, output / "guided_samples.png", points=sizes.scatter_points)

    geometries = run_geometries(GEOMETRIES, ETAS, sizes, generator=generators["geometry"], progress=progress)
    plot_drift_maps(GEOMETRIES, output / "geometry_drift.png")
    plot_geometry_sweep(geometries, output / "geometry_sweep.png")

    example = PHASE_SHIFT_EXAMPLE
    phase_runs = sample_phase_shift(example, PHASE_SHIFT_STEPS, sizes.phase_samples,
                                    generator=generators["phase_shift"], progress=progress)
    phase_shift = measure_phase_shift(example, phase_runs)
    plot_phase_shift_histograms(example, phase_runs, output / "phase_shift_histograms.png")
    plot_phase_shift_curve(phase_shift, output / "phase_shift_dip_ratio.png")
    elapsed = time.perf_counter() - started

    results = {
        "sizes": asdict(sizes), "seed": SEED, "elapsed_s": elapsed, "torch_threads": torch.get_num_threads(),
        "eta_sweep": asdict(sweep), "geometry": [asdict(result) for result in geometries],
        "phase_shift": asdict(phase_shift), "reference": asdict(reference),
        "claims": {
            "confidence_non_decreasing": sweep.confidence_non_decreasing,
            "entropy_non_increasing": sweep.entropy_non_increasing,
            "pathwise_monotone_ode": sweep.ode_monotone_fraction == 1.0,
            "pathwise_monotone_sde": sweep.sde_monotone_fraction == 1.0,
            "phase_shift_at_few_steps": phase_shift.split_at_few_steps,
            "phase_shift_at_many_steps": phase_shift.split_at_many_steps,
            "reference_within_tolerance": reference.all_within_tolerance,
        },
    }
    write_json_atomic(output / "guidance_lab.json", results)

    sections = exact_sections(sizes, elapsed, sweep, geometries, phase_shift, reference)
    if extra_sections is not None:
        sections += list(extra_sections(output))
    return write_report(output / "report.md", "condiff guidance-lab: guidance on Gaussian mixtures", sections)


def exact_sections(sizes: LabSizes, elapsed: float, sweep, geometries, phase_shift, reference) -> list[tuple[str, str]]:
    """The report's sections on the exact-score measurements."""
    return [
        ("Setting", f"Exact scores of isotropic Gaussian mixtures (`condiff.gmm.guidance`), Ornstein-Uhlenbeck time "
                    f"(a_t = exp(-t)), guidance strength eta (classifier guidance = classifier-free guidance with "
                    f"w = eta). ODE = probability-flow ODE, SDE = reverse SDE. Sizes: reference setting "
                    f"{sizes.sweep_samples} samples x {sizes.sweep_steps} steps; three-component geometries "
                    f"{sizes.geometry_samples} samples x {sizes.geometry_steps} steps ({sizes.drift_samples} "
                    f"draws for the drift signs); phase shift {sizes.phase_samples} samples per step count; "
                    f"seed {SEED}. "
                    f"The exact-score part took {elapsed:.0f} s (torch threads: {torch.get_num_threads()}). "
                    f"All numbers are in guidance_lab.json."),
        ("1. Confidence and entropy against eta", eta_sweep_section(sweep)),
        ("Guided samples", f"The first {sizes.scatter_points} samples of the runs above at eta = "
                           f"{', '.join(f'{eta:g}' for eta in SCATTER_ETAS)}.\n\n"
                           + image_md("guided_samples.png", "guided samples at several etas")),
        ("2. Component geometry with three components", geometry_section(geometries)),
        ("3. Discretisation phase shift", phase_shift_section(phase_shift, PHASE_SHIFT_EXAMPLE)),
        ("4. Reference table of docs/guidance-reference.md", reference_section(reference)),
    ]
