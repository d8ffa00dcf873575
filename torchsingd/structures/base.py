"""The protocol every structured matrix family implements.

A structured matrix is a ``d x d`` matrix from a set that is closed under ``+``,
scalar ``*`` and ``@`` (a matrix group once invertible), stored by the few numbers
that define it. SINGD keeps its Kronecker factors ``K``, ``C`` and their momenta in
such a set, so every operation the optimizer needs is expressed here *with* the
structure: no method on the optimizer's path builds a dense ``d x d`` matrix
(``to_dense`` and ``from_dense`` exist for tests, debugging and users).

Notation (ALGORITHM.md section 4): ``P(M)`` is the projection of a symmetric matrix
``M`` onto the structure. It keeps the diagonal, so ``avgtr(P(M)) = avgtr(M)``.

Every family stores a tuple of tensors (:meth:`StructuredMatrix.tensors`). Any values
of these tensors define a member of the family, which makes element-wise operations
(``add_``, ``mul_``, ``max_abs``, copying for checkpoints) family-independent.
"""

from __future__ import annotations

import math
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

GRAM_MIN_NUMEL = 1 << 17
"""Fewest numbers in ``Z`` for which the Gram route to ``inner_of`` is taken (see
:meth:`StructuredMatrix._gram_pays_above`)."""


class StructuredMatrix(ABC):
    """A square matrix of a structured family, stored by its defining tensors.

    Subclasses implement the abstract methods below; each is documented with the
    dense computation it must equal (the tests check exactly these equalities).

    Attributes:
        family: The registry name of the family (e.g. ``"blockdiagonal"``).
        dim: The matrix dimension ``d``.
    """

    family: ClassVar[str]
    #: whether equal-shaped members of this one's family and size are updated together
    #: (:func:`torchsingd.optim.update.update_factors_together`, with the ``stacked_*``
    #: methods): a class attribute, or a property where it depends on the member (the
    #: Toeplitz families: below ``FFT_MIN_DIM`` only). The batched update takes the
    #: default :meth:`bound_inputs` and quick bound, and a member's own
    #: :meth:`bounded_step` (block-diagonal: per block) only where the quick bound does
    #: not hold: a family that overrides the former, or whose ``bounded_step`` acts
    #: where the quick bound holds, does not stack as is; one that overrides
    #: :meth:`frobenius_sq` or :meth:`average_trace` overrides their ``stacked_*``.
    #: Read it on members.
    stacks: bool = False

    def __init__(self, dim: int) -> None:
        self.dim = dim

    # ------------------------------------------------------------------ storage
    @abstractmethod
    def tensors(self) -> tuple[Tensor, ...]:
        """The tensors that define the matrix (views of the storage, not copies)."""

    @abstractmethod
    def options(self) -> tuple[int, ...]:
        """The family's size parameters (e.g. ``(B,)`` for block-diagonal)."""

    @classmethod
    @abstractmethod
    def zeros(
        cls,
        dim: int,
        *options: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> StructuredMatrix:
        """The zero matrix of dimension ``dim`` in this family."""

    @abstractmethod
    def _with_tensors(self, tensors: tuple[Tensor, ...]) -> StructuredMatrix:
        """A member of the same family and options, defined by ``tensors``."""

    @classmethod
    def eye(
        cls,
        dim: int,
        *options: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> StructuredMatrix:
        """The identity matrix of dimension ``dim`` in this family."""
        out = cls.zeros(dim, *options, dtype=dtype, device=device)
        out.add_identity_(1.0)
        return out

    def _storage(self) -> tuple[Tensor, ...]:
        """The tensors that hold the numbers: :meth:`tensors` unless a family keeps its
        defining tensors as views of fewer, larger ones (hierarchical). Element-wise
        operations, copies and casts run over these (fewer, larger operations); any
        values of them that keep the family's fixed zeros define a member."""
        return self.tensors()

    def _from_storage(self, storage: tuple[Tensor, ...]) -> StructuredMatrix:
        """A member of the same family and options held by ``storage`` (tensors shaped
        as :meth:`_storage`'s)."""
        return self._with_tensors(storage)

    @property
    def dtype(self) -> torch.dtype:
        return self._storage()[0].dtype

    @property
    def device(self) -> torch.device:
        return self._storage()[0].device

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.dim, self.dim))

    def numel(self) -> int:
        """How many numbers the structure stores."""
        return sum(t.numel() for t in self.tensors())

    def nbytes(self) -> int:
        """How many bytes the structure stores."""
        return sum(t.nbytes for t in self.tensors())

    def clone(self) -> StructuredMatrix:
        return self._from_storage(tuple(t.clone() for t in self._storage()))

    def to(self, dtype: torch.dtype | None = None, device=None) -> StructuredMatrix:
        storage = self._storage()
        return self._from_storage(tuple(t.to(dtype=dtype, device=device) for t in storage))

    def copy_(self, other: StructuredMatrix) -> StructuredMatrix:
        """Overwrite the values in place with ``other``'s (same family and shape)."""
        self._check_compatible(other)
        for t, o in zip(self._storage(), other._storage(), strict=True):
            t.copy_(o)
        return self

    # -------------------------------------------------------- element-wise ops
    def add_(self, other: StructuredMatrix, alpha: float | Tensor = 1.0) -> StructuredMatrix:
        """``self <- self + alpha * other`` in place."""
        self._check_compatible(other)
        tensors = self._storage()
        if len(tensors) > 1 and not isinstance(alpha, Tensor):
            # one dispatch for all tensors: the per-tensor add_, bit for bit
            torch._foreach_add_(list(tensors), list(other._storage()), alpha=alpha)
        else:
            for t, o in zip(tensors, other._storage(), strict=True):
                t.add_(o, alpha=alpha)
        return self

    def add(self, other: StructuredMatrix, alpha: float | Tensor = 1.0) -> StructuredMatrix:
        """``self + alpha * other``, a new member (the numbers of ``clone().add_``)."""
        self._check_compatible(other)
        tensors, others = list(self._storage()), list(other._storage())
        if len(tensors) > 1 and not isinstance(alpha, Tensor):
            sums = torch._foreach_add(tensors, others, alpha=alpha)
        else:
            sums = [torch.add(t, o, alpha=alpha) for t, o in zip(tensors, others, strict=True)]
        # in self's dtype, as add_ (which computes in the promoted one)
        return self._from_storage(tuple(s.to(t.dtype) for s, t in zip(sums, tensors, strict=True)))

    def mul(self, value: float | Tensor) -> StructuredMatrix:
        """``value * self``, a new member (the numbers of ``clone().mul_``)."""
        tensors = self._storage()
        if len(tensors) > 1:
            return self._from_storage(tuple(torch._foreach_mul(list(tensors), value)))
        return self._from_storage(tuple(torch.mul(t, value) for t in tensors))

    def mul_(self, value: float | Tensor) -> StructuredMatrix:
        """``self <- value * self`` in place."""
        tensors = self._storage()
        if len(tensors) > 1:
            torch._foreach_mul_(list(tensors), value)
        else:
            for t in tensors:
                t.mul_(value)
        return self

    def _stored(self) -> Tensor | None:
        """The stored numbers as one 1-D tensor (a view of a family's only tensor; else
        a concatenation, about ``d B`` numbers for the structured families), or
        ``None`` when nothing is stored. Reductions over every stored number then take
        one or two operators instead of two or three per tensor."""
        flat = [t.reshape(-1) for t in self._storage() if t.numel() > 0]
        if not flat:
            return None
        return flat[0] if len(flat) == 1 else torch.cat(flat)

    def max_abs(self) -> Tensor:
        """The largest absolute entry of the matrix (its infinity vector norm)."""
        flat = self._stored()
        if flat is None:
            return torch.zeros((), dtype=self.dtype, device=self.device)
        return flat.abs().max()

    def frobenius_sq(self) -> Tensor:
        """``||M||_F^2``: the sum of squares of the stored numbers, for structures that
        store every non-zero entry once (Toeplitz weighs its diagonals by their length);
        in at least float32 (squares of half-precision numbers overflow: 40^2 * 64 is
        inf in float16)."""
        flat = self._stored()
        dtype = torch.promote_types(self.dtype, torch.float32)
        if flat is None:
            return torch.zeros((), dtype=dtype, device=self.device)
        flat = flat.to(dtype)
        return torch.dot(flat, flat)

    def spectral_norm_bound(self) -> Tensor:
        """An upper bound on ``||self||_2`` (the largest singular value), a 0-d tensor.

        The smaller of two bounds, each cheap in every structure (float32 at least):

        - ``|c| + ||M - c I||_F`` with ``c = avgtr(M)``: tight for a multiple of the
          identity plus a low-rank part, the shape SINGD's ``m`` takes when the
          curvature of a few directions jumps;
        - ``sqrt(||M||_1 ||M||_inf)`` (Hoelder) from the row and column sums of ``|M|``,
          exact for diagonal matrices.

        Measured on SINGD's ``m`` over MNIST-1D training runs: median 1.07x, at most
        3.4x the exact spectral norm.
        """
        M = self if self.dtype in (torch.float32, torch.float64) else self.to(torch.float32)
        if not self.dim:  # the empty matrix (whose average trace is 0 / 0)
            return torch.zeros((), dtype=M.dtype, device=M.device)
        c = M.average_trace()
        rest = M.clone().add_identity_(-c).frobenius_sq().sqrt()  # ||M - cI||_F
        A = M._from_storage(tuple(t.abs() for t in M._storage()))
        ones = torch.ones(self.dim, 1, dtype=M.dtype, device=M.device)
        hoelder = (A.mm(ones).max() * A.tmm(ones).max()).sqrt()
        first = c.abs() + rest
        # Squares overflow before the Hoelder sums do: then (inf or NaN) use the latter.
        return torch.where(torch.isfinite(first), torch.minimum(first, hoelder), hoelder)

    def bounded_step(
        self, beta: float, max_step: float, inputs: list[float] | None = None
    ) -> StructuredMatrix | None:
        """The step ``S = beta * self`` of a factor update ``X <- X (I - S)``, bounded.

        ``None`` when ``beta * ||self||_2 <= max_step`` holds (by
        :meth:`quick_norm_bound`, else :meth:`spectral_norm_bound`; also for a
        non-finite bound, which the factor repair handles): the step is left alone.
        Otherwise a member ``S`` of the family with ``||S||_2 <= max_step``: here
        ``beta`` scaled down for the whole matrix, ``S = max_step / bound * self``.
        Structures whose members are direct sums of independent diagonal blocks
        (diagonal, block-diagonal) bound each block on its own instead, so that one
        direction of large curvature does not slow the update of all the others.

        ``inputs``: the values of :meth:`bound_inputs` when the caller has read them
        already (with those of other matrices, in one synchronisation); else read here.
        """
        if beta == 0.0 or beta * self.quick_norm_bound(inputs) <= max_step:
            return None
        bound = float(self.spectral_norm_bound())
        if not beta * bound > max_step:
            return None
        return self.clone().mul_(max_step / bound)

    def bound_inputs(self) -> list[Tensor]:
        """The 0-d tensors whose values :meth:`bounded_step` decides from (by default
        those of :meth:`quick_norm_bound`); see :func:`read_scalars`."""
        return self._quick_inputs()

    def _quick_inputs(self) -> list[Tensor]:
        M = self if self.dtype in (torch.float32, torch.float64) else self.to(torch.float32)
        return [M.frobenius_sq(), M.average_trace()]

    def quick_norm_bound(self, inputs: list[float] | None = None) -> float:
        """A cheap upper bound on ``||self||_2``: ``|c| + ||M - cI||_F``, ``c = avgtr(M)``,
        from ``||M - cI||_F^2 = ||M||_F^2 - c^2 d`` (two reductions, no temporaries).

        A float32 sum of ``n`` squares is accurate to well within ``1e-5`` relative, so
        ``1e-5 ||M||_F^2`` is added under the root to keep the cancellation in
        ``||M||_F^2 - c^2 d`` from undercutting the bound. Used to skip
        :meth:`spectral_norm_bound` (several passes) when the step is clearly small;
        NaN or inf for a non-finite matrix. ``inputs``: the values of
        ``[||M||_F^2, avgtr(M)]`` if read already.
        """
        square, c = read_scalars(self._quick_inputs()) if inputs is None else inputs
        rest = square - c * c * self.dim + 1e-5 * square
        return abs(c) + math.sqrt(rest) if rest >= 0.0 else abs(c) + math.sqrt(1e-5 * square)

    def is_finite(self) -> bool:
        """Whether every stored number is finite.

        First one reduction: a sum of the numbers is finite only if each is (NaN and
        inf propagate), which settles the common case in one synchronisation; as a
        sum of finite numbers can overflow, a non-finite sum is confirmed entry by
        entry.
        """
        return self.finite_given(float(self.finite_sum()))

    def finite_sum(self) -> Tensor:
        """The sum of the stored numbers (0-d, at least float32): finite if every
        number is; :meth:`finite_given` decides from its value. Lets a caller read
        the sums of several matrices in one synchronisation (:func:`read_scalars`)."""
        flat = self._stored()
        acc = wide(self.dtype)  # fp16 sums overflow early
        if flat is None:
            return torch.zeros((), dtype=acc, device=self.device)
        return flat.sum(dtype=acc)

    def finite_given(self, total: float) -> bool:
        """:meth:`is_finite` from the value of :meth:`finite_sum`: a finite sum settles
        it; a non-finite one (a sum of finite numbers can overflow) is confirmed entry
        by entry."""
        if math.isfinite(total):
            return True
        return all(bool(torch.isfinite(t).all()) for t in self._storage())

    # --------------------------------------------------- structure-aware algebra
    @abstractmethod
    def add_identity_(self, value: float) -> StructuredMatrix:
        """``self <- self + value * I`` in place."""

    @abstractmethod
    def trace(self) -> Tensor:
        """``trace(self)`` as a 0-d tensor, summed in (and returned in) at least
        float32: see :func:`wide`."""

    def average_trace(self) -> Tensor:
        """``avgtr(self) = trace(self) / d``."""
        return self.trace() / self.dim

    @abstractmethod
    def mm(self, X: Tensor) -> Tensor:
        """``self @ X`` for a dense ``X`` of shape ``[d, n]``; returns ``[d, n]``."""

    @abstractmethod
    def tmm(self, X: Tensor) -> Tensor:
        """``self^T @ X`` for a dense ``X`` of shape ``[d, n]``; returns ``[d, n]``."""

    @abstractmethod
    def matmul(self, other: StructuredMatrix) -> StructuredMatrix:
        """``self @ other`` for a member of the same family; stays in the family."""

    @abstractmethod
    def inner(self) -> StructuredMatrix:
        """``P(self^T @ self)``."""

    @abstractmethod
    def inner_of(self, Z: Tensor) -> StructuredMatrix:
        """``P(self^T @ Z @ Z^T @ self)`` for a dense ``Z`` of shape ``[d, n]``."""

    # ``stacked_*``: the same operations on the storage (:meth:`_storage`) of several
    # members of this one's family and sizes, each tensor stacked along a new first
    # dimension (``self`` gives the sizes only); defined by the families whose members
    # may stack (see ``stacks``).
    def stacked_inner(self, storage: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The storage of each member's :meth:`inner`."""
        raise NotImplementedError(f"{type(self).__name__} does not stack.")

    def stacked_matmul(
        self, first: tuple[Tensor, ...], second: tuple[Tensor, ...]
    ) -> tuple[Tensor, ...]:
        """The storage of each pair's :meth:`matmul`."""
        raise NotImplementedError(f"{type(self).__name__} does not stack.")

    def stacked_trace(self, storage: tuple[Tensor, ...]) -> Tensor:
        """Each member's :meth:`trace` (``[m]``)."""
        raise NotImplementedError(f"{type(self).__name__} does not stack.")

    def stacked_add_identity_(self, storage: tuple[Tensor, ...], value: float) -> None:
        """Each member's :meth:`add_identity_`, in place."""
        raise NotImplementedError(f"{type(self).__name__} does not stack.")

    def stacked_average_trace(self, storage: tuple[Tensor, ...]) -> Tensor:
        """Each member's :meth:`average_trace` (``[m]``)."""
        return self.stacked_trace(storage) / self.dim

    def stacked_frobenius_sq(self, storage: tuple[Tensor, ...]) -> Tensor:
        """Each member's :meth:`frobenius_sq` (``[m]``; by default the squares of the
        stored numbers, as :meth:`frobenius_sq`)."""
        dtype = torch.promote_types(storage[0].dtype, torch.float32)
        return sum((t.flatten(1).to(dtype) ** 2).sum(1) for t in storage)

    def stacked_finite_sum(self, storage: tuple[Tensor, ...]) -> Tensor:
        """Each member's :meth:`finite_sum` (``[m]``, at least float32): finite where
        every number of that member is (:meth:`finite_given` decides)."""
        dtype = wide(storage[0].dtype)
        return sum(t.flatten(1).sum(1, dtype=dtype) for t in storage)

    def stacked_outer_operators(self, storage: tuple[Tensor, ...]) -> list | None:
        """Each member's :meth:`outer_operator`, formed together (a few batched
        operations for all members instead of a few each), or ``None``: this family
        forms them one at a time (its operator costs nothing to form, or it does
        not stack)."""
        return None

    def gram_of(self, Z: Tensor) -> StructuredMatrix | None:
        """The entries of ``Z Z^T`` (``Z: [d, n]`` dense) that ``P(K^T Z Z^T K)`` reads,
        held in a member of this family, or ``None``.

        The Gram route to :meth:`inner_of`: ``inner_of_gram(gram_of(Z))`` equals
        ``inner_of(Z)``. Dense: all of ``Z Z^T``; block-diagonal: its diagonal blocks
        (``P(Z Z^T)``); hierarchical: its border rows and diagonal. It costs about one
        product with ``Z`` instead of two (``S = K^T Z``, then ``S S^T``), and it is
        additive, so statistics over chunks of rows sum their Grams and apply ``K``
        once. ``None``: this family has no such route.
        """
        return None

    def inner_of_gram(self, G: StructuredMatrix) -> StructuredMatrix:
        """``P(self^T G self)`` for ``G`` a sum of :meth:`gram_of` results (symmetric)."""
        raise NotImplementedError(f"{type(self).__name__} has no Gram route to inner_of.")

    def gram_pays(self, columns: int) -> bool:
        """Whether the Gram route beats :meth:`inner_of` for ``columns`` columns of ``Z``
        in all (families without :meth:`gram_of`: never; see :meth:`gram_precise` and
        :meth:`_gram_pays_above`)."""
        return False

    def _gram_pays_above(self, columns: int, flop_columns: float) -> bool:
        """The Gram route's rule: a precise dtype, more than ``flop_columns`` columns
        (where it does fewer FLOPs) and at least ``GRAM_MIN_NUMEL`` numbers in ``Z``.

        The last condition is measured: below it both routes cost a few dispatches
        of small products, and the Gram route's extra ones (``K^T G K`` and the
        symmetrisation) outweigh the FLOPs it saves. On 2 CPU threads (min of 3 x 30
        calls, ``Z`` of ``n`` rows of width ``d``) the Gram route took 1.25x / 1.32x
        the time of :meth:`inner_of` at ``n = 128`` for hierarchical:15,15 at ``d =
        785`` / ``513`` (1.33x / 1.44x block-diagonal:30, 1.80x / 2.79x dense at ``d
        = 65`` / ``257``: the MLP's layers at batch 128), broke even at ``n d`` about
        ``1.3e5 - 2e5`` for both structured families at every ``d`` from 65 to 785,
        and took 0.5-0.8x from ``n = 4096`` (a convolution's rows) on.
        """
        return (
            self.gram_precise() and columns > flop_columns and columns * self.dim >= GRAM_MIN_NUMEL
        )

    def gram_precise(self) -> bool:
        """Whether this member's dtype is precise enough for the Gram route: float32
        and float64 only.

        The route rounds ``G = Z Z^T`` first and then applies ``K``; once SINGD has
        whitened the statistics (``K K^T ~ (G + lambda I)^-1``), ``K^T G K`` amplifies
        that rounding by up to ``||G|| / lambda``, where ``S = K^T Z`` is computed
        whitened and stays accurate. Measured (dense, d=64, N=4096, spectrum 1..1e-6,
        ``lambda = 1e-3``): relative error 1.7e-5 (Gram) vs 4.3e-7 in float32, far
        below a minibatch statistic's sampling noise, but 27% vs 2.7% in bfloat16, so
        16-bit factors keep :meth:`inner_of`.
        """
        return self.dtype in (torch.float32, torch.float64)

    def outer_operator(self) -> StructuredMatrix | OuterOperator | SparseOuterOperator:
        """An operator equal to ``self @ self^T`` that supports ``mm``.

        Families closed under transposition (dense, diagonal, block-diagonal) return a
        member holding ``K K^T``, so applying it costs one product instead of two;
        families with a :meth:`sparse_pattern` (hierarchical, the sparse triangular
        ones) a :class:`SparseOuterOperator`; the others a view that applies
        ``K (K^T X)``.
        """
        pattern = self.sparse_pattern()
        return OuterOperator(self) if pattern is None else SparseOuterOperator(self, pattern)

    def batch_key(self) -> tuple | None:
        """Members (as ``K K^T`` operators) with one key are applied together by
        :meth:`stacked_mm` (the same family, sizes, dtype and device); ``None``: this
        family applies its members one at a time."""
        return None

    @staticmethod
    def stacked_mm(members: Sequence[StructuredMatrix], X: Tensor) -> Tensor:
        """``members[i] @ X[i]`` for ``X: [m, d, n]`` (members of one :meth:`batch_key`),
        in a few batched operations instead of a few per member."""
        raise NotImplementedError

    def outer_operator_pays(self, columns: int, uses: int) -> bool:
        """Whether forming ``outer_operator()`` once beats ``uses`` products ``K (K^T X)``
        with ``columns``-column ``X`` (families that return a plain view: never)."""
        border = self.sparse_border()
        return border is not None and uses * columns >= sum(border)

    def sparse_border(self) -> tuple[int, int] | None:
        """``(head, tail)`` of :meth:`sparse_pattern` without forming its ``delta``
        (``None``: no pattern). Families with a pattern override it with their sizes."""
        pattern = self.sparse_pattern()
        return None if pattern is None else (pattern.head, pattern.tail)

    def border_rows(self) -> Tensor | None:
        """For a ``"rows"`` :meth:`sparse_pattern`: the dense rows ``K[B, :]`` as a
        ``[head + tail, d]`` tensor read off the stored blocks (``None``: not provided;
        :class:`SparseOuterOperator` then multiplies ``K^T`` with unit vectors)."""
        return None

    def sparse_pattern(self) -> SparsePattern | None:
        """``self`` as ``diag(delta)`` plus a few dense rows or columns (``None``: not
        of that form). See :class:`SparsePattern`."""
        return None

    @classmethod
    @abstractmethod
    def from_dense(cls, M: Tensor, *options: int) -> StructuredMatrix:
        """``P(M)`` for a symmetric dense ``M`` of shape ``[d, d]``."""

    @abstractmethod
    def to_dense(self) -> Tensor:
        """The represented matrix as a dense ``[d, d]`` tensor (tests and debugging)."""

    def __matmul__(self, other: StructuredMatrix | Tensor) -> StructuredMatrix | Tensor:
        if isinstance(other, Tensor):
            return self.mm(other)
        return self.matmul(other)

    def __repr__(self) -> str:
        opts = ",".join(str(o) for o in self.options())
        name = f"{self.family}:{opts}" if opts else self.family
        return f"{type(self).__name__}({name}, dim={self.dim}, dtype={self.dtype})"

    def _check_compatible(self, other: StructuredMatrix) -> None:
        if type(other) is not type(self) or other.dim != self.dim:
            raise ValueError(f"Incompatible structured matrices: {self!r} and {other!r}.")
        if other.options() != self.options():
            raise ValueError(f"Incompatible structure options: {self!r} and {other!r}.")


class OuterOperator:
    """``K K^T`` applied as ``K (K^T X)`` (for families not closed under transposition)."""

    def __init__(self, K: StructuredMatrix) -> None:
        self.K = K
        self.dtype = K.dtype

    def mm(self, X: Tensor) -> Tensor:
        return self.K.mm(self.K.tmm(X))

    def nbytes(self) -> int:
        """``0``: a view of ``K``, which holds the numbers."""
        return 0


@dataclass(frozen=True)
class SparsePattern:
    """``K = diag(delta) + (dense rows or columns at the border B)``.

    ``B`` is the first ``head`` and the last ``tail`` indices; ``delta`` (shape
    ``[d]``) is zero on ``B``. ``kind="rows"``: outside ``B`` row ``i`` of ``K`` is
    ``delta_i e_i^T`` (hierarchical, ``triltopleftdiag``, ``triubottomrightdiag``);
    ``kind="columns"``: the same for the columns (the other two triangular families).
    """

    kind: str
    head: int
    tail: int
    delta: Tensor


class SparseOuterOperator:
    """``M = K K^T`` for a ``K`` with a :class:`SparsePattern`, formed once, applied in
    two thin products and one element-wise pass (``b = head + tail``).

    Dense rows (``K = diag(delta) + E_B R``): ``M`` is an arrow matrix, diagonal
    (``delta^2``) outside its ``b`` border rows and columns, so
    ``M X = delta^2 * X + M[:, B] X[B]`` on the rows outside ``B`` and ``M[B, :] X``
    on ``B``. Dense columns (``K = diag(delta) + F E_B^T`` with ``F = K E_B``):
    ``M = diag(delta^2) + F F^T``. Both keep ``d x b`` numbers (``M[:, B]`` or ``F``),
    computed from products of ``K`` with the ``b`` unit vectors of ``B``.
    """

    def __init__(self, K: StructuredMatrix, pattern: SparsePattern) -> None:
        d, h, t = K.dim, pattern.head, pattern.tail
        border = K.border_rows() if pattern.kind == "rows" else None
        if border is not None:  # K^T E = K[B, :]^T exactly: no products with unit vectors
            KtE = border.new_empty(d, h + t).copy_(border.T)  # E's row-major strides
            W = K.mm(KtE)
        else:
            E = torch.zeros(d, h + t, dtype=K.dtype, device=K.device)
            E[border_index(d, h, t, K.device), torch.arange(h + t, device=K.device)] = 1
            # rows: M[:, B] = K K^T E; columns: F = K E (the dense columns of K)
            W = K.mm(K.tmm(E)) if pattern.kind == "rows" else K.mm(E)
        self._hold(pattern.kind, h, t, pattern.delta.square().unsqueeze(1), W)

    @classmethod
    def stacked(
        cls, kind: str, head: int, tail: int, delta: Tensor, W: Tensor
    ) -> list[SparseOuterOperator]:
        """One operator per member from parts formed for several members together
        (:meth:`StructuredMatrix.stacked_outer_operators`): ``delta: [m, d]`` and ``W:
        [m, d, head + tail]``, ``M[:, B] = K K[B, :]^T`` (``"rows"``) or the dense
        columns ``F = K E_B`` (``"columns"``); each operator holds views of them."""
        v = delta.square().unsqueeze(-1)
        out = [cls.__new__(cls) for _ in range(len(W))]
        for i, op in enumerate(out):
            op._hold(kind, head, tail, v[i], W[i])
        return out

    def _hold(self, kind: str, head: int, tail: int, v: Tensor, W: Tensor) -> None:
        self.kind, self.head, self.tail, self.dtype = kind, head, tail, W.dtype
        self.v, self.W = v, W
        # B as indices, kept where it has two parts (see _border)
        self.index = border_index(W.shape[0], head, tail, W.device) if head and tail else None

    def nbytes(self) -> int:
        """Bytes held: ``W`` (``d x b``) and ``delta^2`` (``d``); ``B``'s indices are a
        shared :func:`constant`, not counted."""
        return self.W.nbytes + self.v.nbytes

    def batch_key(self) -> tuple:
        """Operators with one key are applied together (:meth:`stacked_mm`)."""
        W = self.W
        return (type(self), self.kind, self.head, self.tail, *W.shape, W.dtype, W.device)

    @staticmethod
    def stacked_mm(ops: Sequence[SparseOuterOperator], X: Tensor) -> Tensor:
        """``ops[i] @ X[i]`` for ``X: [m, d, n]``: :meth:`mm`'s operations, each
        batched over the operators."""
        first = ops[0]
        W = torch.stack([op.W for op in ops])  # [m, d, b]
        out = torch.stack([op.v for op in ops]) * X
        if first.kind == "columns":
            return out.baddbmm_(W, W.mT @ X)
        border = W.mT @ X  # M[B, :] X, before X is read for its rows B
        out.baddbmm_(W, first._border(X, 1))
        first._write_border(out, 1, border)
        return out

    def _border(self, X: Tensor, dim: int) -> Tensor:
        """The rows (``dim=0``) or columns (``dim=1``) of ``X`` in ``B``: a view where
        ``B`` is one range, else a fresh tensor (one gather)."""
        h, t, d = self.head, self.tail, X.shape[dim]
        if t == 0:
            return X.narrow(dim, 0, h)
        if h == 0:
            return X.narrow(dim, d - t, t)
        return X.index_select(dim, self.index)

    def _write_border(self, out: Tensor, dim: int, values: Tensor) -> None:
        """``out``'s rows (``dim=0``) or columns (``dim=1``) in ``B`` <- ``values``."""
        h, t, d = self.head, self.tail, out.shape[dim]
        if h and t:
            out.index_copy_(dim, self.index, values)
        elif h:
            out.narrow(dim, 0, h).copy_(values)
        elif t:
            out.narrow(dim, d - t, t).copy_(values)

    def mm(self, X: Tensor) -> Tensor:
        if not X.is_contiguous() and X.T.is_contiguous():
            return self._rmm(X.T).T  # M X = (X^T M)^T: keep the products row-major
        # (addmm_ in place: torch.addmm would copy its first argument once more)
        if self.kind == "columns":
            return (self.v * X).addmm_(self.W, self.W.T @ X)
        return self._arrow(self.v * X, self._border(X, 0), self.W.T @ X)

    def mm_(self, X: Tensor) -> Tensor:
        """``M X`` written into ``X`` (which the caller owns; row-major); returns ``X``.

        The same operations as :meth:`mm` in the same order, so the same numbers,
        without a fresh ``[d, n]`` output (the thin products are taken first).
        """
        if not X.is_contiguous():
            return X.copy_(self.mm(X))
        if self.kind == "columns":
            FtX = self.W.T @ X  # before X is overwritten
            return X.mul_(self.v).addmm_(self.W, FtX)
        XB = self._border(X, 0)  # X[B] and X are overwritten below: keep a copy
        XB = XB.clone() if self.index is None else XB  # (a gathered XB is one already)
        border = self.W.T @ X
        return self._arrow(X.mul_(self.v), XB, border)

    def _arrow(self, out: Tensor, XB: Tensor, border: Tensor) -> Tensor:
        """Dense rows: ``out`` holds ``delta^2 * X``; add ``M[:, B] X[B]`` (right
        outside ``B``) and write ``border = M[B, :] X`` into the rows of ``B``."""
        out.addmm_(self.W, XB)
        self._write_border(out, 0, border)
        return out

    def _rmm(self, X: Tensor) -> Tensor:
        """``X M`` for ``X: [n, d]``."""
        if self.kind == "columns":
            return (X * self.v.T).addmm_(X @ self.W, self.W.T)
        out = (X * self.v.T).addmm_(self._border(X, 1), self.W.T)  # right outside B
        self._write_border(out, 1, X @ self.W)  # X M[:, B]
        return out


def border_index(d: int, head: int, tail: int, device: torch.device) -> Tensor:
    """The indices of ``B``: the first ``head`` and the last ``tail`` of ``d`` (a
    :func:`constant`: callers only read it)."""

    def make() -> Tensor:
        index = torch.arange(head + tail, device=device)
        index[head:] += d - tail - head
        return index

    return constant(("border", d, head, tail, torch.device(device)), make)


#: the tensors :func:`constant` keeps (cleared when it reaches ``_CONSTANTS_MAX``)
_CONSTANTS: dict[tuple, Tensor] = {}
_CONSTANTS_MAX = 1024


def constant(key: tuple, make: Callable[[], Tensor]) -> Tensor:
    """A small tensor that depends only on ``key`` (its sizes, dtype and device), built
    by ``make`` the first time and then shared; callers must not modify it.

    The products of a structured step gather, scatter or scale the same index sets
    many times per step (a hierarchical factor's border rows: four operators to build
    them or to concatenate two slices, each time). Built outside inference mode (so it
    can be saved for a backward pass later); while ``torch.compile`` traces (checked
    first: Dynamo cannot trace the dispatch-mode lookup) and under a dispatch mode
    (fake tensors, a counting mode) built afresh and not kept.
    """
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return make()
    found = _CONSTANTS.get(key)
    if found is None:
        with torch.inference_mode(False):
            found = make()
        if len(_CONSTANTS) >= _CONSTANTS_MAX:
            _CONSTANTS.clear()
        _CONSTANTS[key] = found
    return found


#: :func:`self_outer` splits ``X X^T`` from this many rows (and columns) of ``X`` on.
SELF_OUTER_MIN_DIM = 256


def self_outer(X: Tensor) -> Tensor:
    """``X @ X^T`` for ``X: [d, n]``.

    On a CPU from ``d, n >= SELF_OUTER_MIN_DIM``: the lower triangle's four block
    columns as four products (``X[a:] X[a:b]^T``: 5/8 of the FLOPs), then mirrored.
    Measured on 2 CPU threads (float32, median of 31; split / one product): ``[289,
    3628]`` (a chunk of a convolution's patches) 0.75, ``[577, 1817]`` 0.79, ``[513,
    2052]`` 0.69, ``[785, 785]`` 0.62, ``[1024, 4096]`` 0.69; below ``d = 256`` the
    extra products and the mirror's copy cost more than they save (``[128, 512]``:
    1.74). (Not measured on GPUs: one product there.)
    """
    d, n = X.shape
    if d < SELF_OUTER_MIN_DIM or n < SELF_OUTER_MIN_DIM or X.device.type != "cpu":
        return X @ X.T
    out = X.new_empty(d, d)
    edges = [d * i // 4 for i in range(5)]
    for i in range(4):  # block column i, from its diagonal block down
        a, b = edges[i], edges[i + 1]
        out[a:, a:b] = X[a:] @ X[a:b].T
    for i in range(3):  # block row i right of its diagonal block
        a, b = edges[i], edges[i + 1]
        out[a:b, b:] = out[b:, a:b].T
    return out


def symmetrized(R: Tensor) -> Tensor:
    """``(R + R^T) / 2`` over the last two dimensions, a new tensor (a Gram route's
    ``K^T G K`` is symmetric, as ``S S^T`` is, up to rounding)."""
    return (R + R.mT).mul_(0.5)


def read_scalars(values: list[Tensor]) -> list[float]:
    """The Python floats of 0-d tensors, read in one device synchronisation.

    On a GPU each ``float(t)`` waits for the device and copies one number back; the
    tensors of one dtype and device are stacked and read at once instead. The values
    are those of ``float(t)`` for each ``t``, exactly. On the CPU a read waits for
    nothing, and stacking would only add work: there each is read on its own.
    """
    if not any(_read_waits(t.device) for t in values):
        return [float(t) for t in values]
    out: list[float | None] = [None] * len(values)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(values):
        groups.setdefault((t.dtype, t.device), []).append(i)
    for indices in groups.values():
        if len(indices) == 1:
            out[indices[0]] = float(values[indices[0]])
            continue
        read = torch.stack([values[i].reshape(()) for i in indices]).tolist()
        for i, v in zip(indices, read, strict=True):
            out[i] = float(v)
    return out


def written(op, out: Tensor, *args: Tensor) -> Tensor:
    """``op(*args, out=out)``; where autograd must record it (grad mode on and an
    argument requiring grad), ``out.copy_(op(*args))`` instead: ``out=`` variants do not
    support autograd, an in-place copy into a view of a fresh tensor does. Returns
    ``out``."""
    if torch.is_grad_enabled() and any(a.requires_grad for a in args):
        return out.copy_(op(*args))
    return op(*args, out=out)


def round_float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (``inf`` beyond its range), as a Python float."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # rounds to inf
        return math.copysign(math.inf, x)


def _read_waits(device: torch.device) -> bool:
    """Whether reading a number back from ``device`` waits for the device (all but
    the CPU)."""
    return device.type != "cpu"


def wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype to accumulate sums of ``dtype`` numbers in: at least float32 (a
    float16 sum of ``d`` entries overflows long before their average does)."""
    return torch.promote_types(dtype, torch.float32)


def check_square(M: Tensor, name: str = "M") -> int:
    """Return ``d`` for a ``[d, d]`` tensor, else raise a ``ValueError``."""
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(M.shape)}.")
    return M.shape[0]


def check_rows(X: Tensor, dim: int) -> None:
    """Raise a ``ValueError`` unless ``X`` is a ``[dim, n]`` matrix."""
    if X.ndim != 2 or X.shape[0] != dim:
        raise ValueError(f"Expected a matrix with {dim} rows, got shape {tuple(X.shape)}.")


def col_sq_sum(X: Tensor) -> Tensor:
    """``diag(X^T X)``: the column sums of ``X * X`` (shape ``[n]`` for ``X: [m, n]``)."""
    return (X * X).sum(0)


def row_sq_sum(X: Tensor) -> Tensor:
    """``diag(X X^T)``: the row sums of ``X * X`` (shape ``[m]`` for ``X: [m, n]``)."""
    return (X * X).sum(1)
