"""Run-directory locks and interruptions (hostile input): a command that writes into a run holds its lock
for the whole command, so a second writer is refused at once in one line naming the holder, with nothing
written; a lock left by a killed command blocks nobody; Ctrl-C exits with code 130 and one line saying what
the run holds now; an OSError is one line naming its file; `--debug` / CONDIFF_DEBUG=1 add the traceback."""

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from condiff.cli import main
from condiff.rundir import LOCK, RunDirectory

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py

TINY = {"train": {"steps": 4, "checkpoint_every": 2}, "sample": {"num_samples": 8, "batch_size": 8, "steps": 2}}
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
# A shell's background job may start with SIGINT ignored: the child takes Python's own handler back.
CLI = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
       "from condiff.cli import main; sys.exit(main(sys.argv[1:]))")
HOLDER = ("import sys, time; from condiff.rundir import RunDirectory\n"
          "with RunDirectory(sys.argv[1]).lock():\n    print('held', flush=True)\n    time.sleep(600)\n")
BAR = re.compile(r"^[\w -]+:\s+\d+%\|")   # a tqdm progress bar, as the terminal shows it last


@pytest.fixture(scope="module")
def trained(one_torch_thread, tmp_path_factory, tiny_toml) -> Path:
    root = tmp_path_factory.mktemp("locks")
    assert main(["train", tiny_toml(root / "run.toml", root / "run", **TINY)]) == 0
    return root / "run"


@pytest.fixture
def run(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def shown_lines(err: str) -> list[str]:
    """The lines of stderr a terminal leaves, less progress bars."""
    lines = [line.split("\r")[-1] for line in err.splitlines()]
    return [line for line in lines if line.strip() and not BAR.match(line)]


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(shown_lines(err)) == 1, err
    return shown_lines(err)[0]


def commands(run: Path, tmp_path: Path, tiny_toml) -> dict[str, list[str]]:
    return {"train --resume": ["train", str(run), "--resume"],
            "train --overwrite": ["train", tiny_toml(tmp_path / "again.toml", run, **TINY), "--overwrite"],
            "sample": ["sample", str(run)], "evaluate": ["evaluate", str(run)],
            "attribute": ["attribute", str(run), "--samples", "2"], "noise-classifier": ["noise-classifier", str(run)],
            "demo": ["demo", "--output", str(run), "--overwrite"],
            "reproduce": ["reproduce", "digits-minority", "--output", str(run), "--resume"],
            "guidance-lab": ["guidance-lab", "--output", str(run), "--overwrite", "--quick"]}


@pytest.mark.parametrize("command", ["train --resume", "train --overwrite", "sample", "evaluate", "attribute",
                                     "noise-classifier", "demo", "reproduce", "guidance-lab"])
def test_a_second_writer_is_refused_at_once_naming_the_holder(command, run, tmp_path, tiny_toml, capsys, snapshot):
    argv = commands(run, tmp_path, tiny_toml)[command]
    with RunDirectory(run).lock():
        before = snapshot(tmp_path)
        assert main(argv) == 2
        line = one_line(capsys)
        assert snapshot(tmp_path) == before
    assert line == f"condiff: error: {run}: in use by another condiff command (pid {os.getpid()}); wait for it to end"
    assert not (run / LOCK).exists()   # the holder leaves nothing behind


@pytest.mark.slow   # a CLI subprocess
def test_a_second_writer_in_another_process_is_refused(run, snapshot):
    with RunDirectory(run).lock():
        before = snapshot(run)
        child = subprocess.run([sys.executable, "-m", "condiff", "sample", str(run)], env=ENV, capture_output=True,
                               text=True, timeout=120)
        assert snapshot(run) == before
    assert child.returncode == 2 and "Traceback" not in child.stderr, child.stderr
    assert shown_lines(child.stderr) == [f"condiff: error: {run}: in use by another condiff command "
                                         f"(pid {os.getpid()}); wait for it to end"]


def test_a_lock_left_by_a_killed_command_blocks_nobody(run):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
    finally:
        holder.kill()   # SIGKILL: no clean-up runs
        holder.wait(timeout=30)
    assert (run / LOCK).read_text() == f"{holder.pid}\n"   # left behind, naming the dead holder
    assert main(["sample", str(run)]) == 0
    assert (run / "samples.npz").is_file() and not (run / LOCK).exists()


def test_the_lock_spares_runs_it_does_not_own(tmp_path, tiny_toml, capsys):
    """A folder that is not condiff's gets no lock file; a new run's folder made to hold it goes again when the
    command is refused."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("months of work")
    assert main(["sample", str(mine)]) == 2 and "not a condiff run directory" in one_line(capsys)
    missing = {"dataset": "idx", "path": str(tmp_path / "images"), "labels_path": str(tmp_path / "labels")}
    config = tiny_toml(tmp_path / "bad.toml", tmp_path / "new" / "run", data=missing)
    assert main(["train", config]) == 2 and str(tmp_path / "labels") in one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml", "mine"]
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]


def interrupted_main(argv: list[str], module: str, name: str, monkeypatch, write=None) -> int:
    """main(argv) with `module.name` (the command's library call) interrupted halfway through a progress bar,
    after calling `write()` if given."""
    from condiff.runtime import progress_bar

    def interrupted(*args, **kwargs):
        if write is not None:
            write()
        bar = progress_bar(total=3, desc="step")   # left open by the interruption, as in a sampling loop
        bar.update()
        raise KeyboardInterrupt
    monkeypatch.setattr(f"{module}.{name}", interrupted)
    try:
        return main(argv)
    except KeyboardInterrupt:   # escaping, it would stop pytest itself
        pytest.fail("KeyboardInterrupt escaped main")


def test_ctrl_c_before_anything_is_written_says_the_run_is_unchanged(run, monkeypatch, capsys, snapshot):
    before = snapshot(run)
    assert interrupted_main(["sample", str(run)], "condiff.lifecycle.sampling", "sample_run", monkeypatch) == 130
    assert one_line(capsys) == f"condiff: interrupted; {run} is unchanged"
    assert snapshot(run) == before


def test_ctrl_c_of_a_checkpointed_training_says_how_to_resume(run, monkeypatch, capsys):
    assert interrupted_main(["train", str(run), "--resume"], "condiff.lifecycle.training", "train_run", monkeypatch,
                            write=lambda: (run / "metrics.jsonl").write_text("")) == 130
    assert one_line(capsys) == f"condiff: interrupted; resume with condiff train {run} --resume"


def test_ctrl_c_after_writes_puts_back_what_the_command_wrote(run, monkeypatch, capsys, snapshot):
    """evaluate interrupted after it replaced samples.npz and wrote evaluation.json: both undone, byte for byte."""
    from condiff.rundir import write_json_atomic, write_text_atomic

    def write():
        write_text_atomic(run / "samples.npz", "new samples")
        write_json_atomic(run / "evaluation.json", {"tv_to_uniform": 0.5})
    (run / "samples.npz").write_bytes(b"the user's samples")
    before = snapshot(run)
    assert interrupted_main(["evaluate", str(run)], "condiff.lifecycle.evaluation", "evaluate_run", monkeypatch,
                            write=write) == 130
    assert one_line(capsys) == f"condiff: interrupted; {run} is unchanged"
    assert snapshot(run) == before


def test_ctrl_c_after_a_write_past_condiff_says_the_run_is_partly_written(run, monkeypatch, capsys):
    assert interrupted_main(["evaluate", str(run)], "condiff.lifecycle.evaluation", "evaluate_run", monkeypatch,
                            write=lambda: (run / "evaluation.json").write_text("{")) == 130
    assert one_line(capsys) == f"condiff: interrupted; {run} is partly written"


def test_an_os_error_is_one_line_naming_the_file_and_debug_adds_the_traceback(run, monkeypatch, capsys):
    """A full disk while sampling: the file it was writing is named; the traceback only when asked for."""
    def disk_full(run, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run / "samples.npz"))
    monkeypatch.setattr("condiff.lifecycle.sampling.sample_run", disk_full)
    monkeypatch.delenv("CONDIFF_DEBUG", raising=False)
    assert main(["sample", str(run)]) == 2
    assert one_line(capsys) == f"condiff: error: {run / 'samples.npz'}: No space left on device"
    for argv, debug in ((["--debug", "sample", str(run)], None), (["sample", str(run)], "1")):
        if debug:
            monkeypatch.setenv("CONDIFF_DEBUG", debug)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and err.splitlines()[-1].startswith("condiff: error: ")


def test_a_failed_atomic_write_names_its_file(tmp_path):
    from condiff.rundir import write_atomic

    def full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))   # as a write() on a full disk: no file named
    with pytest.raises(OSError) as raised:
        write_atomic(tmp_path / "evaluation.json", full)
    assert raised.value.filename == str(tmp_path / "evaluation.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow   # a CLI subprocess
def test_sigint_exits_130_with_one_line_and_the_run_unchanged(run, snapshot):
    before = snapshot(run)
    child = subprocess.Popen([sys.executable, "-c", CLI, "sample", str(run), "--num-samples", "1000000",
                              "--batch-size", "8", "--steps", "50"],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / LOCK).is_file() or (run / LOCK).read_text() != f"{child.pid}\n":   # it holds the run
            assert child.poll() is None and time.monotonic() < deadline, "the command ended before it was interrupted"
            time.sleep(0.05)
        for _ in range(3):   # again, should a library have swallowed the first KeyboardInterrupt
            child.send_signal(signal.SIGINT)
            try:
                _, err = child.communicate(timeout=20)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        child.kill()
    assert child.returncode == 130 and "Traceback" not in err, err
    assert shown_lines(err) == [f"condiff: interrupted; {run} is unchanged"]
    assert snapshot(run) == before


def test_a_lock_taken_on_the_file_its_holder_just_removed_is_taken_again_on_the_new_one(tmp_path, monkeypatch):
    """The race of a lock file removed on release: B opened the file, A released and removed it, C made a new one
    and holds it; B's flock on the removed file succeeds, but B must not think it holds the lock."""
    import fcntl

    import condiff.rundir as rundir

    path = tmp_path / LOCK
    path.write_text("A\n")
    opened_by_b = os.open(path, os.O_RDWR)   # B, before A's release
    path.unlink()                            # A releases
    held_by_c = rundir.hold_flock(path)      # C locks the new file
    assert held_by_c is not None
    real_open, calls = os.open, []

    def open_as_b(*args, **kwargs):          # B's first open is the one from before A's release
        calls.append(args)
        return opened_by_b if len(calls) == 1 else real_open(*args, **kwargs)
    monkeypatch.setattr(rundir.os, "open", open_as_b)
    assert rundir.hold_flock(path) is None and len(calls) == 2   # refused: C holds the file at the path
    fcntl.flock(held_by_c, fcntl.LOCK_UN)
    os.close(held_by_c)
    monkeypatch.setattr(rundir.os, "open", real_open)
    mine = rundir.hold_flock(path)
    assert mine is not None
    os.close(mine)


def test_ctrl_c_of_an_overwriting_demo_puts_the_old_demo_back(tmp_path, monkeypatch, capsys, snapshot):
    """--overwrite empties the old output first (create_output_directory); interrupted, the old one is back."""
    from condiff.rundir import create_output_directory, write_text_atomic

    demo = create_output_directory(tmp_path / "demo", "demo")
    write_text_atomic(demo / "report.md", "last week's figures")
    (demo / "constrained").mkdir()
    (demo / "constrained" / "summary.json").write_text("{}")
    before = snapshot(demo)

    def replace_then_write():
        create_output_directory(demo, "demo", overwrite=True)
        write_text_atomic(demo / "report.md", "half of today's")
    assert interrupted_main(["demo", "--output", str(demo), "--overwrite"], "condiff.papers.demo", "run_demo",
                            monkeypatch, write=replace_then_write) == 130
    assert one_line(capsys) == f"condiff: interrupted; {demo} is unchanged"
    assert snapshot(demo) == before


def test_ctrl_c_of_an_attribution_keeps_its_features_to_resume(run, monkeypatch, capsys):
    def computed():
        (run / "attribution").mkdir()
        (run / "attribution" / "done-final.npy").write_bytes(b"finished batches")
    assert interrupted_main(["attribute", str(run), "--samples", "2"], "condiff.audit.attribute",
                            "attribute_run", monkeypatch, write=computed) == 130
    assert one_line(capsys) == "condiff: interrupted; resume with the same condiff attribute command with --resume"
    assert (run / "attribution" / "done-final.npy").read_bytes() == b"finished batches"
