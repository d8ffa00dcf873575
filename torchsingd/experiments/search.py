"""The learning-rate search: the same budget for every optimizer.

For each (task, optimizer, precision) every learning rate of the optimizer's grid
(:data:`~torchsingd.experiments.optimizers.GRID_SIZE` values) is trained once, with
seed :data:`SEARCH_SEED`, on the training set less a 20% validation split, for the
same epochs as the final runs. The lr with the best final validation metric wins;
runs that diverged or were refused rank last, ties go to the smaller lr (so if no lr
trains, the smallest is re-run and reported as it behaves). The winner is then
re-run on the full training set with seeds ``0 .. seeds-1`` and scored on the test set.
"""

from __future__ import annotations

import math
from typing import Any

from torchsingd.experiments.optimizers import OPTIMIZERS
from torchsingd.experiments.runner import RunSpec
from torchsingd.experiments.tasks import TASKS

SEARCH_SEED = 0


def search_specs(
    task: str,
    optimizer: str,
    precision: str,
    epochs: int,
    max_train: int | None = None,
) -> list[RunSpec]:
    """One search run per learning rate of the optimizer's grid."""
    return [
        RunSpec(task, optimizer, precision, lr, SEARCH_SEED, epochs, "search", 0, max_train)
        for lr in OPTIMIZERS[optimizer].grid
    ]


def final_specs(search: list[RunSpec], lr: float, seeds: int) -> list[RunSpec]:
    """The re-runs of the winning ``lr`` over ``seeds`` seeds, on the full training set."""
    s = search[0]
    return [
        RunSpec(s.task, s.optimizer, s.precision, lr, seed, s.epochs, "final", 0, s.max_train)
        for seed in range(seeds)
    ]


def score(record: dict[str, Any]) -> float:
    """Larger is better: the validation metric (negated when lower is better), or -inf."""
    metric = record.get("test_metric", math.nan)
    if record["status"] != "ok" or metric is None or not math.isfinite(metric):
        return -math.inf
    return metric if TASKS[record["task"]].higher_is_better else -metric


def best_lr(records: list[dict[str, Any]]) -> float:
    """The learning rate of the best search record (ties: the smaller lr)."""
    return max(records, key=lambda r: (score(r), -r["lr"]))["lr"]
