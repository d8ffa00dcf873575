"""``torchsingd compare`` end to end (quick), resume, and ``torchsingd train``."""

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch

from torchsingd import cli
from torchsingd.experiments import compare
from torchsingd.experiments.optimizers import GRID_SIZE, OPTIMIZERS
from torchsingd.experiments.search import best_lr
from torchsingd.experiments.store import RunStore

OPTS = ["adamw", "singd-dense", "singd-diagonal", "kfac"]
PRECISIONS = ["float32", "bf16"]
ARGS = ["compare", "--quick", "--tasks", "digits-mlp", "--optimizers", *OPTS]
ARGS += ["--precision", *PRECISIONS, "--seeds", "2", "--jobs", "1", "--no-progress"]
ARGS += ["--extend-grid", "0"]  # the fixed grids: a known number of runs
RUNS = len(OPTS) * len(PRECISIONS) * (GRID_SIZE + 2)


class CountingTrain:
    """Wraps ``compare.train`` to count the runs actually trained."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = compare.train

        def train(spec, *args, **kwargs):
            self.calls.append(spec)
            return original(spec, *args, **kwargs)

        monkeypatch.setattr(compare, "train", train)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        counter = CountingTrain(mp)
        assert cli.main([*ARGS, "--out", str(out)]) == 0
    torch.set_num_threads(threads)
    return out, counter.calls


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_every_file_exists_and_parses(quick_run):
    out, calls = quick_run
    assert len(calls) == RUNS
    results = json.loads((out / "results.json").read_text())  # strict JSON: no NaN
    assert len(results["runs"]) == RUNS == len(lines(out / "runs.jsonl"))
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == RUNS
    assert {r["phase"] for r in rows} == {"search", "final"}
    split = {"search": "validation", "final": "test"}
    assert all(r["metric_split"] == split[r["phase"]] for r in rows)
    for name in ("curves_digits-mlp.png", "memory.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    for opt in OPTS:
        assert OPTIMIZERS[opt].label in summary
    assert results["settings"]["grid_size"] == GRID_SIZE
    assert all(len(g) == GRID_SIZE for g in results["settings"]["lr_grids"].values())


def test_every_requested_combination_appears_with_finite_numbers(quick_run):
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    finals = [r for r in results["runs"] if r["phase"] == "final"]
    assert {(r["task"], r["optimizer"], r["precision"]) for r in finals} == {
        ("digits-mlp", o, p) for o in OPTS for p in PRECISIONS
    }
    for r in finals:
        assert r["seed"] in (0, 1)
        if r["status"] == "ok":
            for key in ("test_metric", "test_loss", "train_loss", "sec_per_iter"):
                assert math.isfinite(r[key]), (r["optimizer"], key)
            assert r["state_bytes"] > 0 and r["peak_rss_bytes"] > 2**20
            assert len(r["history"]) == r["epochs"] == 4
            assert r["test_metric"] > 0.5  # well above chance (0.1) even in 48 steps
    adamw = next(r for r in finals if r["optimizer"] == "adamw" and r["precision"] == "float32")
    assert adamw["state_bytes"] >= 2 * adamw["param_bytes"]  # two moments per parameter
    for entry in results["lr_search"]:  # the chosen lr is the best on the validation set
        assert entry["best_lr"] in entry["grid"] and len(entry["search"]) == GRID_SIZE


def test_kfac_bf16_is_refused_while_singd_bf16_trains(quick_run):
    out, _ = quick_run
    runs = json.loads((out / "results.json").read_text())["runs"]
    kfac = [r for r in runs if r["optimizer"] == "kfac" and r["precision"] == "bf16"]
    assert len(kfac) == GRID_SIZE + 2
    assert all(r["status"] == "refused" and "bfloat16" in r["message"] for r in kfac)
    singd = [
        r
        for r in runs
        if r["optimizer"] == "singd-dense" and r["precision"] == "bf16" and r["phase"] == "final"
    ]
    for r in singd:
        assert r["status"] == "ok" and r["skipped_steps"] == 0
        assert r["history"][-1]["train_loss"] < r["history"][0]["train_loss"]
        assert r["test_loss"] < 0.9 * math.log(10)  # below the loss of a uniform guess
    kfac32 = [r for r in runs if r["optimizer"] == "kfac" and r["precision"] == "float32"]
    assert all(r["status"] == "ok" for r in kfac32)
    assert "| KFAC | bf16 | - | refused |" in (out / "summary.md").read_text()


def test_resume_skips_finished_runs_and_redoes_only_missing_ones(quick_run, monkeypatch):
    out, _ = quick_run
    log = out / "runs.jsonl"
    counter = CountingTrain(monkeypatch)
    assert cli.main([*ARGS, "--out", str(out)]) == 0
    assert counter.calls == [] and len(lines(log)) == RUNS

    kept = lines(log)[:-3]  # lose two runs, and cut the third short as a crash would
    log.write_text("\n".join(kept) + "\n" + lines(log)[-3][:40])
    assert cli.main([*ARGS, "--out", str(out)]) == 0
    assert len(counter.calls) == 3
    records = [json.loads(line) for line in lines(log) if line.endswith("}")]
    assert len({r["key"] for r in records}) == RUNS


def test_the_search_extends_past_a_winner_at_the_grid_edge(tmp_path, monkeypatch, capsys):
    """Validation metrics made up per lr (peaked at ``best``; the training is real):
    SGD's peak lies above its grid (0.03, 0.1, 0.3): the search tries 1 and 3, then
    stops (2 beyond the grid) and picks 3, marked '(+) (max)'; AdamW's lies below
    (grid 0.003, 0.01, 0.03): 0.001, then 0.0003 does worse, so 0.001 wins, '(+)'.
    A second call runs nothing."""
    best = {"sgd": 10.0, "adamw": 1e-3}
    original, calls = compare.train, []

    def train(spec, *args, **kwargs):
        calls.append((spec.optimizer, spec.phase, spec.lr))
        record = original(spec, *args, **kwargs)
        if spec.phase == "search":  # accuracy falls with the distance to ``best``
            distance = abs(math.log10(spec.lr / best[spec.optimizer]))
            record.update(status="ok", test_metric=0.9 - distance / 10)
        return record

    monkeypatch.setattr(compare, "train", train)
    args = ["compare", "--quick", "--tasks", "digits-mlp", "--optimizers", "sgd", "adamw"]
    args += ["--precision", "float32", "--seeds", "1", "--epochs", "1", "--jobs", "1"]
    args += ["--no-progress", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    searched = {o: [lr for o2, phase, lr in calls if o2 == o and phase == "search"] for o in best}
    finals = {o: [lr for o2, phase, lr in calls if o2 == o and phase == "final"] for o in best}
    assert searched == {"sgd": [0.03, 0.1, 0.3, 1.0, 3.0], "adamw": [3e-3, 1e-2, 3e-2, 1e-3, 3e-4]}
    assert finals == {"sgd": [3.0], "adamw": [1e-3]}
    summary = (tmp_path / "summary.md").read_text()
    assert "| SGD (momentum 0.9) | float32 | 3 (+) (max) |" in summary
    assert "| AdamW | float32 | 0.001 (+) |" in summary
    assert "up to 2 beyond the grid" in summary
    assert "| 0.0003 (+): 84.8%, 0.001 (+): 90.0%, 0.003: 85.2%," in summary  # the search
    entries = json.loads((tmp_path / "results.json").read_text())["lr_search"]
    tried = {e["optimizer"]: (e["tried"], e["best_lr"]) for e in entries}
    assert tried == {
        "sgd": ([0.03, 0.1, 0.3, 1.0, 3.0], 3.0),
        "adamw": ([3e-4, 1e-3, 3e-3, 1e-2, 3e-2], 1e-3),
    }
    capsys.readouterr()
    calls.clear()
    assert cli.main(args) == 0
    assert calls == [] and "12 of 12 runs already done" in capsys.readouterr().out


def test_extension_rules():
    """Up past a top winner, down past a bottom winner only when strictly better than
    the next lr, nothing once ``extend`` lrs were added or when nothing trained."""
    from torchsingd.experiments.search import extension, next_lr

    assert [next_lr(x, True) for x in (1e-3, 3e-3, 0.3, 5e-3)] == [3e-3, 1e-2, 1.0, 0.015]
    assert [next_lr(x, False) for x in (1e-3, 3e-3, 1.0)] == [3e-4, 1e-3, 0.3]

    def records(*metrics, lrs=(1e-3, 3e-3, 1e-2), status="ok"):
        return [
            {"task": "digits-mlp", "lr": lr, "status": status, "test_metric": m}
            for lr, m in zip(lrs, metrics, strict=True)
        ]

    assert extension(records(0.5, 0.6, 0.7), 0) == 0.03
    assert extension(records(0.5, 0.6, 0.7), 1) == 0.03
    assert extension(records(0.5, 0.6, 0.7), 2) is None  # the default limit
    assert extension(records(0.5, 0.6, 0.7), 0, extend=0) is None
    assert extension(records(0.7, 0.6, 0.5), 0) == 3e-4
    assert extension(records(0.7, 0.7, 0.5), 0) is None  # a tie at the bottom
    assert extension(records(0.6, 0.7, 0.5), 0) is None  # inside
    assert extension(records(0.5, 0.6, 0.7, status="diverged"), 0) is None
    mse = [{**r, "task": "autoencoder"} for r in records(0.05, 0.04, 0.03)]
    assert extension(mse, 0) == 0.03  # lower is better: the top lr wins
    diverged_top = records(0.5, 0.6, 0.7)
    diverged_top[2]["status"] = "diverged"
    assert extension(diverged_top, 0) is None  # the winner 3e-3 is inside


def test_best_lr_ranks_by_the_metric_direction_and_diverged_last():
    def rec(task, lr, metric, status="ok"):
        return {"task": task, "lr": lr, "test_metric": metric, "status": status}

    acc = [rec("digits-mlp", lr, m) for lr, m in ((1e-3, 0.9), (3e-3, 0.95), (1e-2, 0.95))]
    assert best_lr(acc) == 3e-3  # ties go to the smaller lr
    mse = [rec("autoencoder", 1e-3, 0.05), rec("autoencoder", 3e-3, 0.02, "diverged")]
    assert best_lr(mse) == 1e-3
    bpc = [rec("charlm", 1e-3, 1.5), rec("charlm", 3e-3, 1.2), rec("charlm", 1e-2, 2.0)]
    assert best_lr(bpc) == 3e-3  # lower is better
    refused = [rec("charlm", 1e-3, math.nan, "refused"), rec("charlm", 1e-4, None, "refused")]
    assert best_lr(refused) == 1e-4


def test_parallel_jobs_give_the_same_records(tmp_path, quick_run):
    out, _ = quick_run
    args = ["compare", "--quick", "--tasks", "digits-mlp", "--optimizers", "singd-diagonal"]
    args += ["--precision", "float32", "--seeds", "1", "--jobs", "2", "--no-progress"]
    args += ["--extend-grid", "0"]
    assert cli.main([*args, "--out", str(tmp_path)]) == 0
    parallel, serial = RunStore(tmp_path).records, RunStore(out).records
    assert len(parallel) == GRID_SIZE + 1
    common = parallel.keys() & serial.keys()
    assert len(common) >= GRID_SIZE  # the searches at least
    for key in common:  # same seeds, same data order: the same training
        assert parallel[key]["history"][-1]["train_loss"] == pytest.approx(
            serial[key]["history"][-1]["train_loss"], rel=1e-4
        )


def test_train_command_runs_one_configuration(tmp_path, capsys):
    args = ["train", "--task", "autoencoder", "--optimizer", "singd-diagonal", "--quick"]
    assert cli.main([*args, "--epochs", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "test mse" in text and "optimizer state" in text
    (record,) = [json.loads(x) for x in lines(tmp_path / "runs.jsonl")]
    assert record["epochs"] == 2 and record["status"] == "ok"
    assert record["lr"] == OPTIMIZERS["singd-diagonal"].grid[1]
    refused = ["train", "--task", "digits-mlp", "--optimizer", "kfac", "--precision", "bf16"]
    assert cli.main([*refused, "--no-progress"]) == 1
    assert "refused" in capsys.readouterr().out


def test_bad_command_lines_fail_before_any_run(tmp_path, capsys, monkeypatch):
    """Options of the other mode, a file as --out, lr <= 0: exit status 2, nothing run."""
    counter = CountingTrain(monkeypatch)
    a_file = tmp_path / "afile"
    a_file.write_text("")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "runs.jsonl").write_text('{"not": "a record"}\n')
    base = ["compare", "--quick", "--tasks", "digits-mlp", "--no-progress", "--jobs", "1"]
    cases = [
        ([*base, "--out", str(foreign)], "line 1 is not a run record of torchsingd"),
        ([*base, "--structures", "diagonal"], "--structures only applies with --sweep"),
        ([*base, "--baseline", "none", "--all-seeds"], "--all-seeds, --baseline only apply"),
        ([*base, "--out", str(a_file)], "exists and is not a directory"),
        (["compare", "--sweep", "--optimizers", "sgd"], "--optimizers does not apply"),
        (["compare", "--sweep", "--extend-grid", "1"], "--extend-grid does not apply"),
        (["compare", "--tasks", "mnist1d-sweep"], "choose from ['digits-mlp'"),
        (["train", "--task", "digits-mlp", "--optimizer", "sgd", "--out", str(a_file)], "not a"),
        ([*base, "--out", "/proc/torchsingd-out"], "cannot write to --out /proc/torchsingd-out"),
        (["compare", "--sweep", "--quick", "--out", f"{a_file}/sub"], "cannot write to --out"),
        (["train", "--task", "digits-mlp", "--optimizer", "sgd", "--out", "/proc/x"], "cannot"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    for lr in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit) as info:
            cli.main(["train", "--task", "digits-mlp", "--optimizer", "sgd", "--lr", lr])
        assert info.value.code == 2
        assert "--lr: must be a finite number > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--task", "digits-mlp", "--optimizer", "sgd", "--seed", "1" + "0" * 20])
    assert info.value.code == 2 and "--seed: must be in [0, 2^64)" in capsys.readouterr().err
    # an empty --out (an unset shell variable) meant the current directory for compare
    # and no output at all for train
    for argv in ([*base], ["compare", "--sweep"], ["train", "--task", "digits-mlp"]):
        with pytest.raises(SystemExit) as info:
            cli.main([*argv, "--out", ""])
        assert info.value.code == 2
        assert "--out: must not be empty" in capsys.readouterr().err
    assert counter.calls == []


def test_missing_extras_are_named_before_any_run(capsys, monkeypatch):
    """Without the experiments extra: one line naming what to install, exit status 2."""
    import importlib.util

    counter = CountingTrain(monkeypatch)
    find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find(name)
    )
    assert cli.main(["compare", "--quick", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "needs matplotlib: pip install 'torchsingd[experiments]'" in err
    assert counter.calls == []


def test_python_dash_m_torchsingd():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "torchsingd", "--help"], capture_output=True, text=True, check=True
    )
    assert "compare" in out.stdout and "bench" in out.stdout


def test_names_given_twice_run_once_and_reused_runs_say_their_threads(tmp_path, capsys):
    args = ["compare", "--quick", "--tasks", "digits-mlp", "digits-mlp", "--optimizers"]
    args += ["sgd", "sgd", "--precision", "float32", "float32", "--seeds", "1", "--epochs", "1"]
    args += ["--jobs", "1", "--no-progress", "--extend-grid", "0", "--out", str(tmp_path)]
    assert cli.main([*args, "--threads", "1"]) == 0
    assert len(lines(tmp_path / "runs.jsonl")) == GRID_SIZE + 1
    capsys.readouterr()
    assert cli.main([*args, "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert f"{GRID_SIZE + 1} of {GRID_SIZE + 1} runs already done" in out
    assert "timed with [1] torch thread(s) per job (this call: 2)" in out
    summary = (tmp_path / "summary.md").read_text()  # said "1 job(s) x 2 torch thread(s)."
    assert "1 job(s) x 2 torch thread(s) in this call; the runs were timed with [1]" in summary


def test_parallel_progress_is_one_bar_above_which_the_log_is_written(tmp_path, capsys):
    """With --jobs 2 the workers draw no bars; the log lines stay whole."""
    args = ["compare", "--quick", "--tasks", "digits-mlp", "--optimizers", "sgd"]
    args += ["--precision", "float32", "--seeds", "1", "--epochs", "1", "--jobs", "2"]
    assert cli.main([*args, "--extend-grid", "0", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    logged = [x for x in captured.out.splitlines() if x.startswith("[")]
    assert [x.split("]")[0] for x in logged] == [f"[{i}/{GRID_SIZE + 1}" for i in range(1, 5)]
    assert "runs (2 workers)" in captured.err  # the one bar
    assert "lr search" not in captured.err  # no per-run bars from the workers
    # the bar counts the whole plan from the start: the final run, queued once the
    # search ends, was not in its total (0/3, then 4), which made its ETA optimistic
    states = re.findall(r"(\d+)/(\d+) \[", captured.err)
    assert states and {total for _, total in states} == {str(GRID_SIZE + 1)}
    assert states[-1][0] == str(GRID_SIZE + 1)
    # resumed: the bar starts at the runs already done, and with none to run there is
    # no bar (an empty one was drawn)
    store = tmp_path / "runs.jsonl"
    store.write_text("".join(store.read_text().splitlines(keepends=True)[:-1]))
    assert cli.main([*args, "--extend-grid", "0", "--out", str(tmp_path)]) == 0
    states = re.findall(r"(\d+)/(\d+) \[", capsys.readouterr().err)
    assert states[0] == (str(GRID_SIZE), str(GRID_SIZE + 1)), states
    assert states[-1] == (str(GRID_SIZE + 1), str(GRID_SIZE + 1))
    assert cli.main([*args, "--extend-grid", "0", "--out", str(tmp_path)]) == 0
    assert "runs (2 workers)" not in capsys.readouterr().err


def test_peak_rss_is_reset_between_runs():
    """A run's peak RSS does not include an earlier, larger peak of the process."""
    from torchsingd.experiments import runner

    big = torch.ones(300_000_000 // 4)  # 300 MB, touched
    before = runner.peak_rss_bytes()
    del big
    if runner._reset_peak_rss() != "run":
        pytest.skip("the OS cannot reset the peak RSS")
    assert runner.peak_rss_bytes() < before - (200 << 20)


def test_plots_of_an_earlier_call_do_not_stay_beside_a_new_report(quick_run, tmp_path):
    """A compare into a directory that held another task's run left its
    curves_<task>.png beside a report that no longer covers that task."""
    from torchsingd.experiments.plots import write_plots

    out, _ = quick_run
    runs = json.loads((out / "results.json").read_text())["runs"]
    finals = [r for r in runs if r["phase"] == "final"]
    (tmp_path / "curves_autoencoder.png").write_bytes(b"old")
    (tmp_path / "notes.png").write_bytes(b"the user's")
    paths = write_plots(finals, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["curves_digits-mlp.png", "memory.png", "notes.png"]
    assert sorted(p.name for p in paths) == ["curves_digits-mlp.png", "memory.png"]


def test_ctrl_c_ends_a_command_with_a_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    from torchsingd.experiments import compare as compare_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_set_threads", interrupted)  # e.g. while training one run
    assert cli.main(["train", "--task", "digits-mlp", "--optimizer", "sgd"]) == 130
    assert capsys.readouterr().err.strip() == "Interrupted."
    monkeypatch.undo()
    monkeypatch.setattr(compare_module, "run_compare", interrupted)
    args = ["compare", "--quick", "--tasks", "digits-mlp", "--no-progress", "--out", str(tmp_path)]
    assert cli.main(args) == 130
    assert "No run had finished; run the same command again" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("task", "optimizer", "expected"),
    [
        ("charlm", "singd-diagonal", "batch+sequence"),
        ("charlm-lstm", "kfac", "batch+sequence"),
        ("digits-mlp", "singd-diagonal", "batch"),
    ],
)
def test_each_task_counts_its_loss_terms_for_the_preconditioners(
    task, optimizer, expected, monkeypatch
):
    """The language tasks average their loss over every token: a run gives SINGD and
    KFAC ``loss_average="batch+sequence"`` there (``"batch"`` counted 32x fewer terms)."""
    import dataclasses

    from torchsingd.experiments import runner

    built = []
    spec = OPTIMIZERS[optimizer]

    def make(model, lr, **kwargs):
        built.append(spec.make(model, lr, **kwargs))
        return built[-1]

    monkeypatch.setitem(runner.OPTIMIZERS, optimizer, dataclasses.replace(spec, make=make))
    run = runner.RunSpec(task, optimizer, "float32", 1e-3, 0, 1, max_train=8)
    assert runner.train(run, progress=False)["status"] == "ok"
    assert built[0].param_groups[0]["loss_average"] == expected


def test_tables_give_chance_and_mark_means_near_it():
    """The header names the task's chance level; a mean within 10% of the way from it
    to a perfect score is marked, and the table says why."""
    from torchsingd.experiments import report

    def row(optimizer, task, mean):
        return report.Row(task, optimizer, "float32", 1e-2, 2, 2, 0, False, 0.0, mean, 0.01,
                          1e-3, 1e3, 1e3, 1e8)  # fmt: skip

    # accuracy, chance 0.1: 0.18 is 8.9% of the way to 1, 0.2 is 11.1%
    table = report.task_table(
        "digits-mlp", [row("adamw", "digits-mlp", 0.18), row("sgd", "digits-mlp", 0.2)],
        chance_value=0.1,
    )  # fmt: skip
    assert "(higher is better; chance 10.0%)" in table
    assert "| AdamW | float32 | 0.01 | 18.0% ± 1.0 (≈ chance) |" in table
    assert "| SGD (momentum 0.9) | float32 | 0.01 (+) | 20.0% ± 1.0 |" in table  # (off its grid)
    # lower is better, perfect 0: chance 4.5 bits, 4.1 is 8.9% of the way, 4.0 11.1%;
    # worse than chance is marked too
    bits = [row("adamw", "charlm", 4.1), row("sgd", "charlm", 4.0), row("kfac", "charlm", 5)]
    table = report.task_table("charlm", bits, chance_value=4.5)
    assert "(lower is better; chance 4.5)" in table
    marked = [line.split(" | ")[0] for line in table.splitlines() if "(≈ chance)" in line]
    assert marked == ["| AdamW", "| KFAC"]
    # without a chance level nothing is marked
    assert "chance" not in report.task_table("charlm", bits)


def test_the_summary_gives_each_task_its_chance(quick_run):
    out, _ = quick_run
    summary = (out / "summary.md").read_text()
    assert "| test accuracy (higher is better; chance 10.0%) |" in summary
