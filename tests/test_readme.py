"""The README's Python example runs as it stands (issue 11: the public API in about ten lines)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    section = README.read_text().split("### From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    import condiff

    code = python_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 12
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    run, samples, result = namespace["run"], namespace["samples"], namespace["result"]
    assert isinstance(run, condiff.Run) and isinstance(result, condiff.RunEvaluation)
    assert samples.samples.shape == (300, 1, 8, 8) and samples.provenance["steps"] == 20
    assert result.samples == samples.provenance and result.num_samples == 300   # evaluated the samples drawn
    assert set(run.summary.multipliers) == {"class 4"} and run.summary.multipliers["class 4"] > 0
    assert condiff.Run(tmp_path / "runs" / "minority-fours").summary == run.summary
    assert "class 4" in capsys.readouterr().out
