"""``torchsingd compare --sweep``: how often does each optimizer diverge on a grid?

For each task and precision, SINGD (our safeguarded default), the reference rule (the
authors' ``singd==0.0.5`` when installed, else torchsingd with ``safeguards=False``,
which equals it number for number) and AdamW train on a hyper-parameter grid:

- SINGD and the reference: ``lr`` in :data:`LR_GRID` x ``lr_cov`` in
  :data:`LR_COV_GRID`, fixed :data:`SETTINGS` (momentum 0.9, damping 1e-3, alpha1 0.5,
  weight decay 1e-4, T 5), one structure per optimizer (for both ``K`` and ``C``);
- AdamW: ``lr`` in :data:`ADAMW_GRID` (weight decay 1e-4).

The report gives, per optimizer: the fraction of grid points that diverged (status
``"diverged"`` of :mod:`~torchsingd.experiments.runner`: a non-finite test loss or
most of an epoch's steps non-finite/skipped), the best test metric and the median over
the grid, where a diverged point counts as chance (accuracy ``1/10``; for the
autoencoder the MSE of predicting the mean training image), and so does a run that ends
worse than chance (an autoencoder whose MSE exceeds the mean image's is no better than
a diverged one). With ``seeds > 1`` the best grid point of each optimizer is re-run
with further seeds (mean +- std); with ``all_seeds`` (``--all-seeds``) every grid point
is, and the best point is the one with the best mean over seeds (the median is then
over the points' means), which removes the luck of selecting on one seed. A heat map
per task and precision shows every grid point.

Tasks: ``mnist1d-sweep`` (the setting of the robustness issue: MNIST-1D, 4000 / 1000,
three convolutions 1->32->32->32 with kernels 5, 3, 3 and strides 1, 2, 2, ReLU, a
linear head; batch 100, 30 epochs; the convolutions are ``Conv2d`` over a ``1 x 40``
image so that the reference, which has no ``Conv1d``, can run the same model),
``digits-cnn`` and ``autoencoder`` (the comparison's tasks, :data:`SWEEP_EPOCHS`).
"""

from __future__ import annotations

import json
import math
import statistics
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from torchsingd import SINGD
from torchsingd.experiments import data
from torchsingd.experiments.bench import reference_cls
from torchsingd.experiments.compare import execute
from torchsingd.experiments.runner import _progress_bar, _train_loop
from torchsingd.experiments.store import RunStore, json_safe
from torchsingd.experiments.tasks import TASKS, Task, accuracy, chance
from torchsingd.optim import NonFiniteError
from torchsingd.structures import get_structure

LR_GRID = (1e-3, 3e-3, 1e-2)
LR_COV_GRID = (1e-2, 1e-1)
ADAMW_GRID = (3e-3, 1e-2, 3e-2)
SETTINGS: dict[str, Any] = {
    "momentum": 0.9,
    "damping": 1e-3,
    "alpha1": 0.5,
    "weight_decay": 1e-4,
    "T": 5,
}
STRUCTURES = ("dense", "hierarchical15_15", "diagonal")
SWEEP_PRECISIONS = ("float32", "bf16-mixed")
SWEEP_EPOCHS = {"mnist1d-sweep": 30, "digits-cnn": 20, "autoencoder": 20}
QUICK_TRAIN = 512
BASELINES = ("reference", "reference-rule", "none")
#: The structure names ``singd==0.0.5``'s optimizer accepts (ours accepts them too).
REFERENCE_STRUCTURES = (
    "dense",
    "diagonal",
    "block30diagonal",
    "hierarchical15_15",
    "triltoeplitz",
    "triutoeplitz",
)


def mnist1d_sweep_model() -> nn.Module:
    """The robustness issue's CNN: ``[B, 1, 1, 40]`` -> logits ``[B, 10]``."""
    return nn.Sequential(
        nn.Conv2d(1, 32, (1, 5)),
        nn.ReLU(),
        nn.Conv2d(32, 32, (1, 3), stride=(1, 2)),
        nn.ReLU(),
        nn.Conv2d(32, 32, (1, 3), stride=(1, 2)),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8, 10),
    )


def mnist1d_images(seed: int) -> data.Split:
    """MNIST-1D (4000 / 1000) as ``[N, 1, 1, 40]`` images."""
    s = data.mnist1d(seed, 4000, 1000)
    return data.Split(s.X_train.unsqueeze(2), s.y_train, s.X_test.unsqueeze(2), s.y_test)


MNIST1D_SWEEP = Task(
    "mnist1d-sweep",
    "3-conv CNN (strides 1, 2, 2) on MNIST-1D, the robustness issue's setting",
    mnist1d_images,
    mnist1d_sweep_model,
    F.cross_entropy,
    accuracy,
    "accuracy",
    True,
    epochs=30,
    batch_size=100,
    quick_epochs=1,
    quick_train=QUICK_TRAIN,
)
SWEEP_TASKS: dict[str, Task] = {
    "mnist1d-sweep": MNIST1D_SWEEP,
    "digits-cnn": TASKS["digits-cnn"],
    "autoencoder": TASKS["autoencoder"],
}


@dataclass(frozen=True)
class SweepSpec:
    """One run of the sweep. ``optimizer``: ``"adamw"``, ``"singd"``, ``"reference"``
    (``singd==0.0.5``) or ``"reference-rule"`` (ours with ``safeguards=False``)."""

    task: str
    optimizer: str
    structure: str | None
    precision: str
    lr: float
    lr_cov: float | None
    seed: int
    epochs: int
    max_train: int | None = None
    phase: str = "sweep"  # "sweep" (grid, seed 0) or "seeds" (further seeds)

    @classmethod
    def of(cls, record: dict[str, Any]) -> SweepSpec:
        """The spec of a run record."""
        return cls(**{k: record[k] for k in cls.__dataclass_fields__})

    def key(self) -> str:
        return "|".join(f"{k}={v}" for k, v in asdict(self).items())

    def name(self) -> str:
        """The optimizer as reported: ``singd hierarchical15_15``, ``adamw``..."""
        return self.optimizer if self.structure is None else f"{self.optimizer} {self.structure}"

    def label(self) -> str:
        cov = "" if self.lr_cov is None else f" lr_cov={self.lr_cov:g}"
        return f"{self.task} {self.name()} {self.precision} lr={self.lr:g}{cov} seed={self.seed}"


def make_optimizer(spec: SweepSpec, model: nn.Module) -> torch.optim.Optimizer:
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(
            model.parameters(), lr=spec.lr, weight_decay=SETTINGS["weight_decay"], foreach=True
        )
    kwargs = dict(SETTINGS, lr=spec.lr, lr_cov=spec.lr_cov, warn_unsupported=False)
    if spec.optimizer == "reference":
        return reference_cls()(model, structures=(spec.structure, spec.structure), **kwargs)
    if spec.optimizer == "singd":
        return SINGD(model, structures=spec.structure, **kwargs)
    # The reference rule; it raises where the reference would write NaN into the
    # weights (ours would skip the step and keep the weights finite), so that both
    # baselines diverge at the same points.
    return SINGD(model, structures=spec.structure, safeguards=False, on_nonfinite="raise", **kwargs)


def train_sweep(spec: SweepSpec, progress: bool = True, position: int | None = None) -> dict:
    """Train one grid point; the record has the spec, status, metric and safeguard counts."""
    task = SWEEP_TASKS[spec.task]
    split = task.load(0)
    X, y = split.X_train, split.y_train
    if spec.max_train is not None:
        X, y = X[: spec.max_train], y[: spec.max_train]
    torch.manual_seed(spec.seed)
    model = task.model()
    record: dict[str, Any] = {
        **asdict(spec),
        "key": spec.key(),
        "name": spec.name(),
        "metric_name": task.metric_name,
        "higher_is_better": task.higher_is_better,
        "chance": chance(task, split),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped steps and safeguards are counted instead
        opt = make_optimizer(spec, model)
        total = spec.epochs * math.ceil(len(y) / task.batch_size)
        bar = _progress_bar(spec, total, position) if progress else None  # type: ignore[arg-type]
        start = time.perf_counter()
        try:
            result = _train_loop(spec, task, model, opt, X, y, split.X_test, split.y_test, bar)  # type: ignore[arg-type]
        except NonFiniteError as err:  # the reference rule: NaN would enter the weights
            if bar is not None:
                bar.close()
            result = {"status": "diverged", "message": str(err), "history": []}
            result.update(test_loss=math.nan, test_metric=math.nan, train_loss=math.nan)
    events = dict(getattr(opt, "safeguard_events", {}))
    return {
        **record,
        **result,
        "wall_seconds": time.perf_counter() - start,
        "skipped_steps": getattr(opt, "skipped_steps", 0),
        "safeguard_events": events,
    }


@dataclass(frozen=True)
class SweepConfig:
    tasks: tuple[str, ...] = tuple(SWEEP_TASKS)
    structures: tuple[str, ...] = STRUCTURES
    precisions: tuple[str, ...] = SWEEP_PRECISIONS
    seeds: int = 1
    all_seeds: bool = False  # every grid point over ``seeds`` seeds, best by the mean
    epochs: int | None = None
    quick: bool = False
    jobs: int = 1
    threads: int = 1
    baseline: str = "reference"  # or "reference-rule", or "none" (SINGD and AdamW only)

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in SWEEP_TASKS]
        if unknown:
            raise ValueError(f"Unknown sweep task(s) {unknown}; choose from {list(SWEEP_TASKS)}.")
        bad = [p for p in self.precisions if p not in SWEEP_PRECISIONS]
        if bad:
            raise ValueError(f"Unknown precision(s) {bad}; choose from {list(SWEEP_PRECISIONS)}.")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}.")
        if self.seeds < 1 or self.jobs < 1 or self.threads < 1:
            raise ValueError("seeds, jobs and threads must be >= 1.")
        if self.all_seeds and self.seeds < 2:
            raise ValueError("--all-seeds needs --seeds N with N >= 2 (the seeds per point).")
        for structure in self.structures:
            get_structure(structure)  # a ValueError listing the valid names
            if self.baseline == "reference" and structure not in REFERENCE_STRUCTURES:
                raise ValueError(
                    f"The reference has no structure {structure!r}; with --baseline "
                    f"reference use one of {REFERENCE_STRUCTURES}."
                )

    def epochs_of(self, task: str) -> int:
        if self.epochs is not None:
            return self.epochs
        return 1 if self.quick else SWEEP_EPOCHS[task]

    def grid(self) -> list[SweepSpec]:
        """Every grid point (seed 0), in report order."""
        specs = []
        for task in self.tasks:
            base = dict(
                task=task,
                seed=0,
                epochs=self.epochs_of(task),
                max_train=QUICK_TRAIN if self.quick else None,
            )
            for precision in self.precisions:
                for lr in ADAMW_GRID:
                    specs.append(
                        SweepSpec(
                            optimizer="adamw",
                            structure=None,
                            precision=precision,
                            lr=lr,
                            lr_cov=None,
                            **base,
                        )
                    )
                optimizers = ("singd",) if self.baseline == "none" else ("singd", self.baseline)
                for optimizer in optimizers:
                    for structure in self.structures:
                        for lr in LR_GRID:
                            for lr_cov in LR_COV_GRID:
                                specs.append(
                                    SweepSpec(
                                        optimizer=optimizer,
                                        structure=structure,
                                        precision=precision,
                                        lr=lr,
                                        lr_cov=lr_cov,
                                        **base,
                                    )
                                )
        return specs


Cell = tuple[str, str, str]  # (task, precision, optimizer name)


def _value(record: dict[str, Any]) -> float:
    """The test metric, or chance for a diverged (or non-finite) run or one that ended
    worse than chance."""
    value = record["test_metric"]
    if record["status"] != "ok" or value is None or not math.isfinite(value):
        return record["chance"]
    worse = value < record["chance"] if record["higher_is_better"] else value > record["chance"]
    return record["chance"] if worse else value


def _better(record: dict[str, Any]) -> float:
    """A sort key: larger is better."""
    return _value(record) if record["higher_is_better"] else -_value(record)


def best_points(grid: list[dict[str, Any]]) -> dict[Cell, dict[str, Any]]:
    """The best grid record of each (task, precision, optimizer)."""
    out: dict[Cell, dict[str, Any]] = {}
    for r in grid:
        cell = (r["task"], r["precision"], r["name"])
        if cell not in out or _better(r) > _better(out[cell]):
            out[cell] = r
    return out


def run_sweep(config: SweepConfig, out: Path, progress: bool = True, log=print) -> list[dict]:
    """Run (or resume) the sweep into ``out``; return every record of the plan."""
    store = RunStore(out)
    grid = config.grid()
    ready = deque(s for s in grid if s.key() not in store)
    seeds_specs: list[SweepSpec] = []
    cells = {(s.task, s.precision, s.name()) for s in grid}
    repeats = len(grid) if config.all_seeds else len(cells)
    total = len(grid) + (config.seeds - 1) * repeats
    done = [len(grid) - len(ready)]
    if done[0]:
        log(f"resuming from {store.path}: {done[0]} grid runs already done")

    def finished(record: dict[str, Any]) -> None:
        store.add(record)
        done[0] += 1
        log(f"[{done[0]}/{total}] {describe(record)}")

    def plan() -> tuple[int, int]:
        return done[0], total

    execute(ready, finished, config.jobs, config.threads, progress, train_sweep, plan)
    if config.seeds > 1:
        if config.all_seeds:
            repeated = grid
        else:
            best = best_points([store.get(s.key()) for s in grid])
            repeated = [SweepSpec.of(r) for r in best.values()]
        for spec in repeated:
            for seed in range(1, config.seeds):
                seeds_specs.append(replace(spec, seed=seed, phase="seeds"))
        ready = deque(s for s in seeds_specs if s.key() not in store)
        done[0] += len(seeds_specs) - len(ready)
        execute(ready, finished, config.jobs, config.threads, progress, train_sweep, plan)
    return [store.get(s.key()) for s in grid + seeds_specs]


def describe(record: dict[str, Any]) -> str:
    value = record["test_metric"]
    shown = f"{value:.4f}" if value is not None and math.isfinite(value) else "nan"
    status = "" if record["status"] == "ok" else f" ({record['status']})"
    events = {k: v for k, v in record.get("safeguard_events", {}).items() if v}
    guard = f", safeguards {events}" if events else ""
    spec = SweepSpec.of(record)
    seconds = f"{record['wall_seconds']:.0f} s"
    return f"{spec.label()}: {record['metric_name']} {shown}{status}{guard}, {seconds}"


@dataclass
class Row:
    task: str
    precision: str
    name: str
    points: int
    diverged: int
    best: float
    best_std: float | None
    best_seeds: int
    best_at: str
    median: float
    metric_name: str
    chance: float = math.nan


def _point(record: dict[str, Any]) -> tuple:
    return (record["task"], record["precision"], record["name"], record["lr"], record["lr_cov"])


def _runs_by_point(records: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """The runs of each grid point, its seed-0 grid run first."""
    runs: dict[tuple, list[dict[str, Any]]] = {}
    for phase in ("sweep", "seeds"):
        for r in records:
            if r["phase"] == phase:
                runs.setdefault(_point(r), []).append(r)
    return runs


def _counted_runs(runs: dict[tuple, list], all_seeds: bool) -> dict[tuple, list]:
    """Of :func:`_runs_by_point`'s runs, those that make each grid point's value: all
    its seeds with ``all_seeds``, else its seed-0 grid run alone."""
    return {p: rs if all_seeds else rs[:1] for p, rs in runs.items()}


def _mean_value(runs: list[dict[str, Any]]) -> float:
    return statistics.mean(_value(r) for r in runs)


def summarize(records: list[dict[str, Any]], all_seeds: bool = False) -> list[Row]:
    """One row per (task, precision, optimizer).

    Without ``all_seeds`` the best point is the best on seed 0 (its further seeds
    give mean +- std) and the median is over the seed-0 grid; with it, every point's
    value is its mean over the seeds, the best point the best mean and the median
    over the means. A point counts as diverged when any of its runs diverged.
    """
    grid = [r for r in records if r["phase"] == "sweep"]
    runs = _runs_by_point(records)
    counted = _counted_runs(runs, all_seeds)

    def score(point: tuple) -> float:  # larger is better
        mean = _mean_value(counted[point])
        return mean if counted[point][0]["higher_is_better"] else -mean

    rows = []
    for cell in dict.fromkeys((r["task"], r["precision"], r["name"]) for r in grid):
        points = [p for p in dict.fromkeys(map(_point, grid)) if p[:3] == cell]
        top = max(points, key=score)
        values = [_value(r) for r in runs[top]]
        first = runs[top][0]
        cov = "" if first["lr_cov"] is None else f", lr_cov={first['lr_cov']:g}"
        at = f"lr={first['lr']:g}{cov}"
        rows.append(
            Row(
                task=cell[0],
                precision=cell[1],
                name=cell[2],
                points=len(points),
                diverged=sum(any(r["status"] == "diverged" for r in counted[p]) for p in points),
                best=statistics.mean(values),
                best_std=statistics.stdev(values) if len(values) > 1 else None,
                best_seeds=len(values),
                best_at=at,
                median=statistics.median(_mean_value(counted[p]) for p in points),
                metric_name=first["metric_name"],
                chance=first["chance"],
            )
        )
    return rows


def sweep_table(rows: list[Row]) -> str:
    """Markdown tables, one per task and precision."""
    lines: list[str] = []
    for task, precision in dict.fromkeys((r.task, r.precision) for r in rows):
        mine = [r for r in rows if (r.task, r.precision) == (task, precision)]
        metric = mine[0].metric_name
        lines += [
            f"### {task}, {precision}",
            "",
            f"| optimizer | diverged | best {metric} | at | median {metric} over the grid |",
            "|---|---|---|---|---|",
        ]
        for r in mine:
            best = f"{r.best:.4f}" + (" (chance)" if r.best == r.chance else "")
            if r.best_std is not None:
                best += f" +- {r.best_std:.4f} ({r.best_seeds} seeds)"
            median = f"{r.median:.4f}" + (" (chance)" if r.median == r.chance else "")
            lines.append(
                f"| {r.name} | {r.diverged}/{r.points} | {best} | {r.best_at} | {median} |"
            )
        lines.append("")
        at_chance = [r.name for r in mine if r.best == r.chance]
        if at_chance:
            lines += [
                f"No grid point of {', '.join(at_chance)} did better than chance "
                f"({mine[0].chance:.4f}, what a diverged run counts as): too short a run "
                "to compare (e.g. --quick) or a grid that misses the working range.",
                "",
            ]
    return "\n".join(lines)


def plot_heatmaps(records: list[dict[str, Any]], out: Path, all_seeds: bool = False) -> list[Path]:
    """``sweep_<task>_<precision>.png``: the test metric of every grid point (x: diverged;
    with ``all_seeds`` the mean over the seeds, x: any seed diverged)."""
    from torchsingd.experiments.plots import _pyplot

    plt = _pyplot()
    grid = [r for r in records if r["phase"] == "sweep"]
    counted = _counted_runs(_runs_by_point(records), all_seeds)

    def value(r: dict[str, Any]) -> float:
        return _mean_value(counted[_point(r)])

    def label(r: dict[str, Any]) -> str:
        mine = counted[_point(r)]
        diverged = sum(x["status"] == "diverged" for x in mine)
        if diverged == len(mine):
            return "x"
        return f"{value(r):.3f}" + (f"\n{diverged}/{len(mine)} x" if diverged else "")

    paths = []
    for task, precision in dict.fromkeys((r["task"], r["precision"]) for r in grid):
        mine = [r for r in grid if (r["task"], r["precision"]) == (task, precision)]
        names = list(dict.fromkeys(r["name"] for r in mine))
        higher = mine[0]["higher_is_better"]
        values = [value(r) for r in mine]
        vmin, vmax = min(values), max(values)
        cmap = "viridis" if higher else "viridis_r"
        fig, axes = plt.subplots(1, len(names), figsize=(2.3 * len(names) + 1, 3.2), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            points = [r for r in mine if r["name"] == name]
            lrs = sorted({r["lr"] for r in points})
            covs = sorted({r["lr_cov"] for r in points if r["lr_cov"] is not None}) or [None]
            image = [[math.nan] * len(covs) for _ in lrs]
            for r in points:
                i, j = lrs.index(r["lr"]), covs.index(r["lr_cov"])
                image[i][j] = value(r)
                text = label(r)
                # (all equal: imshow paints the colour map's low end, dark for viridis)
                shade = (value(r) - vmin) / (vmax - vmin) if vmax > vmin else 0.0
                dark = shade < 0.5 if higher else shade > 0.5
                color = "white" if dark else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
            ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
            ax.set_title(name, fontsize=9)
            ax.set_yticks(range(len(lrs)), [f"{v:g}" for v in lrs])
            ax.set_xticks(range(len(covs)), ["-" if c is None else f"{c:g}" for c in covs])
            ax.set_xlabel("lr_cov")
            ax.set_ylabel("lr")  # each panel: the optimizers' lr grids differ
        seeds = "mean over seeds, " if all_seeds else ""
        fig.suptitle(
            f"{task}, {precision}: test {mine[0]['metric_name']} ({seeds}x = diverged)",
            fontsize=10,
        )
        fig.tight_layout()
        path = out / f"sweep_{task}_{precision}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    for stale in out.glob("sweep_*.png"):  # an earlier call's, not covered by sweep.md
        if stale not in paths:
            stale.unlink()
    return paths


def write_sweep_report(
    records: list[dict[str, Any]], config: SweepConfig, out: Path, command: str
) -> str:
    """``sweep.md`` and ``sweep.json`` (rows and settings); returns the tables."""
    rows = summarize(records, config.all_seeds)
    tables = sweep_table(rows)
    if config.all_seeds:
        how = (
            f"Every grid point ran {config.seeds} seeds: best = the point with the best "
            "mean over them (mean +- std), median over the points' means; a point counts "
            "as diverged when any of its runs diverged."
        )
    else:
        how = (
            "Best = the best point on seed 0 (with further seeds: mean +- std over them); "
            "median over the seed-0 grid."
        )
    text = "\n".join(
        [
            "# Robustness sweep",
            "",
            f"Command: `{command}`",
            "",
            f"SINGD / reference grid: lr {list(LR_GRID)} x lr_cov {list(LR_COV_GRID)}, "
            f"settings {SETTINGS}; AdamW lr {list(ADAMW_GRID)}. A diverged run, or one "
            "that ends worse than chance, counts as chance. `singd` is torchsingd's "
            f"default (safeguards on); the baseline is `{config.baseline}`. {how}",
            "",
            tables,
        ]
    )
    (out / "sweep.md").write_text(text, encoding="utf-8")
    (out / "sweep.json").write_text(
        json.dumps(
            json_safe(
                {"config": asdict(config), "command": command, "rows": [asdict(r) for r in rows]}
            ),
            indent=1,
        ),
        encoding="utf-8",
    )
    return tables
