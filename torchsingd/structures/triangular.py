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
    SparseOuterOperator,
    SparsePattern,
    check_rows,
    check_square,
    row_sq_sum,
    wide,
    written,
)
from torchsingd.structures.transposed import LowerTriangularMatrix, TransposedMatrix

DEFAULT_CORNER = 1


class TrilTopLeftDiagonalMatrix(LowerTriangularMatrix):
    """``[[diag(a), 0], [b, C]]`` with ``a: [d-k]``, ``b: [k, d-k]``, ``C: [k, k]``."""

    family = "triltopleftdiag"
    stacks = True  # (the default norms and bounds; stacked_* below)

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
        self.stacked_add_identity_(self.tensors(), value)
        return self

    def stacked_add_identity_(self, storage, value):
        a, _, C = storage
        a.add_(value)
        C.diagonal(dim1=-2, dim2=-1).add_(value)

    def trace(self):
        return self.stacked_trace(self.tensors())

    def stacked_trace(self, storage):
        a, _, C = storage
        return torch.cat([a, C.diagonal(dim1=-2, dim2=-1)], -1).sum(-1, dtype=wide(a.dtype))

    def sparse_pattern(self) -> SparsePattern:
        """Dense rows ``[b, C]`` at the bottom, ``diag(a)`` above."""
        kk = self.C.shape[0]
        return SparsePattern("rows", 0, kk, F.pad(self.a, (0, kk)))

    def sparse_border(self) -> tuple[int, int]:
        return 0, self.C.shape[0]

    def border_rows(self) -> Tensor:
        """``[b C]``: the ``k`` dense bottom rows."""
        return torch.cat([self.b, self.C], 1)

    def stacked_outer_operators(self, storage):
        # W = K [b C]^T of every member at once, as mm forms it; delta = [a, 0]
        a, b, C = storage
        if not self.dim:
            return None
        m, kk = a.shape[-1], C.shape[-1]
        W = a.new_empty(a.shape[0], self.dim, kk)
        torch.mul(a.unsqueeze(-1), b.mT, out=W[:, :m])
        W[:, m:] = torch.matmul(b, b.mT).baddbmm_(C, C.mT)
        return SparseOuterOperator.stacked("rows", 0, kk, F.pad(a, (0, kk)), W)

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
        return self._with_tensors(self.stacked_matmul(self.tensors(), other.tensors()))

    def stacked_matmul(self, first, second):
        (a1, b1, C1), (a2, b2, C2) = first, second
        b = torch.matmul(C1, b2).addcmul_(b1, a2.unsqueeze(-2))
        return a1 * a2, b, torch.matmul(C1, C2)

    def inner(self):
        return self._with_tensors(self.stacked_inner(self.tensors()))

    def stacked_inner(self, storage):
        a, b, C = storage
        Ct = C.mT
        return a * a + (b * b).sum(-2), 2 * torch.matmul(Ct, b), torch.matmul(Ct, C)

    def outer(self):
        return self._with_tensors(self.stacked_outer(self.tensors()))

    def stacked_outer(self, storage):
        a, b, C = storage
        BBt = torch.matmul(b, b.mT) + torch.matmul(C, C.mT)
        return a * a, 2 * (b * a.unsqueeze(-2)), BBt

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
    stacks = True  # (the default norms and bounds; stacked_* below)

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
        self.stacked_add_identity_(self.tensors(), value)
        return self

    def stacked_add_identity_(self, storage, value):
        A, _, c = storage
        A.diagonal(dim1=-2, dim2=-1).add_(value)
        c.add_(value)

    def trace(self):
        return self.stacked_trace(self.tensors())

    def stacked_trace(self, storage):
        A, _, c = storage
        return torch.cat([A.diagonal(dim1=-2, dim2=-1), c], -1).sum(-1, dtype=wide(c.dtype))

    def sparse_pattern(self) -> SparsePattern:
        """Dense columns ``[A; b]`` on the left, ``diag(c)`` right of them."""
        kk = self.A.shape[0]
        return SparsePattern("columns", kk, 0, F.pad(self.c, (kk, 0)))

    def sparse_border(self) -> tuple[int, int]:
        return self.A.shape[0], 0

    def stacked_outer_operators(self, storage):
        # F = [A; b], the dense columns, of every member; delta = [0, c]
        A, b, c = storage
        if not self.dim:
            return None
        kk = A.shape[-1]
        W = torch.cat([A, b], -2)
        return SparseOuterOperator.stacked("columns", kk, 0, F.pad(c, (kk, 0)), W)

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
        return self._with_tensors(self.stacked_matmul(self.tensors(), other.tensors()))

    def stacked_matmul(self, first, second):
        (A1, b1, c1), (A2, b2, c2) = first, second
        b = torch.matmul(b1, A2).addcmul_(c1.unsqueeze(-1), b2)
        return torch.matmul(A1, A2), b, c1 * c2

    def inner(self):
        return self._with_tensors(self.stacked_inner(self.tensors()))

    def stacked_inner(self, storage):
        A, b, c = storage
        AtA = torch.matmul(A.mT, A)
        AtA = AtA.addmm_(b.mT, b) if AtA.ndim == 2 else AtA.baddbmm_(b.mT, b)
        return AtA, 2 * (c.unsqueeze(-1) * b), c * c

    def outer(self):
        return self._with_tensors(self.stacked_outer(self.tensors()))

    def stacked_outer(self, storage):
        A, b, c = storage
        At = A.mT
        return torch.matmul(A, At), 2 * torch.matmul(b, At), (b * b).sum(-1) + c * c

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

    def stacked_outer_operators(self, storage):
        # dense columns on the right: F = U[:, B] = [b C]^T of every member; delta = [a, 0]
        a, b, C = storage
        if not self.dim:
            return None
        kk = C.shape[-1]
        W = torch.cat([b.mT, C.mT], -2)
        return SparseOuterOperator.stacked("columns", 0, kk, F.pad(a, (0, kk)), W)


class TriuBottomRightDiagonalMatrix(TransposedMatrix):
    """``[[A^T, b^T], [0, diag(c)]]``: transpose of :class:`TrilBottomRightDiagonalMatrix`."""

    family = "triubottomrightdiag"
    BASE = TrilBottomRightDiagonalMatrix

    def stacked_outer_operators(self, storage):
        # dense rows on top, [A^T b^T]: W = U U[B, :]^T = L^T [A; b] of every member
        # (as L.tmm forms it); delta = [0, c]
        A, b, c = storage
        if not self.dim:
            return None
        kk = A.shape[-1]
        W = A.new_empty(A.shape[0], self.dim, kk)
        W[:, :kk] = torch.matmul(A.mT, A).baddbmm_(b.mT, b)
        torch.mul(c.unsqueeze(-1), b, out=W[:, kk:])
        return SparseOuterOperator.stacked("rows", kk, 0, F.pad(c, (kk, 0)), W)
