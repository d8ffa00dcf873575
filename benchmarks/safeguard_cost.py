"""What the safeguards cost: SINGD iteration time with ``safeguards=True`` over ``False``.

Same model, data and hyper-parameters for both; the two candidates are interleaved
(A B A B ...) after warm-up, and the ratio is the median over rounds of the round
means. Model: the benchmark's MLP 784-512-512-512-10, batch 128, float32.

    PYTHONPATH=. python benchmarks/safeguard_cost.py [--threads 2] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from torchsingd import SINGD


def mlp() -> nn.Module:
    sizes = (784, 512, 512, 512, 10)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def candidate(structure: str, T: int, safeguards: bool):
    torch.manual_seed(0)
    model = mlp()
    opt = SINGD(model, structures=structure, T=T, safeguards=safeguards, lr=1e-3)
    return model, opt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument(
        "--structures", nargs="+", default=["diagonal", "blockdiagonal", "hierarchical", "dense"]
    )
    p.add_argument("--T", nargs="+", type=int, default=[1, 10])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(128, 784, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (128,), generator=torch.Generator().manual_seed(1))
    print(f"threads {args.threads}, rounds {args.rounds} x {args.iters} iterations")
    print("structure     | T  | off ms/it | on ms/it | on/off")
    for structure in args.structures:
        for T in args.T:
            runs = {flag: candidate(structure, T, flag) for flag in (False, True)}
            times: dict[bool, list[float]] = {False: [], True: []}
            for round_ in range(args.rounds + 1):
                for flag, (model, opt) in runs.items():
                    start = time.perf_counter()
                    for _ in range(args.iters):
                        opt.zero_grad()
                        nn.functional.cross_entropy(model(x), y).backward()
                        opt.step()
                    if round_ > 0:  # round 0 warms up
                        times[flag].append((time.perf_counter() - start) / args.iters)
            ratio = statistics.median(
                on / off for on, off in zip(times[True], times[False], strict=True)
            )
            off, on = (1e3 * statistics.median(times[f]) for f in (False, True))
            print(f"{structure:13s} | {T:2d} | {off:9.2f} | {on:8.2f} | {ratio:.3f}x", flush=True)


if __name__ == "__main__":
    main()
