"""Optimizers: SINGD (with INGD and IKFAC as settings) and the shared machinery."""

from torchsingd.optim.base import KroneckerOptimizer, NonFiniteError
from torchsingd.optim.singd import SINGD, LayerState

__all__ = ["SINGD", "KroneckerOptimizer", "LayerState", "NonFiniteError"]
