"""A real kill test (issue 10): `condiff train` is killed with SIGKILL at several points (during a step,
while a checkpoint is being written, between a checkpoint and its `latest` pointer), resumed with
`condiff train RUN --resume` (in the test's process), and ends with the weights, multipliers and
metrics.jsonl of a run that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

KILL_TRAIN = {"steps": 400, "checkpoint_every": 50, "keep_checkpoints": 2}   # long enough to be caught mid-run

# Kills its own process with SIGKILL at a chosen point of `condiff train`, then runs it.
SELF_KILLING_TRAIN = """
import os, signal, sys
import condiff.training.checkpoint as checkpoint
from condiff.cli import main

point, target = sys.argv[1], int(sys.argv[2])
original = {"save_file": checkpoint.save_file, "write_text_atomic": checkpoint.write_text_atomic}

def save_file(tensors, path, *args, **kwargs):      # inside the checkpoint's temporary folder
    original["save_file"](tensors, path, *args, **kwargs)
    if point == "mid-checkpoint" and f"step-{target:07d}" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)

def write_text_atomic(path, text):                  # the checkpoint is in place, `latest` not yet updated
    if point == "before-latest" and text == f"step-{target:07d}":
        os.kill(os.getpid(), signal.SIGKILL)
    return original["write_text_atomic"](path, text)

checkpoint.save_file, checkpoint.write_text_atomic = save_file, write_text_atomic
sys.exit(main(sys.argv[3:]))
"""

pytestmark = pytest.mark.slow   # trains in subprocesses and kills them

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def train(*argv, kill_at: tuple[str, int] | None = None):
    """`condiff train ARGV` in a new process; `kill_at` = (point, step): it kills itself there."""
    start = ["-m", "condiff"] if kill_at is None else ["-c", SELF_KILLING_TRAIN, kill_at[0], str(kill_at[1])]
    return subprocess.Popen([sys.executable, *start, "train", *argv], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def train_here(*argv) -> None:
    """`condiff train ARGV` in this process (one thread, like the killed subprocesses: the same float sums); a
    resume reads nothing but what the kill left on disk."""
    from condiff.cli import main

    assert main(["train", *map(str, argv)]) == 0


@pytest.fixture(scope="session")
def config_file(tiny_toml):
    """`config_file(folder, name)`: the kill test's run folder/name, as a TOML file beside it."""
    return lambda folder, name: tiny_toml(folder / f"{name}.toml", folder / name, train=KILL_TRAIN)


def outcome(run_dir):
    weights = load_file(run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    summary = json.loads((run_dir / "summary.json").read_text())
    return weights, [c["multiplier"] for c in summary["constraints"]], (run_dir / "metrics.jsonl").read_text()


def last_logged_step(run_dir) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError):
        return 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory, config_file, one_torch_thread):
    """The uninterrupted run, trained in this process."""
    tmp_path = tmp_path_factory.mktemp("kill-reference")
    train_here(config_file(tmp_path, "run"))
    return outcome(tmp_path / "run")


def assert_same(result, reference):
    weights, multipliers, metrics = result
    ref_weights, ref_multipliers, ref_metrics = reference
    assert weights.keys() == ref_weights.keys()
    assert all((weights[k] == ref_weights[k]).all() for k in weights)
    assert multipliers == ref_multipliers
    assert metrics == ref_metrics


def test_killed_during_a_step(tmp_path, reference, config_file, one_torch_thread):
    process = train(config_file(tmp_path, "run"))
    deadline = time.monotonic() + 120
    while last_logged_step(tmp_path / "run") < 120:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)   # far shorter than steps 120 to 400 of the run take
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = last_logged_step(tmp_path / "run")
    assert 120 <= killed_at < 400
    train_here(tmp_path / "run", "--resume")
    assert_same(outcome(tmp_path / "run"), reference)


@pytest.mark.parametrize("point", ["mid-checkpoint", "before-latest"])
def test_killed_while_writing_a_checkpoint(tmp_path, reference, point, config_file, one_torch_thread):
    config = config_file(tmp_path, "run")
    process = train(config, kill_at=(point, 200))
    process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-0000150"
    assert (checkpoints / "step-0000200").is_dir() == (point == "before-latest")
    train_here(tmp_path / "run", "--resume")
    assert_same(outcome(tmp_path / "run"), reference)
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]   # no temporary folder left behind
