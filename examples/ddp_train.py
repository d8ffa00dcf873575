"""Data-parallel training with SINGD: ``torchrun --nproc_per_node=2 examples/ddp_train.py``.

Runs on CPUs (gloo) and unchanged on GPUs (nccl, one GPU per process). Each rank
trains on its share of every batch of scikit-learn's bundled digits; SINGD averages
its statistics across ranks, so N ranks follow the trajectory of one process with the
whole batch. Rank 0 writes a checkpoint after every epoch; running the command again
resumes from it (``--fresh`` starts over). Multi-node::

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 \\
        --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 examples/ddp_train.py
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from torchsingd import SINGD
from torchsingd.experiments.data import digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--strategy", choices=["replicate", "shard"], default="replicate")
    parser.add_argument("--structures", default="blockdiagonal:16")
    parser.add_argument("--checkpoint", default="ddp_checkpoint.pt")
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)

    data = digits(seed=0)
    X, y, X_test, y_test = data.X_train, data.y_train, data.X_test, data.y_test
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    model = model.to(device)
    opt = SINGD(
        model,
        lr=1e-3,
        lr_cov=0.05,
        damping=1e-2,
        T=5,
        structures=args.structures,
        distributed_strategy=args.strategy,
    )
    ddp = DistributedDataParallel(model)

    start = 0
    ckpt = Path(args.checkpoint)
    if ckpt.exists() and not args.fresh:
        state = torch.load(ckpt, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["epoch"] + 1
        if rank == 0:
            print(f"resumed from {ckpt} after epoch {state['epoch']}")

    local = args.batch // world
    for epoch in range(start, args.epochs):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(y) - args.batch + 1, args.batch):
            idx = order[i + rank * local : i + (rank + 1) * local]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(ddp(X[idx].to(device)), y[idx].to(device))
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = (model(X_test.to(device)).argmax(1).cpu() == y_test).float().mean().item()
        if rank == 0:
            torch.save(
                {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch}, ckpt
            )
            print(
                f"epoch {epoch}: loss {loss.item():.4f}, test accuracy {acc:.3f} "
                f"({world} ranks, {args.strategy})"
            )
    dist.barrier()  # no rank tears the process group down while a peer still works
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
