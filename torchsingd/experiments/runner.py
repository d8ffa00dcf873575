"""Train one configuration (task, optimizer, precision, lr, seed) and measure it.

Precision modes:

- ``float32``: everything in float32.
- ``bf16-mixed``: ``torch.autocast("cpu", dtype=torch.bfloat16)`` around forward and
  loss; parameters, gradients and optimizer state stay float32.
- ``bf16``: model, gradients and optimizer state in bfloat16 (``model.to(bfloat16)``;
  SINGD's factors take the weight's dtype; KFAC refuses bfloat16 factors, which is
  recorded as ``status="refused"``). Model outputs are cast to float32 for the loss.

A run is *diverged* when a test/validation loss is not finite, or when more than half
of an epoch's steps had a non-finite loss or were skipped by SINGD/KFAC because of
inf/NaN; training stops there.

Peak memory: on Linux the process's peak RSS is reset before each run
(``/proc/self/clear_refs``), so ``peak_rss_bytes`` is the run's own peak
(``rss_scope="run"``); elsewhere it is the peak of the whole process so far
(``rss_scope="process"``).
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from torchsingd.experiments.data import Split, validation_split
from torchsingd.experiments.optimizers import OPTIMIZERS, skipped_steps, state_bytes
from torchsingd.experiments.tasks import TASKS, Task, evaluate

PRECISIONS = ("float32", "bf16-mixed", "bf16")
PHASES = ("search", "final")
WARMUP_ITERATIONS = 5  # excluded from the time per iteration


@dataclass(frozen=True)
class RunSpec:
    """One training run.

    ``phase="search"`` trains on the training set less a 20% validation split and
    reports the validation set as ``test_*``; ``"final"`` trains on the whole training
    set and reports the test set. ``seed`` fixes the initialisation and the data
    order (the same for every optimizer); ``data_seed`` the train/test split.
    ``max_train`` truncates the training set (``--quick``).
    """

    task: str
    optimizer: str
    precision: str
    lr: float
    seed: int
    epochs: int
    phase: str = "final"
    data_seed: int = 0
    max_train: int | None = None

    def key(self) -> str:
        """A unique, stable name of this run (used to resume)."""
        return "|".join(f"{k}={v}" for k, v in asdict(self).items())

    def label(self) -> str:
        return f"{self.task} {self.optimizer} {self.precision} lr={self.lr:g} seed={self.seed}"


def validate(spec: RunSpec) -> None:
    """Raise ``ValueError`` naming the bad field of ``spec``."""
    for field, value, valid in (
        ("task", spec.task, TASKS),
        ("optimizer", spec.optimizer, OPTIMIZERS),
        ("precision", spec.precision, PRECISIONS),
        ("phase", spec.phase, PHASES),
    ):
        if value not in valid:
            raise ValueError(f"Unknown {field} {value!r}; choose one of {sorted(valid)}.")
    if not spec.lr > 0 or spec.epochs < 1:
        raise ValueError(f"Need lr > 0 and epochs >= 1, got lr={spec.lr}, epochs={spec.epochs}.")


def run_data(spec: RunSpec) -> Split:
    """The run's training set and its evaluation set (test, or validation when searching)."""
    split = TASKS[spec.task].load(spec.data_seed)
    if spec.phase == "search":
        split = validation_split(split.X_train, split.y_train)
    if spec.max_train is not None:
        n = spec.max_train
        split = Split(split.X_train[:n], split.y_train[:n], split.X_test, split.y_test)
    return split


def precision_context(precision: str) -> contextlib.AbstractContextManager:
    """Autocast for ``bf16-mixed``, nothing otherwise."""
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _reset_peak_rss() -> str:
    """Reset the process's peak RSS where the OS allows it; return the scope measured."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return "process"
    return "run"


def peak_rss_bytes() -> int:
    """The process's peak RSS in bytes (since :func:`_reset_peak_rss`): on Linux the
    high-water mark of ``/proc/self/status`` (what ``clear_refs`` resets; ``ru_maxrss``
    is never reset, and in a spawned worker includes the parent's size at the fork)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    perm = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield perm[start : start + batch_size]


def train(spec: RunSpec, progress: bool = True, position: int | None = None) -> dict[str, Any]:
    """Train ``spec`` and return its record (one line of ``runs.jsonl``).

    ``progress`` shows a tqdm bar (at terminal line ``position``, for parallel workers).

    The record holds the spec, ``status`` (``"ok"``, ``"diverged"`` or ``"refused"``,
    with ``message``), a per-epoch ``history`` (train loss, test loss and metric,
    cumulative training seconds), the final test loss and metric, ``sec_per_iter``,
    ``state_bytes``, ``param_bytes``, ``peak_rss_bytes`` and ``skipped_steps``.
    """
    validate(spec)
    task = TASKS[spec.task]
    split = run_data(spec)
    dtype = torch.bfloat16 if spec.precision == "bf16" else torch.float32

    def cast(x: Tensor) -> Tensor:
        return x.to(dtype) if x.is_floating_point() else x

    X, y, X_eval, y_eval = (cast(split.X_train), split.y_train, cast(split.X_test), split.y_test)
    rss_scope = _reset_peak_rss()
    torch.manual_seed(spec.seed)
    model = task.model().to(dtype)
    record: dict[str, Any] = {
        **asdict(spec),
        "key": spec.key(),
        "metric_name": task.metric_name,
        "param_bytes": sum(p.nbytes for p in model.parameters()),
        "rss_scope": rss_scope,
        "threads": torch.get_num_threads(),
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            opt = OPTIMIZERS[spec.optimizer].make(model, spec.lr, loss_average=task.loss_average)
    except ValueError as err:
        return {**record, "status": "refused", "message": str(err), "history": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # skipped steps are counted instead
        total = spec.epochs * math.ceil(len(y) / task.batch_size)
        bar = _progress_bar(spec, total, position) if progress else None
        result = _train_loop(spec, task, model, opt, X, y, X_eval, y_eval, bar)
    return {
        **record,
        **result,
        "state_bytes": state_bytes(opt),
        "skipped_steps": skipped_steps(opt),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _train_loop(
    spec: RunSpec,
    task: Task,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    X: Tensor,
    y: Tensor,
    X_eval: Tensor,
    y_eval: Tensor,
    bar: Any,
) -> dict[str, Any]:
    """Epochs of (zero_grad, forward, loss, backward, step), then evaluation."""
    generator = torch.Generator().manual_seed(spec.seed)
    steps_per_epoch = math.ceil(len(y) / task.batch_size)
    history: list[dict[str, float]] = []
    iterations, timed_iterations, timed_seconds, train_seconds = 0, 0, 0.0, 0.0
    status, message = "ok", ""
    for epoch in range(1, spec.epochs + 1):
        model.train()
        losses, bad_steps = [], 0
        for idx in _batches(len(y), task.batch_size, generator):
            skipped_before = skipped_steps(opt)
            start = time.perf_counter()
            opt.zero_grad()
            with precision_context(spec.precision):
                loss = task.loss(model(X[idx]).float(), y[idx])
            loss.backward()
            opt.step()
            value = loss.item()
            seconds = time.perf_counter() - start
            train_seconds += seconds
            if iterations >= WARMUP_ITERATIONS:
                timed_seconds += seconds
                timed_iterations += 1
            iterations += 1
            if math.isfinite(value):
                losses.append(value)
            if not math.isfinite(value) or skipped_steps(opt) > skipped_before:
                bad_steps += 1
            if bar is not None:
                bar.set_postfix(epoch=epoch, loss=f"{value:.4f}", refresh=False)
                bar.update()
        model.eval()
        with precision_context(spec.precision):
            test_loss, test_metric = evaluate(task, model, X_eval, y_eval)
        train_loss = sum(losses) / len(losses) if losses else float("nan")
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "test_loss": test_loss,
                "test_metric": test_metric,
                "seconds": train_seconds,
            }
        )
        if not math.isfinite(test_loss) or 2 * bad_steps > steps_per_epoch:
            status = "diverged"
            message = (
                f"epoch {epoch}: test loss {test_loss}, {bad_steps} of {steps_per_epoch} steps "
                "with a non-finite loss or skipped"
            )
            break
    if bar is not None:
        bar.close()
    last = history[-1]
    return {
        "status": status,
        "message": message,
        "history": history,
        "train_loss": last["train_loss"],
        "test_loss": last["test_loss"],
        "test_metric": last["test_metric"],
        "iterations": iterations,
        "sec_per_iter": timed_seconds / timed_iterations if timed_iterations else float("nan"),
        "train_seconds": train_seconds,
    }


def _progress_bar(spec: RunSpec, total: int, position: int | None) -> Any:
    """A tqdm bar named by task, optimizer, precision, lr (and a sweep's lr_cov), seed."""
    from tqdm.auto import tqdm

    lr_cov = getattr(spec, "lr_cov", None)
    desc = f"{spec.task} {spec.optimizer} {spec.precision} lr {spec.lr:g}"
    desc += "" if lr_cov is None else f" lr_cov {lr_cov:g}"
    desc += f" seed {spec.seed}" + (" (lr search)" if spec.phase == "search" else "")
    return tqdm(
        total=total, desc=desc, unit="it", leave=False, dynamic_ncols=True, position=position
    )
