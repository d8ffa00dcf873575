"""Optimizers: SINGD (with INGD and IKFAC as settings)."""

from torchsingd.optim.singd import SINGD, LayerState

__all__ = ["SINGD", "LayerState"]
