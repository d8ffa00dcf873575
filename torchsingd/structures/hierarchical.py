"""Hierarchical matrices with dense corners of sizes ``K1`` and ``K2``.

Members (rows split as ``k1 | m | k2``)::

    [ A  B1       B2 ]     A: [k1, k1] dense,  B = [B1 B2]: [k1, m + k2]
    [ 0  diag(c)  0  ]     c: [m]
    [ 0  D        E  ]     D: [k2, m],  E: [k2, k2] dense

Sizing for dimension ``d``: ``d <= K1``: only ``A``; ``d <= K1 + K2``: ``A`` (``K1``) and
``E`` (``d - K1``); else ``A``, ``E`` and a diagonal of ``m = d - K1 - K2``.
``P(M)``: ``A = M11``, ``B = 2 M[1, 2:3]``, ``c = diag(M22)``, ``D = 2 M32``,
``E = M33``. Stores about ``d (K1 + K2)`` numbers. Registry names:
``"hierarchical"`` (15, 15), ``"hierarchical:K1,K2"``, the reference's
``"hierarchicalK1_K2"`` (e.g. ``"hierarchical15_15"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from torchsingd.structures.base import (
    SparsePattern,
    StructuredMatrix,
    check_rows,
    check_square,
    col_sq_sum,
    row_sq_sum,
    symmetrized,
    wide,
    written,
)

DEFAULT_K1 = 15
DEFAULT_K2 = 15


def hierarchical_sizes(dim: int, K1: int, K2: int) -> tuple[int, int, int]:
    """``(k1, m, k2)``: sizes of the top block, the diagonal and the bottom block."""
    if dim <= K1:
        return dim, 0, 0
    if dim <= K1 + K2:
        return K1, 0, dim - K1
    return K1, dim - K1 - K2, K2


class HierarchicalMatrix(StructuredMatrix):
    """See the module docstring for the layout of ``A, B, c, D, E``."""

    family = "hierarchical"

    def __init__(self, A: Tensor, B: Tensor, c: Tensor, D: Tensor, E: Tensor, K1: int, K2: int):
        k1, k2, m = check_square(A, "A"), check_square(E, "E"), c.shape[0]
        if c.ndim != 1 or B.shape != (k1, m + k2) or D.shape != (k2, m):
            raise ValueError(
                f"Inconsistent hierarchical blocks: A {tuple(A.shape)}, B {tuple(B.shape)}, "
                f"c {tuple(c.shape)}, D {tuple(D.shape)}, E {tuple(E.shape)}."
            )
        super().__init__(k1 + m + k2)
        if hierarchical_sizes(self.dim, K1, K2) != (k1, m, k2):
            raise ValueError(f"Block sizes {(k1, m, k2)} do not match K1={K1}, K2={K2}.")
        self.A, self.B, self.c, self.D, self.E = A, B, c, D, E
        self.K1, self.K2 = K1, K2
        self.k1, self.m, self.k2 = k1, m, k2

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.A, self.B, self.c, self.D, self.E)

    def options(self) -> tuple[int, ...]:
        return (self.K1, self.K2)

    @classmethod
    def zeros(cls, dim, K1=DEFAULT_K1, K2=DEFAULT_K2, dtype=None, device=None):
        k1, m, k2 = hierarchical_sizes(dim, K1, K2)

        def z(*shape):
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(z(k1, k1), z(k1, m + k2), z(m), z(k2, m), z(k2, k2), K1, K2)

    def _with_tensors(self, tensors):
        return HierarchicalMatrix(*tensors, self.K1, self.K2)

    def add_identity_(self, value: float) -> HierarchicalMatrix:
        self.A.diagonal().add_(value)
        self.c.add_(value)
        self.E.diagonal().add_(value)
        return self

    def trace(self) -> Tensor:
        diagonal = torch.cat([self.A.diagonal(), self.c, self.E.diagonal()])
        return diagonal.sum(dtype=wide(self.dtype))

    def sparse_pattern(self) -> SparsePattern:
        """Dense rows at the ``k1`` top and ``k2`` bottom rows, ``diag(c)`` between."""
        delta = F.pad(self.c, (self.k1, self.k2))  # [0 (k1), c, 0 (k2)]
        return SparsePattern("rows", self.k1, self.k2, delta)

    def sparse_border(self) -> tuple[int, int]:
        return self.k1, self.k2

    def border_rows(self) -> Tensor:
        """``[A B; 0 D E]``: the top ``k1`` and bottom ``k2`` rows."""
        bottom = torch.cat([self.D.new_zeros(self.k2, self.k1), self.D, self.E], 1)
        return torch.cat([torch.cat([self.A, self.B], 1), bottom])

    def _split_rows(self, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        check_rows(X, self.dim)
        return X[: self.k1], X[self.k1 : self.k1 + self.m], X[self.k1 + self.m :]

    def _B12(self) -> tuple[Tensor, Tensor]:
        return self.B[:, : self.m], self.B[:, self.m :]

    def mm(self, X: Tensor) -> Tensor:
        # Rows k1: of X hold [X2; X3], so B [X2; X3] and [D E] [X2; X3] are single
        # products; every block is written into one output (no concatenation).
        check_rows(X, self.dim)
        X1, X2, X23 = X[: self.k1], X[self.k1 : self.k1 + self.m], X[self.k1 :]
        out = torch.empty_like(X)  # keeps a transposed layout
        k1, s = self.k1, self.k1 + self.m
        written(torch.mm, out[:k1], self.A, X1).addmm_(self.B, X23)
        written(torch.mul, out[k1:s], self.c.unsqueeze(1), X2)
        written(torch.mm, out[s:], torch.cat([self.D, self.E], 1), X23)
        return out

    def tmm(self, X: Tensor) -> Tensor:
        X1, X2, X3 = self._split_rows(X)
        out = torch.empty_like(X)  # keeps a transposed layout
        k1 = self.k1
        written(torch.mm, out[:k1], self.A.T, X1)
        rest = written(torch.mm, out[k1:], self.B.T, X1)  # [B1^T; B2^T] X1
        rest[: self.m].addcmul_(self.c.unsqueeze(1), X2)
        rest.addmm_(torch.cat([self.D, self.E], 1).T, X3)  # + [D^T; E^T] X3
        return out

    def matmul(self, other: StructuredMatrix) -> HierarchicalMatrix:
        # B_new = A [oB1 oB2] + B2 [oD oE] + [B1 * oc, 0]: two products for both
        # column blocks of B (written in place: fewer, larger operations)
        self._check_compatible(other)
        B1, B2 = self._B12()
        B_new = torch.mm(self.A, other.B).addmm_(B2, torch.cat([other.D, other.E], 1))
        B_new[:, : self.m].addcmul_(B1, other.c)
        return HierarchicalMatrix(
            self.A @ other.A,
            B_new,
            self.c * other.c,
            torch.mm(self.E, other.D).addcmul_(self.D, other.c),
            self.E @ other.E,
            self.K1,
            self.K2,
        )

    def inner(self) -> HierarchicalMatrix:
        # diag(M22) = c^2 + colsum(B1^2) + colsum(D^2): one pass over [B1; D]
        B1, B2 = self._B12()
        return HierarchicalMatrix(
            self.A.T @ self.A,
            torch.mm(self.A.T, self.B).mul_(2),
            col_sq_sum(torch.cat([B1, self.D])).addcmul_(self.c, self.c),
            torch.mm(B2.T, B1).addmm_(self.E.T, self.D).mul_(2),
            torch.mm(self.E.T, self.E).addmm_(B2.T, B2),
            self.K1,
            self.K2,
        )

    def inner_of(self, Z: Tensor) -> HierarchicalMatrix:
        S = self.tmm(Z)
        S1, S2, S3 = self._split_rows(S)
        return HierarchicalMatrix(
            S1 @ S1.T,
            2 * (S1 @ S[self.k1 :].T),  # S[k1:] = [S2; S3]
            row_sq_sum(S2),
            2 * (S3 @ S2.T),
            S3 @ S3.T,
            self.K1,
            self.K2,
        )

    def gram_of(self, Z: Tensor) -> HierarchicalMatrix:
        """The entries of ``G = Z Z^T`` that ``P(K^T G K)`` reads: its top ``k1`` and
        bottom ``k2`` rows and its diagonal, stored as ``A = G11``, ``B = [G12 G13]``,
        ``c = diag(G22)``, ``D = G32``, ``E = G33`` (without ``P``'s factor 2)."""
        check_rows(Z, self.dim)
        k1, s = self.k1, self.k1 + self.m
        W = torch.cat([Z[:k1], Z[s:]]) @ Z.T  # [k1 + k2, d]: one product for both
        return HierarchicalMatrix(
            W[:k1, :k1],
            W[:k1, k1:],
            row_sq_sum(Z[k1:s]),
            W[k1:, k1:s],
            W[k1:, s:],
            self.K1,
            self.K2,
        )

    def inner_of_gram(self, G: StructuredMatrix) -> HierarchicalMatrix:
        """``P(K^T G K)`` from the rows and diagonal of ``G`` (see :meth:`gram_of`):
        with ``GK = G K`` in blocks, ``M = K^T G K`` has ``M11 = A^T GK11``,
        ``M1j = A^T GK1j``, ``M32 = B2^T GK12 + E^T GK32``, ``M33 = B2^T GK13 +
        E^T GK33`` and ``diag(M22) = colsum(B1 * GK12) + c * diag(GK22) +
        colsum(D * GK32)``, where ``diag(GK22) = colsum(G12 * B1) + g22 * c +
        colsum(G32 * D)``."""
        self._check_compatible(G)
        A, B, c, D, E, m, k1 = self.A, self.B, self.c, self.D, self.E, self.m, self.k1
        B1, B2 = self._B12()
        G13 = G.B[:, m:]
        G12_32 = torch.cat([G.B[:, :m], G.D])  # [G12; G32]
        BD = torch.cat([B1, D])  # [B1; D]
        # S = [GK12 GK13; GK32 GK33] = [G11; G31] B + [G13; G33] [D E] + [G12; G32] c
        # on the middle columns: both border row blocks in one product
        S = torch.mm(torch.cat([G.A, G13.T]), B)
        S.addmm_(torch.cat([G13, G.E]), torch.cat([D, E], 1))
        S[:, :m].addcmul_(G12_32, c)
        M11 = A.T @ (G.A @ A)  # A^T GK11
        R = torch.mm(B2.T, S[:k1]).addmm_(E.T, S[k1:])  # [M32 M33]
        M33 = R[:, m:]
        GK22 = (G12_32 * BD).sum(0).addcmul_(G.c, c)  # diag(GK22)
        return HierarchicalMatrix(
            symmetrized(M11),  # symmetric, as S S^T is
            torch.mm(A.T, S[:k1]).mul_(2),
            (BD * S[:, :m]).sum(0).addcmul_(c, GK22),
            R[:, :m] * 2,
            symmetrized(M33),
            self.K1,
            self.K2,
        )

    def gram_pays(self, columns: int) -> bool:
        # inner_of: ~4 n d (k1 + k2) flops (K^T Z, then its products); Gram: ~2 n d
        # (k1 + k2) and ~2 m (2 k1^2 + 3 k1 k2 + 2 k2^2) once: pays from n ~ 1.75 (k1 +
        # k2) (from 2 d when d <= K1: then only A, a dense factor)
        return self._gram_pays_above(columns, 2 * (self.k1 + self.k2))

    @classmethod
    def from_dense(cls, M: Tensor, K1: int = DEFAULT_K1, K2: int = DEFAULT_K2):
        dim = check_square(M)
        k1, m, _ = hierarchical_sizes(dim, K1, K2)
        s = k1 + m
        return cls(
            M[:k1, :k1].clone(),
            2 * M[:k1, k1:],
            M.diagonal()[k1:s].clone(),
            2 * M[s:, k1:s],
            M[s:, s:].clone(),
            K1,
            K2,
        )

    def to_dense(self) -> Tensor:
        out = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self.device)
        k1, s = self.k1, self.k1 + self.m
        out[:k1, :k1] = self.A
        out[:k1, k1:] = self.B
        out[k1:s, k1:s] = torch.diag(self.c)
        out[s:, k1:s] = self.D
        out[s:, s:] = self.E
        return out
