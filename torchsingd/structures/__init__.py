"""Structured matrix families for SINGD's Kronecker factors (a public API).

Each family is a set of ``d x d`` matrices closed under ``+``, scalar ``*`` and ``@``,
stored by the numbers that define it, with every operation SINGD needs implemented
with the structure (see :class:`StructuredMatrix`). Build members through
:func:`get_structure`::

    from torchsingd.structures import get_structure
    K = get_structure("blockdiagonal:32").eye(100)   # 3 blocks of 32 and one of 4

- ``dense``: any matrix; ``P(M) = M``; ``d^2`` numbers.
- ``diagonal``: ``P(M) = diag(M)``; ``d`` numbers.
- ``blockdiagonal:B`` (B=30): ``d//B`` dense ``BxB`` blocks and one ``d%B`` block;
  ``P`` keeps the diagonal blocks; ``~dB`` numbers.
- ``hierarchical:K1,K2`` (15,15): ``[A B1 B2; 0 diag(c) 0; 0 D E]``;
  ``P(M)``: ``A=M11, B=2M1rest, c=diag(M22), D=2M32, E=M33``; ``~d(K1+K2)`` numbers.
- ``triltoeplitz`` / ``triutoeplitz``: triangular Toeplitz; ``P`` averages diagonals;
  ``d`` numbers.
- ``triltopleftdiag:k`` (k=1): ``[diag(a) 0; b C]``, ``C`` dense ``kxk``;
  ``P(M)``: ``a=diag(M11), b=M21+M12^T, C=M22``; ``~kd`` numbers.
- ``trilbottomrightdiag:k``: ``[A 0; b diag(c)]``, ``A`` dense ``kxk``; likewise.
- ``triutopleftdiag:k``, ``triubottomrightdiag:k``: transposes of the two above.
"""

from torchsingd.structures.base import StructuredMatrix
from torchsingd.structures.blockdiagonal import BlockDiagonalMatrix
from torchsingd.structures.dense import DenseMatrix
from torchsingd.structures.diagonal import DiagonalMatrix
from torchsingd.structures.hierarchical import HierarchicalMatrix
from torchsingd.structures.registry import (
    FAMILIES,
    StructureSpec,
    get_structure,
    register_structure,
    valid_forms,
)
from torchsingd.structures.toeplitz import TrilToeplitzMatrix, TriuToeplitzMatrix
from torchsingd.structures.triangular import (
    TrilBottomRightDiagonalMatrix,
    TrilTopLeftDiagonalMatrix,
    TriuBottomRightDiagonalMatrix,
    TriuTopLeftDiagonalMatrix,
)

register_structure(DenseMatrix, memory="d^2")
register_structure(DiagonalMatrix, memory="d")
register_structure(BlockDiagonalMatrix, (30,), ("B",), memory="~d*B")
register_structure(HierarchicalMatrix, (15, 15), ("K1", "K2"), memory="~d*(K1+K2)")
register_structure(TrilToeplitzMatrix, memory="d")
register_structure(TriuToeplitzMatrix, memory="d")
for _cls in (
    TrilTopLeftDiagonalMatrix,
    TrilBottomRightDiagonalMatrix,
    TriuTopLeftDiagonalMatrix,
    TriuBottomRightDiagonalMatrix,
):
    register_structure(_cls, (1,), ("k",), memory="~k*d")

__all__ = [
    "FAMILIES",
    "BlockDiagonalMatrix",
    "DenseMatrix",
    "DiagonalMatrix",
    "HierarchicalMatrix",
    "StructureSpec",
    "StructuredMatrix",
    "TrilBottomRightDiagonalMatrix",
    "TrilToeplitzMatrix",
    "TrilTopLeftDiagonalMatrix",
    "TriuBottomRightDiagonalMatrix",
    "TriuToeplitzMatrix",
    "TriuTopLeftDiagonalMatrix",
    "get_structure",
    "register_structure",
    "valid_forms",
]
