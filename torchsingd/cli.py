"""Command line: ``torchsingd compare`` (the optimizer comparison), ``torchsingd train``
(one configuration) and ``torchsingd bench`` (speed and memory benchmark); also
``python -m torchsingd``."""

from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
from pathlib import Path

COMPARE_HELP = """\
Compare optimizers on tasks with embedded data (no download): an equal learning-rate
search per optimizer (3 values each, judged on a validation split of the training set,
extended past a winner at the grid's edge: --extend-grid), then the best lr re-run over
--seeds seeds; writes results.json, results.csv (one row per run), summary.md and PNG
plots into --out, and prints the summary tables.

Default plan (what `make demo` runs, about 13 minutes on 2 cores): every optimizer in
float32 on every task; bf16-mixed (autocast) and pure bf16 for adamw, singd-dense,
singd-diagonal, singd-hierarchical and kfac on digits-mlp and autoencoder (bfloat16
convolutions and attention are slow on CPUs without bfloat16 units). --precision runs
every requested optimizer in every requested precision. --quick: few epochs on a
subset of each training set, 2 seeds (under 3 minutes).

Resumable: every finished run is appended to <out>/runs.jsonl at once, and a second call
with the same --out only runs what is missing (Ctrl-C loses at most the runs in
progress).
"""


def _sweep(args: argparse.Namespace) -> int:
    if args.optimizers is not None:
        print(
            "compare --sweep: --optimizers does not apply (the sweep runs SINGD, the "
            "--baseline and AdamW); use --structures and --baseline.",
            file=sys.stderr,
        )
        return 2
    if args.extend_grid is not None:
        print(
            "compare --sweep: --extend-grid does not apply (the sweep runs its fixed "
            "lr x lr_cov grid).",
            file=sys.stderr,
        )
        return 2
    from torchsingd.experiments.bench import reference_cls
    from torchsingd.experiments.compare import command_line
    from torchsingd.experiments.sweep import plot_heatmaps, run_sweep, write_sweep_report

    have_reference = reference_cls() is not None
    baseline = args.baseline or ("reference" if have_reference else "reference-rule")
    if baseline == "reference" and not have_reference:
        print("--baseline reference needs `pip install singd==0.0.5 einconv`.", file=sys.stderr)
        return 2
    try:
        config = _sweep_config(args, baseline)
    except ValueError as err:
        print(f"compare --sweep: {err}", file=sys.stderr)
        return 2
    if not _task_packages(config.tasks, "compare --sweep"):
        return 2
    out = Path(args.out if args.out is not None else "sweep_out")
    if not _usable_out(out, "compare --sweep"):
        return 2
    _set_threads(args.threads)
    try:
        records = run_sweep(config, out, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\nInterrupted; run the same command again to resume ({out}).", file=sys.stderr)
        return 130
    tables = write_sweep_report(records, config, out, command_line(args.argv))
    plots = plot_heatmaps(records, out, config.all_seeds)
    print()
    print(tables)
    print(f"Wrote runs.jsonl, sweep.md, sweep.json, {', '.join(p.name for p in plots)} to {out}/")
    return 0


def _sweep_config(args: argparse.Namespace, baseline: str):
    from torchsingd.experiments.sweep import (
        STRUCTURES,
        SWEEP_PRECISIONS,
        SWEEP_TASKS,
        SweepConfig,
    )

    return SweepConfig(
        tasks=_unique(args.tasks) if args.tasks else tuple(SWEEP_TASKS),
        structures=_unique_structures(args.structures) if args.structures else STRUCTURES,
        precisions=_unique(args.precision) if args.precision else SWEEP_PRECISIONS,
        seeds=args.seeds if args.seeds is not None else 1,
        all_seeds=args.all_seeds,
        epochs=args.epochs,
        quick=args.quick,
        jobs=args.jobs,
        threads=args.threads,
        baseline=baseline,
    )


def _compare(args: argparse.Namespace) -> int:
    if args.sweep:
        return _sweep(args)
    from torchsingd.experiments.tasks import TASKS

    sweep_only = [
        flag
        for flag, value in (
            ("--structures", args.structures),
            ("--all-seeds", args.all_seeds),
            ("--baseline", args.baseline),
        )
        if value
    ]
    if sweep_only:
        verb = "applies" if len(sweep_only) == 1 else "apply"
        print(f"compare: {', '.join(sweep_only)} only {verb} with --sweep.", file=sys.stderr)
        return 2
    if args.tasks is None:
        args.tasks = list(TASKS)
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        print(
            f"Unknown task(s) {unknown} for compare (without --sweep); choose from "
            f"{list(TASKS)} (mnist1d-sweep needs --sweep).",
            file=sys.stderr,
        )
        return 2
    if not _task_packages(args.tasks, "compare"):
        return 2
    from torchsingd.experiments.compare import CompareConfig, command_line, run_compare
    from torchsingd.experiments.optimizers import OPTIMIZERS
    from torchsingd.experiments.plots import write_plots
    from torchsingd.experiments.report import summary_tables, write_reports
    from torchsingd.experiments.search import EXTEND

    config = CompareConfig(
        tasks=_unique(args.tasks),
        optimizers=_unique(args.optimizers) if args.optimizers else tuple(OPTIMIZERS),
        precisions=_unique(args.precision) if args.precision else None,
        seeds=args.seeds if args.seeds is not None else (2 if args.quick else 3),
        epochs=args.epochs,
        quick=args.quick,
        jobs=args.jobs,
        threads=args.threads,
        extend_grid=EXTEND if args.extend_grid is None else args.extend_grid,
    )
    out = Path(args.out if args.out is not None else "demo_out")
    if not _usable_out(out, "compare"):
        return 2
    _set_threads(args.threads)
    try:
        outcome = run_compare(config, out, progress=not args.no_progress)
    except KeyboardInterrupt:
        store = out / "runs.jsonl"
        where = f"Finished runs are in {store}" if store.exists() else "No run had finished"
        print(f"\nInterrupted. {where}; run the same command again to resume.", file=sys.stderr)
        return 130
    write_reports(outcome, config, out, command_line(args.argv))
    plots = write_plots(outcome.records("final"), out)
    print()
    print(summary_tables(outcome))
    print()
    files = ["runs.jsonl", "results.json", "results.csv", "summary.md"]
    print(f"Wrote {', '.join(files + [p.name for p in plots])} to {out}/")
    return 0


def _train(args: argparse.Namespace) -> int:
    from torchsingd.experiments.compare import describe
    from torchsingd.experiments.optimizers import OPTIMIZERS
    from torchsingd.experiments.runner import RunSpec, train
    from torchsingd.experiments.store import RunStore
    from torchsingd.experiments.tasks import TASKS

    if not _task_packages([args.task], "train"):
        return 2
    task = TASKS[args.task]
    spec = RunSpec(
        task=args.task,
        optimizer=args.optimizer,
        precision=args.precision,
        lr=args.lr if args.lr is not None else OPTIMIZERS[args.optimizer].grid[1],
        seed=args.seed,
        epochs=args.epochs or (task.quick_epochs if args.quick else task.epochs),
        max_train=task.quick_train if args.quick else None,
    )
    if args.out and not _usable_out(Path(args.out), "train"):
        return 2
    _set_threads(args.threads)
    record = train(spec, progress=not args.no_progress)
    if record["status"] == "refused":
        print(f"{spec.label()}: refused: {record['message']}")
        return 1
    print(f"epoch | train loss | test loss | test {task.metric_name} | seconds")
    for h in record["history"]:
        print(
            f"{h['epoch']:5d} | {h['train_loss']:10.4f} | {h['test_loss']:9.4f} | "
            f"{h['test_metric']:.4f} | {h['seconds']:.1f}"
        )
    print(describe(record))
    print(
        f"optimizer state {record['state_bytes']} bytes "
        f"({record['state_bytes'] / record['param_bytes']:.2f}x the parameters), "
        f"skipped steps {record['skipped_steps']}, peak RSS {record['peak_rss_bytes'] >> 20} MB"
    )
    if args.out:
        RunStore(Path(args.out)).add(record)
        print(f"Appended to {Path(args.out) / 'runs.jsonl'}")
    return 0 if record["status"] == "ok" else 2


def _bench(args: argparse.Namespace) -> int:
    from torchsingd.experiments.bench import main as bench_main

    bench_main(args.bench_argv)
    return 0


def _unique(values: list[str]) -> tuple[str, ...]:
    """The values in order, each once (a name given twice would run twice)."""
    return tuple(dict.fromkeys(values))


def _unique_structures(names: list[str]) -> tuple[str, ...]:
    """The structure names in order, each structure once under its first spelling
    (``hierarchical15_15`` and ``hierarchical:15,15`` are one structure); an invalid
    name is kept, for the configuration to refuse."""
    from torchsingd.structures import get_structure

    seen: dict[str, str] = {}
    for name in names:
        try:
            key = get_structure(name).name
        except ValueError:
            key = name
        seen.setdefault(key, name)
    return tuple(seen.values())


def _task_packages(tasks, command: str) -> bool:
    """Whether the packages the chosen tasks need are installed (MNIST-1D is
    generated by the ``mnist1d`` package); says what is missing before any work."""
    import importlib.util

    wanting = [t for t in tasks if t.startswith("mnist1d")]
    if wanting and importlib.util.find_spec("mnist1d") is None:
        print(
            f"{command}: task(s) {wanting} need mnist1d: pip install 'torchsingd[experiments]' "
            "(or leave them out with --tasks).",
            file=sys.stderr,
        )
        return False
    return True


def _usable_out(out: Path, command: str) -> bool:
    """Whether ``out`` can be the output directory (created if missing, and writable);
    says why not, before any work."""
    if out.exists() and not out.is_dir():
        print(f"{command}: --out {out} exists and is not a directory.", file=sys.stderr)
        return False
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".torchsingd-write-test"
        probe.touch()
        probe.unlink()
    except OSError as err:
        print(f"{command}: cannot write to --out {out}: {err.strerror}.", file=sys.stderr)
        return False
    from torchsingd.experiments.store import RunStore

    try:
        RunStore(out)  # (its records are read again by the command)
    except ValueError as err:
        print(f"{command}: {err}", file=sys.stderr)
        return False
    return True


#: What each command imports beyond torch (the ``experiments`` extra).
NEEDS = {
    "compare": ("numpy", "sklearn", "matplotlib", "tqdm"),
    "train": ("numpy", "sklearn", "tqdm"),
}


def _have_extras(command: str) -> bool:
    """Whether the optional packages ``command`` needs are installed; says which are
    missing and how to install them (before any work)."""
    import importlib.util

    missing = [name for name in NEEDS[command] if importlib.util.find_spec(name) is None]
    if missing:
        names = ", ".join("scikit-learn" if m == "sklearn" else m for m in missing)
        print(
            f"torchsingd {command} needs {names}: pip install 'torchsingd[experiments]'.",
            file=sys.stderr,
        )
    return not missing


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def parser() -> argparse.ArgumentParser:
    from torchsingd.experiments.optimizers import OPTIMIZERS
    from torchsingd.experiments.runner import PRECISIONS
    from torchsingd.experiments.tasks import TASKS

    cpus = multiprocessing.cpu_count()
    p = argparse.ArgumentParser(prog="torchsingd", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser(
        "compare",
        help="compare optimizers on embedded tasks (tables and plots)",
        description=COMPARE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from torchsingd.experiments.sweep import SWEEP_TASKS

    c.add_argument(
        "--tasks",
        nargs="+",
        choices=list(dict.fromkeys([*TASKS, *SWEEP_TASKS])),
        help=f"default: every comparison task (with --sweep: {', '.join(SWEEP_TASKS)})",
    )
    c.add_argument(
        "--optimizers",
        nargs="+",
        choices=list(OPTIMIZERS),
        help="default: all (not with --sweep, which runs SINGD, --baseline and AdamW)",
    )
    c.add_argument(
        "--precision", nargs="+", choices=PRECISIONS, help="default: the plan described above"
    )
    c.add_argument(
        "--seeds",
        type=positive_int,
        help="seeds of the final runs (default 3, --quick 2; --sweep: default 1, the seeds "
        "of each best point, or of every point with --all-seeds)",
    )
    c.add_argument("--epochs", type=positive_int, help="epochs of every run (default: per task)")
    c.add_argument(
        "--extend-grid",
        type=non_negative_int,
        metavar="N",
        help="when the best lr is at an edge of those tried, try the next one past it "
        "(factor ~3), at most N beyond each grid (default 2; 0: the fixed grids)",
    )
    c.add_argument("--quick", action="store_true", help="tiny version (under 3 minutes)")
    c.add_argument(
        "--out",
        type=path_text,
        help="output directory (default: demo_out, with --sweep: sweep_out)",
    )
    c.add_argument(
        "--sweep",
        action="store_true",
        help="robustness sweep instead: SINGD (safeguards on), the reference rule and "
        "AdamW on an lr x lr_cov grid; diverged fraction, best and median per optimizer, "
        "heat maps (see torchsingd.experiments.sweep)",
    )
    c.add_argument(
        "--structures",
        nargs="+",
        help="--sweep: SINGD structures (default: dense, hierarchical15_15, diagonal)",
    )
    c.add_argument(
        "--all-seeds",
        action="store_true",
        help="--sweep: run every grid point with --seeds seeds and pick the best point by "
        "its mean over them (default: the best on seed 0, then re-run)",
    )
    c.add_argument(
        "--baseline",
        choices=("reference", "reference-rule", "none"),
        help="--sweep: singd==0.0.5 (default when installed), torchsingd with "
        "safeguards=False, or none",
    )
    c.add_argument(
        "--jobs",
        type=positive_int,
        default=min(2, cpus),
        help="parallel worker processes (default: min(2, CPUs))",
    )
    c.add_argument(
        "--threads", type=positive_int, default=1, help="torch threads per job (default 1)"
    )
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(run=_compare)

    b = sub.add_parser(
        "bench",
        help="speed and memory against AdamW and the reference (interleaved ratios)",
        add_help=False,
    )
    b.set_defaults(run=_bench, bench_argv=[])

    t = sub.add_parser(
        "train",
        help="train one configuration",
        description="Train one (task, optimizer, precision, lr, seed) on the full training "
        "set and report the test metric per epoch (the final runs of `compare`).",
    )
    t.add_argument("--task", required=True, choices=list(TASKS), help="the embedded task")
    t.add_argument("--optimizer", required=True, choices=list(OPTIMIZERS), help="its name")
    t.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="float32, bf16-mixed (autocast) or bf16 (pure); default float32",
    )
    t.add_argument("--lr", type=positive_float, help="default: the middle of the optimizer's grid")
    t.add_argument("--epochs", type=positive_int, help="default: the task's")
    t.add_argument("--seed", type=seed_int, default=0, help="data order and init (default 0)")
    t.add_argument("--quick", action="store_true", help="few epochs on a training subset")
    t.add_argument("--out", type=path_text, help="append the run to <out>/runs.jsonl")
    t.add_argument(
        "--threads",
        type=positive_int,
        default=min(2, cpus),
        help=f"torch threads (default: min(2, CPUs) = {min(2, cpus)})",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(run=_train)
    return p


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def path_text(text: str) -> str:
    """An argparse type: a non-empty path (an empty one, as from ``--out "$UNSET"``,
    would mean the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (name a path)")
    return text


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def seed_int(text: str) -> int:
    """An argparse type: a seed torch.manual_seed accepts (0 <= seed < 2^64)."""
    value = int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be in [0, 2^64), got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["bench"]:  # its own options; see `torchsingd bench --help`
            return _bench(argparse.Namespace(bench_argv=argv[1:]))
        helping = "-h" in argv or "--help" in argv
        if argv[:1] and argv[0] in NEEDS and not helping and not _have_extras(argv[0]):
            return 2  # (checked before the parser, which imports them)
        args = parser().parse_args(argv)
        args.argv = argv
        return args.run(args)
    except KeyboardInterrupt:  # (where a command has nothing more to say about it)
        print("\nInterrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
