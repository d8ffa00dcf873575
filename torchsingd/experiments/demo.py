"""``torchsingd demo``: train an MLP on the bundled digits with SINGD and AdamW.

A short, real, end-to-end run: every optimizer sees the same model initialisation,
data order and number of epochs; the table reports test accuracy, time per
iteration and the optimizer's state in bytes relative to the parameters' bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from torchsingd import SINGD
from torchsingd.experiments.data import digits


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer holds (SINGD's factors included)."""
    if isinstance(opt, SINGD):
        return opt.state_bytes()
    return sum(
        t.numel() * t.element_size()
        for state in opt.state.values()
        for t in state.values()
        if torch.is_tensor(t) and t.ndim > 0
    )


@dataclass
class Result:
    name: str
    test_accuracy: float
    final_train_loss: float
    seconds_per_iteration: float
    state_ratio: float


def train(
    name: str,
    make_opt: Callable[[nn.Module], torch.optim.Optimizer],
    epochs: int,
    seed: int,
    progress: bool = True,
) -> Result:
    X, y, Xt, yt = digits(seed=0)
    model = mlp(seed)
    opt = make_opt(model)
    gen = torch.Generator().manual_seed(seed)
    batch = 64
    loss_fn = nn.CrossEntropyLoss()
    warmup = 5  # iterations excluded from the timing (allocator and thread-pool warm-up)
    iterations, timed, elapsed, loss = 0, 0, 0.0, torch.tensor(float("nan"))
    bar = _progress(epochs, name) if progress else None
    for _epoch in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch):
            idx = perm[start : start + batch]
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = loss_fn(model(X[idx]), y[idx])
            loss.backward()
            opt.step()
            if iterations >= warmup:
                elapsed += time.perf_counter() - t0
                timed += 1
            iterations += 1
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    with torch.no_grad():
        acc = (model(Xt).argmax(1) == yt).float().mean().item()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return Result(
        name, acc, loss.item(), elapsed / iterations, optimizer_state_bytes(opt) / param_bytes
    )


def _progress(total: int, name: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=f"{name:>24}", unit="epoch", leave=False)


def candidates() -> dict[str, Callable[[nn.Module], torch.optim.Optimizer]]:
    def singd(structure: str) -> Callable[[nn.Module], torch.optim.Optimizer]:
        return lambda m: SINGD(
            m,
            lr=1e-3,
            lr_cov=0.05,
            damping=1e-2,
            T=5,
            momentum=0.9,
            structures=(structure, structure),
        )

    out: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
        "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, foreach=True),
        "SGD (momentum 0.9)": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    }
    for s in ("dense", "diagonal", "blockdiagonal:16", "hierarchical:16,16", "triltoeplitz"):
        out[f"SINGD {s}"] = singd(s)
    return out


def main(epochs: int = 10, seed: int = 0) -> list[Result]:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(
        f"digits MLP 64-128-128-10, {epochs} epochs, batch 64, seed {seed}, "
        f"{torch.get_num_threads()} threads"
    )
    results = [train(name, make, epochs, seed) for name, make in candidates().items()]
    adamw = results[0]
    print(f"| {'optimizer':<24} | test acc | train loss | time/iter (x AdamW) | state / params |")
    print(f"|{'-' * 26}|----------|------------|---------------------|----------------|")
    for r in results:
        ratio = r.seconds_per_iteration / adamw.seconds_per_iteration
        print(
            f"| {r.name:<24} | {r.test_accuracy:8.3f} | {r.final_train_loss:10.4f} | "
            f"{1e3 * r.seconds_per_iteration:7.2f} ms ({ratio:4.2f}x) | "
            f"{r.state_ratio:13.2f}x |"
        )
    return results
