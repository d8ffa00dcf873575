"""Dense matrices: no structure (INGD when used for both factors).

``P(M) = M``. Stores ``d^2`` numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from torchsingd.structures.base import (
    StructuredMatrix,
    check_rows,
    check_square,
    self_outer,
    symmetrized,
    wide,
)


class DenseMatrix(StructuredMatrix):
    """A full ``d x d`` matrix ``mat``."""

    family = "dense"

    def __init__(self, mat: Tensor) -> None:
        super().__init__(check_square(mat, "mat"))
        self.mat = mat

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.mat,)

    def options(self) -> tuple[int, ...]:
        return ()

    @classmethod
    def zeros(cls, dim, *options, dtype=None, device=None) -> DenseMatrix:
        return cls(torch.zeros(dim, dim, dtype=dtype, device=device))

    def _with_tensors(self, tensors):
        return DenseMatrix(*tensors)

    def add_identity_(self, value: float) -> DenseMatrix:
        self.mat.diagonal().add_(value)
        return self

    def trace(self) -> Tensor:
        return self.mat.diagonal().sum(dtype=wide(self.dtype))

    def mm(self, X: Tensor) -> Tensor:
        check_rows(X, self.dim)
        return self.mat @ X

    def batch_key(self) -> tuple:
        return (type(self), self.dim, self.mat.dtype, self.mat.device)

    @staticmethod
    def stacked_mm(members: Sequence[DenseMatrix], X: Tensor) -> Tensor:
        return torch.bmm(torch.stack([M.mat for M in members]), X)

    def tmm(self, X: Tensor) -> Tensor:
        check_rows(X, self.dim)
        return self.mat.T @ X

    def matmul(self, other: StructuredMatrix) -> DenseMatrix:
        self._check_compatible(other)
        return DenseMatrix(self.mat @ other.mat)

    def outer_operator(self) -> DenseMatrix:
        return DenseMatrix(self_outer(self.mat))

    def outer_operator_pays(self, columns: int, uses: int) -> bool:
        return uses * columns >= self.dim  # d^3 once vs. d^2 n saved per use

    def inner(self) -> DenseMatrix:
        return DenseMatrix(self_outer(self.mat.T))

    def inner_of(self, Z: Tensor) -> DenseMatrix:
        return DenseMatrix(self_outer(self.tmm(Z)))

    def gram_of(self, Z: Tensor) -> DenseMatrix:
        check_rows(Z, self.dim)
        return DenseMatrix(self_outer(Z))

    def inner_of_gram(self, G: StructuredMatrix) -> DenseMatrix:
        self._check_compatible(G)
        R = self.mat.T @ (G.mat @ self.mat)
        return DenseMatrix(symmetrized(R))

    def gram_pays(self, columns: int) -> bool:
        # inner_of: 4 n d^2 flops (K^T Z, S S^T); Gram: 2 n d^2 + 4 d^3 once
        return self._gram_pays_above(columns, 2 * self.dim)

    @classmethod
    def from_dense(cls, M: Tensor, *options: int) -> DenseMatrix:
        check_square(M)
        return cls(M.clone())

    def to_dense(self) -> Tensor:
        return self.mat.clone()
