"""In-process A/B of the whole package at another git revision against the working tree.

On a noisy machine (this 2-core VM moves whole runs by up to 2x) separate benchmark
processes cannot resolve a 5% change, so both versions run in one process, their
iterations interleaved with AdamW's (A B AdamW, A B AdamW, ...). The other revision's
``torchsingd`` is extracted with ``git archive`` and imported under another name
(``torchsingd_at_old``: every ``torchsingd`` module name in its sources renamed), so
that nothing is shared between the two: unlike ``ab_structure.py``, which swaps one
structure class and so misses code elsewhere that dispatches on the family's class
(``isinstance`` in the convolution statistics: there the swapped-in class took
another route and read 0.73 where the real difference is smaller).

    PYTHONPATH=. python benchmarks/ab_revision.py --rev 4205cec \\
        --structure hierarchical:15,15 --model cnn --T 1 --rounds 12

prints the median iteration time of each as a ratio to AdamW, new/old of the
medians, and new/old per round. ``--new REV`` takes the new side from another
revision too (``torchsingd_at_new``) instead of the working tree.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import io
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from torchsingd import SINGD  # noqa: E402
from torchsingd.experiments import bench  # noqa: E402


def package_at(rev: str, name: str):
    """``torchsingd`` as it is at ``rev``, imported as ``name``."""
    archive = subprocess.run(
        ["git", "archive", rev, "torchsingd"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    where = Path(tempfile.mkdtemp())
    # removed when the run ends (a module the package imports later is read from it)
    atexit.register(shutil.rmtree, where, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(where, filter="data")
    (where / "torchsingd").rename(where / name)
    pattern = re.compile(r"\btorchsingd\b")
    for path in (where / name).rglob("*.py"):
        path.write_text(pattern.sub(name, path.read_text()))
    sys.path.insert(0, str(where))
    return importlib.import_module(name)


def build(optimizer_class, model_name: str, structure: str, T: int):
    """A seeded model and an optimizer of ``optimizer_class`` on it."""
    torch.manual_seed(0)
    model = bench.MODELS[model_name]()
    opt = optimizer_class(model, structures=structure, T=T, lr=1e-3, warn_unsupported=False)
    return model, opt


def time_rounds(cands: dict, model_name: str, T: int, rounds: int, alternate: bool) -> dict:
    """Per candidate (``name -> (model, optimizer)``) and AdamW on the same seeded
    model, the mean iteration time of each round after two warm-up rounds; a round
    runs every candidate for ``max(T, 10)`` iterations, back to back (``alternate``:
    the first two candidates swap places every other round, AdamW last)."""
    torch.manual_seed(0)
    model = bench.MODELS[model_name]()
    cands = {**cands, "adamw": (model, torch.optim.AdamW(model.parameters(), foreach=True))}
    x, y = bench.data(128, torch.device("cpu"), torch.float32)
    loss_fn = nn.CrossEntropyLoss()
    iters = max(T, 10)
    times: dict[str, list[float]] = {k: [] for k in cands}
    names = list(cands)
    if rounds <= 2:
        raise SystemExit(f"--rounds must exceed the 2 warm-up rounds, got {rounds}.")
    for r in range(rounds):
        order = [names[1], names[0], *names[2:]] if alternate and r % 2 == 0 else names
        for name in order:
            model, opt = cands[name]
            start = time.perf_counter()
            for _ in range(iters):
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
            if r >= 2:  # warm-up rounds
                times[name].append((time.perf_counter() - start) / iters)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", required=True, help="the old revision (e.g. HEAD^)")
    parser.add_argument("--new", default=None, help="the new revision (default: working tree)")
    parser.add_argument("--structure", required=True, help="e.g. hierarchical:15,15")
    parser.add_argument("--model", default="mlp", choices=sorted(bench.MODELS))
    parser.add_argument("--T", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    old = package_at(args.rev, "torchsingd_at_old")
    new_singd = SINGD if args.new is None else package_at(args.new, "torchsingd_at_new").SINGD
    cands = {
        "old": build(old.SINGD, args.model, args.structure, args.T),
        "new": build(new_singd, args.model, args.structure, args.T),
    }
    times = time_rounds(cands, args.model, args.T, args.rounds, alternate=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    new_name = "working tree" if args.new is None else args.new
    print(f"{args.model} {args.structure} T={args.T}, old = {args.rev}, new = {new_name}")
    for name in ("old", "new"):
        print(
            f"  {name}: {1e3 * med[name]:.2f} ms per iteration = "
            f"{med[name] / med['adamw']:.2f}x AdamW ({1e3 * med['adamw']:.2f} ms)"
        )
    ratios = [a / b for a, b in zip(times["new"], times["old"], strict=True)]
    rounds = " ".join(f"{r:.2f}" for r in ratios)
    print(
        f"  new/old {med['new'] / med['old']:.3f} (paired median "
        f"{statistics.median(ratios):.3f}); per round: {rounds}"
    )


if __name__ == "__main__":
    main()
