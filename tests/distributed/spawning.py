"""Starting the multi-process tests' workers: one job alone, or many jobs in one start.

Starting 2 Python processes that import torch costs ~6 s on the 2-core machine, the
jobs themselves well under 1 s each; so the tests' jobs run together in one
``mp.spawn`` (:class:`JobBatch`), each job initialising and destroying its own process
group on its own port, in the order they were added. If that start fails, every test
then runs its own jobs alone (:func:`spawn`), so a failure is reported by the test whose
job fails, with that job's error.
"""

from __future__ import annotations

import socket
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

WORLD = 2
#: A job's process-group timeout (a job takes about a second): a job that hangs (a
#: rendezvous lost in the joint start) fails instead, and its test runs it alone
JOB_TIMEOUT = timedelta(seconds=120)


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports free now (all bound at once, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return _free_ports(1)[0]


def spawn(worker: Callable[..., None], *args: Any, nprocs: int = WORLD) -> None:
    """``worker(rank, port, *args)`` on ``nprocs`` processes and a free port. One retry
    for two rare failures of the harness, not of the code under test: a port taken in
    between, and a worker killed by SIGABRT (gloo aborting a process whose peer tore its
    sockets down first; seen once in ~40 runs even with the barrier before teardown).
    A configuration that really crashes crashes twice; wrong numbers still fail the
    comparisons."""
    for attempt in range(2):
        try:
            mp.spawn(worker, args=(free_port(), *args), nprocs=nprocs, join=True)
            return
        except Exception as err:  # noqa: BLE001 - only the two cases above are retried
            if attempt or not _harness_failure(err):
                raise


def _harness_failure(err: Exception) -> bool:
    """A port taken in between, or a worker aborted by gloo (see :func:`spawn`)."""
    text = str(err).lower()
    clash = "address already in use" in text or "eaddrinuse" in text
    return clash or getattr(err, "signal_name", None) == "SIGABRT"


def _run_jobs(rank: int, jobs: list[tuple[Callable[..., None], int, tuple]]) -> None:
    for worker, port, args in jobs:
        worker(rank, port, *args)


class JobBatch:
    """Jobs ``worker(rank, port, *args)`` of ``WORLD`` processes, run together on the
    first :meth:`ensure`. Each job writes what its test checks under :meth:`path`."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.jobs: dict[str, tuple[Callable[..., None], tuple]] = {}
        self.started = False
        self.failed: str | None = None  # why the joint start failed
        self.done_alone: set[str] = set()

    def path(self, key: str) -> str:
        """Where job ``key`` writes (a file name, or a prefix for several files)."""
        return str(self.directory / key)

    def add(self, key: str, worker: Callable[..., None], *args: Any) -> None:
        if key in self.jobs:
            raise ValueError(f"job {key!r} added twice")
        self.jobs[key] = (worker, args)

    def _start_together(self) -> None:
        """All jobs in one start; a second start (new ports) after a failure of the
        harness (:func:`spawn`); else ``failed`` says why, in a warning too."""
        for attempt in range(2):
            ports = _free_ports(len(self.jobs))  # bound long before the last job runs
            jobs = [(w, p, a) for (w, a), p in zip(self.jobs.values(), ports, strict=True)]
            try:
                mp.spawn(_run_jobs, args=(jobs,), nprocs=WORLD, join=True)
                self.failed = None
                return
            except Exception as err:  # noqa: BLE001 - each job is retried alone below
                self.failed = f"{type(err).__name__}: {err}"
                if attempt or not _harness_failure(err):
                    break
        warnings.warn(
            f"the {len(self.jobs)} multi-process jobs failed together ({self.failed}); "
            "each test now runs its own jobs alone",
            stacklevel=3,
        )

    def ensure(self, *keys: str) -> None:
        """Jobs ``keys`` have run (in this order when they run alone)."""
        unknown = [k for k in keys if k not in self.jobs]
        if unknown:
            raise KeyError(f"jobs {unknown} were never added")
        if not self.started:
            self.started = True
            self._start_together()
        if self.failed is None:
            return
        for key in keys:
            if key not in self.done_alone:
                worker, args = self.jobs[key]
                spawn(worker, *args)
                self.done_alone.add(key)
