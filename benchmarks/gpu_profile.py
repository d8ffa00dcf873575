"""Where a SINGD iteration's time goes on a GPU: launches, host syncs, kernel time.

For the benchmark's models (batch 128) and structures, ours and the reference: the
iteration's wall time (median of 5 rounds of 10), and from ``torch.profiler`` over 10
iterations, per iteration, the number of aten operators dispatched (nested ones
included), of operator calls per ``opt.step()`` that reach the dispatcher from Python
(``step calls``, views left out: what a host-bound GPU pays for), of device-to-host
reads (each a sync: ``Memcpy DtoH`` on the GPU; ``aten::_local_scalar_dense`` on the
CPU), of GPU kernels and copies, and their summed time (user ranges such as
``Optimizer.step#SINGD.step``, which span the whole step on the GPU's timeline, left
out). Wall time far above kernel time means the iteration is bound by the host
(Python and operator dispatch), not by the GPU. ``--top N`` lists the N costliest
kernels of each candidate.

``python benchmarks/gpu_profile.py [--device cuda] [--T 1 10] [--models mlp cnn]``
(runs on the CPU too, without the kernel columns).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from torchsingd.experiments.bench import REFERENCE_NAMES, build, data, reference_cls, sync

STRUCTURES = ["diagonal", "blockdiagonal:30", "hierarchical:15,15", "triltoeplitz", "dense"]


def wall(c, x, y, device, rounds=5, iters=10) -> float:
    c.iterate(x, y, 3)
    times = []
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        c.iterate(x, y, iters)
        sync(device)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def _annotation(event) -> bool:
    """A user range shown on the GPU timeline (e.g. ``Optimizer.step#SINGD.step``, which
    spans the whole step), not a kernel or a copy."""
    return bool(getattr(event, "is_user_annotation", False)) or event.name.startswith(
        ("Optimizer.", "ProfilerStep")
    )


VIEWS = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "t", "numpy_T", "transpose",
    "permute", "slice", "select", "narrow", "diagonal", "unsqueeze", "squeeze", "expand",
    "as_strided", "alias", "detach", "lift_fresh", "split", "unbind", "view_as", "flatten",
}  # fmt: skip


class _Calls(TorchDispatchMode):
    """Counts the operator calls (views left out) that reach the dispatcher from Python."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.__name__.split(".")[0] not in VIEWS
        return func(*args, **(kwargs or {}))


def step_calls(c, x, y, steps) -> float:
    """Operator calls per ``opt.step()`` (views left out), over ``steps`` steps."""
    total = 0
    for _ in range(steps):
        c.opt.zero_grad()
        torch.nn.functional.cross_entropy(c.model(x).float(), y).backward()
        with _Calls() as mode:
            c.opt.step()
        total += mode.n
    return total / steps


def counts(c, x, y, device, iters=10, top=0) -> dict[str, float]:
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts) as prof:
        c.iterate(x, y, iters)
        sync(device)
    ops = syncs = kernels = 0
    kernel_us = 0.0
    by_name: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA and not _annotation(e):
            syncs += e.name.startswith("Memcpy DtoH")
            kernels += 1
            kernel_us += e.time_range.elapsed_us()
            entry = by_name.setdefault(e.name[:70], [0, 0.0])
            entry[0] += 1
            entry[1] += e.time_range.elapsed_us()
        elif e.name.startswith("aten::"):
            ops += 1
            syncs += device.type == "cpu" and e.name == "aten::_local_scalar_dense"
    for name, (n, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"    {us / iters:8.1f} us/iter {n / iters:6.1f} x  {name}")
    return dict(
        ops=ops / iters,
        syncs=syncs / iters,
        kernels=kernels / iters,
        kernel_ms=kernel_us / iters / 1e3,
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    p.add_argument("--structures", nargs="+", default=STRUCTURES)
    p.add_argument("--T", nargs="+", type=int, default=[1, 10])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--top", type=int, default=0, help="list the N costliest kernels")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    have_ref = reference_cls() is not None
    print(
        "| model | T | candidate | ms/iter | aten ops | step calls | host syncs | kernels | "
        "kernel ms |\n|---|---|---|---|---|---|---|---|---|"
    )
    for model_name in args.models:
        x, y = data(args.batch, device, torch.float32)
        for T in args.T:
            kinds = [("adamw", "dense"), ("null", "dense")]
            for s in args.structures:
                kinds.append(("ours", s))
                if have_ref and s in REFERENCE_NAMES and not (T == 10 and "toeplitz" in s):
                    kinds.append(("ref", s))
            for kind, s in kinds:
                c = build(kind, model_name, s, T, device, torch.float32)
                slow = kind == "ref" and "toeplitz" in s  # ~1 s per iteration
                ms = 1e3 * wall(c, x, y, device, rounds=1 if slow else 5, iters=3 if slow else 10)
                n = counts(c, x, y, device, iters=2 if slow else max(T, 10), top=args.top)
                label = kind if kind in ("adamw", "null") else f"{kind} {s}"
                calls = step_calls(c, x, y, 2 if slow else max(T, 10))
                print(
                    f"| {model_name} | {T} | {label} | {ms:.2f} | {n['ops']:.0f} | {calls:.0f} | "
                    f"{n['syncs']:.1f} | {n['kernels']:.0f} | {n['kernel_ms']:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
