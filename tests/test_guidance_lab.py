"""guidance-lab (condiff.labs.guidance.exact): the guidance claims of Wu et al. (ICML 2024) at reduced sizes,
and the report it writes.

The claims: with exact scores guidance raises the mean confidence and lowers the output entropy, every
shared-noise path gains confidence (two components), the centre of three collinear components is the
place where the drift along mu_y - mu_k turns negative, and a coarse DDPM splits the centre component
where a fine one does not. The report must hold every figure it links and the JSON every number.
"""

import json
import math
import re

import numpy as np
import pytest
import torch

from condiff.labs.guidance.geometry import (
    GEOMETRIES,
    centre_confidence_ceiling,
    measure_drift_signs,
    measure_geometry,
    sample_geometry,
)
from condiff.labs.guidance.lab import run_guidance_lab
from condiff.labs.guidance.measures import largest_pathwise_drop, pathwise_monotone_fraction
from condiff.labs.guidance.phase_shift import PHASE_SHIFT_EXAMPLE, measure_phase_shift, sample_phase_shift
from condiff.labs.guidance.reference import REFERENCE_TABLE, reference_samples
from condiff.labs.guidance.settings import ETAS, QUICK_SIZES
from condiff.labs.guidance.sweep import compare_with_reference, measure_eta_sweep
from condiff.rundir import RunDirectoryError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SWEEP_SAMPLES = 2000


def gen(seed):
    return torch.Generator().manual_seed(seed)


def geometry(name):
    return next(g for g in GEOMETRIES if g.name == name)


@pytest.fixture(scope="module")
def eta_sweep():
    ode, sde = reference_samples(ETAS, SWEEP_SAMPLES, 200, generator=gen(0))
    return measure_eta_sweep(ode, sde, paths_shown=5)


@pytest.fixture(scope="module")
def geometry_results():
    results = {}
    for g in GEOMETRIES:
        ode, sde = sample_geometry(g, ETAS, 800, 200, generator=gen(1))
        results[g.name] = measure_geometry(g, ode, sde, measure_drift_signs(g, (0.0, 1.0), 4000, generator=gen(2)))
    return results


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """One quick run of the whole lab, with an extra section that records what it saw when called."""
    output = tmp_path_factory.mktemp("lab") / "guidance"
    calls = []

    def extra_sections(directory):
        calls.append({"directory": directory, "json_written": (directory / "guidance_lab.json").exists()})
        return [("Learned models", "a section from another part of the lab")]

    report = run_guidance_lab(output, progress=False, extra_sections=extra_sections, sizes=QUICK_SIZES)
    return output, report, calls


# ----------------------------------------------------------------------------------------------------
# 1. Confidence and entropy against eta (two components)
# ----------------------------------------------------------------------------------------------------

def test_mean_confidence_rises_with_eta_for_ode_and_sde(eta_sweep):
    assert eta_sweep.confidence_non_decreasing
    assert np.all(np.diff(eta_sweep.ode_confidence) > 0) and np.all(np.diff(eta_sweep.sde_confidence) > 0)
    assert eta_sweep.ode_confidence[-1] > 0.99


def test_entropy_falls_with_eta_by_divergence_identity_and_knn(eta_sweep):
    assert eta_sweep.entropy_non_increasing
    assert eta_sweep.ode_entropy[0] == pytest.approx(math.log(2 * math.pi * math.e), abs=1e-9)   # N(mu_y, I)
    # The k-NN estimate agrees with the divergence identity within its sampling error.
    assert np.allclose(eta_sweep.ode_entropy_knn, eta_sweep.ode_entropy, atol=0.1)


def test_every_shared_noise_path_gains_confidence(eta_sweep):
    assert eta_sweep.ode_monotone_fraction == 1.0 and eta_sweep.sde_monotone_fraction == 1.0
    assert eta_sweep.ode_largest_drop == 0.0 and eta_sweep.sde_largest_drop == 0.0
    for path in eta_sweep.ode_path_confidence + eta_sweep.sde_path_confidence:
        assert np.all(np.diff(path) >= 0)


def test_variance_orthogonal_to_the_means_stays_one(eta_sweep):
    tolerance = 4 * math.sqrt(2 / SWEEP_SAMPLES)
    assert np.allclose(eta_sweep.ode_orthogonal_variance, 1.0, atol=tolerance)
    assert np.allclose(eta_sweep.sde_orthogonal_variance, 1.0, atol=tolerance)


def test_pathwise_helpers_count_decreases():
    confidences = np.array([[0.5, 0.6, 0.9], [0.5, 0.4, 0.9], [0.2, 0.2, 0.2]])
    assert pathwise_monotone_fraction(confidences) == pytest.approx(2 / 3)
    assert largest_pathwise_drop(confidences) == pytest.approx(0.1)


def test_reference_table_is_close_at_reduced_size(eta_sweep):
    # 2,000 samples and 200 steps instead of 20,000 and 2,000: Monte Carlo error ~0.01, so a looser bound.
    comparison = compare_with_reference(eta_sweep, tolerance=0.03)
    assert comparison.etas == sorted(REFERENCE_TABLE)
    assert comparison.all_within_tolerance
    measured, reference = np.array(comparison.measured), np.array(comparison.reference)
    assert np.allclose(comparison.abs_difference, np.abs(measured - reference))
    assert comparison.max_abs_difference == pytest.approx(np.abs(measured - reference).max())


def test_reference_comparison_needs_every_reference_eta():
    ode, sde = reference_samples([0.0, 1.0], 50, 10, generator=gen(0))
    with pytest.raises(ValueError, match="reference etas"):
        compare_with_reference(measure_eta_sweep(ode, sde, paths_shown=2))


# ----------------------------------------------------------------------------------------------------
# 2. Three components
# ----------------------------------------------------------------------------------------------------

def test_drift_along_mu_y_minus_mu_k_is_negative_only_for_the_centre_target(geometry_results):
    for name in ("line, target at the end", "triangle"):
        assert all(sign.negative_share == 0.0 for sign in geometry_results[name].drift_signs)
    centre = geometry_results["line, target in the centre"].drift_signs
    # The drift along mu_y - mu_k is negative wherever the other outer component is the likelier: half the mass.
    assert all(abs(sign.negative_share - 0.5) < 0.05 and sign.mean_where_negative < 0 for sign in centre)


def test_guidance_raises_confidence_and_lowers_entropy_in_every_geometry(geometry_results):
    for result in geometry_results.values():
        assert result.confidence_non_decreasing and result.entropy_non_increasing, result.name
        assert result.ode_monotone_fraction == 1.0, result.name


def test_centre_target_confidence_saturates_at_the_centre_line(geometry_results):
    ceiling = centre_confidence_ceiling(geometry("line, target in the centre"))
    assert ceiling == pytest.approx(1 / (1 + 2 * math.exp(-2.0)))   # p0(centre | x1 = 0), neighbours at +-2
    result = geometry_results["line, target in the centre"]
    assert result.ode_confidence[-1] == pytest.approx(ceiling, abs=0.01)
    assert max(result.ode_confidence + result.sde_confidence) <= ceiling + 1e-6


# ----------------------------------------------------------------------------------------------------
# 3. Phase shift
# ----------------------------------------------------------------------------------------------------

def test_phase_shift_at_few_steps_not_at_many():
    example = PHASE_SHIFT_EXAMPLE
    runs = sample_phase_shift(example, (example.few_steps, example.many_steps), 2000, generator=gen(3),
                              progress=False)
    sweep = measure_phase_shift(example, runs)
    assert sweep.split_at_few_steps and not sweep.split_at_many_steps
    assert sweep.guided_split == [True, False]
    assert sweep.unguided_split == [False, False]   # the control: eta = 0 never splits


# ----------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------

def test_report_links_only_figures_that_exist(lab):
    output, report, _ = lab
    assert report == output / "report.md"
    links = re.findall(r"!\[[^\]]*\]\(<?([^)>]+)>?\)", report.read_text())
    # Every figure written is shown, and every figure shown was written.
    assert sorted(links) == sorted(path.name for path in output.glob("*.png"))
    assert len(links) == 7
    for link in links:
        assert (output / link).is_file(), link
        assert (output / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_confidence_entropy_figure_shows_the_measured_sweep(lab, tmp_path, drawn):
    """What the figure plots, read back from its artists, is the sweep guidance_lab.json records."""
    from condiff.labs.guidance.sweep import EtaSweep, plot_confidence_entropy

    output, _, _ = lab
    sweep = EtaSweep(**json.loads((output / "guidance_lab.json").read_text())["eta_sweep"])
    plot_confidence_entropy(sweep, tmp_path / "figure.png")
    confidence, entropy = drawn[0].axes
    plotted = {line.get_label(): np.asarray(line.get_ydata(), dtype=float) for axes in (confidence, entropy) for line in axes.get_lines()
               if not line.get_label().startswith("_")}
    ode, sde = (np.asarray(c.lines[0].get_ydata(), dtype=float) for c in confidence.containers)   # errorbar lines
    np.testing.assert_allclose(ode, sweep.ode_confidence)
    np.testing.assert_allclose(sde, sweep.sde_confidence)
    np.testing.assert_allclose(plotted["ODE, divergence identity"], sweep.ode_entropy)
    np.testing.assert_allclose(plotted["SDE, k-NN"], sweep.sde_entropy_knn)
    np.testing.assert_allclose(np.asarray(confidence.containers[0].lines[0].get_xdata(), dtype=float), sweep.etas)


def test_json_holds_the_numbers_and_claims(lab):
    output, _, _ = lab
    results = json.loads((output / "guidance_lab.json").read_text())
    assert set(results) >= {"eta_sweep", "geometry", "phase_shift", "reference", "claims", "sizes", "elapsed_s"}
    reference = results["reference"]   # the verdict is the table's, recomputed from the stored numbers
    measured, expected = np.asarray(reference["measured"]), np.asarray(reference["reference"])
    np.testing.assert_allclose(reference["abs_difference"], np.abs(measured - expected))
    assert reference["all_within_tolerance"] == bool(np.all(np.abs(measured - expected) <= reference["tolerance"]))
    assert reference["etas"] == sorted(reference["etas"]) and set(reference["etas"]) <= set(ETAS)
    assert results["eta_sweep"]["etas"] == list(ETAS)
    assert [g["name"] for g in results["geometry"]] == [g.name for g in GEOMETRIES]
    assert results["claims"]["pathwise_monotone_ode"] and results["claims"]["phase_shift_at_few_steps"]
    assert not results["claims"]["phase_shift_at_many_steps"]


def test_extra_sections_are_called_after_the_lab_and_appended(lab):
    output, report, calls = lab
    assert calls == [{"directory": output, "json_written": True}]
    text = report.read_text()
    assert "## Learned models" in text and "a section from another part of the lab" in text
    assert text.index("## 4. Reference table") < text.index("## Learned models")


def test_refuses_to_overwrite_a_run_without_overwrite(lab, tmp_path):
    output, report, _ = lab
    before = report.read_text()
    with pytest.raises(RunDirectoryError):
        run_guidance_lab(output, progress=False, sizes=QUICK_SIZES)
    assert report.read_text() == before

    stale = tmp_path / "lab"
    stale.mkdir()
    (stale / ".condiff").write_text('{"kind": "guidance-lab"}')     # made by condiff: may be replaced
    (stale / "old.txt").write_text("from an earlier run")
    run_guidance_lab(stale, overwrite=True, progress=False, sizes=QUICK_SIZES)
    assert not (stale / "old.txt").exists() and (stale / "report.md").is_file()


@pytest.mark.slow
def test_command_runs_the_exact_lab_and_the_learned_models_into_one_report(tmp_path):
    """`condiff guidance-lab --quick`: both parts, every linked figure present, the learned numbers saved."""
    from condiff.cli import main

    output = tmp_path / "lab"
    assert main(["guidance-lab", "--quick", "--output", str(output)]) == 0
    text = (output / "report.md").read_text()
    assert "Learned scores: the reference mixture" in text and "Learned scores: digits" in text
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (output / link).is_file(), link
    learned = json.loads((output / "learned_guidance.json").read_text())
    assert set(learned["mixture"]["confidence"]) == {"learned ddim", "exact ddim", "learned ddpm", "exact ddpm"}
    assert len(learned["digits"]["confidence"]) == len(learned["digits"]["etas"])
    assert (output / "learned-digits" / "model" / "model_index.json").is_file()   # an ordinary run directory
    assert main(["guidance-lab", "--quick", "--output", str(output)]) == 2           # never silently replaced
