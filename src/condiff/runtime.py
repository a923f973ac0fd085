"""Where and how work runs: one device for training, sampling, evaluation and every auxiliary network,
the process state, and progress bars.

The default device is accelerate's choice for this process (its CUDA device under a multi-GPU launch,
else the CPU; `ACCELERATE_USE_CPU=true` forces the CPU), so that nothing is hard-coded to "cpu" or "cuda".
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import shutil
import signal
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
from tqdm.auto import tqdm

from condiff.config import ArgumentError, ConfigError


def process_state():
    """accelerate's state of this process (rank, number of processes, device), set up as `Accelerator()`
    sets it up: without `cpu=True`, processes that torchrun starts on CPUs would each run alone as rank 0."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` when given (checked to exist here), else the accelerator's device of this process."""
    if device is None:
        return process_state().device
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ArgumentError("device", f"{device!r} is not a device name (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("device", f"{device}: CUDA is not available on this machine")
    return device


def progress_bar(iterable=None, *, desc: str, enabled: bool = True, **options) -> tqdm:
    """A tqdm bar that redraws freely on a terminal but writes a line at most every 30 s into a log
    file or pipe (a carriage-return redraw per step would flood it)."""
    interactive = sys.stderr.isatty()
    options.setdefault("position", BAR_ROW)
    bar = tqdm(iterable, desc=desc, disable=not enabled, dynamic_ncols=interactive,
               mininterval=0.1 if interactive else 30.0, **options)
    OPEN_BARS.add(bar)
    return bar


BAR_ROW: int | None = None   # the terminal row of this process's bars: a worker of a side-by-side job sets its own
OPEN_BARS: "weakref.WeakSet[tqdm]" = weakref.WeakSet()   # every bar progress_bar made that is still referenced


def close_progress_bars() -> None:
    """Close the bars an error or an interruption left open, so that a message printed next has its own line."""
    for bar in list(OPEN_BARS):
        bar.close()


def end_processes() -> None:
    """Leave the process group together at the end of a command: a rank that exits while the group is
    still open can abort ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class IndependentWorkers:
    """The processes `torchrun --nproc_per_node N` started, used as N independent workers that share out
    jobs which each run in one process (e.g. one model's training each): accelerate would otherwise join
    them into one data-parallel group, so `independent_workers()` hides torchrun's variables from it. They
    meet at file barriers in the system's temporary folder, named by the launch (the torchrun agent, their
    common parent, and its port): so they must run on one machine."""

    def __init__(self, rank: int, world: int, token: str):
        self.rank, self.world, self.token = rank, world, token

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, jobs: list) -> list:
        """This process's jobs: every world-th, from its rank."""
        return jobs[self.rank::self.world]

    @property
    def marks(self) -> Path:
        return Path(tempfile.gettempdir()) / f"condiff-workers-{self.token}"

    def barrier(self, name: str, poll_seconds: float = 1.0) -> None:
        """Wait until every worker has reached `name` (a worker that fails makes torchrun stop them all)."""
        if self.world == 1:
            return
        self.marks.mkdir(parents=True, exist_ok=True)
        (self.marks / f"{name}-{self.rank}").touch()
        while not all((self.marks / f"{name}-{rank}").exists() for rank in range(self.world)):
            time.sleep(poll_seconds)

    def leave(self, poll_seconds: float = 1.0) -> None:
        """This worker meets no more barriers; the main worker, once every worker has said so, removes the marks
        (a barrier still polling them would wait forever if they went earlier)."""
        if self.world == 1:
            return
        (self.marks / f"left-{self.rank}").touch()
        if self.is_main:
            while not all((self.marks / f"left-{rank}").exists() for rank in range(self.world)):
                time.sleep(poll_seconds)
            shutil.rmtree(self.marks, ignore_errors=True)


def independent_workers() -> IndependentWorkers:
    """This process as one of torchrun's independent workers (rank 0 of 1 outside torchrun). Call it before
    anything asks accelerate for its state: it removes torchrun's variables from this process's environment."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        raise ConfigError("independent workers: a process group already exists in this process")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE"):
        os.environ.pop(name, None)
    return IndependentWorkers(rank, world, f"{os.getppid()}-{os.environ.get('MASTER_PORT', '')}")


def quiet_worker() -> None:
    """Ctrl-C is the parent's to handle; the parent's terminate() makes a worker exit rather than die, so that its
    exit handlers run (else multiprocessing warns of the semaphores, e.g. tqdm's lock, a killed worker leaves)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, leave_on_terminate)


def leave_on_terminate(*_) -> None:
    # Once, and not in a worker already leaving (multiprocessing's exit flag): the parent terminates its workers
    # again as it exits, and a SystemExit raised inside exit handlers prints a traceback under its one-line error.
    if not multiprocessing.util._exiting:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(1)


def run_in_worker(job, arguments: tuple, row: int, workers: int):
    """`job(*arguments)` in one of `workers` side-by-side processes: its share of the threads torch would use
    (OMP_NUM_THREADS is heard) and its own row of progress bars."""
    global BAR_ROW
    torch.set_num_threads(max(1, torch.get_num_threads() // workers))
    BAR_ROW = row
    return job(*arguments)


def run_side_by_side(job, arguments: dict[str, tuple]) -> dict:
    """`job(*arguments[name])` for every name at once, a process each; the results in `arguments`' order. On a
    2-core CPU a second thread speeds a small UNet's step up by a fifth only, so two one-thread processes finish two
    trainings about a quarter sooner than one two-thread process in turn. Ctrl-C reaches this process only: the
    workers are terminated (the caller restores its output). `job` must be importable by name. Under a
    multi-process launch, or for one job, the jobs run here one after the other (every process of a launch takes
    part in each job)."""
    workers = len(arguments)
    if workers < 2 or process_state().num_processes > 1:
        return {name: job(*args) for name, args in arguments.items()}
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=quiet_worker)
    try:
        pending = {name: pool.apply_async(run_in_worker, (job, args, row, workers))
                   for row, (name, args) in enumerate(arguments.items())}
        results = {name: result.get() for name, result in pending.items()}
    except BaseException:
        pool.terminate()   # at once on Ctrl-C or a failed job
        pool.join()
        raise
    pool.close()   # the workers leave on their own: a SIGTERM could land in their exit handlers
    pool.join()
    return results
