"""Every command's outputs stay what they were when the package was reorganised: a tiny run trained, sampled,
evaluated and attributed through the command line, compared file by file with tests/data/tiny_run_outputs.json
(written by the code before the move: `CONDIFF_REGENERATE=1 pytest tests/test_outputs_unchanged.py`).

What is compared: the list of files; the text of config.toml; every JSON value (numbers within a relative
1e-4, so that another CPU's rounding passes and a changed computation does not); every array's shape and
sum in .npz and .safetensors files. Not compared: clock times, absolute paths, versions, weight hashes, and the bytes of
pictures (matplotlib's output is not byte-stable across versions: their presence is compared)."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from condiff.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
REFERENCE = Path(__file__).parent / "data" / "tiny_run_outputs.json"
# Keys ending so: clock times, paths, versions, weight hashes ("train_timesteps" is compared: ends, not contains)
VOLATILE = ("seconds", "date", "version", "path", "output_dir", "pid", "created", "sha256")


def arrays_digest(arrays) -> dict:
    """Numbers by shape and sum; text (a provenance record) as its JSON."""
    return {name: json_digest(json.loads(str(a))) if a.dtype.kind == "U" else
            {"shape": list(a.shape), "sum": float(np.asarray(a, dtype=np.float64).sum())}
            for name, a in sorted(arrays.items())}


def json_digest(value):
    """`value` without the entries that differ between two identical runs (times, paths, versions)."""
    if isinstance(value, dict):
        return {k: json_digest(v) for k, v in value.items() if not k.lower().endswith(VOLATILE)}
    if isinstance(value, list):
        return [json_digest(v) for v in value]
    if isinstance(value, str) and ("/" in value or os.sep in value):
        return "<path>"
    return value


def digest(root: Path) -> dict:
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = str(path.relative_to(root))
        if path.suffix in (".json", ".jsonl"):
            lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
            files[name] = [json_digest(json.loads(line)) for line in lines if line.strip()]
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                files[name] = arrays_digest(dict(data))
        elif path.suffix == ".safetensors":
            files[name] = arrays_digest(load_file(path))
        elif path.name == "config.toml":
            files[name] = path.read_text().replace(str(root), "<root>")
        else:
            files[name] = None    # present: pictures, reports (their numbers are in the JSON files), markers
    return files


def assert_close(actual, expected, where: str) -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(actual) == sorted(expected), f"{where}: keys differ"
        for key in expected:
            assert_close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: lengths differ"
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, f"{where}[{index}]")
    elif isinstance(expected, float) and isinstance(actual, (int, float)):
        assert math.isclose(actual, expected, rel_tol=1e-4, abs_tol=1e-6), f"{where}: {actual} != {expected}"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def test_a_tiny_runs_files_are_those_of_the_code_before_the_move(tmp_path, tiny_toml):
    run = tmp_path / "run"
    config = tiny_toml(tmp_path / "tiny.toml", run, train={"steps": 20, "checkpoint_every": 10})
    assert main(["train", config]) == 0
    assert main(["sample", str(run), "--num-samples", "16", "--seed", "3"]) == 0
    assert main(["evaluate", str(run)]) == 0
    assert main(["attribute", str(run), "--samples", "2", "--timesteps", "2", "--train-timesteps", "4",
                 "--resamplings", "2", "--dimension", "64", "--top", "3", "--journey-every", "2"]) == 0
    outputs = digest(run)
    if os.environ.get("CONDIFF_REGENERATE"):
        REFERENCE.parent.mkdir(exist_ok=True)
        REFERENCE.write_text(json.dumps(outputs, indent=1, sort_keys=True) + "\n")
    expected = json.loads(REFERENCE.read_text())
    assert sorted(outputs) == sorted(expected), "the run's files differ"
    for name in expected:
        assert_close(outputs[name], expected[name], name)
