"""``torchsingd compare --sweep``: a tiny end-to-end sweep, resume, the summary
statistics on synthetic records, the report files and the command line."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from torchsingd import cli
from torchsingd.experiments import sweep
from torchsingd.experiments.sweep import (
    ADAMW_GRID,
    LR_COV_GRID,
    LR_GRID,
    SweepConfig,
    best_points,
    plot_heatmaps,
    run_sweep,
    summarize,
    sweep_table,
    write_sweep_report,
)
from torchsingd.experiments.tasks import TASKS

CONFIG = SweepConfig(
    tasks=("digits-cnn",),
    structures=("diagonal",),
    precisions=("float32",),
    quick=True,
    epochs=1,
    baseline="reference-rule",
    seeds=2,
)
NAMES = ("adamw", "singd diagonal", "reference-rule diagonal")
PNG = b"\x89PNG\r\n\x1a\n"


class Counting:
    """Wraps ``sweep.train_sweep`` to record the specs actually trained."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.specs: list[sweep.SweepSpec] = []
        original = sweep.train_sweep

        def train(spec, *args, **kwargs):
            self.specs.append(spec)
            return original(spec, *args, **kwargs)

        mp.setattr(sweep, "train_sweep", train)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def counted_sweep(config: SweepConfig, out: Path, log=lambda s: None):
    """``run_sweep`` with one torch thread; returns its records and the specs trained."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            trained = Counting(mp)
            records = run_sweep(config, out, progress=False, log=log)
    finally:
        torch.set_num_threads(threads)
    return records, trained.specs


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    records, first = counted_sweep(CONFIG, out)
    logged: list[str] = []
    again, second = counted_sweep(CONFIG, out, logged.append)
    return out, records, first, again, second, logged


# ----------------------------------------------------------------- end to end
def test_sweep_runs_the_grid_then_the_best_points_with_more_seeds(swept):
    out, records, trained, *_ = swept
    grid = [r for r in records if r["phase"] == "sweep"]
    seeds = [r for r in records if r["phase"] == "seeds"]
    assert len(records) == len(trained) == 18 == len(lines(out / "runs.jsonl"))
    assert len(grid) == 15 and len(seeds) == 3
    by_name = {n: [r for r in grid if r["name"] == n] for n in NAMES}
    assert {n: len(v) for n, v in by_name.items()} == dict(zip(NAMES, (3, 6, 6), strict=True))
    assert sorted(r["lr"] for r in by_name["adamw"]) == sorted(ADAMW_GRID)
    assert all(r["lr_cov"] is None and r["structure"] is None for r in by_name["adamw"])
    for name in NAMES[1:]:
        assert {(r["lr"], r["lr_cov"]) for r in by_name[name]} == {
            (lr, c) for lr in LR_GRID for c in LR_COV_GRID
        }
    for r in records:
        assert r["task"] == "digits-cnn" and r["precision"] == "float32"
        assert r["epochs"] == 1 and r["max_train"] == sweep.QUICK_TRAIN
        assert r["status"] in ("ok", "diverged")
        assert r["chance"] == pytest.approx(0.1)
        assert r["metric_name"] == "accuracy" and r["higher_is_better"] is True
    assert all(r["seed"] == 0 for r in grid)
    # the reference rule never uses the safeguards; SINGD counts its events
    events = {"kl_clipped", "factor_step_bounded", "factor_repaired"}
    for r in by_name["reference-rule diagonal"]:
        assert r["safeguard_events"] == dict.fromkeys(events, 0)
    for r in by_name["singd diagonal"]:
        assert set(r["safeguard_events"]) == events
    # one seed-1 re-run of each optimizer's best grid point
    best = best_points(grid)
    assert {r["name"] for r in seeds} == set(NAMES)
    for r in seeds:
        top = best[("digits-cnn", "float32", r["name"])]
        assert r["seed"] == 1 and (r["lr"], r["lr_cov"]) == (top["lr"], top["lr_cov"])
    assert [(s.optimizer, s.phase) for s in trained[-3:]] == [
        ("adamw", "seeds"),
        ("singd", "seeds"),
        ("reference-rule", "seeds"),
    ]


def test_sweep_resumes_without_training_again(swept):
    out, records, _, again, retrained, logged = swept
    assert retrained == []
    assert len(lines(out / "runs.jsonl")) == 18
    assert [r["key"] for r in again] == [r["key"] for r in records]
    assert any("15 grid runs already done" in line for line in logged)


def test_sweep_report_and_heatmaps(swept, tmp_path):
    _, records, *_ = swept
    tables = write_sweep_report(records, CONFIG, tmp_path, "torchsingd compare --sweep")
    text = (tmp_path / "sweep.md").read_text()
    assert tables in text and "reference-rule" in text
    for name in NAMES:
        assert f"| {name} |" in text
    assert "### digits-cnn, float32" in text
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert report["config"]["baseline"] == "reference-rule"
    assert report["config"]["seeds"] == 2
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == set(NAMES)
    assert {n: r["points"] for n, r in rows.items()} == dict(zip(NAMES, (3, 6, 6), strict=True))
    assert all(r["best_seeds"] == 2 for r in rows.values())
    grid = [r for r in records if r["phase"] == "sweep"]
    for name, row in rows.items():
        points = [r for r in grid if r["name"] == name]
        assert row["diverged"] == sum(r["status"] == "diverged" for r in points)
        assert row["median"] == pytest.approx(statistics.median(sweep._value(r) for r in points))

    (tmp_path / "sweep_autoencoder_float32.png").write_bytes(b"an earlier call's")
    paths = plot_heatmaps(records, tmp_path)
    assert paths == [tmp_path / "sweep_digits-cnn_float32.png"]
    assert paths[0].read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["sweep_digits-cnn_float32.png"]


# ----------------------------------------------------- summary on synthetic data
def record(name, lr, lr_cov, value, status="ok", phase="sweep", task="t", higher=True, chance=0.1):
    return {
        "task": task,
        "precision": "float32",
        "name": name,
        "phase": phase,
        "status": status,
        "test_metric": value,
        "chance": chance,
        "higher_is_better": higher,
        "lr": lr,
        "lr_cov": lr_cov,
        "metric_name": "accuracy" if higher else "mse",
    }


def test_value_is_chance_for_diverged_or_non_finite():
    assert sweep._value(record("a", 1, None, 0.7)) == 0.7
    assert sweep._value(record("a", 1, None, 0.7, status="diverged")) == 0.1
    assert sweep._value(record("a", 1, None, math.nan)) == 0.1
    assert sweep._value(record("a", 1, None, math.inf)) == 0.1
    assert sweep._value(record("a", 1, None, None)) == 0.1


def test_value_worse_than_chance_counts_as_chance():
    assert sweep._value(record("a", 1, None, 0.05)) == 0.1  # accuracy below 1/10
    assert sweep._value(record("a", 1, None, 0.1)) == 0.1
    mse = dict(task="ae", higher=False, chance=1.0)
    assert sweep._value(record("a", 1, None, 0.5, **mse)) == 0.5
    assert sweep._value(record("a", 1, None, 3.0, **mse)) == 1.0  # worse than the mean image


def test_summarize_all_seeds_best_by_mean():
    """With ``all_seeds`` the best point is the best mean over seeds (not the best seed
    0), the median is over the points' means and a point with any diverged run counts
    as diverged."""
    records = [
        record("s", 1e-3, 0.1, 0.95),  # best on seed 0, poor mean
        record("s", 1e-3, 0.1, 0.5, phase="seeds"),
        record("s", 1e-3, 0.1, 0.6, phase="seeds"),
        record("s", 1e-2, 0.1, 0.9),  # best mean
        record("s", 1e-2, 0.1, 0.92, phase="seeds"),
        record("s", 1e-2, 0.1, 0.88, phase="seeds"),
        record("s", 3e-2, 0.1, 0.8),  # one seed diverged: counts chance for that seed
        record("s", 3e-2, 0.1, math.nan, status="diverged", phase="seeds"),
        record("s", 3e-2, 0.1, 0.8, phase="seeds"),
    ]
    (row,) = summarize(records, all_seeds=True)
    assert row.best_at == "lr=0.01, lr_cov=0.1" and row.best_seeds == 3
    assert row.best == pytest.approx(0.9) and row.best_std == pytest.approx(0.02)
    assert (row.points, row.diverged) == (3, 1)
    assert row.median == pytest.approx((0.95 + 0.5 + 0.6) / 3)  # of 0.683, 0.9, 0.567
    (seed0,) = summarize(records)  # selection on seed 0, as before
    assert seed0.best_at == "lr=0.001, lr_cov=0.1"
    assert seed0.best == pytest.approx((0.95 + 0.5 + 0.6) / 3)
    assert (seed0.diverged, seed0.median) == (0, pytest.approx(0.9))


def test_sweep_all_seeds_reruns_every_point(swept, tmp_path):
    """``all_seeds`` on a finished seed-0 sweep trains seed 1 of every grid point it has
    not run yet (the best points' seed-1 runs are reused) and plots the means."""
    out, records, *_ = swept
    (tmp_path / "runs.jsonl").write_text((out / "runs.jsonl").read_text())
    everything, trained = counted_sweep(replace(CONFIG, all_seeds=True), tmp_path)
    assert len(trained) == 12 and {s.seed for s in trained} == {1}
    assert len(everything) == 30
    points = {(r["name"], r["lr"], r["lr_cov"]) for r in everything if r["phase"] == "seeds"}
    assert len(points) == 15
    rows = summarize(everything, all_seeds=True)
    assert all(r.best_seeds == 2 for r in rows)
    paths = plot_heatmaps(everything, tmp_path, all_seeds=True)
    assert paths[0].read_bytes()[:8] == PNG


def test_summarize_synthetic_records():
    records = [
        # accuracy (higher is better), chance 0.1
        record("singd", 1e-3, 0.1, 0.9),
        record("singd", 1e-3, 0.01, 0.8),
        record("singd", 1e-2, 0.1, math.nan, status="diverged"),
        record("singd", 1e-2, 0.01, 0.95, status="diverged"),  # diverged: not the best
        record("singd", 1e-3, 0.1, 0.7, phase="seeds"),  # the best point, more seeds
        record("singd", 1e-3, 0.1, 0.5, phase="seeds"),
        record("singd", 1e-3, 0.01, 0.1, phase="seeds"),  # another point: ignored
        record("adamw", 3e-3, None, 0.6),
        record("adamw", 1e-2, None, 0.4),
        # MSE (lower is better), chance 1.0
        record("ref", 1e-3, 0.1, 0.5, task="ae", higher=False, chance=1.0),
        record("ref", 1e-2, 0.1, 0.2, task="ae", higher=False, chance=1.0),
        record("ref", 3e-2, 0.1, 0.01, status="diverged", task="ae", higher=False, chance=1.0),
    ]
    rows = {(r.task, r.name): r for r in summarize(records)}
    assert set(rows) == {("t", "singd"), ("t", "adamw"), ("ae", "ref")}

    s = rows["t", "singd"]
    assert (s.points, s.diverged) == (4, 2)
    assert s.median == pytest.approx(0.45)  # median of 0.9, 0.8, 0.1, 0.1
    assert s.best == pytest.approx((0.9 + 0.7 + 0.5) / 3)
    assert s.best_std == pytest.approx(statistics.stdev([0.9, 0.7, 0.5]))
    assert s.best_seeds == 3
    assert s.best_at == "lr=0.001, lr_cov=0.1"

    a = rows["t", "adamw"]
    assert (a.points, a.diverged, a.best, a.best_std, a.best_seeds) == (2, 0, 0.6, None, 1)
    assert a.best_at == "lr=0.003" and a.median == pytest.approx(0.5)

    r = rows["ae", "ref"]
    assert (r.points, r.diverged, r.best, r.best_seeds) == (3, 1, 0.2, 1)
    assert r.median == pytest.approx(0.5)  # median of 0.5, 0.2, 1.0 (chance)
    assert r.best_at == "lr=0.01, lr_cov=0.1" and r.metric_name == "mse"

    table = sweep_table(list(rows.values()))
    assert "| singd | 2/4 | 0.7000 +- 0.2000 (3 seeds) | lr=0.001, lr_cov=0.1 | 0.4500 |" in table
    assert "| ref | 1/3 | 0.2000 | lr=0.01, lr_cov=0.1 | 0.5000 |" in table
    assert "best mse" in table and "best accuracy" in table


def test_chance():
    digits = TASKS["digits-cnn"].load(0)
    assert sweep.chance(TASKS["digits-cnn"], digits) == pytest.approx(0.1)
    task = TASKS["autoencoder"]
    split = task.load(0)
    mean = split.y_train.double().mean(0)
    expected = ((split.y_test.double() - mean) ** 2).mean().item()
    assert sweep.chance(task, split) == pytest.approx(expected, rel=1e-5)


def test_sweep_config_validation():
    with pytest.raises(ValueError, match="Unknown sweep task"):
        SweepConfig(tasks=("digits-mlp",))
    with pytest.raises(ValueError, match="precision"):
        SweepConfig(precisions=("float16",))
    with pytest.raises(ValueError, match="baseline"):
        SweepConfig(baseline="adamw")
    with pytest.raises(ValueError, match="seeds"):
        SweepConfig(seeds=0)
    with pytest.raises(ValueError, match="--all-seeds needs --seeds"):
        SweepConfig(all_seeds=True)


# --------------------------------------------------------------- command line
SWEEP_ARGS = ["compare", "--sweep", "--quick", "--structures", "diagonal"]
SWEEP_ARGS += ["--precision", "float32", "--epochs", "1", "--baseline", "reference-rule"]
SWEEP_ARGS += ["--no-progress", "--jobs", "1"]


def test_cli_sweep(tmp_path, capsys):
    code = cli.main([*SWEEP_ARGS, "--tasks", "digits-cnn", "--out", str(tmp_path)])
    assert code == 0
    assert len(lines(tmp_path / "runs.jsonl")) == 15  # --seeds defaults to 1 for the sweep
    text = (tmp_path / "sweep.md").read_text()
    for name in NAMES:
        assert f"| {name} |" in text
    assert json.loads((tmp_path / "sweep.json").read_text())["config"]["quick"] is True
    assert (tmp_path / "sweep_digits-cnn_float32.png").read_bytes()[:8] == PNG
    assert "| singd diagonal |" in capsys.readouterr().out


def test_cli_sweep_unknown_task(tmp_path, capsys):
    # not a task at all: argparse rejects it
    with pytest.raises(SystemExit) as info:
        cli.main([*SWEEP_ARGS, "--tasks", "nope", "--out", str(tmp_path)])
    assert info.value.code == 2
    # a comparison task that the sweep does not have: a message and exit status 2
    assert cli.main([*SWEEP_ARGS, "--tasks", "digits-mlp", "--out", str(tmp_path)]) == 2
    assert "Unknown sweep task" in capsys.readouterr().err
    assert cli.main([*SWEEP_ARGS, "--all-seeds", "--out", str(tmp_path)]) == 2
    assert "--all-seeds needs --seeds" in capsys.readouterr().err
    # a structure the reference does not have, with the reference as the baseline
    args = [*SWEEP_ARGS, "--tasks", "digits-cnn", "--out", str(tmp_path)]
    args[args.index("reference-rule")] = "reference"
    args[args.index("diagonal")] = "blockdiagonal:4"
    pytest.importorskip("singd.optim.optimizer")
    assert cli.main(args) == 2
    assert "The reference has no structure 'blockdiagonal:4'" in capsys.readouterr().err
    assert not (tmp_path / "runs.jsonl").exists()


def test_cli_sweep_names_given_twice_count_once():
    args = cli.parser().parse_args(
        ["compare", "--sweep", "--structures", "diagonal", "diagonal", "--tasks", "digits-cnn"]
        + ["digits-cnn", "--precision", "float32", "float32"]
    )
    config = cli._sweep_config(args, "none")
    assert config.structures == ("diagonal",)
    assert config.tasks == ("digits-cnn",) and config.precisions == ("float32",)


def test_table_says_when_no_point_beat_chance():
    """A --quick autoencoder sweep ended worse than chance everywhere: every cell read
    the chance value as if it were a result. Such cells are marked, with a note."""
    records = [
        record("ae-singd", 1e-3, 0.1, 2.0, task="ae", higher=False, chance=1.0),
        record("ae-singd", 1e-2, 0.1, 3.0, task="ae", higher=False, chance=1.0),
        record("ae-ok", 1e-3, 0.1, 0.5, task="ae", higher=False, chance=1.0),
        record("ae-ok", 1e-2, 0.1, 0.4, task="ae", higher=False, chance=1.0),
    ]
    table = sweep_table(summarize(records))
    assert "| ae-singd | 0/2 | 1.0000 (chance) | lr=0.001, lr_cov=0.1 | 1.0000 (chance) |" in table
    assert "| ae-ok | 0/2 | 0.4000 | lr=0.01, lr_cov=0.1 | 0.4500 |" in table
    assert "No grid point of ae-singd did better than chance (1.0000" in table


def test_cli_sweep_runs_one_structure_once_whatever_its_spelling(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "_set_threads", lambda threads: None)
    monkeypatch.setattr(sweep, "run_sweep", lambda config, *a, **k: seen.append(config) or [])
    monkeypatch.setattr(sweep, "write_sweep_report", lambda *a, **k: "")
    monkeypatch.setattr(sweep, "plot_heatmaps", lambda *a, **k: [])
    args = [*SWEEP_ARGS, "--tasks", "digits-cnn", "--out", str(tmp_path)]
    i = args.index("diagonal")
    args[i : i + 1] = ["hierarchical15_15", "hierarchical:15,15", "diagonal", "Diagonal"]
    assert cli.main(args) == 0
    assert seen[0].structures == ("hierarchical15_15", "diagonal")


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "--quick", "--tasks", "digits-mlp", "mnist1d-cnn", "--no-progress"],
        [*SWEEP_ARGS, "--tasks", "mnist1d-sweep"],
        ["train", "--task", "mnist1d-cnn", "--optimizer", "sgd", "--no-progress"],
    ],
    ids=["compare", "sweep", "train"],
)
def test_a_task_whose_package_is_missing_is_named_before_any_run(
    argv, tmp_path, monkeypatch, capsys
):
    """Without the mnist1d package, compare ran the other tasks' runs first and then
    stopped with a traceback; now one line before any work, exit status 2."""
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mnist1d" else find(name)
    )
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: pytest.fail("ran"))
    from torchsingd.experiments import compare, runner

    monkeypatch.setattr(compare, "run_compare", lambda *a, **k: pytest.fail("ran"))
    monkeypatch.setattr(runner, "train", lambda *a, **k: pytest.fail("ran"))
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2
    assert "need mnist1d: pip install 'torchsingd[experiments]'" in capsys.readouterr().err
