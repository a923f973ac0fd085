"""Directories that condiff owns: creating them safely, writing into them atomically, and replacing them.

condiff deletes or replaces only what it created. Every directory it creates for output (a run, a demo,
a reproduction, a lab, an autoencoder, a noise classifier) carries a marker file, `.condiff`; `overwrite`
replaces an empty directory or a marked one and refuses anything else, and the current directory, its
ancestors, the home directory, `/` and condiff's own checkout are refused as outputs whatever is passed.
Every file condiff writes goes through `write_atomic`: a unique temporary name in the same folder, then a
rename, so a reader never sees half a file and two writers never collide. A command writing into a run
holds its lock, `.condiff.lock` (`RunDirectory.lock`), so that a second one is refused instead of mixing files,
and (but for training, which checkpoints to be resumed) a transaction (`RunDirectory.transaction`,
condiff.journal) that puts back everything it changed when it fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from condiff.errors import SwitchError
from condiff.journal import UNDO, open_transaction, recover, transaction
from condiff.runrecords import metrics_record_problem, summary_problem

MARKER = ".condiff"
LOCK = ".condiff.lock"   # held by the command writing into a directory; gone again when it ends
PROJECT_ROOT = Path(__file__).resolve().parents[2]   # the checkout, when condiff runs from one


class RunDirectoryError(SwitchError, RuntimeError):
    """A directory is missing, is not condiff's, or exists where condiff would overwrite it; `{resume}` or
    `{overwrite}` in the message name the switch that would let the call go ahead."""


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object], *, directory: bool = False) -> Path:
    """Call `write(temporary)` on a unique temporary file (or folder) beside `path`, then rename it onto
    `path`; an existing folder at `path` is replaced only once the new one is complete."""
    path = Path(path)
    make_directory(path.parent)
    prefix = f".{path.name}."
    journal, old = open_transaction(path), None
    beside = path.parent if journal is None else journal.scratch()   # the same file system either way
    if directory:
        temporary = Path(tempfile.mkdtemp(dir=beside, prefix=prefix, suffix=".tmp"))
    else:
        handle, name = tempfile.mkstemp(dir=beside, prefix=prefix, suffix=".tmp")
        os.close(handle)
        temporary = Path(name)
    try:
        write(temporary)
        # mkstemp/mkdtemp make private (0600/0700) entries; give the result the modes a plain write would.
        os.chmod(temporary, (0o777 if directory else 0o666) & ~current_umask())
        if journal is not None:   # keep the original for the undo (which moves a folder out of the way too)
            journal.before_change(path)
        if directory and path.exists():   # os.replace cannot replace a non-empty folder: move it aside first
            old = Path(tempfile.mkdtemp(dir=beside, prefix=prefix, suffix=".old"))
            os.replace(path, old / path.name)
        os.replace(temporary, path)
    except BaseException as err:
        shutil.rmtree(temporary, ignore_errors=True) if directory else temporary.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:   # a failed write (e.g. a full disk) names no file
            err.filename = str(path)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


def make_directory(folder: Path) -> None:
    """`mkdir -p folder`, each folder it makes journaled by an open transaction (so that an undo removes it)."""
    missing = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    for parent in reversed(missing):
        journal = open_transaction(parent)
        if journal is not None:
            journal.before_change(parent)
    folder.mkdir(parents=True, exist_ok=True)


def remove(path: Path) -> None:
    """Delete a file or folder, kept first by an open transaction that holds it."""
    journal = open_transaction(path)
    if journal is not None:
        journal.before_change(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda p: Path(p).write_text(text))


def write_json_atomic(path: str | os.PathLike, value) -> Path:
    """Strict JSON: a NaN or infinity is refused naming the file (never a bare `NaN` token), nothing written."""
    try:
        text = json.dumps(value, indent=1, allow_nan=False)
    except ValueError as err:
        raise RunDirectoryError(f"{path}: not written: {err}") from None
    return write_text_atomic(path, text)


def save_pretrained_atomic(model, path: str | os.PathLike) -> Path:
    """`model.save_pretrained(path)` (safetensors), atomically, marked as condiff's."""
    def save(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        (folder / MARKER).write_text(json.dumps({"kind": type(model).__name__}))
    return write_atomic(path, save, directory=True)


def forbidden_reason(path: Path) -> str | None:
    """Why `path` may never be a condiff output directory, or None."""
    try:
        resolved = path.expanduser().resolve()
    except RuntimeError as err:   # ~USER of no such user, or a symlink loop
        raise RunDirectoryError(f"{path}: cannot be resolved to a folder ({err})") from None
    cwd = Path.cwd().resolve()
    if str(path).strip() in ("", "."):
        return "the current directory"
    if resolved == Path(resolved.anchor):
        return "the file system root"
    if resolved == Path.home().resolve():
        return "the home directory"
    if resolved == cwd or resolved in cwd.parents:
        return "the current directory or one of its ancestors"
    if (PROJECT_ROOT / "pyproject.toml").is_file() and (resolved == PROJECT_ROOT or resolved in PROJECT_ROOT.parents):
        return "condiff's own checkout or one of its ancestors"
    return None


def is_condiff_directory(path: Path) -> bool:
    return (path / MARKER).is_file()


def contents(path: Path) -> list[Path]:
    """The entries of a folder, less the lock and the undo folder of the command writing into it."""
    return [entry for entry in path.iterdir() if entry.name not in (LOCK, UNDO)]


def check_output_directory(path: str | os.PathLike, *, overwrite: bool, resumable: bool = False) -> Path:
    """Refuse, before anything is written, an output that condiff may not create or replace."""
    path = Path(path)
    reason = forbidden_reason(path)
    if reason is not None:
        raise RunDirectoryError(f"{str(path) or '(empty path)'}: refused as an output directory ({reason}); "
                                "give a folder of its own, e.g. runs/NAME")
    if path.exists() and not path.is_dir():
        raise RunDirectoryError(f"{path}: exists and is not a directory")
    if path.is_dir() and contents(path):
        if not overwrite:
            resume = "{resume} to continue it or " if resumable else ""
            raise RunDirectoryError(f"{path}: exists; pass {resume}{{overwrite}} to replace it")
        if not is_condiff_directory(path):
            raise RunDirectoryError(f"{path}: not a directory condiff created (no {MARKER} marker); {{overwrite}} "
                                    "replaces only those, so move your files or choose another output")
    return path


def create_output_directory(path: str | os.PathLike, kind: str, *, overwrite: bool = False,
                            resumable: bool = False) -> Path:
    """Check as `check_output_directory` (on every process, so that a refusal stops them all), then
    (re)create `path` empty and marked as condiff's (on the main process alone)."""
    from condiff.runtime import process_state  # accelerate and torch only once a directory is made

    state = process_state()
    path = check_output_directory(path, overwrite=overwrite, resumable=resumable)
    state.wait_for_everyone()
    if state.is_main_process:
        make_directory(path)
        for entry in contents(path):   # the lock stays: the command replacing the run holds it
            remove(entry)
        write_json_atomic(path / MARKER, {"kind": kind})
    state.wait_for_everyone()
    return path


def create_or_resume_directory(path: str | os.PathLike, kind: str, *, resume: bool, overwrite: bool = False,
                               create: bool = True) -> Path:
    """The output of a job that resumes: (re)created as `create_output_directory` does (unless not `create`:
    independent workers leave that to the main one), or with `resume` one condiff made, refused otherwise."""
    path = Path(path)
    if resume:
        if not is_condiff_directory(path):
            raise RunDirectoryError(f"{path}: nothing to resume (not a directory condiff created)")
    elif create:
        create_output_directory(path, kind, overwrite=overwrite, resumable=True)
    return path


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics.jsonl file, one dict per non-blank line, in file order.

    A final line without its newline that does not parse is dropped: it is the record a killed or
    still-running trainer was writing. A malformed line anywhere else is an error naming the line.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RunDirectoryError(f"{path}: not a metrics log (not UTF-8 text: byte {err.start} is "
                                f"{err.object[err.start:err.start + 1]!r})") from None
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise RunDirectoryError(f"{path}:{number}: not a JSON object: {line[:80]!r}") from None
        problem = metrics_record_problem(record)
        if problem is not None:
            raise RunDirectoryError(f"{path}:{number}: not a metrics record ({problem}): {line[:80]!r}")
        records.append(record)
    return records


def hold_flock(path: Path) -> int | None:
    """An exclusive flock on the file at `path`, made if missing: its descriptor, or None while another process
    holds it. An OS lock, not a lock file's mere existence: the kernel drops it when its holder dies, SIGKILL too.
    A holder removes the file as it releases, so a lock just taken on a removed file is let go and taken again on
    the file now at `path` (the check filelock does not make in every release condiff admits)."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return None
        held = os.fstat(descriptor)
        with contextlib.suppress(FileNotFoundError):
            current = os.stat(path)
            if (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino):
                return descriptor
        os.close(descriptor)


def lock_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except (OSError, UnicodeDecodeError):   # released, or not a lock condiff wrote
        return "unknown"


def remove_empty(folders: list[Path]) -> None:
    """Remove `folders`, innermost first, as long as they are empty."""
    with contextlib.suppress(OSError):
        for folder in folders:
            folder.rmdir()


class RunDirectory:
    """A run's folder: its layout, its marker, and reading what it holds."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config_file = self.path / "config.toml"
        self.metrics_file = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.model = self.path / "model"                       # a diffusers DDPMPipeline
        self.summary_file = self.path / "summary.json"
        self.samples_file = self.path / "samples.npz"
        self.evaluation_file = self.path / "evaluation.json"
        self.evaluation_data = self.path / "evaluation_data.safetensors"   # what evaluation compares with
        self.train_subset = self.path / "train_subset.json"   # counterfactual retraining: the examples kept
        self.autoencoder = self.path / "autoencoder"           # latent runs: a copy of their AutoencoderKL
        self.noise_classifier = self.path / "noise_classifier"  # p_phi(y | x_t, t), for classifier guidance
        self.lock_file = self.path / LOCK

    @contextlib.contextmanager
    def lock(self, *, create: bool = False) -> Iterator[None]:
        """Hold the run's lock while a command writes into it: a second writer is refused at once, naming
        the holder. Only a folder condiff made is locked (the command itself refuses any other), or with
        `create` a missing or empty one, which is made to hold it and removed again if it stays empty."""
        made = [folder for folder in (self.path, *self.path.parents) if not folder.exists()]   # innermost first
        empty = bool(made) or self.path.is_dir() and not contents(self.path)
        # torchrun's other processes share rank 0's hold: torchrun stops them all if rank 0 is refused.
        if os.environ.get("RANK", "0") != "0" or not (is_condiff_directory(self.path) or create and empty):
            yield
            return
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(remove_empty, made)
            self.path.mkdir(parents=True, exist_ok=True)
            descriptor = hold_flock(self.lock_file)
            if descriptor is None:
                raise RunDirectoryError(f"{self.path}: in use by another condiff command (pid "
                                        f"{lock_holder(self.lock_file)}); wait for it to end")
            cleanup.callback(os.close, descriptor)
            cleanup.callback(self.lock_file.unlink, missing_ok=True)   # first, while still held
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())
            if recover(self.path):
                print(f"{self.path}: a command killed while writing into it was undone", file=sys.stderr)
            yield

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """What the block changes in the run stays only if it ends normally (see condiff.journal); hold the
        lock around it. Like the lock, on torchrun's rank 0 alone, and only in a folder condiff made."""
        if os.environ.get("RANK", "0") != "0" or not is_condiff_directory(self.path):
            yield
            return
        with transaction(self.path):
            yield

    def listing(self) -> dict[str, tuple[int, int] | None]:
        """(size, modification time) of every file in the run and its folders' names: what a command changed.
        Its lock and undo folder are left out, and folders' times: they change when a file is put back."""
        listing = {}
        for path in self.path.rglob("*"):
            relative = path.relative_to(self.path)
            if relative.parts[0] not in (LOCK, UNDO):
                status = path.lstat()
                listing[str(relative)] = None if path.is_dir() else (status.st_size, status.st_mtime_ns)
        return listing

    def require_run(self) -> "RunDirectory":
        if not self.config_file.is_file():
            raise RunDirectoryError(f"{self.path}: not a condiff run directory (config.toml missing)")
        return self

    def require_model(self) -> "RunDirectory":
        if not (self.model / "model_index.json").is_file():
            raise RunDirectoryError(f"{self.path}: no trained model (model/model_index.json missing); "
                                    "train it first or resume its training ({resume})")
        return self

    def read_summary(self) -> dict:
        """summary.json, refused naming the file unless it holds what its readers use (see `summary_problem`)."""
        summary = self.read_json(self.summary_file)
        problem = summary_problem(summary)
        if problem is not None:
            raise RunDirectoryError(f"{self.summary_file}: not a training summary ({problem}); train the run again, "
                                    "or resume its training ({resume})")
        return summary

    def read_json(self, path: Path):
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise RunDirectoryError(f"{path}: missing; the run is unfinished (resume its training with "
                                    "{resume})") from None
        except (OSError, ValueError) as err:
            raise RunDirectoryError(f"{path}: unreadable ({err})") from None
