"""``torchsingd compare``: every optimizer on every task, searched, re-run, reported.

The plan: for each (task, optimizer, precision) the learning-rate search of
:mod:`~torchsingd.experiments.search` (the grid, extended past an edge winner up to
``extend_grid`` times), then the winner over ``seeds`` seeds. By
default (no ``--precision``) every optimizer runs in float32 on every task, and the
bfloat16 modes (``bf16-mixed``, ``bf16``) run for :data:`BF16_OPTIMIZERS` on
:data:`BF16_TASKS` (bfloat16 convolutions and attention are several times slower than
float32 on CPUs without bfloat16 units, so the convolutional tasks and the transformer
stay in float32 to keep ``make demo`` short). Naming ``--precision`` runs every
requested optimizer in every requested precision.

Runs go to ``jobs`` worker processes (each with ``threads`` torch threads), finished
runs are logged at once (:mod:`~torchsingd.experiments.store`), and a second call with
the same ``out`` only runs what is missing.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import platform
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from torchsingd.experiments.optimizers import GRID_SIZE, OPTIMIZERS, SINGD_SETTINGS
from torchsingd.experiments.runner import PRECISIONS, RunSpec, train
from torchsingd.experiments.search import EXTEND, best_lr, extension, final_specs, search_specs
from torchsingd.experiments.store import RunStore
from torchsingd.experiments.tasks import TASKS

BF16_OPTIMIZERS = ("adamw", "singd-dense", "singd-diagonal", "singd-hierarchical", "kfac")
BF16_TASKS = ("digits-mlp", "autoencoder")

Group = tuple[str, str, str]  # (task, optimizer, precision)


@dataclass(frozen=True)
class CompareConfig:
    """What ``compare`` runs. ``precisions=None`` is the default plan (module docstring);
    ``epochs=None`` each task's default (its quick default with ``quick``), and ``quick``
    also trains on the first ``Task.quick_train`` examples only. ``extend_grid``: lrs
    tried at most beyond an edge of each grid (0: the fixed grid)."""

    tasks: tuple[str, ...] = tuple(TASKS)
    optimizers: tuple[str, ...] = tuple(OPTIMIZERS)
    precisions: tuple[str, ...] | None = None
    seeds: int = 3
    epochs: int | None = None
    quick: bool = False
    jobs: int = 1
    threads: int = 1
    extend_grid: int = EXTEND

    def __post_init__(self) -> None:
        for name, values, valid in (
            ("task", self.tasks, TASKS),
            ("optimizer", self.optimizers, OPTIMIZERS),
            ("precision", self.precisions or (), PRECISIONS),
        ):
            unknown = [v for v in values if v not in valid]
            if unknown:
                raise ValueError(f"Unknown {name}(s) {unknown}; choose from {list(valid)}.")
        if self.seeds < 1 or self.jobs < 1 or self.threads < 1:
            raise ValueError("seeds, jobs and threads must be >= 1.")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}.")
        if self.extend_grid < 0:
            raise ValueError(f"extend_grid must be >= 0, got {self.extend_grid}.")

    def groups(self) -> list[Group]:
        """Every (task, optimizer, precision) of the plan, in report order."""
        out = []
        for task in self.tasks:
            for precision in self.precisions or PRECISIONS:
                for optimizer in self.optimizers:
                    default_bf16 = task in BF16_TASKS and optimizer in BF16_OPTIMIZERS
                    if self.precisions is None and precision != "float32" and not default_bf16:
                        continue
                    out.append((task, optimizer, precision))
        return out

    def epochs_of(self, task: str) -> int:
        if self.epochs is not None:
            return self.epochs
        return TASKS[task].quick_epochs if self.quick else TASKS[task].epochs

    def max_train_of(self, task: str) -> int | None:
        return TASKS[task].quick_train if self.quick else None


def environment(config: CompareConfig) -> dict[str, Any]:
    """Versions and the machine, for the report."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": multiprocessing.cpu_count(),
        "jobs": config.jobs,
        "threads_per_job": config.threads,
    }


def settings() -> dict[str, Any]:
    """The fixed hyper-parameters and the lr grids, for the report."""
    return {
        "grid_size": GRID_SIZE,
        "lr_grids": {name: list(spec.grid) for name, spec in OPTIMIZERS.items()},
        "singd_settings": SINGD_SETTINGS,
        "structures": {name: spec.structure for name, spec in OPTIMIZERS.items()},
        "batch_sizes": {name: task.batch_size for name, task in TASKS.items()},
    }


@dataclass
class Outcome:
    """The runs of one ``compare`` call: search and final specs of each group (a
    group's searches: its grid, then the lrs tried beyond it, in that order)."""

    searches: dict[Group, list[RunSpec]]
    finals: dict[Group, list[RunSpec]]
    store: RunStore

    def records(self, phase: str) -> list[dict[str, Any]]:
        """Finished records of this plan (``"search"`` or ``"final"``), in plan order."""
        specs = self.searches if phase == "search" else self.finals
        found = (self.store.get(s.key()) for group in self.searches for s in specs.get(group, []))
        return [r for r in found if r is not None]

    def best_lrs(self) -> dict[Group, float]:
        return {group: specs[0].lr for group, specs in self.finals.items()}

    def tried_lrs(self) -> dict[Group, list[float]]:
        """Every lr searched per group, ascending (the grid and its extensions)."""
        return {group: sorted(s.lr for s in specs) for group, specs in self.searches.items()}


def run_compare(
    config: CompareConfig,
    out: Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Outcome:
    """Run (or resume) the plan of ``config`` into ``out``; return what it holds.

    Finished runs already in ``out`` are not run again. ``log`` gets one line per run.
    """
    store = RunStore(out)
    searches = {
        g: search_specs(*g, config.epochs_of(g[0]), config.max_train_of(g[0]))
        for g in config.groups()
    }
    outcome = Outcome(searches, {}, store)
    ready: deque[RunSpec] = deque()
    total = [len(searches) * (GRID_SIZE + config.seeds)]
    done = [0]

    def queue_finals(group: Group) -> None:
        """Once a group's searches are in: one more lr past an edge winner (while
        allowed), else its final runs."""
        while True:
            records = [store.get(s.key()) for s in searches[group]]
            if group in outcome.finals or not all(records):
                return
            lr = extension(records, len(records) - GRID_SIZE, config.extend_grid)
            if lr is None:
                break
            spec = replace(searches[group][0], lr=lr)
            searches[group].append(spec)
            total[0] += 1
            if spec.key() not in store:
                ready.appendleft(spec)
                return
            done[0] += 1  # found in the store (a resumed call): judge again
        outcome.finals[group] = final_specs(searches[group], best_lr(records), config.seeds)
        missing = [s for s in outcome.finals[group] if s.key() not in store]
        done[0] += len(outcome.finals[group]) - len(missing)
        ready.extendleft(reversed(missing))  # next: a group's results come out together

    for group, specs in searches.items():
        for spec in specs:
            if spec.key() in store:
                done[0] += 1
            else:
                ready.append(spec)
        queue_finals(group)
    if done[0]:
        log(f"resuming from {store.path}: {done[0]} of {total[0]} runs already done")
        timed = {r.get("threads") for r in store.records.values()} - {None}
        if timed - {config.threads}:
            log(
                f"note: runs reused from {store.path} were timed with "
                f"{sorted(timed)} torch thread(s) per job (this call: {config.threads}); "
                "their ms/it are as recorded (results.csv has each run's threads)"
            )

    def finished(record: dict[str, Any]) -> None:
        store.add(record)
        done[0] += 1
        log(f"[{done[0]}/{total[0]}] {describe(record)}")
        queue_finals((record["task"], record["optimizer"], record["precision"]))

    execute(
        ready, finished, config.jobs, config.threads, progress, plan=lambda: (done[0], total[0])
    )
    return outcome


def describe(record: dict[str, Any]) -> str:
    """One line: what ran and how it ended."""
    spec = RunSpec(**{k: record[k] for k in RunSpec.__dataclass_fields__})
    what = f"{spec.phase:6s} {spec.label()}"
    if record["status"] == "refused":
        return f"{what}: refused"
    metric = record["test_metric"]
    split = "val" if spec.phase == "search" else "test"
    value = f"{metric:.4f}" if metric is not None and math.isfinite(metric) else "nan"
    status = "" if record["status"] == "ok" else f" ({record['status']})"
    return (
        f"{what}: {split} {record['metric_name']} {value}{status}, "
        f"{1e3 * record['sec_per_iter']:.2f} ms/it, {record['train_seconds']:.1f} s"
    )


def execute(
    ready: deque[RunSpec],
    finished: Callable[[dict[str, Any]], None],
    jobs: int,
    threads: int,
    progress: bool,
    run: Callable[..., dict[str, Any]] | None = None,
    plan: Callable[[], tuple[int, int]] | None = None,
) -> None:
    """Train every spec of ``ready`` (which ``finished`` may extend) and hand over records.

    ``run(spec, progress, position)`` trains one spec (a module-level function, so that
    workers can import it; default :func:`~torchsingd.experiments.runner.train`).
    ``jobs == 1`` trains in this process (whose torch threads the caller sets), with a
    bar per run; otherwise in ``jobs`` spawned worker processes with ``threads`` torch
    threads each, without bars of their own (bars drawn by several processes on one
    terminal overwrite each other and the log lines): one bar here counts the runs,
    and ``finished``'s output is written above it. ``plan()`` gives ``(runs done, runs
    planned)`` of the caller's whole plan, read after each ``finished``, for that bar
    (its total and its ETA then cover runs not queued yet, such as final runs queued once
    a search ends, and runs done before a resume); default: the runs of ``ready``.
    """
    run = train if run is None else run
    if not ready:
        return
    if jobs == 1:
        while ready:
            finished(run(ready.popleft(), progress))
        return
    context = multiprocessing.get_context("spawn")
    slots = context.Queue()
    for slot in range(jobs):
        slots.put(slot)
    pool = ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_init_worker, initargs=(threads, slots, False)
    )
    running: set[Future] = set()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        done, planned = plan() if plan is not None else (0, len(ready))
        bar = tqdm(
            total=planned,
            initial=done,
            desc=f"runs ({jobs} workers)",
            unit="run",
            dynamic_ncols=True,
        )
    try:
        while ready or running:
            while ready and len(running) < jobs:
                with _ctrl_c_ignored():  # a worker started now ignores it until it is
                    # ready (_init_worker): no traceback from its imports
                    running.add(pool.submit(_train_in_worker, run, ready.popleft()))
            completed, running = wait(running, return_when=FIRST_COMPLETED)
            for future in completed:
                record = future.result()
                if bar is None:
                    finished(record)
                    continue
                with bar.external_write_mode():
                    finished(record)
                if plan is None:  # finished may queue more
                    bar.total = bar.n + 1 + len(ready) + len(running)
                    bar.update(1)
                else:
                    done, bar.total = plan()
                    bar.update(done - bar.n)
    except KeyboardInterrupt:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()  # (one still starting ignores Ctrl-C)
        raise
    finally:
        if bar is not None:
            bar.close()
        pool.shutdown(wait=not running, cancel_futures=True)


@contextmanager
def _ctrl_c_ignored():
    """SIGINT ignored in this process meanwhile (a process spawned inherits that)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


_WORKER: dict[str, Any] = {}


def _init_worker(threads: int, slots: Any, progress: bool) -> None:
    # Ctrl-C reaches the workers too: they leave quietly (the parent reports it and
    # keeps what finished) instead of each printing a KeyboardInterrupt traceback
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    torch.set_num_threads(threads)
    _WORKER.update(position=slots.get(), progress=progress)


def _train_in_worker(run: Callable[..., dict[str, Any]], spec: Any) -> dict[str, Any]:
    return run(spec, _WORKER["progress"], _WORKER["position"])


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed (for the report)."""
    return " ".join(["torchsingd", *(sys.argv[1:] if argv is None else argv)])


def config_dict(config: CompareConfig) -> dict[str, Any]:
    return {**asdict(config), "groups": [list(g) for g in config.groups()]}
