"""Time per step and bytes communicated per step of SINGD's distributed strategies.

Spawns 1, 2 and 4 gloo processes on this machine (one thread each), trains the
benchmark MLP (784-512-512-512-10) wrapped in ``DistributedDataParallel`` with a
global batch of 128, and reports per strategy the median time per step and the bytes
each rank sends per step: torchsingd's own collectives (statistics every ``T`` steps,
and for "shard" the factor broadcasts and the natural-gradient sum) and DDP's
gradient all-reduce (the parameter bytes, for both strategies).

    python benchmarks/distributed.py [--procs 1 2 4] [--T 10] [--structure diagonal]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from torchsingd import SINGD
from torchsingd import distributed as tdist
from torchsingd.experiments.bench import mlp


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, strategy, structure, T, steps, out):
    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = mlp()
    opt = SINGD(model, structures=structure, T=T, distributed_strategy=strategy)
    ddp = DistributedDataParallel(model)
    gen = torch.Generator().manual_seed(rank)
    local = 128 // world
    x = torch.randn(local, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (local,), generator=gen)
    times = []
    for step in range(steps + T):
        if step == T:  # after warm-up
            before = dict(tdist.traffic)
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        dist.barrier()
        if step >= T:
            times.append(time.perf_counter() - t0)
    sent = sum(tdist.traffic.values()) - sum(before.values())
    if rank == 0:
        grad_bytes = sum(p.nbytes for p in model.parameters())
        torch.save(
            {
                "time": statistics.median(times),
                "ours": sent / steps,
                "ddp": grad_bytes if world > 1 else 0,
            },
            out,
        )
    dist.barrier()  # no rank tears gloo down while a peer still works
    del ddp, opt
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--procs", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--T", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="timed steps (a multiple of T)")
    p.add_argument("--structure", default="blockdiagonal:30")
    args = p.parse_args()
    print(
        f"MLP 784-512-512-512-10, global batch 128, {args.structure}, T={args.T}, gloo, "
        f"{os.cpu_count()} cores, 1 thread per process"
    )
    print("| processes | strategy | ms/step | torchsingd bytes/step/rank | DDP bytes/step/rank |")
    print("|---|---|---|---|---|")
    for world in args.procs:
        for strategy in ("replicate", "shard"):
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "r.pt")
                mp.spawn(
                    _worker,
                    args=(world, _port(), strategy, args.structure, args.T, args.steps, out),
                    nprocs=world,
                    join=True,
                )
                r = torch.load(out)
            print(
                f"| {world} | {strategy} | {1e3 * r['time']:.1f} | {r['ours'] / 1e6:.3f} MB "
                f"| {r['ddp'] / 1e6:.3f} MB |",
                flush=True,
            )


if __name__ == "__main__":
    main()
