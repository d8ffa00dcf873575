"""Sparse triangular families: a diagonal part and a dense ``k x k`` corner.

``"triltopleftdiag:k"``     ``[[diag(a), 0], [b, C]]``: ``C`` dense ``k x k`` bottom right.
``"trilbottomrightdiag:k"`` ``[[A, 0], [b, diag(c)]]``: ``A`` dense ``k x k`` top left.
``"triutopleftdiag:k"``, ``"triubottomrightdiag:k"``: their transposes.

``k`` defaults to 1 (the reference's fixed choice) and is clipped to ``d``.
``P(M)`` keeps the diagonal of the diagonal part, the dense corner, and couples the
off-diagonal block as ``b = M21 + M12^T`` (lower) or ``M12 + M21^T`` (upper).
Stores about ``k d`` numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from torchsingd.structures.base import (
    SparsePattern,
    check_rows,
    check_square,
    col_sq_sum,
    row_sq_sum,
    wide,
    written,
)
from torchsingd.structures.transposed import LowerTriangularMatrix, TransposedMatrix

DEFAULT_CORNER = 1


class TrilTopLeftDiagonalMatrix(LowerTriangularMatrix):
    """``[[diag(a), 0], [b, C]]`` with ``a: [d-k]``, ``b: [k, d-k]``, ``C: [k, k]``."""

    family = "triltopleftdiag"

    def __init__(self, a: Tensor, b: Tensor, C: Tensor, k: int = DEFAULT_CORNER) -> None:
        kk, m = check_square(C, "C"), a.shape[0]
        if a.ndim != 1 or b.shape != (kk, m):
            raise ValueError(
                f"Inconsistent blocks a {tuple(a.shape)}, b {tuple(b.shape)}, C {tuple(C.shape)}."
            )
        super().__init__(m + kk)
        if kk != min(k, self.dim):
            raise ValueError(f"Corner size {kk} does not match k={k} for d={self.dim}.")
        self.a, self.b, self.C, self.k = a, b, C, k

    def tensors(self):
        return (self.a, self.b, self.C)

    def options(self):
        return (self.k,)

    @classmethod
    def zeros(cls, dim, k=DEFAULT_CORNER, dtype=None, device=None):
        kk = min(k, dim)
        m = dim - kk

        def z(*shape):
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(z(m), z(kk, m), z(kk, kk), k)

    def _with_tensors(self, tensors):
        return TrilTopLeftDiagonalMatrix(*tensors, self.k)

    def add_identity_(self, value):
        self.a.add_(value)
        self.C.diagonal().add_(value)
        return self

    def trace(self):
        return torch.cat([self.a, self.C.diagonal()]).sum(dtype=wide(self.dtype))

    def sparse_pattern(self) -> SparsePattern:
        """Dense rows ``[b, C]`` at the bottom, ``diag(a)`` above."""
        kk = self.C.shape[0]
        return SparsePattern("rows", 0, kk, F.pad(self.a, (0, kk)))

    def sparse_border(self) -> tuple[int, int]:
        return 0, self.C.shape[0]

    def border_rows(self) -> Tensor:
        """``[b C]``: the ``k`` dense bottom rows."""
        return torch.cat([self.b, self.C], 1)

    def _split(self, X: Tensor):
        check_rows(X, self.dim)
        m = self.a.shape[0]
        return X[:m], X[m:]

    def mm(self, X):
        X1, X2 = self._split(X)
        out, m = torch.empty_like(X), X1.shape[0]  # blocks written in place, no cat
        written(torch.mul, out[:m], self.a.unsqueeze(1), X1)
        written(torch.mm, out[m:], self.b, X1).addmm_(self.C, X2)
        return out

    def tmm(self, X):
        X1, X2 = self._split(X)
        out, m = torch.empty_like(X), X1.shape[0]
        written(torch.mul, out[:m], self.a.unsqueeze(1), X1).addmm_(self.b.T, X2)
        written(torch.mm, out[m:], self.C.T, X2)
        return out

    def matmul(self, other):
        self._check_compatible(other)
        return TrilTopLeftDiagonalMatrix(
            self.a * other.a,
            torch.mm(self.C, other.b).addcmul_(self.b, other.a),
            self.C @ other.C,
            self.k,
        )

    def inner(self):
        return TrilTopLeftDiagonalMatrix(
            self.a * self.a + col_sq_sum(self.b),
            2 * (self.C.T @ self.b),
            self.C.T @ self.C,
            self.k,
        )

    def outer(self):
        return TrilTopLeftDiagonalMatrix(
            self.a * self.a,
            2 * (self.b * self.a),
            self.b @ self.b.T + self.C @ self.C.T,
            self.k,
        )

    def project_gram(self, S):
        S1, S2 = self._split(S)
        return TrilTopLeftDiagonalMatrix(row_sq_sum(S1), 2 * (S2 @ S1.T), S2 @ S2.T, self.k)

    @classmethod
    def from_dense(cls, M, k=DEFAULT_CORNER):
        d = check_square(M)
        m = d - min(k, d)
        return cls(M.diagonal()[:m].clone(), M[m:, :m] + M[:m, m:].T, M[m:, m:].clone(), k)

    def to_dense(self):
        m = self.a.shape[0]
        out = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self.device)
        out[:m, :m] = torch.diag(self.a)
        out[m:, :m] = self.b
        out[m:, m:] = self.C
        return out


class TrilBottomRightDiagonalMatrix(LowerTriangularMatrix):
    """``[[A, 0], [b, diag(c)]]`` with ``A: [k, k]``, ``b: [d-k, k]``, ``c: [d-k]``."""

    family = "trilbottomrightdiag"

    def __init__(self, A: Tensor, b: Tensor, c: Tensor, k: int = DEFAULT_CORNER) -> None:
        kk, m = check_square(A, "A"), c.shape[0]
        if c.ndim != 1 or b.shape != (m, kk):
            raise ValueError(
                f"Inconsistent blocks A {tuple(A.shape)}, b {tuple(b.shape)}, c {tuple(c.shape)}."
            )
        super().__init__(m + kk)
        if kk != min(k, self.dim):
            raise ValueError(f"Corner size {kk} does not match k={k} for d={self.dim}.")
        self.A, self.b, self.c, self.k = A, b, c, k

    def tensors(self):
        return (self.A, self.b, self.c)

    def options(self):
        return (self.k,)

    @classmethod
    def zeros(cls, dim, k=DEFAULT_CORNER, dtype=None, device=None):
        kk = min(k, dim)
        m = dim - kk

        def z(*shape):
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(z(kk, kk), z(m, kk), z(m), k)

    def _with_tensors(self, tensors):
        return TrilBottomRightDiagonalMatrix(*tensors, self.k)

    def add_identity_(self, value):
        self.A.diagonal().add_(value)
        self.c.add_(value)
        return self

    def trace(self):
        return torch.cat([self.A.diagonal(), self.c]).sum(dtype=wide(self.dtype))

    def sparse_pattern(self) -> SparsePattern:
        """Dense columns ``[A; b]`` on the left, ``diag(c)`` right of them."""
        kk = self.A.shape[0]
        return SparsePattern("columns", kk, 0, F.pad(self.c, (kk, 0)))

    def sparse_border(self) -> tuple[int, int]:
        return self.A.shape[0], 0

    def _split(self, X: Tensor):
        check_rows(X, self.dim)
        kk = self.A.shape[0]
        return X[:kk], X[kk:]

    def mm(self, X):
        X1, X2 = self._split(X)
        out, kk = torch.empty_like(X), X1.shape[0]  # blocks written in place, no cat
        written(torch.mm, out[:kk], self.A, X1)
        written(torch.mul, out[kk:], self.c.unsqueeze(1), X2).addmm_(self.b, X1)
        return out

    def tmm(self, X):
        X1, X2 = self._split(X)
        out, kk = torch.empty_like(X), X1.shape[0]
        written(torch.mm, out[:kk], self.A.T, X1).addmm_(self.b.T, X2)
        written(torch.mul, out[kk:], self.c.unsqueeze(1), X2)
        return out

    def matmul(self, other):
        self._check_compatible(other)
        return TrilBottomRightDiagonalMatrix(
            self.A @ other.A,
            torch.mm(self.b, other.A).addcmul_(self.c.unsqueeze(1), other.b),
            self.c * other.c,
            self.k,
        )

    def inner(self):
        return TrilBottomRightDiagonalMatrix(
            torch.mm(self.A.T, self.A).addmm_(self.b.T, self.b),
            2 * (self.c.unsqueeze(1) * self.b),
            self.c * self.c,
            self.k,
        )

    def outer(self):
        return TrilBottomRightDiagonalMatrix(
            self.A @ self.A.T,
            2 * (self.b @ self.A.T),
            row_sq_sum(self.b) + self.c * self.c,
            self.k,
        )

    def project_gram(self, S):
        S1, S2 = self._split(S)
        return TrilBottomRightDiagonalMatrix(S1 @ S1.T, 2 * (S2 @ S1.T), row_sq_sum(S2), self.k)

    @classmethod
    def from_dense(cls, M, k=DEFAULT_CORNER):
        d = check_square(M)
        kk = min(k, d)
        return cls(M[:kk, :kk].clone(), M[kk:, :kk] + M[:kk, kk:].T, M.diagonal()[kk:].clone(), k)

    def to_dense(self):
        kk = self.A.shape[0]
        out = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self.device)
        out[:kk, :kk] = self.A
        out[kk:, :kk] = self.b
        out[kk:, kk:] = torch.diag(self.c)
        return out


class TriuTopLeftDiagonalMatrix(TransposedMatrix):
    """``[[diag(a), b^T], [0, C^T]]``: transpose of :class:`TrilTopLeftDiagonalMatrix`."""

    family = "triutopleftdiag"
    BASE = TrilTopLeftDiagonalMatrix


class TriuBottomRightDiagonalMatrix(TransposedMatrix):
    """``[[A^T, b^T], [0, diag(c)]]``: transpose of :class:`TrilBottomRightDiagonalMatrix`."""

    family = "triubottomrightdiag"
    BASE = TrilBottomRightDiagonalMatrix
