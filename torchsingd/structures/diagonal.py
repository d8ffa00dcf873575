"""Diagonal matrices.

``P(M) = diag(M)``. Stores ``d`` numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from torchsingd.structures.base import (
    StructuredMatrix,
    check_rows,
    check_square,
    read_scalars,
    round_float32,
    row_sq_sum,
    wide,
)


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
        if not self.dim:
            return torch.zeros((), dtype=wide(self.dtype), device=self.device)
        return self.bound_inputs()[0]

    def bound_inputs(self) -> list[Tensor]:
        """``[max |d_i|]`` (at least float32): all :meth:`bounded_step` reads."""
        if not self.dim:
            return []
        return [self.diag.abs().max().to(wide(self.dtype))]

    def bounded_step(
        self, beta: float, max_step: float, inputs: list[float] | None = None
    ) -> DiagonalMatrix | None:
        """``beta * d`` with each entry clipped to ``[-max_step, max_step]`` (each entry
        is an eigenvalue: the exact per-direction bound); ``None`` if none exceeds.

        Decided from ``max |d_i|`` alone: ``max_i |fl(beta d_i)| = fl(beta max_i |d_i|)``
        (rounding is monotone), computed here as the step's product would be."""
        if beta == 0.0 or not self.dim:
            return None
        dtype = torch.promote_types(self.dtype, torch.float32)
        (largest,) = read_scalars(self.bound_inputs()) if inputs is None else inputs
        if largest == math.inf:  # an inf entry (an overflowed statistic): the unbounded
            return None  # step is not finite either, and the factor repair undoes it (a
            # clamp to +-max_step would leave a finite factor and the inf in the momentum)
        limit = max_step
        if dtype == torch.float32:  # as the kernels: float32 operands, product, comparison
            largest = round_float32(round_float32(abs(beta)) * largest)
            limit = round_float32(max_step)
        else:
            largest = abs(beta) * largest
        if not largest > limit:  # False for NaN: the repair's case
            return None
        step = self.diag.to(dtype) * beta
        return DiagonalMatrix(step.clamp_(-max_step, max_step).to(self.dtype))

    def mm(self, X: Tensor) -> Tensor:
        check_rows(X, self.dim)
        return self.diag.unsqueeze(1) * X

    def batch_key(self) -> tuple:
        return (type(self), self.dim, self.diag.dtype, self.diag.device)

    @staticmethod
    def stacked_mm(members: Sequence[DiagonalMatrix], X: Tensor) -> Tensor:
        return torch.stack([M.diag for M in members]).unsqueeze(2) * X

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
