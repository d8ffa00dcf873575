"""In-process A/B of one structure family's implementation at two git revisions.

On a noisy machine (this 2-core VM moves whole runs by up to 2x) separate benchmark
processes cannot resolve a 5% change. This script loads the family's module from
another revision (``git show REV:torchsingd/structures/FAMILY.py``) next to the
working tree's, builds one SINGD per implementation and AdamW on the same model, and
times them interleaved (A B AdamW, A B AdamW, ...), so that slow periods hit all
three alike. The other revision's module must import cleanly against the working
tree's ``torchsingd.structures.base`` (true while the protocol is unchanged).

Not for models whose statistics dispatch on the family's class: the convolution
statistics test ``isinstance(K, HierarchicalMatrix)`` (and block-diagonal), which the
other revision's class fails, so it takes the generic rows route there and the CNN's
ratio says more than the structures' difference (0.943 read here for 1614e85, 1.006
by ``ab_revision.py``). ``ab_revision.py`` compares whole packages instead.

    PYTHONPATH=. python benchmarks/ab_structure.py --rev 542892d^ --family hierarchical \\
        --structure hierarchical:15,15 --model mlp --T 1 --rounds 15

prints the median iteration time of each, as a ratio to AdamW, and new/old (also
per round).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ab_revision import time_rounds  # noqa: E402

from torchsingd import SINGD  # noqa: E402
from torchsingd.experiments import bench  # noqa: E402
from torchsingd.structures import registry  # noqa: E402


def old_class(rev: str, family: str) -> type:
    """The family's class as the module at ``rev`` defines it."""
    source = subprocess.run(
        ["git", "show", f"{rev}:torchsingd/structures/{family}.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"{family}_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = registry.FAMILIES[family].cls
    return getattr(module, current.__name__)


def build(model_name: str, structure: str, family: str, cls: type, T: int):
    """A seeded model and a SINGD whose factors are instances of ``cls``."""
    entry = registry.FAMILIES[family]
    registry.FAMILIES[family] = dataclasses.replace(entry, cls=cls)
    try:
        torch.manual_seed(0)
        model = bench.MODELS[model_name]()
        opt = SINGD(model, structures=structure, T=T, lr=1e-3, warn_unsupported=False)
    finally:
        registry.FAMILIES[family] = entry
    return model, opt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", required=True, help="the other revision (e.g. HEAD^)")
    parser.add_argument("--family", required=True, help="module name, e.g. hierarchical")
    parser.add_argument("--structure", required=True, help="e.g. hierarchical:15,15")
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn", "vit"])
    parser.add_argument("--T", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    current = registry.FAMILIES[args.family].cls
    other = old_class(args.rev, args.family)
    cands = {
        "old": build(args.model, args.structure, args.family, other, args.T),
        "new": build(args.model, args.structure, args.family, current, args.T),
    }
    times = time_rounds(cands, args.model, args.T, args.rounds, alternate=False)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model} {args.structure} T={args.T}, old = {args.rev}, new = working tree")
    for name in ("old", "new"):
        print(
            f"  {name}: {1e3 * med[name]:.2f} ms per iteration = "
            f"{med[name] / med['adamw']:.2f}x AdamW ({1e3 * med['adamw']:.2f} ms)"
        )
    rounds = " ".join(f"{a / b:.2f}" for a, b in zip(times["new"], times["old"], strict=True))
    print(f"  new/old {med['new'] / med['old']:.3f}; per round: {rounds}")


if __name__ == "__main__":
    main()
