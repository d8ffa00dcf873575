"""Time one training iteration of torchsingd's SINGD against AdamW and the reference.

Protocol (shared/BENCHMARKING.md): the same model, data and hyper-parameters for every
candidate; candidates interleaved (A B C A B C ...) after warm-up; the median of the
per-round times, with min and max, as a ratio to AdamW measured in the same process.
Runs unchanged on CPU (threads pinned) and CUDA (synchronised timings).

    python benchmarks/iteration_time.py [--device cuda] [--rounds 7] [--iters 5]
        [--models mlp cnn] [--structures dense diagonal ...] [--T 1 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from torchsingd import SINGD

REFERENCE_NAMES = {
    "dense": "dense",
    "diagonal": "diagonal",
    "blockdiagonal:30": "block30diagonal",
    "hierarchical:15,15": "hierarchical15_15",
    "triltoeplitz": "triltoeplitz",
}


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


MODELS = {"mlp": mlp, "cnn": cnn}


def reference_singd():
    try:
        from singd.optim.optimizer import SINGD as reference_cls  # noqa: N811
    except ImportError:
        return None
    return reference_cls


class Candidate:
    """A model + optimizer pair that can run training iterations."""

    def __init__(self, name: str, model: nn.Module, make_opt: Callable, x, y):
        self.name = name
        self.model = model
        self.opt = make_opt(model)
        self.x, self.y = x, y
        self.times: list[float] = []

    def iterate(self, n: int) -> None:
        for _ in range(n):
            self.opt.zero_grad()
            nn.functional.cross_entropy(self.model(self.x), self.y).backward()
            self.opt.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(cands: list[Candidate], rounds: int, iters: int, device: torch.device) -> None:
    for c in cands:  # warm-up (includes the first preconditioner update)
        c.iterate(3)
    sync(device)
    for _ in range(rounds):
        for c in cands:
            sync(device)
            t0 = time.perf_counter()
            c.iterate(iters)
            sync(device)
            c.times.append((time.perf_counter() - t0) / iters)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    p.add_argument("--structures", nargs="+", default=list(REFERENCE_NAMES))
    p.add_argument("--T", nargs="+", type=int, default=[1, 10])
    p.add_argument("--no-reference", action="store_true")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    Reference = None if args.no_reference else reference_singd()
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"torch {torch.__version__}, {where}, batch {args.batch} of 1x28x28, "
        f"median of {args.rounds} rounds x {args.iters} iterations (interleaved)"
    )
    print(
        "| model | structure | T | AdamW ms | ours ms | ours/AdamW | ref ms | ref/AdamW "
        "| ref/ours |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for model_name in args.models:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 1, 28, 28, generator=gen).to(device)
        y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
        for T in args.T:
            for s in args.structures:

                def build(seed=0, model_name=model_name):
                    torch.manual_seed(seed)
                    return MODELS[model_name]().to(device)

                hp = dict(lr=1e-3, lr_cov=1e-2, T=T)
                cands = [
                    Candidate(
                        "adamw",
                        build(),
                        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True),
                        x,
                        y,
                    ),
                    Candidate(
                        "ours",
                        build(),
                        lambda m, s=s, hp=hp: SINGD(m, structures=(s, s), **hp),
                        x,
                        y,
                    ),
                ]
                ref_name = REFERENCE_NAMES.get(s)
                if Reference is not None and ref_name is not None:
                    cands.append(
                        Candidate(
                            "ref",
                            build(),
                            lambda m, r=ref_name, hp=hp: Reference(m, structures=(r, r), **hp),
                            x,
                            y,
                        )
                    )
                measure(cands, args.rounds, args.iters, device)
                med = {c.name: statistics.median(c.times) for c in cands}
                ref = med.get("ref")
                ref_cols = (
                    (f"{1e3 * ref:.2f} | {ref / med['adamw']:.2f}x | {ref / med['ours']:.2f}x")
                    if ref
                    else "- | - | -"
                )
                print(
                    f"| {model_name} | {s} | {T} | {1e3 * med['adamw']:.2f} | "
                    f"{1e3 * med['ours']:.2f} | {med['ours'] / med['adamw']:.2f}x | "
                    f"{ref_cols} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
