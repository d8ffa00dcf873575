"""Upper-triangular families as transposes of lower-triangular ones.

If ``U = L^T`` with ``L`` in a lower-triangular family, every operation on ``U``
reduces to one on ``L``: ``U X = L^T X``, ``U1 U2 = (L2 L1)^T``, and, since the
projections satisfy ``P_U(M) = P_L(M)^T`` for symmetric ``M``,
``P_U(U^T U) = P_L(L L^T)^T`` and ``P_U(U^T Z Z^T U) = P_L(S S^T)^T`` with ``S = L Z``.
So the lower-triangular classes implement two extra operations, ``outer()``
(``P(L L^T)``) and ``project_gram(S)`` (``P(S S^T)``), and each upper-triangular
family is a two-line subclass of :class:`TransposedMatrix`. The stored tensors are
those of ``L`` (e.g. the coupling block of ``U`` is stored transposed).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from torchsingd.structures.base import SparsePattern, StructuredMatrix


class LowerTriangularMatrix(StructuredMatrix):
    """A lower-triangular family that also provides ``outer`` and ``project_gram``."""

    def outer(self) -> LowerTriangularMatrix:
        """``P(self @ self^T)``."""
        raise NotImplementedError

    def stacked_outer(self, storage: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The storage of each stacked member's :meth:`outer` (families that stack)."""
        raise NotImplementedError(f"{type(self).__name__} does not stack.")

    def project_gram(self, S: Tensor) -> LowerTriangularMatrix:
        """``P(S @ S^T)`` for a dense ``S`` of shape ``[d, n]``."""
        raise NotImplementedError

    def inner_of(self, Z: Tensor) -> LowerTriangularMatrix:
        return self.project_gram(self.tmm(Z))


class TransposedMatrix(StructuredMatrix):
    """``U = L^T`` for ``L`` a member of the lower-triangular family ``BASE``."""

    BASE: ClassVar[type[LowerTriangularMatrix]]

    def __init__(self, lower: LowerTriangularMatrix) -> None:
        if not isinstance(lower, self.BASE):
            raise TypeError(f"Expected a {self.BASE.__name__}, got {type(lower).__name__}.")
        super().__init__(lower.dim)
        self.lower = lower

    def tensors(self) -> tuple[Tensor, ...]:
        return self.lower.tensors()

    def options(self) -> tuple[int, ...]:
        return self.lower.options()

    @classmethod
    def zeros(cls, dim, *options, dtype=None, device=None):
        return cls(cls.BASE.zeros(dim, *options, dtype=dtype, device=device))

    def _with_tensors(self, tensors):
        return type(self)(self.lower._with_tensors(tensors))

    def add_identity_(self, value: float) -> TransposedMatrix:
        self.lower.add_identity_(value)
        return self

    def frobenius_sq(self) -> Tensor:
        return self.lower.frobenius_sq()

    def trace(self) -> Tensor:
        return self.lower.trace()

    def sparse_pattern(self) -> SparsePattern | None:
        """The lower factor's pattern with rows and columns exchanged."""
        p = self.lower.sparse_pattern()
        if p is None:
            return None
        return SparsePattern("columns" if p.kind == "rows" else "rows", p.head, p.tail, p.delta)

    def sparse_border(self) -> tuple[int, int] | None:
        return self.lower.sparse_border()

    def mm(self, X: Tensor) -> Tensor:
        return self.lower.tmm(X)

    def tmm(self, X: Tensor) -> Tensor:
        return self.lower.mm(X)

    def matmul(self, other: StructuredMatrix) -> TransposedMatrix:
        self._check_compatible(other)
        return type(self)(other.lower.matmul(self.lower))

    def inner(self) -> TransposedMatrix:
        return type(self)(self.lower.outer())

    def inner_of(self, Z: Tensor) -> TransposedMatrix:
        return type(self)(self.lower.project_gram(self.lower.mm(Z)))

    # stacking, where the lower family stacks: U^T U = L L^T (P_U(U^T U) = P_L(L L^T)^T,
    # the same stored numbers), U U' = (L' L)^T; trace, identity and norms are L's
    @property
    def stacks(self) -> bool:
        return self.lower.stacks

    def stacked_inner(self, storage: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return self.lower.stacked_outer(storage)

    def stacked_matmul(self, first: tuple[Tensor, ...], second: tuple[Tensor, ...]):
        return self.lower.stacked_matmul(second, first)

    def stacked_trace(self, storage: tuple[Tensor, ...]) -> Tensor:
        return self.lower.stacked_trace(storage)

    def stacked_average_trace(self, storage: tuple[Tensor, ...]) -> Tensor:
        return self.lower.stacked_average_trace(storage)

    def stacked_add_identity_(self, storage: tuple[Tensor, ...], value: float) -> None:
        self.lower.stacked_add_identity_(storage, value)

    def stacked_frobenius_sq(self, storage: tuple[Tensor, ...]) -> Tensor:
        return self.lower.stacked_frobenius_sq(storage)

    @classmethod
    def from_dense(cls, M: Tensor, *options: int) -> TransposedMatrix:
        return cls(cls.BASE.from_dense(M, *options))

    def to_dense(self) -> Tensor:
        return self.lower.to_dense().T.contiguous()
