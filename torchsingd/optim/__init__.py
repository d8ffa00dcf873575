"""Optimizers: SINGD (with INGD and IKFAC as settings), the KFAC baseline, shared machinery."""

from torchsingd.optim.base import KroneckerOptimizer, NonFiniteError
from torchsingd.optim.kfac import KFAC
from torchsingd.optim.singd import SINGD, LayerState

__all__ = ["KFAC", "SINGD", "KroneckerOptimizer", "LayerState", "NonFiniteError"]
