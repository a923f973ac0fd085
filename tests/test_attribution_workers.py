"""Attribution work spread over processes (issue 20, item 6): `condiff attribute` under torchrun shares the
training examples out and writes what one process writes; the validation protocol under torchrun shares its
models out between independent workers (each trains alone) and reports what one process reports."""

import json
import os
import runpy
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import condiff

pytestmark = pytest.mark.slow   # torchrun processes


def torchrun(*arguments: str, processes: int = 2, temporary: Path | None = None) -> None:
    """`torchrun` on this machine; `temporary`: the processes' temporary folder (TMPDIR)."""
    launcher = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    with socket.socket() as probe:           # torchrun's static rendezvous hangs on port 0: pick a free one
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    if temporary is not None:
        env["TMPDIR"] = str(temporary)
    done = subprocess.run([launcher, "--nproc_per_node", str(processes), "--master_port", port, *arguments],
                          env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-3000:]


def test_attribute_under_two_processes_writes_what_one_writes(tiny_config, tmp_path, one_torch_thread):
    from condiff.cli import main

    run = condiff.train(tiny_config(tmp_path / "run", train={"steps": 20})).path
    arguments = ["-m", "condiff", "attribute", str(run), "--samples", "2", "--timesteps", "500,100", "--output-function", "dtrak",
                 "--train-timesteps", "3", "--dimension", "64", "--journey-every", "0"]
    assert main(arguments[2:]) == 0   # one process: this one
    one = {name: np.load(run / "attribution" / name) for name in ("scores.npy", "features-dtrak-K3-k64-sparse.npy")}
    torchrun(*arguments, "--overwrite")
    for name, expected in one.items():
        np.testing.assert_allclose(np.load(run / "attribution" / name), expected, rtol=1e-5, atol=1e-7)
    assert json.loads((run / "attribution" / "attribution.json").read_text())["steps"]


def test_validation_under_two_workers_reports_what_one_reports(tmp_path, monkeypatch, one_torch_thread):
    worker = str(Path(__file__).with_name("attribution_workers_worker.py"))
    monkeypatch.setattr(sys, "argv", [worker, str(tmp_path / "one")])
    runpy.run_path(worker, run_name="__main__")   # one worker: this process
    (tmp_path / "temporary").mkdir()
    torchrun(worker, str(tmp_path / "two"), temporary=tmp_path / "temporary")
    one, two = (json.loads((tmp_path / name / "lds.json").read_text()) for name in ("one", "two"))
    assert one["results"] == two["results"] and one["removals"] == two["removals"]
    assert len(list((tmp_path / "two" / "subsets").glob("subset-*"))) == 4 * 2
    # the workers' barrier marks are gone: nothing of condiff's is left in the temporary folder
    assert not [p.name for p in (tmp_path / "temporary").iterdir() if p.name.startswith("condiff")]
