"""Multi-process tests (2 gloo processes on localhost): DDP equals one process.

N ranks with batch ``B/N`` each must end, step for step, where one process with
batch ``B`` ends (to float64 rounding), for both distributed strategies.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: N817

from tests.distributed.spawning import JOB_TIMEOUT, WORLD, free_port, spawn
from torchsingd import KFAC, SINGD

pytestmark = pytest.mark.distributed


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6),
        nn.LayerNorm(6),
        nn.Linear(6, 3),
    ).double()


def batches(steps: int, batch: int = 8):
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(batch, 2, 5, 5, dtype=torch.float64, generator=gen),
            torch.randint(0, 3, (batch,), generator=gen),
        )
        for _ in range(steps)
    ]


def train(model, opt, data, rank=0, world=1, accumulate=False):
    for x, y in data:
        n = len(x) // world
        xs, ys = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
        opt.zero_grad()
        if accumulate:  # two micro-batches, the first without gradient sync
            half = n // 2
            with model.no_sync():
                (nn.functional.cross_entropy(model(xs[:half]), ys[:half]) / 2).backward()
            (nn.functional.cross_entropy(model(xs[half:]), ys[half:]) / 2).backward()
        else:
            nn.functional.cross_entropy(model(xs), ys).backward()
        opt.step()


def factory(kind: str, structure: str, approx: str, T: int, strategy: str, split: bool = False):
    """``split``: nanoGPT's groups (weight decay on parameters of 2 or more dimensions
    only), which split every layer with a bias across two groups."""

    def build(model):
        common = dict(
            lr=0.05, T=T, kfac_approx=approx, warn_unsupported=False, distributed_strategy=strategy
        )
        if split:
            inner = model.module if isinstance(model, DDP) else model
            common["params"] = [
                {"params": [p for p in inner.parameters() if p.dim() >= 2], "weight_decay": 0.05},
                {"params": [p for p in inner.parameters() if p.dim() < 2], "momentum": 0.5},
            ]
        if kind == "kfac":
            return KFAC(model, lr_cov=0.1, damping=0.1, **common)
        return SINGD(model, lr_cov=0.1, structures=structure, **common)

    return build


def _worker(rank, port, config, out_path, accumulate, wrap_first, steps=(0, 5), resume=None):
    """Train ``batches(5)[steps[0]:steps[1]]`` on 2 ranks (resuming from a checkpoint)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=JOB_TIMEOUT)
    torch.set_num_threads(1)
    try:
        model = make_model()
        if wrap_first:
            ddp = DDP(model)
            opt = factory(*config)(ddp)
        else:
            opt = factory(*config)(model)
            ddp = DDP(model)
        if resume is not None:  # every rank loads the checkpoint rank 0 wrote
            ckpt = torch.load(resume)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
        train(ddp, opt, batches(5)[steps[0] : steps[1]], rank, WORLD, accumulate)
        if rank == 0:
            torch.save(
                {
                    "params": [p.detach() for p in model.parameters()],
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                },
                out_path,
            )
        # Every rank finishes (rank 0 saved) and drops DDP's reducer before the group
        # goes: tearing gloo down under a peer still working aborted a worker (rarely).
        dist.barrier()
        del ddp, opt
    finally:
        dist.destroy_process_group()


CONFIGS = [
    ("singd", "dense", "expand", 1, "replicate"),
    ("singd", "blockdiagonal:4", "reduce", 2, "replicate"),
    ("singd", "hierarchical:3,2", "expand", 2, "shard", True),
    ("singd", "triltoeplitz", "reduce", 1, "shard"),
    ("singd", "diagonal", "reduce", 3, "replicate"),
    ("singd", "triubottomrightdiag:2", "expand", 2, "shard"),
    ("kfac", "dense", "expand", 2, "shard", True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_two_ranks_equal_one_process(config, jobs):
    key = _key("two-ranks", config)
    jobs.ensure(key)
    out = jobs.path(key)
    torch.set_num_threads(1)
    model = make_model()
    opt = factory(*config)(model)
    train(model, opt, batches(5))
    got = torch.load(out)
    for p, q in zip(model.parameters(), got["params"], strict=True):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-11)
    single = opt.state_dict()["kronecker"]["layers"]
    for name, saved in got["opt"]["kronecker"]["layers"].items():
        for key, tensors in saved["factors"].items():
            if tensors is None:
                continue
            for a, b in zip(tensors, single[name]["factors"][key], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def _subgroup_worker(rank, port, out_path):
    """3 processes; ranks 1 and 2 train in the process group ``[1, 2]``, rank 0 idles."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=3, timeout=JOB_TIMEOUT)
    torch.set_num_threads(1)
    try:
        sub = dist.new_group([1, 2])
        if rank > 0:
            model = make_model()
            opt = SINGD(
                model,
                lr=0.05,
                lr_cov=0.1,
                T=1,
                structures="hierarchical:3,2",
                warn_unsupported=False,
                distributed_strategy="shard",
                process_group=sub,
            )
            ddp = DDP(model, process_group=sub)
            train(ddp, opt, batches(3), rank - 1, 2)
            if rank == 1:
                torch.save([p.detach() for p in model.parameters()], out_path)
            del ddp, opt
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_shard_strategy_in_a_process_group_that_is_not_the_world(tmp_path):
    """The owners of the layers are ranks of the group; broadcasts must use them (as
    global ranks): equal to one process."""
    out = tmp_path / "rank1.pt"
    spawn(_subgroup_worker, str(out), nprocs=3)
    torch.set_num_threads(1)
    model = make_model()
    opt = SINGD(
        model, lr=0.05, lr_cov=0.1, T=1, structures="hierarchical:3,2", warn_unsupported=False
    )
    train(model, opt, batches(3))
    for p, q in zip(model.parameters(), torch.load(out), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-11)


RESUME_STRATEGIES = ["replicate", "shard"]


def _resume_config(strategy):
    return ("singd", "blockdiagonal:4", "expand", 2, strategy)


@pytest.mark.parametrize("strategy", RESUME_STRATEGIES)
def test_distributed_checkpoint_resume(strategy, jobs):
    """3 steps on 2 ranks, rank 0 saves; a new 2-rank job resumes for 2 more steps:
    equal to 5 uninterrupted steps of one process."""
    config = _resume_config(strategy)
    jobs.ensure(_key("resume-first", strategy), _key("resume-final", strategy))
    final = jobs.path(_key("resume-final", strategy))
    torch.set_num_threads(1)
    model = make_model()
    opt = factory(*config)(model)
    train(model, opt, batches(5))
    for p, q in zip(model.parameters(), torch.load(final)["params"], strict=True):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-11)


def test_fsdp2_is_refused_with_an_explanation():
    """Parameters sharded as DTensors (what ``fully_shard`` leaves) are refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    model = make_model()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model[5].weight = nn.Parameter(distribute_tensor(model[5].weight.detach(), mesh))
        with pytest.raises(ValueError, match="FSDP.*DistributedDataParallel"):
            SINGD(model)
        with pytest.raises(ValueError, match="FSDP"):
            KFAC(model)
    finally:
        dist.destroy_process_group()


def test_invalid_strategy_is_refused():
    with pytest.raises(ValueError, match="distributed_strategy"):
        SINGD(make_model(), distributed_strategy="zero")


def test_example_runs_under_torchrun_and_resumes(tmp_path):
    """``torchrun --nproc_per_node=2 examples/ddp_train.py`` trains, saves, resumes."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("sklearn")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(root / "examples" / "ddp_train.py"),
        "--checkpoint",
        str(tmp_path / "ckpt.pt"),
    ]
    first = subprocess.run(
        [*cmd, "--epochs", "1"], env=env, capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 0, first.stderr[-2000:]
    assert "epoch 0:" in first.stdout
    second = subprocess.run(
        [*cmd, "--epochs", "2", "--strategy", "shard"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout and "epoch 1:" in second.stdout


def _sum_loss_worker(rank, port, config, out_path, mode):
    """A sum loss (``loss_average=None``) on 2 ranks: gradients summed by hand, or DDP
    (which averages) with the loss times N and ``set_current_grad_scale(N)``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=JOB_TIMEOUT)
    torch.set_num_threads(1)
    try:
        model = make_model()
        opt = _sum_factory(config, init_grad_scale=WORLD if mode == "ddp" else 1.0)(model)
        net = DDP(model) if mode == "ddp" else model
        for t, (x, y) in enumerate(batches(4)):
            n = len(x) // WORLD
            xs, ys = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(xs), ys, reduction="sum")
            if mode == "ddp":
                (loss * WORLD).backward()
                opt.set_current_grad_scale(WORLD)
            else:
                loss.backward()
                for p in model.parameters():
                    dist.all_reduce(p.grad)  # summed
            if mode == "retry" and t == 1:  # a step that raises after the statistics'
                # reduction ("replicate" reads a scheduled lr_cov there), retried with
                # the schedule fixed: the sum over ranks must not be summed again
                opt.param_groups[0]["lr_cov"] = lambda step: -1.0
                with pytest.raises(ValueError, match="returned -1.0"):
                    opt.step()
                opt.param_groups[0]["lr_cov"] = 0.1
            opt.step()
        if rank == 0:
            torch.save([p.detach() for p in model.parameters()], out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _sum_factory(config, init_grad_scale=1.0):
    kind, structure, strategy = config

    def build(model):
        common = dict(
            lr=1e-3,
            T=1,
            loss_average=None,
            warn_unsupported=False,
            distributed_strategy=strategy,
            init_grad_scale=init_grad_scale,
        )
        if kind == "kfac":
            return KFAC(model, lr_cov=0.1, damping=0.1, **common)
        return SINGD(model, lr_cov=0.1, structures=structure, kl_clip=None, **common)

    return build


SUM_MODES = ["summed", "ddp", "retry"]
SUM_CONFIGS = [
    ("singd", "dense", "replicate"),
    ("singd", "diagonal", "shard"),
    ("kfac", "dense", "shard"),
]


@pytest.mark.parametrize("mode", SUM_MODES)
@pytest.mark.parametrize("config", SUM_CONFIGS, ids=lambda c: "-".join(c))
def test_sum_loss_two_ranks_equal_one_process(config, mode, jobs):
    """loss_average=None: H_K is a mean over the input rows (averaged across ranks),
    H_C a sum over the output gradients (summed); it summed both (H_K N times too
    large: parameters off by ~0.5 after 5 steps). "retry": a step raises after the
    reduction and is retried with the same statistics (the sum was summed again:
    H_C N times too large)."""
    key = _key("sum-loss", config, mode)
    jobs.ensure(key)
    out = jobs.path(key)
    torch.set_num_threads(1)
    model = make_model()
    opt = _sum_factory(config)(model)
    for x, y in batches(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        opt.step()
    for p, q in zip(model.parameters(), torch.load(out), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-11)


def _events_worker(rank, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=JOB_TIMEOUT)
    torch.set_num_threads(1)
    try:
        model = make_model()
        opt = _events_optimizer(model, "shard")
        ddp = DDP(model)
        train(ddp, opt, batches(3), rank, WORLD)
        torch.save(dict(opt.safeguard_events), f"{out_path}.{rank}")
        dist.barrier()
        del ddp, opt
    finally:
        dist.destroy_process_group()


def _events_optimizer(model, strategy):
    # lr_cov large enough that the factor-step bound acts in most updates
    return SINGD(
        model, lr=0.05, lr_cov=5.0, T=1, warn_unsupported=False, distributed_strategy=strategy
    )


def test_shard_counts_every_ranks_safeguard_events(jobs):
    """Under "shard" each factor is updated by its owner only; every rank's
    safeguard_events still counts all of them (as one process does)."""
    jobs.ensure("events")
    out = jobs.path("events")
    torch.set_num_threads(1)
    model = make_model()
    opt = _events_optimizer(model, "replicate")
    train(model, opt, batches(3))
    assert opt.safeguard_events["factor_step_bounded"] > 0
    for rank in range(WORLD):
        assert torch.load(f"{out}.{rank}") == opt.safeguard_events, rank


def _bad_lr_cov_worker(rank, port, out_path):
    from datetime import timedelta

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)  # one preconditioned layer: one rank owns nothing
        model = nn.Sequential(nn.Flatten(), nn.Linear(50, 3)).double()
        opt = SINGD(
            model,
            T=1,
            lr_cov=lambda t: 0.1 if t == 0 else -1.0,
            warn_unsupported=False,
            distributed_strategy="shard",
        )
        ddp = DDP(model)
        train(ddp, opt, batches(1), rank, WORLD)
        try:
            train(ddp, opt, batches(2)[1:], rank, WORLD)
            outcome = "stepped"
        except ValueError as err:
            outcome = str(err)
        torch.save(outcome, f"{out_path}.{rank}")
        dist.barrier()
        del ddp, opt
    finally:
        dist.destroy_process_group()


def test_shard_bad_scheduled_lr_cov_raises_on_every_rank(jobs):
    """Under "shard" only a layer's owner reads lr_cov; a bad scheduled value raised on
    the owners alone and the other ranks hung in the next collective. Now every rank
    checks it first and raises."""
    jobs.ensure("bad-lr-cov")
    out = jobs.path("bad-lr-cov")
    for rank in range(WORLD):
        assert "lr_cov(1) returned -1.0" in torch.load(f"{out}.{rank}"), rank


def _bad_adapter_worker(rank, port, out_path):
    from datetime import timedelta

    from tests.optim.test_training_loops import DENSE_SHAPE, Dense, DenseNet, batch
    from tests.optim.test_training_loops import ForgetfulAdapter as Forgetful
    from torchsingd import register_layer, unregister_layer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a short timeout: without the fix the rank that does not own the layer waits here
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=20))
    torch.set_num_threads(1)
    register_layer(Dense, Forgetful())
    try:
        model = DenseNet()
        opt = SINGD(model, lr=0.1, lr_cov=0.05, T=1, distributed_strategy="shard")
        assert len(set(opt._owner(e) for e in opt._entries.values())) == WORLD
        x, y = batch(0, DENSE_SHAPE, 2)
        nn.functional.mse_loss(model(x), y).backward()
        try:
            opt.step()
            outcome = "stepped"
        except Exception as err:  # noqa: BLE001 - the type is part of the outcome
            outcome = f"{type(err).__name__}: {err}"
        torch.save(outcome, f"{out_path}.{rank}")
        dist.barrier()
        del opt
    finally:
        unregister_layer(Dense)
        dist.destroy_process_group()


def test_shard_bad_adapter_raises_on_every_rank(jobs):
    """A user adapter whose directions have the wrong shapes raised on the layer's
    owner only; the other rank waited in the next collective until its timeout. Every
    rank now checks the shapes once and raises the same error."""
    jobs.ensure("bad-adapter")
    out = jobs.path("bad-adapter")
    for rank in range(WORLD):
        outcome = torch.load(f"{out}.{rank}")
        assert outcome.startswith("ValueError: Layer 'dense': ForgetfulAdapter"), (rank, outcome)


class _Experts(nn.Module):
    """Two experts behind a router given with the batch (``route[i]`` picks sample
    ``i``'s expert): the experts see different numbers of rows on each rank."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(4, 6)
        self.experts = nn.ModuleList([nn.Linear(6, 5), nn.Linear(6, 5)])
        self.head = nn.Linear(5, 3)
        self.double()

    def forward(self, x, route):
        h = torch.relu(self.inp(x))
        out = h.new_zeros(len(x), 5)
        for i, expert in enumerate(self.experts):
            mask = route == i
            if mask.any():
                out = out.index_put((mask.nonzero().squeeze(1),), expert(h[mask]))
        return self.head(torch.tanh(out))


# (rank 0 rows, rank 1 rows) per step: the router's choices and the per-rank batch
# sizes. "moe": 4 samples per rank, expert 1 used on one rank only in step 0, unequal
# non-zero counts after; "uneven": 3 and 5 samples (a sum loss), routes mixed.
_ROUTES = {
    "moe": [
        ([0, 0, 0, 1], [0, 0, 0, 0]),
        ([0, 1, 1, 1], [0, 0, 0, 1]),
        ([1, 1, 0, 1], [0, 1, 0, 0]),
        ([0, 0, 1, 0], [1, 1, 1, 1]),
    ],
    "uneven": [
        ([0, 1, 0], [1, 1, 0, 0, 1]),
        ([1, 1, 1], [0, 0, 0, 0, 1]),
        ([0, 0, 1], [1, 0, 1, 1, 0]),
        ([0, 1, 1], [0, 0, 0, 1, 1]),
    ],
}


def _routed_batches(scenario):
    gen = torch.Generator().manual_seed(3)
    out = []
    for routes in _ROUTES[scenario]:
        parts = []
        for r in routes:
            n = len(r)
            x = torch.randn(n, 4, dtype=torch.float64, generator=gen)
            y = torch.randint(0, 3, (n,), generator=gen)
            parts.append((x, y, torch.tensor(r)))
        out.append(parts)
    return out


def _routed_factory(config, scenario):
    kind, structure, strategy = config

    def build(model):
        common = dict(
            lr=0.05,
            T=1,
            warn_unsupported=False,
            distributed_strategy=strategy,
            loss_average=None if scenario == "uneven" else "batch",
        )
        if kind == "kfac":
            return KFAC(model, lr_cov=0.3, damping=0.1, **common)
        return SINGD(model, lr_cov=0.3, structures=structure, kl_clip=None, **common)

    return build


def _routed_loss(model, x, y, route, scenario):
    reduction = "sum" if scenario == "uneven" else "mean"
    return nn.functional.cross_entropy(model(x, route), y, reduction=reduction)


def _routed_worker(rank, port, config, scenario, out_path):
    """Gradients combined by hand (DDP would need ``find_unused_parameters`` for an
    expert without tokens): averaged for the mean loss, summed for the sum loss."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=JOB_TIMEOUT)
    torch.set_num_threads(1)
    try:
        model = _Experts()
        opt = _routed_factory(config, scenario)(model)
        for parts in _routed_batches(scenario):
            x, y, route = parts[rank]
            opt.zero_grad()
            _routed_loss(model, x, y, route, scenario).backward()
            for p in model.parameters():
                if p.grad is None:  # an expert without tokens on this rank
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                if scenario == "moe":
                    p.grad /= WORLD
            opt.step()
        if rank == 0:
            torch.save([p.detach() for p in model.parameters()], out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# each optimizer and strategy at least once per scenario (all failed before the weighting)
ROUTED = [
    (("singd", "dense", "replicate"), "moe"),
    (("singd", "diagonal", "shard"), "moe"),
    (("kfac", "dense", "replicate"), "moe"),
    (("kfac", "dense", "shard"), "moe"),
    (("singd", "diagonal", "replicate"), "uneven"),
    (("kfac", "dense", "shard"), "uneven"),
]


@pytest.mark.parametrize(
    ("config", "scenario"), ROUTED, ids=lambda c: c if isinstance(c, str) else "-".join(c)
)
def test_ranks_with_different_row_counts_equal_one_process(config, scenario, jobs):
    """The input-side statistic is a mean over a layer's rows: combined across ranks
    weighted by each rank's rows. With equal weights (before), KFAC's ``S_K`` of an
    expert used on one of 2 ranks was half the one-process value, and unequal counts
    left SINGD ~1e-2 off after 3 steps."""
    key = _key("routed", config, scenario)
    jobs.ensure(key)
    out = jobs.path(key)
    torch.set_num_threads(1)
    model = _Experts()
    opt = _routed_factory(config, scenario)(model)
    for parts in _routed_batches(scenario):
        x, y, route = (torch.cat(t) for t in zip(*parts, strict=True))
        opt.zero_grad()
        _routed_loss(model, x, y, route, scenario).backward()
        opt.step()
    for p, q in zip(model.parameters(), torch.load(out), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-11)


UNFREEZE_STRATEGIES = ["replicate", "shard"]


def _unfreeze_run(model, strategy, rank=0, world=1, wrap=lambda m: m):
    """A backbone frozen at construction (the convolution and the first Linear, given
    in params), unfrozen after 2 steps; T=2, so both are preconditioned from step 4."""
    model[0].requires_grad_(False)
    model[3].requires_grad_(False)
    opt = SINGD(
        model,
        params=model.parameters(),
        lr=0.05,
        lr_cov=0.1,
        T=2,
        warn_unsupported=False,
        distributed_strategy=strategy,
    )
    data = batches(6)
    wrapped = wrap(model)
    train(wrapped, opt, data[:2], rank, world)
    woken = [list(opt.layers)]
    del wrapped  # DDP syncs the gradients of what required them when it was made
    model.requires_grad_(True)
    wrapped = wrap(model)
    for i in range(2, 6):
        train(wrapped, opt, data[i : i + 1], rank, world)
        woken.append(list(opt.layers))
    del wrapped
    return opt, woken


def _unfreeze_worker(rank, port, strategy, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=JOB_TIMEOUT)
    torch.set_num_threads(1)
    try:
        model = make_model()
        opt, woken = _unfreeze_run(model, strategy, rank, WORLD, DDP)
        params = [p.detach() for p in model.parameters()]
        torch.save({"params": params, "woken": woken}, f"{out_path}.{rank}")
        dist.barrier()
        del opt
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("strategy", UNFREEZE_STRATEGIES)
def test_layers_unfrozen_after_construction_wake_together_on_every_rank(strategy, jobs):
    """Layers frozen at construction and unfrozen later are preconditioned from the
    same step on every rank; two ranks end where one process ends."""
    key = _key("unfreeze", strategy)
    jobs.ensure(key)
    out = jobs.path(key)
    torch.set_num_threads(1)
    model = make_model()
    _, woken = _unfreeze_run(model, strategy)
    both = ["0", "3", "5"]
    assert woken == [["5"], ["5"], both, both, both]  # (woken at the end of step 3)
    for rank in range(WORLD):
        got = torch.load(f"{out}.{rank}")
        assert got["woken"] == woken, rank
        for p, q in zip(model.parameters(), got["params"], strict=True):
            torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-11)


def _disagree_worker(rank, port, out_path):
    """Of two layers frozen at construction, rank 0 unfreezes both, rank 1 the weight
    of the second only."""
    import warnings

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=JOB_TIMEOUT)
    torch.set_num_threads(1)
    try:
        model = make_model()
        model[0].requires_grad_(False)
        model[3].requires_grad_(False)
        opt = SINGD(model, params=model.parameters(), lr=0.05, T=1, warn_unsupported=False)
        ddp = DDP(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(ddp, opt, batches(1), rank, WORLD)
            model[0].requires_grad_(rank == 0)
            model[3].requires_grad_(rank == 0)
            model[3].weight.requires_grad_(True)
            train(ddp, opt, batches(3)[1:], rank, WORLD)
        params = [p.detach() for p in model.parameters()]
        messages = [str(w.message) for w in caught]
        torch.save(
            {"params": params, "messages": messages, "layers": list(opt.layers)},
            f"{out_path}.{rank}",
        )
        dist.barrier()
        del ddp, opt
    finally:
        dist.destroy_process_group()


def test_a_layer_unfrozen_on_some_ranks_only_stays_unchanged_everywhere(jobs):
    """Ranks that disagree on unfreezing a waiting layer (on it at all, or on its bias:
    the factors would differ in size) keep it unchanged (identical parameters on every
    rank); each rank that unfroze a weight says why."""
    jobs.ensure("disagree")
    out = jobs.path("disagree")
    got = [torch.load(f"{out}.{rank}") for rank in range(WORLD)]
    for p, q in zip(got[0]["params"], got[1]["params"], strict=True):
        assert torch.equal(p, q)
    start = make_model()
    for i in (0, 1, 2, 3):  # (the weights and biases of layers 0 and 3)
        assert torch.equal(got[0]["params"][i], list(start.parameters())[i].detach())
    assert got[0]["layers"] == got[1]["layers"] == ["5"]
    told = [[m for m in g["messages"] if "not in the same way on every rank" in m] for g in got]
    assert "['0', '3']" in told[0][0] and "['3']" in told[1][0]


def _key(*parts) -> str:
    """A job's name: its test and parameters (tuples flattened), joined by '-'."""
    flat = [x for part in parts for x in (part if isinstance(part, tuple) else (part,))]
    return "-".join(map(str, flat))


def add_jobs(batch) -> None:
    """Every 2-rank job of this module, run together (``tests/distributed/spawning.py``)."""
    for config in CONFIGS:
        key = _key("two-ranks", config)
        accumulate = config[4] == "replicate" and config[3] == 1
        batch.add(key, _worker, config, batch.path(key), accumulate, config[0] == "singd")
    for strategy in RESUME_STRATEGIES:
        config = _resume_config(strategy)
        first, final = _key("resume-first", strategy), _key("resume-final", strategy)
        batch.add(first, _worker, config, batch.path(first), False, False, (0, 3))
        resume = (3, 5), batch.path(first)
        batch.add(final, _worker, config, batch.path(final), False, False, *resume)
    for config in SUM_CONFIGS:
        for mode in SUM_MODES:
            key = _key("sum-loss", config, mode)
            batch.add(key, _sum_loss_worker, config, batch.path(key), mode)
    batch.add("events", _events_worker, batch.path("events"))
    batch.add("bad-lr-cov", _bad_lr_cov_worker, batch.path("bad-lr-cov"))
    batch.add("bad-adapter", _bad_adapter_worker, batch.path("bad-adapter"))
    for config, scenario in ROUTED:
        key = _key("routed", config, scenario)
        batch.add(key, _routed_worker, config, scenario, batch.path(key))
    for strategy in UNFREEZE_STRATEGIES:
        key = _key("unfreeze", strategy)
        batch.add(key, _unfreeze_worker, strategy, batch.path(key))
    batch.add("disagree", _disagree_worker, batch.path("disagree"))
