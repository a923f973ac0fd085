"""All or nothing (condiff.journal): what a command writes into a run through condiff's atomic writes stays only
if it ends normally. Ground truth is the folder itself: after a failure, or after a kill at any point and the
next command's recovery, every file and folder is byte for byte (and for a file, inode for inode) as before."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from condiff.journal import UNDO, transaction
from condiff.rundir import MARKER, RunDirectory, remove, write_atomic, write_text_atomic

NAMES = ["a.txt", "b.txt", "sub", "sub/c.txt", "sub/deep/d.txt", "new", "new/e.txt", "model", "model/weights"]


def make_folder(root: Path) -> Path:
    """A run-like folder: condiff's marker, files at two depths, a folder of weights."""
    root.mkdir()
    (root / MARKER).write_text("{}")
    (root / "a.txt").write_text("the user's samples")
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "sub" / "c.txt").write_bytes(bytes(range(256)))
    (root / "model").mkdir()
    (root / "model" / "weights").write_bytes(b"w" * 1000)
    return root


def state(root: Path) -> dict:
    """Every entry under root: a file's bytes, inode and modification time, or None for a folder."""
    entries = {}
    for path in sorted(root.rglob("*")):
        status = path.lstat()
        entries[str(path.relative_to(root))] = None if path.is_dir() else (path.read_bytes(), status.st_ino,
                                                                           status.st_mtime_ns)
    return entries


def write_folder(path: Path, text: str) -> None:
    write_atomic(path, lambda folder: (folder / "weights").write_text(text), directory=True)


def apply(root: Path, operations: list[tuple[str, str]]) -> None:
    """("write" | "remove" | "folder", name) in order, through condiff's writes."""
    for kind, name in operations:
        path = root / name
        if kind == "write" and not path.is_dir():
            write_text_atomic(path, f"{kind} {name} {len(operations)}")
        elif kind == "remove":
            remove(path)
        elif kind == "folder" and not path.is_file():
            write_folder(path, name)


OPERATIONS = st.lists(st.tuples(st.sampled_from(["write", "remove", "folder"]), st.sampled_from(NAMES)),
                      min_size=1, max_size=8)


def test_a_failed_block_leaves_the_folder_as_it_was_and_a_finished_one_keeps_its_writes(tmp_path):
    root = make_folder(tmp_path / "run")
    before = state(root)
    operations = [("write", "a.txt"), ("write", "a.txt"), ("write", "new/e.txt"), ("remove", "sub"),
                  ("folder", "model"), ("folder", "new/deep/x")]
    with pytest.raises(ValueError), transaction(root):
        apply(root, operations)
        assert (root / UNDO).is_dir() and not (root / "sub").exists()
        raise ValueError("the command fails after writing")
    assert state(root) == before

    with transaction(root):
        apply(root, operations)
    assert (root / "new" / "e.txt").is_file() and (root / "model" / "weights").read_text() == "model"
    assert not (root / "sub").exists() and not (root / UNDO).exists()


@settings(max_examples=60)
@given(operations=OPERATIONS)
def test_any_failed_sequence_of_writes_is_undone(tmp_path_factory, operations):
    root = make_folder(tmp_path_factory.mktemp("journal") / "run")
    before = state(root)
    with pytest.raises(KeyboardInterrupt), transaction(root):
        apply(root, operations)
        raise KeyboardInterrupt
    assert state(root) == before


class Killed(BaseException):
    """The process dies here: nothing after it runs, the roll-back included."""


def contents(root: Path) -> dict:
    return {name: None if entry is None else entry[0] for name, entry in state(root).items()}


@settings(max_examples=80)
@given(operations=OPERATIONS, kill_at=st.integers(0, 40))
def test_a_kill_at_any_file_system_call_is_undone_by_the_next_lock(tmp_path_factory, operations, kill_at):
    """A kill at any rename, link or removal (the journal's own included), then the next command locking the
    run: the folder is as it was, or, killed once the journal was dropped, as the finished block left it."""
    import condiff.journal as journal

    folder = tmp_path_factory.mktemp("journal")
    finished = make_folder(folder / "finished")
    apply(finished, operations)
    root = make_folder(folder / "run")
    before = state(root)
    calls = {"count": 0, "committed": False}
    with pytest.MonkeyPatch.context() as patch:
        for name in ("replace", "rename", "link", "unlink", "rmdir"):
            def counted(*args, _real=getattr(os, name), _name=name, **kwargs):
                calls["count"] += 1
                if calls["count"] > kill_at:
                    raise Killed
                _real(*args, **kwargs)
                calls["committed"] |= _name == "unlink" and str(args[0]).endswith(f"{UNDO}/{journal.JOURNAL}")
            patch.setattr(os, name, counted)
        patch.setattr(journal.Transaction, "roll_back", lambda self: None)
        try:
            with transaction(root):
                apply(root, operations)
        except Killed:
            pass
    journal._open.clear()
    with RunDirectory(root).lock():
        pass
    if calls["committed"]:
        assert contents(root) == contents(finished)
    else:
        assert state(root) == before


@pytest.mark.slow   # a subprocess
def test_a_command_killed_mid_write_is_undone_by_the_next_one(tmp_path):
    root = make_folder(tmp_path / "run")
    before = state(root)
    script = ("import os, signal, sys; from pathlib import Path; from condiff.journal import transaction\n"
              "from condiff.rundir import write_text_atomic, remove\n"
              "root = Path(sys.argv[1])\n"
              "with transaction(root):\n"
              "    write_text_atomic(root / 'a.txt', 'half of a new run'); remove(root / 'model')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    child = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert (root / UNDO).is_dir() and (root / "a.txt").read_text() == "half of a new run"
    recovered = subprocess.run([sys.executable, "-c", "import sys; from condiff.rundir import RunDirectory\n"
                                "with RunDirectory(sys.argv[1]).lock(): pass", str(root)],
                               capture_output=True, text=True, timeout=60)
    assert recovered.returncode == 0, recovered.stderr
    assert recovered.stderr == f"{root}: a command killed while writing into it was undone\n"
    assert state(root) == before
