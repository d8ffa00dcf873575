"""The optimizers compared, their fixed hyper-parameters and their learning-rate grids.

Every optimizer gets a grid of :data:`GRID_SIZE` learning rates (a factor ~3 apart);
everything else is fixed (``lr_cov`` 0.1 and ``T`` 2 let the factors reach their scale
within the short budgets of the tasks; ``lr_cov`` 0.05, ``T`` 5 learnt nothing for the
first few epochs):

| name | optimizer | fixed settings | lr grid |
|---|---|---|---|
| ``adamw`` | ``AdamW(foreach=True)`` | betas (0.9, 0.999), weight decay 0.01 | 3e-3, 1e-2, 3e-2 |
| ``sgd`` | ``torch.optim.SGD`` | momentum 0.9 | 3e-2, 1e-1, 3e-1 |
| ``singd-<structure>`` | ``SINGD(structures=...)`` | :data:`SINGD_SETTINGS` | 1e-3, 3e-3, 1e-2 |
| ``ikfac`` | ``SINGD(kfac_like=True)``, dense | :data:`SINGD_SETTINGS` | 3e-4, 1e-3, 3e-3 |
| ``kfac`` | ``torchsingd.KFAC`` | :data:`SINGD_SETTINGS` less ``alpha1`` | 3e-4, 1e-3, 3e-3 |

Each grid is centred on the value that did best for that method in a pilot run of the
default tasks (short budgets favour large steps; KFAC and IKFAC, whose preconditioners
reach their scale faster, diverged above 3e-3 where SINGD did not).

SINGD's structures: ``dense`` (INGD), ``diagonal``, ``blockdiagonal:16``,
``hierarchical:16,16``, ``triltoeplitz``. Parameters outside supported layers (norm
layers, free parameters) are trained by SINGD's and KFAC's AdamW fallback at the same lr.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchsingd import KFAC, SINGD

GRID_SIZE = 3

# Shared by SINGD, IKFAC and KFAC (KFAC has no alpha1): damping lambda, factor step
# size beta1, preconditioner update interval T, momentum alpha2, Riemannian momentum alpha1.
SINGD_SETTINGS: dict[str, Any] = {
    "damping": 1e-2,
    "lr_cov": 0.1,
    "T": 2,
    "momentum": 0.9,
    "alpha1": 0.5,
}

SINGD_GRID = (1e-3, 3e-3, 1e-2)
KFAC_GRID = (3e-4, 1e-3, 3e-3)

STRUCTURES = {
    "dense": "dense",
    "diagonal": "diagonal",
    "blockdiagonal": "blockdiagonal:16",
    "hierarchical": "hierarchical:16,16",
    "triltoeplitz": "triltoeplitz",
}


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one compared optimizer: ``make(model, lr, loss_average=...)`` and
    its lr grid (``loss_average``: the task's count of loss terms, for SINGD, IKFAC and
    KFAC; the others ignore it)."""

    name: str
    label: str
    make: Callable[..., torch.optim.Optimizer]
    grid: tuple[float, ...]
    structure: str | None = None  # SINGD structure, for the memory plot


def _adamw(model: nn.Module, lr: float, loss_average: str = "batch") -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, foreach=True)


def _sgd(model: nn.Module, lr: float, loss_average: str = "batch") -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def _singd(structure: str, kfac_like: bool = False) -> Callable[..., SINGD]:
    def make(model: nn.Module, lr: float, loss_average: str = "batch") -> SINGD:
        settings = dict(SINGD_SETTINGS, alpha1=0.0) if kfac_like else SINGD_SETTINGS
        return SINGD(
            model,
            lr=lr,
            structures=structure,
            kfac_like=kfac_like,
            warn_unsupported=False,
            loss_average=loss_average,
            **settings,
        )

    return make


def _kfac(model: nn.Module, lr: float, loss_average: str = "batch") -> KFAC:
    settings = {k: v for k, v in SINGD_SETTINGS.items() if k != "alpha1"}
    return KFAC(model, lr=lr, warn_unsupported=False, loss_average=loss_average, **settings)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("adamw", "AdamW", _adamw, (3e-3, 1e-2, 3e-2)),
    "sgd": OptimizerSpec("sgd", "SGD (momentum 0.9)", _sgd, (3e-2, 1e-1, 3e-1)),
    **{
        f"singd-{short}": OptimizerSpec(
            f"singd-{short}",
            f"SINGD {structure}" + (" (INGD)" if short == "dense" else ""),
            _singd(structure),
            SINGD_GRID,
            structure,
        )
        for short, structure in STRUCTURES.items()
    },
    "ikfac": OptimizerSpec("ikfac", "IKFAC (SINGD kfac_like)", _singd("dense", True), KFAC_GRID),
    "kfac": OptimizerSpec("kfac", "KFAC", _kfac, KFAC_GRID),
}


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps between steps (factors included)."""
    if isinstance(opt, SINGD | KFAC):
        return opt.state_bytes()
    return sum(
        t.nbytes for state in opt.state.values() for t in state.values() if torch.is_tensor(t)
    )


def skipped_steps(opt: torch.optim.Optimizer) -> int:
    """Steps SINGD/KFAC skipped because of inf/NaN (0 for torch's optimizers)."""
    return getattr(opt, "skipped_steps", 0)
