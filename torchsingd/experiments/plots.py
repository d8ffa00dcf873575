"""PNG plots of a comparison (matplotlib, Agg backend).

- ``curves_<task>.png``: test metric vs epoch and vs training seconds, one row per
  precision, one line per optimizer (mean over seeds that did not diverge, band:
  min to max);
- ``memory.png``: optimizer-state bytes relative to the parameters' bytes, per
  optimizer (SINGD structure) and task, in float32 (or the first precision that ran).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from torchsingd.experiments.optimizers import OPTIMIZERS
from torchsingd.experiments.report import aggregate
from torchsingd.experiments.tasks import TASKS


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(plt: Any) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {name: cmap(i % 10) for i, name in enumerate(OPTIMIZERS)}


def _curves(runs: list[dict[str, Any]], x_key: str) -> tuple[np.ndarray, np.ndarray]:
    """``x [E]`` (mean over seeds) and the metric ``[seeds, E]`` of runs that finished."""
    full = [r for r in runs if r["status"] == "ok" and r["history"]]
    epochs = min(len(r["history"]) for r in full)
    x = np.mean([[h[x_key] for h in r["history"][:epochs]] for r in full], axis=0)
    y = np.array([[h["test_metric"] for h in r["history"][:epochs]] for r in full])
    return x, y


def plot_curves(task: str, records: list[dict[str, Any]], path: Path, dpi: int = 80) -> Path:
    """Test metric vs epoch and vs training seconds for one task's final runs."""
    plt = _pyplot()
    colors = _colors(plt)
    precisions = list(dict.fromkeys(r["precision"] for r in records))
    fig, axes = plt.subplots(len(precisions), 2, figsize=(11, 3.6 * len(precisions)), squeeze=False)
    metric = TASKS[task].metric_name
    for row, precision in enumerate(precisions):
        by_optimizer: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            if r["precision"] == precision:
                by_optimizer.setdefault(r["optimizer"], []).append(r)
        for col, (x_key, x_label) in enumerate(
            (("epoch", "epoch"), ("seconds", "training time (s)"))
        ):
            ax = axes[row][col]
            for optimizer, runs in by_optimizer.items():
                if not any(r["status"] == "ok" and r["history"] for r in runs):
                    continue
                x, y = _curves(runs, x_key)
                color = colors[optimizer]
                label = OPTIMIZERS[optimizer].label
                ax.plot(x, y.mean(0), color=color, label=label, marker=".")
                if len(y) > 1:
                    ax.fill_between(x, y.min(0), y.max(0), color=color, alpha=0.15)
            ax.set_xlabel(x_label)
            ax.set_ylabel(f"test {metric}")
            ax.set_title(f"{task}, {precision}")
            ax.grid(alpha=0.3)
            if col == 0 and TASKS[task].higher_is_better:
                ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]))
        axes[row][1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_memory(records: list[dict[str, Any]], path: Path) -> Path:
    """Optimizer state / parameter bytes, per optimizer, grouped by task."""
    plt = _pyplot()
    rows = [r for r in aggregate(records) if not r.refused]
    precisions = list(dict.fromkeys(r.precision for r in rows))
    precision = "float32" if "float32" in precisions else precisions[0]
    rows = [r for r in rows if r.precision == precision]
    tasks = list(dict.fromkeys(r.task for r in rows))
    optimizers = [o for o in OPTIMIZERS if any(r.optimizer == o for r in rows)]
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(tasks)
    for i, task in enumerate(tasks):
        values = {r.optimizer: r.state_bytes / r.param_bytes for r in rows if r.task == task}
        xs = [j + i * width for j, o in enumerate(optimizers) if o in values]
        # markers, not bars: on the log axis a bar's length would not show its value
        ax.plot(xs, [values[o] for o in optimizers if o in values], "o", label=task)
    ax.axhline(2.0, color="black", lw=0.8, ls="--", label="AdamW (2 moments)")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(optimizers))])
    ax.set_xticklabels([OPTIMIZERS[o].label for o in optimizers], rotation=25, ha="right")
    ax.set_ylabel("optimizer state / parameter bytes")
    ax.set_yscale("log")
    ax.set_title(f"Optimizer state relative to the parameters ({precision})")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_plots(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """All plots of the final runs ``records`` into ``out``; returns their paths."""
    out = Path(out)
    trained = [r for r in records if r["status"] == "ok" and r["history"]]
    paths = [  # (a task whose every run was refused or diverged gets no empty figure)
        plot_curves(task, [r for r in records if r["task"] == task], out / f"curves_{task}.png")
        for task in dict.fromkeys(r["task"] for r in trained)
    ]
    if any(r["status"] != "refused" for r in records):
        paths.append(plot_memory(records, out / "memory.png"))
    # plots of an earlier call into the same directory (other tasks) would sit beside
    # a report that does not cover them
    for stale in [*out.glob("curves_*.png"), out / "memory.png"]:
        if stale not in paths and stale.exists():
            stale.unlink()
    return paths
