"""All or nothing: a command's writes into a run, undone when it fails.

A command that writes several things into a run (sample: samples.npz and samples.png; evaluate: five files;
noise-classifier: a model; demo replacing an old demo) opens a transaction on it. (Commands that resume,
train, attribute and reproduce, keep what they computed instead.) Before condiff's atomic writes
(`rundir.write_atomic`, `rundir.remove`) replace or remove anything inside the run, the original is kept in
RUN/.condiff-undo/ (a hard link for a file, so nothing is copied: a write makes a new file; a rename for a
folder), and what is about to be created is listed in the journal there first. A command that ends normally
drops the undo folder; one that raises (Ctrl-C included) puts every entry back, newest first, so the run is
byte for byte as it was. A command killed outright (SIGKILL, the OOM killer, torchrun stopping a process)
leaves the undo folder behind, and the next command that locks the run rolls it back before it starts. (Not a
power loss: nothing is fsynced, so the journal may not have reached the disk.)

Why a journal and not a staging folder moved into place at the end: commands read back what they wrote
(evaluate's report reads the samples it drew), and a journal keeps every path where its readers look.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

UNDO = ".condiff-undo"
JOURNAL = "journal.json"

_open: list["Transaction"] = []   # the transactions of this process, innermost last


def absolute(path: str | os.PathLike) -> Path:
    """An absolute path without resolving links: a run's files are named from its path as the user gave it."""
    return Path(os.path.abspath(path))


def discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


class Transaction:
    """The journal of one command's changes to the folder `root`."""

    def __init__(self, root: str | os.PathLike):
        self.root = absolute(root)
        self.undo = self.root / UNDO
        self.entries: list[dict] = []   # {"path": relative path, "kept": name in the undo folder, or None}

    def covers(self, path: str | os.PathLike) -> bool:
        return absolute(path).is_relative_to(self.root) and absolute(path) != self.root

    def scratch(self) -> Path:
        """Where condiff's atomic writes make their temporaries: what a kill leaves there goes with the undo."""
        self.undo.mkdir(exist_ok=True)
        return self.undo

    def before_change(self, path: str | os.PathLike) -> None:
        """Keep what is at `path` now (or note that nothing is) before the first change to it."""
        relative = str(absolute(path).relative_to(self.root))
        if any(entry["path"] == relative for entry in self.entries):
            return   # changed before: its original is kept already, or this command created it
        path = absolute(path)
        kept = str(len(self.entries)) if os.path.lexists(path) else None
        self.log({"path": relative, "kept": kept})   # first: a kill before the move below loses nothing
        if kept is None:
            return
        if path.is_dir() and not path.is_symlink():
            os.rename(path, self.undo / kept)
        else:
            try:
                os.link(path, self.undo / kept, follow_symlinks=False)
            except OSError:   # a file system without hard links
                shutil.copy2(path, self.undo / kept, follow_symlinks=False)

    def log(self, entry: dict) -> None:
        self.entries.append(entry)
        self.undo.mkdir(exist_ok=True)
        temporary = self.undo / f"{JOURNAL}.tmp"
        temporary.write_text(json.dumps(self.entries))
        os.replace(temporary, self.undo / JOURNAL)

    def roll_back(self) -> None:
        """Put every changed path back as it was, newest change first; then drop the undo folder."""
        for entry in reversed(self.entries):
            path = self.root / entry["path"]
            if entry["kept"] is None:
                discard(path)
            elif os.path.lexists(self.undo / entry["kept"]):   # absent: killed before it was moved, so in place
                discard(path)
                os.rename(self.undo / entry["kept"], path)
        self.commit()

    def commit(self) -> None:
        """Drop the undo folder: its journal first, which is the moment the changes stand (a kill later leaves
        only leftovers, which a recovery without a journal removes)."""
        with contextlib.suppress(FileNotFoundError):
            (self.undo / JOURNAL).unlink()
        shutil.rmtree(self.undo, ignore_errors=True)


def open_transaction(path: str | os.PathLike) -> Transaction | None:
    """The transaction of this process whose folder holds `path`, or None."""
    return next((transaction for transaction in reversed(_open) if transaction.covers(path)), None)


def recover(root: str | os.PathLike) -> bool:
    """Roll back what a killed command left half done in `root`; whether there was anything."""
    transaction = Transaction(root)
    if not transaction.undo.is_dir():
        return False
    with contextlib.suppress(FileNotFoundError):   # killed before its first entry: nothing changed
        transaction.entries = json.loads((transaction.undo / JOURNAL).read_text())
    transaction.roll_back()
    return True


@contextlib.contextmanager
def transaction(root: str | os.PathLike) -> Iterator[Transaction]:
    """Everything written into `root` inside the block stays only if the block ends normally. Hold the
    folder's lock around it (RunDirectory.lock): two transactions on one folder would undo each other."""
    current = next((open_ for open_ in _open if open_.root == absolute(root)), None)
    if current is not None:   # nested: the outer one decides
        yield current
        return
    recover(root)
    current = Transaction(root)
    _open.append(current)
    try:
        yield current
    except BaseException:
        _open.remove(current)
        current.roll_back()
        raise
    _open.remove(current)
    current.commit()
