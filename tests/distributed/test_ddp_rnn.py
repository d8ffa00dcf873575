"""Recurrent layers under DDP (2 gloo processes): N ranks with batch ``B/N`` end where
one process with batch ``B`` ends, as for the other layers (``test_ddp.py``)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: N817

from tests.distributed.spawning import JOB_TIMEOUT, WORLD
from torchsingd import KFAC, SINGD

pytestmark = pytest.mark.distributed


class Tagger(nn.Module):
    def __init__(self, cell: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = getattr(nn, cell)(3, 4, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(8, 3)
        self.double()

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def batches(steps: int = 4, batch: int = 4, length: int = 5):
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(batch, length, 3, dtype=torch.float64, generator=gen),
            torch.randint(0, 3, (batch, length), generator=gen),
        )
        for _ in range(steps)
    ]


def build(model, config):
    kind, cell, structure, approx, T, strategy = config
    common = dict(
        lr=0.05,
        T=T,
        kfac_approx=approx,
        loss_average="batch+sequence",
        warn_unsupported=False,
        distributed_strategy=strategy,
    )
    if kind == "kfac":
        return KFAC(model, lr_cov=0.1, damping=0.1, **common)
    return SINGD(model, lr_cov=0.1, structures=structure, **common)


def train(model, opt, rank=0, world=1):
    for x, y in batches():
        n = len(x) // world
        xs, ys = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
        opt.zero_grad()
        nn.functional.cross_entropy(model(xs).flatten(0, 1), ys.flatten()).backward()
        opt.step()


def _worker(rank, port, config, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=JOB_TIMEOUT)
    torch.set_num_threads(1)
    try:
        model = Tagger(config[1])
        opt = build(model, config)
        ddp = DDP(model)
        train(ddp, opt, rank, WORLD)
        if rank == 0:
            torch.save([p.detach() for p in model.parameters()], out_path)
        dist.barrier()
        del ddp, opt
    finally:
        dist.destroy_process_group()


CONFIGS = [
    ("singd", "LSTM", "dense", "expand", 1, "replicate"),
    ("kfac", "GRU", "dense", "reduce", 2, "shard"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_recurrent_layers_on_two_ranks_equal_one_process(config, jobs):
    key = _key(config)
    jobs.ensure(key)
    out = jobs.path(key)
    torch.set_num_threads(1)
    model = Tagger(config[1])
    opt = build(model, config)
    assert "rnn.hh_l1_reverse" in opt.layers
    train(model, opt)
    for p, q in zip(model.parameters(), torch.load(out), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-11)


def _key(config) -> str:
    return "rnn-" + "-".join(map(str, config))


def add_jobs(batch) -> None:
    """This module's 2-rank jobs, run with the others (``tests/distributed/spawning.py``)."""
    for config in CONFIGS:
        batch.add(_key(config), _worker, config, batch.path(_key(config)))
