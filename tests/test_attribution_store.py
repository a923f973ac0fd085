"""The stored training features under two processes (torchrun on CPUs) equal one process's: the processes
share the batches out, write into one file, and each gets the whole array back; a resumed featurization
keeps the batches already marked done."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attribution_store_worker import BATCH_SIZE, DAMAGED, FINISHED, stored_tiny_features

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]   # two torchrun processes


def run_two_processes(features_path: Path) -> None:
    """The worker under torchrun with 2 CPU processes: a fresh featurization, then a resumed one."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    with socket.socket() as probe:           # torchrun's static rendezvous hangs on port 0: pick a free one
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    worker = Path(__file__).with_name("attribution_store_worker.py")
    done = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", port, str(worker),
                           str(features_path)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


def returned(features_path: Path, mode: str, batches: list[int]) -> list[np.ndarray]:
    """The arrays the two processes got back in `mode`, once checked that each featurized some of `batches`
    and that together they featurized each exactly once."""
    shares = [np.load(features_path.with_name(f"starts-{mode}-rank{rank}.npy")).tolist() for rank in (0, 1)]
    assert all(shares) and sorted(shares[0] + shares[1]) == [index * BATCH_SIZE for index in batches], shares
    return [np.load(features_path.with_name(f"returned-{mode}-rank{rank}.npy")) for rank in (0, 1)]


def test_two_processes_store_the_features_of_one_and_resume(tmp_path):
    (tmp_path / "one").mkdir()
    expected = stored_tiny_features(tmp_path / "one" / "features-tiny.npy", resume=False).copy()

    (tmp_path / "two").mkdir()
    two = tmp_path / "two" / "features-tiny.npy"
    run_two_processes(two)
    for array in returned(two, "fresh", list(range(8))):
        np.testing.assert_array_equal(array, expected)
    np.testing.assert_array_equal(np.load(tmp_path / "two" / "after-fresh.npy"), expected)
    assert np.load(tmp_path / "two" / "done-after-fresh.npy").all()

    # Resumed from a killed run's file (`damage`): batches FINISHED kept as they were, the others featurized.
    resumed = returned(two, "resume", [i for i in range(8) if i not in FINISHED])
    for index in range(8):
        rows = slice(index * BATCH_SIZE, (index + 1) * BATCH_SIZE)
        for array in resumed + [np.load(two)]:
            np.testing.assert_array_equal(array[rows], DAMAGED if index in FINISHED else expected[rows])
    assert np.load(tmp_path / "two" / "done-tiny.npy").all()
