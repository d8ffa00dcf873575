"""The files ``compare`` writes: ``results.json``, ``results.csv`` and ``summary.md``.

``summary.md`` has, per task, one row per (optimizer, precision) over the final runs:
the chosen lr, the test metric's mean +- sample standard deviation over the seeds that
did not diverge, time per iteration and optimizer-state bytes (absolute and as a ratio
to AdamW in the same precision), peak RSS and how many seeds diverged, with the task's
chance level and a mark on means near it; then the
learning-rate search (the validation metric of every lr tried: the grid and its extensions).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchsingd.experiments.compare import CompareConfig, Outcome, config_dict, environment
from torchsingd.experiments.compare import settings as compare_settings
from torchsingd.experiments.optimizers import OPTIMIZERS
from torchsingd.experiments.store import json_safe
from torchsingd.experiments.tasks import TASKS, chance

#: a metric that closes less than this share of the way from chance to a perfect score
#: (accuracy 1, bits/char and MSE 0) is marked "(≈ chance)": those runs learned (almost)
#: nothing and do not rank the optimizers (``--quick`` is too short for some tasks)
NEAR_CHANCE = 0.1

CSV_FIELDS = (
    "task",
    "optimizer",
    "precision",
    "phase",
    "lr",
    "seed",
    "epochs",
    "max_train",
    "data_seed",
    "status",
    "metric_name",
    "metric_split",  # "validation" (search runs) or "test" (final runs): what test_metric is
    "test_metric",
    "test_loss",
    "train_loss",
    "iterations",
    "sec_per_iter",
    "train_seconds",
    "state_bytes",
    "param_bytes",
    "peak_rss_bytes",
    "rss_scope",
    "skipped_steps",
    "threads",
    "message",
)


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _mean(values: list[float]) -> float:
    values = [v for v in values if finite(v)]
    return statistics.fmean(values) if values else math.nan


@dataclass
class Row:
    """The final runs of one (task, optimizer, precision), aggregated over seeds."""

    task: str
    optimizer: str
    precision: str
    lr: float
    runs: int
    ok: int
    diverged: int
    refused: bool
    skipped_fraction: float  # steps skipped by SINGD/KFAC (inf/NaN) / all steps
    metric_mean: float
    metric_std: float
    sec_per_iter: float
    state_bytes: float
    param_bytes: float
    peak_rss_bytes: float


def aggregate(records: list[dict[str, Any]]) -> list[Row]:
    """One :class:`Row` per (task, optimizer, precision) of ``records`` (final runs)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["task"], r["optimizer"], r["precision"]), []).append(r)
    rows = []
    for (task, optimizer, precision), runs in groups.items():
        ok = [r for r in runs if r["status"] == "ok"]
        metrics = [r["test_metric"] for r in ok]
        trained = [r for r in runs if r["status"] != "refused"]
        rows.append(
            Row(
                task,
                optimizer,
                precision,
                runs[0]["lr"],
                len(runs),
                len(ok),
                sum(r["status"] == "diverged" for r in runs),
                not trained,
                sum(r["skipped_steps"] for r in trained)
                / max(1, sum(r["iterations"] for r in trained)),
                _mean(metrics),
                statistics.stdev(metrics) if len(metrics) > 1 else math.nan,
                _mean([r["sec_per_iter"] for r in trained]),
                _mean([r["state_bytes"] for r in trained]),
                _mean([r["param_bytes"] for r in runs]),
                _mean([r["peak_rss_bytes"] for r in trained]),
            )
        )
    return rows


@functools.cache
def task_chance(task: str, data_seed: int = 0) -> float:
    """:func:`~torchsingd.experiments.tasks.chance` on ``task``'s test split."""
    return chance(TASKS[task], TASKS[task].load(data_seed))


def near_chance(task: str, value: float, chance_value: float) -> bool:
    """Whether ``value`` closes less than :data:`NEAR_CHANCE` of the way from
    ``chance_value`` to a perfect score (or is worse than chance)."""
    perfect = 1.0 if TASKS[task].higher_is_better else 0.0
    if not finite(value) or not finite(chance_value) or perfect == chance_value:
        return False
    return (value - chance_value) / (perfect - chance_value) < NEAR_CHANCE


def format_chance(task: str, value: float) -> str:
    return format_metric(TASKS[task].metric_name, value, math.nan)


def _ratio(value: float, reference: float | None) -> str:
    if reference is None or not finite(value) or not finite(reference) or reference == 0:
        return "-"
    return f"{value / reference:.2f}x"


def format_metric(name: str, mean: float, std: float) -> str:
    """``mean +- std`` (accuracy in percent)."""
    if not finite(mean):
        return "nan"
    spread = f" ± {std * 100:.1f}" if finite(std) and name == "accuracy" else ""
    if name == "accuracy":
        return f"{mean:.1%}{spread}"
    return f"{mean:.4g}" + (f" ± {std:.2g}" if finite(std) else "")


def _beyond_grid(optimizer: str, lr: float) -> str:
    """``" (+)"`` for an lr outside ``optimizer``'s grid (a search extension), else ``""``."""
    return "" if any(math.isclose(lr, g) for g in OPTIMIZERS[optimizer].grid) else " (+)"


def _lr_cell(row: Row, tried: list[float] | None = None) -> str:
    """The lr, marked ``(min)``/``(max)`` at an edge of the lrs tried (the grid and its
    extensions) and ``(+)`` when it lies outside the optimizer's grid."""
    tried = tried or list(OPTIMIZERS[row.optimizer].grid)
    edge = " (min)" if row.lr == min(tried) else " (max)" if row.lr == max(tried) else ""
    return f"{row.lr:g}{_beyond_grid(row.optimizer, row.lr)}{edge}"


def task_table(
    task: str,
    rows: list[Row],
    tried: dict[tuple, list[float]] | None = None,
    chance_value: float = math.nan,
) -> str:
    """The markdown table of one task's final runs (``tried``: the lrs searched per
    (task, optimizer, precision), for the edge marks; default the grids). With a finite
    ``chance_value`` (the test metric of a model that ignores its input) the header
    names it and a mean near it is marked (:func:`near_chance`)."""
    metric = TASKS[task].metric_name
    better = "higher" if TASKS[task].higher_is_better else "lower"
    if finite(chance_value):
        better += f" is better; chance {format_chance(task, chance_value)}"
    else:
        better += " is better"
    adamw = {r.precision: r for r in rows if r.optimizer == "adamw" and not r.refused}
    lines = [
        f"| optimizer | precision | lr | test {metric} ({better}) | "
        "time/iter | x AdamW | state | x AdamW | state/params | peak RSS | diverged |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ref = adamw.get(row.precision)
        label = OPTIMIZERS[row.optimizer].label
        if row.refused:
            lines.append(f"| {label} | {row.precision} | - | refused |" + " - |" * 7)
            continue
        if row.ok == 0:
            cell = "diverged"
        else:
            cell = format_metric(metric, row.metric_mean, row.metric_std)
            if near_chance(task, row.metric_mean, chance_value):
                cell += " (≈ chance)"
            if row.ok < row.runs:
                cell += f" ({row.ok} of {row.runs} seeds)"
        skipped = f", {row.skipped_fraction:.1%} skipped" if row.skipped_fraction else ""
        time_ratio = _ratio(row.sec_per_iter, ref and ref.sec_per_iter)
        state_ratio = _ratio(row.state_bytes, ref and ref.state_bytes)
        lines.append(
            f"| {label} | {row.precision} | "
            f"{_lr_cell(row, (tried or {}).get((row.task, row.optimizer, row.precision)))} | "
            f"{cell} | "
            f"{1e3 * row.sec_per_iter:.2f} ms | {time_ratio} | {row.state_bytes / 1024:.0f} KiB | "
            f"{state_ratio} | {_ratio(row.state_bytes, row.param_bytes)} | "
            f"{row.peak_rss_bytes / 2**20:.0f} MiB | {row.diverged}/{row.runs}{skipped} |"
        )
    return "\n".join(lines)


def search_table(task: str, records: list[dict[str, Any]], best: dict[tuple, float]) -> str:
    """The markdown table of one task's lr search (validation metric per lr tried;
    '(+)' marks an lr beyond the optimizer's grid)."""
    metric = TASKS[task].metric_name
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["task"], r["optimizer"], r["precision"]), []).append(r)
    lines = [
        f"| optimizer | precision | validation {metric} per lr | chosen lr |",
        "|---|---|---|---|",
    ]
    for group, runs in groups.items():
        cells = []
        for r in sorted(runs, key=lambda r: r["lr"]):
            if r["status"] == "ok":
                value = format_metric(metric, r["test_metric"], math.nan)
            else:
                value = r["status"]
            cells.append(f"{r['lr']:g}{_beyond_grid(group[1], r['lr'])}: {value}")
        chosen = best.get(group)
        lines.append(
            f"| {OPTIMIZERS[group[1]].label} | {group[2]} | {', '.join(cells)} | "
            f"{'-' if chosen is None else f'{chosen:g}'} |"
        )
    return "\n".join(lines)


def summary_tables(outcome: Outcome) -> str:
    """Per task: a heading, its description and the table of final runs."""
    rows = aggregate(outcome.records("final"))
    parts = []
    for task in dict.fromkeys(r.task for r in rows):
        t = TASKS[task]
        first = next(r for r in outcome.records("final") if r["task"] == task)
        span = f"{first['epochs']} epoch" + ("s" if first["epochs"] != 1 else "")
        chance_value = task_chance(task, first.get("data_seed", 0))
        mine = [r for r in rows if r.task == task]
        table = task_table(task, mine, outcome.tried_lrs(), chance_value)
        if any(r.ok and near_chance(task, r.metric_mean, chance_value) for r in mine):
            table += (
                f"\n\n(≈ chance): a mean less than {NEAR_CHANCE:.0%} of the way from chance "
                f"({format_chance(task, chance_value)}, a model that ignores its input) to a "
                "perfect score: those runs learned little and do not rank the optimizers"
                + (" (--quick runs are short)." if first.get("max_train") else ".")
            )
        parts.append(f"### {task}: {t.description}, {span}, batch {t.batch_size}\n\n{table}")
    return "\n\n".join(parts)


def summary_markdown(outcome: Outcome, config: CompareConfig, command: str) -> str:
    env = environment(config)
    s = compare_settings()
    grids = "; ".join(
        f"{name}: {', '.join(f'{lr:g}' for lr in grid)}" for name, grid in s["lr_grids"].items()
    )
    searches = outcome.records("search")
    best = outcome.best_lrs()
    timed = sorted({r.get("threads") for r in searches + outcome.records("final")} - {None})
    threads = f"{env['jobs']} job(s) x {env['threads_per_job']} torch thread(s)"
    if timed and timed != [env["threads_per_job"]]:  # runs reused from an earlier call
        threads += f" in this call; the runs were timed with {timed} thread(s) per job"
    search_parts = [
        f"### {task}\n\n" + search_table(task, [r for r in searches if r["task"] == task], best)
        for task in dict.fromkeys(r["task"] for r in searches)
    ]
    return "\n".join(
        [
            "# torchsingd compare",
            "",
            f"Command: `{command}`  ",
            f"Python {env['python']}, torch {env['torch']}, {env['platform']}, "
            f"{env['cpu_count']} CPUs; {threads}.",
            "",
            f"Seeds per setting: {config.seeds}. Learning-rate grids ({s['grid_size']} values "
            f"each, judged on a validation split of the training set, seed 0): {grids}. "
            + (
                f"A winner at an edge of the lrs tried got the next lr past it (factor ~3), "
                f"up to {config.extend_grid} beyond the grid. "
                if config.extend_grid
                else "No lr beyond the grids (--extend-grid 0). "
            )
            + f"SINGD, IKFAC and KFAC: {s['singd_settings']} (IKFAC: alpha1 0; KFAC has none).",
            "",
            "Test metric: mean ± sample std over the seeds that did not diverge. time/iter: "
            "mean training iteration (zero_grad, forward, backward, step) after 5 warm-up "
            "iterations, measured while the other jobs run; a rough cost, not a benchmark. "
            "state: bytes of every tensor the optimizer keeps; x AdamW: ratio to AdamW in the "
            "same precision. peak RSS: the run's peak resident memory (process scope if the "
            "OS cannot reset it; it includes torch and the data set). diverged: seeds whose "
            "loss became inf/NaN (or whose steps SINGD/KFAC mostly skipped), with the share "
            "of steps skipped because of inf/NaN. lr '(min)'/'(max)': the winner is at an "
            "edge of the lrs tried; '(+)': beyond the optimizer's grid. chance (in each "
            "table's header): the test metric of a model that ignores its input (accuracy "
            "1/classes; MSE of the mean training target; bits/char of the training "
            f"characters' frequencies); '(≈ chance)': a mean less than {NEAR_CHANCE:.0%} of "
            "the way from chance to a perfect score.",
            "",
            "## Results (test set)",
            "",
            summary_tables(outcome),
            "",
            "## Learning-rate search (validation set)",
            "",
            "\n\n".join(search_parts),
            "",
        ]
    )


def write_reports(outcome: Outcome, config: CompareConfig, out: Path, command: str) -> str:
    """Write ``results.json``, ``results.csv`` and ``summary.md``; return the summary."""
    out = Path(out)
    records = outcome.records("search") + outcome.records("final")
    best = outcome.best_lrs()
    lr_search = [
        {
            "task": g[0],
            "optimizer": g[1],
            "precision": g[2],
            "grid": list(OPTIMIZERS[g[1]].grid),
            "tried": sorted(s.lr for s in specs),
            "search": [
                {k: r.get(k) for k in ("lr", "status", "test_metric")}
                for r in (outcome.store.get(s.key()) for s in specs)
                if r is not None
            ],
            "best_lr": best.get(g),
        }
        for g, specs in outcome.searches.items()
    ]
    results = {
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": environment(config),
        "settings": compare_settings(),
        "config": config_dict(config),
        "lr_search": lr_search,
        "runs": records,
    }
    (out / "results.json").write_text(json.dumps(json_safe(results), indent=1) + "\n")
    with (out / "results.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            split = "validation" if r["phase"] == "search" else "test"
            writer.writerow(json_safe({**r, "metric_split": split}))
    summary = summary_markdown(outcome, config, command)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    return summary
