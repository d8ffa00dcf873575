"""The learning-rate search: the same budget for every optimizer.

For each (task, optimizer, precision) every learning rate of the optimizer's grid
(:data:`~torchsingd.experiments.optimizers.GRID_SIZE` values) is trained once, with
seed :data:`SEARCH_SEED`, on the training set less a 20% validation split, for the
same epochs as the final runs. The lr with the best final validation metric wins;
runs that diverged or were refused rank last, ties go to the smaller lr (so if no lr
trains, the smallest is re-run and reported as it behaves). The winner is then
re-run on the full training set with seeds ``0 .. seeds-1`` and scored on the test set.

A winner at an edge of the lrs tried says the best lr may lie beyond the grid (a grid
centred for other tasks is too low for one whose best step is larger): the search then
tries the next lr past that edge (:func:`next_lr`, a factor ~3) and judges again, up to
``extend`` times per (task, optimizer, precision) (:func:`extension`; ``compare
--extend-grid``, default :data:`EXTEND`). It extends downwards only when the smallest
lr is strictly better than the next one (a tie, or no lr that trains, stops there).
"""

from __future__ import annotations

import math
from typing import Any

from torchsingd.experiments.optimizers import OPTIMIZERS
from torchsingd.experiments.runner import RunSpec
from torchsingd.experiments.tasks import TASKS

SEARCH_SEED = 0
EXTEND = 2  # at most this many lrs beyond the grid per (task, optimizer, precision)


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


def next_lr(lr: float, up: bool) -> float:
    """The neighbour of ``lr`` on the ladder 1, 3, 10, 30, ... (x 10**k): 0.01 -> 0.03
    -> 0.1 upwards, 0.003 -> 0.001 -> 0.0003 downwards; off the ladder a factor 3."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = lr / 10.0**exponent
    if math.isclose(mantissa, 1.0, rel_tol=1e-6):
        value = (3.0 if up else 0.3) * 10.0**exponent
    elif math.isclose(mantissa, 3.0, rel_tol=1e-6):
        value = (10.0 if up else 1.0) * 10.0**exponent
    else:
        value = lr * 3.0 if up else lr / 3.0
    return float(f"{value:.6g}")  # 0.03, not 0.030000000000000002


def extension(records: list[dict[str, Any]], extended: int, extend: int = EXTEND) -> float | None:
    """The lr to try next, or None: past the top when the best of ``records`` has the
    largest lr, past the bottom when it has the smallest and is strictly better than the
    next one; none when ``extended`` lrs were added already or none trained."""
    if extended >= extend or len(records) < 2:
        return None
    ranked = sorted(records, key=lambda r: r["lr"])
    best = best_lr(records)
    if score(next(r for r in ranked if r["lr"] == best)) == -math.inf:
        return None
    if best == ranked[-1]["lr"]:
        return next_lr(best, up=True)
    if best == ranked[0]["lr"] and score(ranked[0]) > score(ranked[1]):
        return next_lr(best, up=False)
    return None
