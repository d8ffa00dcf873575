"""Diagonal matrices.

``P(M) = diag(M)``. Stores ``d`` numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchsingd.structures.base import StructuredMatrix, check_rows, check_square, row_sq_sum, wide


class DiagonalMatrix(StructuredMatrix):
    """``diag(d)`` for a vector ``diag`` of length ``d``."""

    family = "diagonal"

    def __init__(self, diag: Tensor) -> None:
        if diag.ndim != 1:
            raise ValueError(f"diag must be a vector, got shape {tuple(diag.shape)}.")
        super().__init__(diag.shape[0])
        self.diag = diag

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.diag,)

    def options(self) -> tuple[int, ...]:
        return ()

    @classmethod
    def zeros(cls, dim, *options, dtype=None, device=None) -> DiagonalMatrix:
        return cls(torch.zeros(dim, dtype=dtype, device=device))

    def _with_tensors(self, tensors):
        return DiagonalMatrix(*tensors)

    def add_identity_(self, value: float) -> DiagonalMatrix:
        self.diag.add_(value)
        return self

    def trace(self) -> Tensor:
        return self.diag.sum(dtype=wide(self.dtype))

    def spectral_norm_bound(self) -> Tensor:
        """``||D||_2 = max |d_i|`` exactly."""
        dtype = torch.promote_types(self.dtype, torch.float32)
        return self.diag.abs().max().to(dtype) if self.dim else torch.zeros((), dtype=dtype)

    def bounded_step(self, beta: float, max_step: float) -> DiagonalMatrix | None:
        """``beta * d`` with each entry clipped to ``[-max_step, max_step]`` (each entry
        is an eigenvalue: the exact per-direction bound); ``None`` if none exceeds."""
        if beta == 0.0 or not self.dim:
            return None
        dtype = torch.promote_types(self.dtype, torch.float32)
        step = self.diag.to(dtype) * beta
        if not bool(step.abs().max() > max_step):  # False for NaN: the repair's case
            return None
        return DiagonalMatrix(step.clamp_(-max_step, max_step).to(self.dtype))

    def mm(self, X: Tensor) -> Tensor:
        check_rows(X, self.dim)
        return self.diag.unsqueeze(1) * X

    def mm_(self, X: Tensor) -> Tensor:
        """``self @ X`` written into ``X`` (which the caller owns); returns ``X``."""
        check_rows(X, self.dim)
        return X.mul_(self.diag.unsqueeze(1))

    def tmm(self, X: Tensor) -> Tensor:
        return self.mm(X)

    def matmul(self, other: StructuredMatrix) -> DiagonalMatrix:
        self._check_compatible(other)
        return DiagonalMatrix(self.diag * other.diag)

    def outer_operator(self) -> DiagonalMatrix:
        return DiagonalMatrix(self.diag * self.diag)

    def outer_operator_pays(self, columns: int, uses: int) -> bool:
        return True

    def inner(self) -> DiagonalMatrix:
        return DiagonalMatrix(self.diag * self.diag)

    def inner_of(self, Z: Tensor) -> DiagonalMatrix:
        check_rows(Z, self.dim)
        return DiagonalMatrix(self.diag * self.diag * row_sq_sum(Z))

    @classmethod
    def from_dense(cls, M: Tensor, *options: int) -> DiagonalMatrix:
        check_square(M)
        return cls(M.diagonal().clone())

    def to_dense(self) -> Tensor:
        return torch.diag(self.diag)
