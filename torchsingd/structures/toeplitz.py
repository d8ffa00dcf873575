"""Triangular Toeplitz matrices: one number per diagonal.

``"triltoeplitz"``: ``L[i, j] = col[i - j]`` for ``i >= j``, zero above the diagonal.
``"triutoeplitz"``: the transpose, ``U[i, j] = col[j - i]`` for ``j >= i``.
Products of such matrices are again triangular Toeplitz (they are polynomials in the
shift matrix), and a product with a dense matrix is a causal convolution along its
rows, computed by FFT (``O(n d log d)``, of a length without large prime factors) from
``d = FFT_MIN_DIM`` on, below by one product with the small dense matrix; from
``FFT_MIN_DIM`` on nothing here is ``O(d^2)`` in memory except the Gram route of
statistics over many rows (``gram_of``: the dense ``Z Z^T``, only up to
``GRAM_MAX_DIM``). A convolution may be
circular of a length a little below ``2 d - 1`` (``conv_size``: a layer with a bias
has ``d = 2^k + 1``, whose ``fft_size`` is 5-smooth and slow); the few outputs it
wraps onto are corrected exactly. Half-precision inputs are
transformed in float32 (PyTorch has no half-precision CPU FFT) and rounded back.

``P(M)``: ``col[0] = avgtr(M)``, ``col[j] = (sum of the j-th sub-diagonal + sum of the
j-th super-diagonal of M) / (d - j)``; for symmetric ``M`` the two triangular families
share this vector. Stores ``d`` numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from torchsingd.structures.base import StructuredMatrix, check_rows, check_square, self_outer
from torchsingd.structures.dense import DenseMatrix
from torchsingd.structures.transposed import LowerTriangularMatrix, TransposedMatrix

#: From this dimension on, products use FFTs (O(n d log d)) instead of one product
#: with the small dense matrix (O(n d^2), but BLAS-fast and without padded copies).
#: Measured on 2 CPU threads (torch 2.13), ``L L^T X`` (dense: ``L`` formed per
#: product) against the FFT route: d = 128 / 129 / 192 / 224 with n = 64-512 columns
#: 0.49-0.67 of the FFT route's time, d = 200, n = 200: 0.79, d = 192, n = 3137: 0.49;
#: from d ~ 240 on the FFT route is as fast or faster (d = 255, n = 512: 1.16; d = 256,
#: n = 64 / 256: 0.99 / 0.98; d = 384, n = 128: 1.33; d = 512, n = 64: 1.59).
#: With n = 25088 (a convolution's unfolded input) the dense product is still 3x
#: faster at d = 256, since batched FFTs are memory-bound. (128 before 268cf24, from
#: a crossing measured at n = 512 with an older FFT route.)
FFT_MIN_DIM = 256


def _use_fft(d: int) -> bool:
    return d >= FFT_MIN_DIM


def _fft_dtype(dtype: torch.dtype) -> torch.dtype:
    """FFTs run in float32 for half-precision inputs (PyTorch has no half CPU FFT)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def fft_size(d: int) -> int:
    """The smallest ``2^a 3^b 5^c >= 2 d - 1``: long enough that a circular convolution
    of two length-``d`` sequences holds their linear one, and without large prime
    factors (``2 d`` itself may have one, e.g. ``2 * 785 = 2 * 5 * 157``, which FFTs
    handle several times slower)."""
    n = max(2 * d - 1, 1)
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            size = p35
            while size < n:
                size *= 2
            best = min(best, size)
            p35 *= 3
        p5 *= 5
    return best


#: The most outputs a circular convolution of :func:`conv_size` may wrap onto (its
#: correction is a ``[w, w]`` product: at most 64^2 numbers, kept by the operator).
MAX_WRAP = 64


def conv_size(d: int) -> int:
    """The FFT length of a causal convolution (or correlation) of length-``d`` rows
    truncated to ``d`` outputs: ``fft_size(d)``, unless a power of two or three times
    one, ``N``, lies in ``[2 d - 1 - w_max, fft_size(d))`` with ``w_max = min(d // 16,
    MAX_WRAP)`` (the correction's ``[w, w]`` matrix stays small): such a length is faster
    (``L L^T X`` for ``d = 513`` and 512 columns, 2 threads: 3.9-4.4 ms at 1024
    against 5.7-6.2 ms at 1080; ``d = 785``: 11.1-11.4 ms at 1536 against 11.5-11.8
    at 1600), and the ``2 d - 1 - N`` outputs its circular convolution wraps onto are
    corrected by a product with a small triangular matrix (``wrap_matrix``)."""
    exact = fft_size(d)
    low = 2 * d - 1 - min(d // 16, MAX_WRAP)
    fast = [n for k in range(exact.bit_length() + 1) for n in (1 << k, 3 << k)]
    candidates = [n for n in fast if low <= n < exact and n >= d]
    return min(candidates, default=exact)


def wrap_matrix(col: Tensor, size: int) -> Tensor | None:
    """``B[j, v] = col[d - 1 - (j - v)]`` for ``v <= j < w = 2 d - 1 - size`` (lower
    triangular Toeplitz, ``[w, w]``), or ``None`` when a length-``size`` circular
    convolution of length-``d`` rows wraps onto none of the first ``d`` outputs.

    With ``m = size - d + 1``, the circular convolution's outputs ``i < w`` hold the
    extra terms ``sum_k B[k, i] x[m + k]`` (``y[:, :w] -= x[:, m:d] @ B``), the
    circular correlation's outputs ``m + j`` the extra ``sum_v B[j, v] x[v]``
    (``y[:, m:d] -= x[:, :w] @ B^T``)."""
    d = col.shape[0]
    w = 2 * d - 1 - size
    return dense_lower_toeplitz(col.flip(0)[:w]) if w > 0 else None


def _padded_rows(X: Tensor, size: int, dtype: torch.dtype) -> Tensor:
    """``X^T`` (``X: [d, n]``, any layout) as the rows of a new ``[n, size]`` buffer
    of ``dtype``, zero after column ``d``: one copy (transposing and converting at
    once) instead of a transposing copy and then the FFT's own zero-padded one."""
    d, n = X.shape
    buf = X.new_empty(n, size, dtype=dtype)
    buf[:, :d].copy_(X.T)
    buf[:, d:].zero_()
    return buf


def _padded_rows_conv(
    spectrum: Tensor, buf: Tensor, d: int, correlate: bool, wrap: Tensor | None
) -> Tensor:
    """Causal convolution (or, ``correlate``, correlation) of every row of the
    zero-padded ``buf: [n, size]`` (its first ``d`` columns hold the rows) with the
    sequence whose length-``size`` spectrum is given; returns a new ``[n, size]``
    buffer whose first ``d`` columns hold the result, zero after them, so that it can
    go into the next product as it is.

    Convolution: ``Y[r, i] = sum_{s <= i} col[s] X[r, i - s]``; correlation:
    ``Y[r, i] = sum_s col[s] X[r, i + s]`` (the conjugate spectrum). With
    ``size >= 2d - 1`` neither wraps around; else ``wrap`` (``wrap_matrix``) removes
    what wrapped.
    """
    size = buf.shape[1]
    factor = spectrum.conj() if correlate else spectrum
    out = torch.fft.irfft(torch.fft.rfft(buf, dim=1).mul_(factor), n=size, dim=1)
    out[:, d:].zero_()  # the truncation to the first d outputs, in place
    if wrap is not None:
        w = wrap.shape[0]
        if correlate:
            out[:, d - w : d].sub_(buf[:, :w] @ wrap.T)
        else:
            out[:, :w].sub_(buf[:, d - w : d] @ wrap)
    return out


def _conv(col: Tensor, X: Tensor, correlate: bool) -> Tensor:
    d, n = X.shape
    if _use_fft(d):
        if n == 0:  # MKL's FFT refuses an empty batch
            return X.new_zeros(d, 0)
        work, size = _fft_dtype(X.dtype), conv_size(d)
        col = col.to(work)
        spectrum = torch.fft.rfft(col, n=size)
        buf = _padded_rows(X, size, work)
        out = _padded_rows_conv(spectrum, buf, d, correlate, wrap_matrix(col, size))
        return out[:, :d].T.to(X.dtype)
    L = dense_lower_toeplitz(col)  # d < FFT_MIN_DIM: one product with the small dense matrix
    return (L.T if correlate else L) @ X


def dense_lower_toeplitz(col: Tensor) -> Tensor:
    """The lower-triangular Toeplitz matrix with first column ``col`` as a dense
    ``[d, d]`` tensor (``col: [..., d]``: one matrix per leading index, ``[..., d, d]``).
    On the optimizer's path only below ``FFT_MIN_DIM`` (at most 255^2 numbers), where a
    product with it beats a convolution and keeps no padded copy of the operand."""
    *batch, d = col.shape
    if d == 0:
        return col.new_zeros(*batch, 0, 0)
    # q = reversed [0 (d-1 times), col]: q[r + j] = col[d-1-r-j] (0 when negative), so
    # the Hankel view U[r, j] = q[r + j] is L with its rows reversed (one copy: 11 us
    # at d = 65 against 58 us for an index gather)
    q = torch.cat([col.new_zeros(*batch, d - 1), col], -1).flip(-1)  # contiguous
    return q.as_strided((*batch, d, d), (*q.stride()[:-1], 1, 1)).flip(-2)


def causal_conv(col: Tensor, X: Tensor) -> Tensor:
    """``Y[i] = sum_{s <= i} col[s] X[i - s]`` along the rows of ``X: [d, n]``."""
    return _conv(col, X, correlate=False)


def anticausal_conv(col: Tensor, X: Tensor) -> Tensor:
    """``Y[i] = sum_{s} col[s] X[i + s]`` along the rows of ``X: [d, n]``."""
    return _conv(col, X, correlate=True)


class ToeplitzOuterOperator:
    """``L L^T`` (``lower``) or ``L^T L`` for a lower-triangular Toeplitz ``L`` with
    first column ``col``: the spectrum of ``col`` is computed once and both factors
    are applied along contiguous rows (two FFT round trips per product; the
    truncation between ``L^T`` and ``L`` makes a single one impossible). Below
    ``FFT_MIN_DIM`` nothing is kept besides ``col``: each product forms the small
    dense ``L`` and applies it twice, or forms ``L L^T`` and applies that once where
    ``X`` has more columns than rows (holding ``L L^T`` would store ``d^2`` numbers
    between steps, more than a small layer's weights: 2.4x the ViT's parameters)."""

    def __init__(self, col: Tensor, lower: bool) -> None:
        self.col, self.lower, self.dtype = col, lower, col.dtype
        self.d = col.shape[0]
        if _use_fft(self.d):
            self.work, self.size = _fft_dtype(col.dtype), conv_size(self.d)
            self.spectrum = torch.fft.rfft(col.to(self.work), n=self.size)
            self.wrap = wrap_matrix(col.to(self.work), self.size)

    def batch_key(self) -> tuple | None:
        """Operators with one key are applied together (:meth:`stacked_mm`): the small
        ones (below ``FFT_MIN_DIM``, products with the dense ``L``); FFT ones alone."""
        if _use_fft(self.d) or not self.d:
            return None
        return (type(self), self.d, self.lower, self.dtype, self.col.device)

    @staticmethod
    def stacked_mm(ops: Sequence[ToeplitzOuterOperator], X: Tensor) -> Tensor:
        """``ops[i] @ X[i]`` for ``X: [m, d, n]``: the dense ``L`` of every operator
        formed at once (:func:`dense_lower_toeplitz`), then batched products
        (:func:`_dense_outer_product`, as :meth:`mm`)."""
        L = dense_lower_toeplitz(torch.stack([op.col for op in ops]))  # [m, d, d]
        return _dense_outer_product(L, ops[0].lower, X)

    def nbytes(self) -> int:
        """Bytes held besides ``col`` (the factor's own): the spectrum and the small
        wrap-around correction, if any."""
        if not _use_fft(self.d):
            return 0
        return self.spectrum.nbytes + (0 if self.wrap is None else self.wrap.nbytes)

    def mm(self, X: Tensor) -> Tensor:
        check_rows(X, self.d)
        first_correlates = self.lower  # L L^T X: L^T (a correlation) acts first
        if not _use_fft(self.d):
            return _dense_outer_product(dense_lower_toeplitz(self.col), self.lower, X)
        if X.shape[1] == 0:  # MKL's FFT refuses an empty batch
            return X.new_zeros(self.d, 0)
        Y = _padded_rows(X, self.size, self.work)
        Y = _padded_rows_conv(self.spectrum, Y, self.d, first_correlates, self.wrap)
        Y = _padded_rows_conv(self.spectrum, Y, self.d, not first_correlates, self.wrap)
        return Y[:, : self.d].T.to(X.dtype)


def _dense_outer_product(L: Tensor, lower: bool, X: Tensor) -> Tensor:
    """``L L^T X`` (``lower``) or ``L^T L X`` for dense ``L: [..., d, d]`` and ``X:
    [..., d, n]``. With more columns than rows the product of the two factors first
    (``d^3``) and one with ``X`` (``d^2 n``) beat two with ``X`` (``2 d^2 n``): the
    CNN's ``[128, 3137]`` gradient 2.39 -> 1.68 ms."""
    A, B = (L, L.mT) if lower else (L.mT, L)
    return (A @ B) @ X if X.shape[-1] > L.shape[-1] else A @ (B @ X)


def column_autocorrelation(S: Tensor) -> Tensor:
    """``half[j] = sum_{p, k} S[p + j, k] S[p, k]`` for ``S: [d, n]`` (shape ``[d]``),
    in at least float32: the sums are up to ``n d`` times the entries' squares (a
    float16 sum overflows where the projection, an average, does not)."""
    d, n = S.shape
    work = _fft_dtype(S.dtype)
    if _use_fft(d):
        # a circular length that wraps lag d - 1 onto itself (d = 2^k + 1: 1024 for
        # d = 513) where there is one, its lag summed directly; longer wraps cost more
        # to correct than their shorter FFTs save (d = 785: 0.1 ms saved, 0.25 spent)
        size = conv_size(d) if 2 * d - 1 - conv_size(d) == 1 else fft_size(d)
        spectrum = torch.fft.rfft(_padded_rows(S, size, work), dim=1)
        half = torch.fft.irfft(_power(spectrum), n=size)[:d]
        if size < 2 * d - 1:  # lag d - 1 holds itself twice
            half[d - 1] = torch.dot(S[d - 1].to(work), S[0].to(work))
        return half
    S = S.to(work)
    return _subdiagonal_sums(S @ S.T)  # d < FFT_MIN_DIM: a small Gram


def _power(spectrum: Tensor) -> Tensor:
    """``sum_r |spectrum[r, f]|^2`` (``[n, F]`` complex -> ``[F]`` real), squaring at
    most ``2^20`` numbers at a time (the temporary's bound): 0.15 ms for ``[128, 801]``
    where ``vector_norm`` over the two strided dimensions of the real view takes 0.55
    (``[512, 801]``: 0.55 against 5.6 ms)."""
    flat = torch.view_as_real(spectrum).reshape(spectrum.shape[0], -1)
    total = None
    for chunk in flat.split(max(1, (1 << 20) // flat.shape[1])):
        part = chunk.square().sum(0)
        total = part if total is None else total.add_(part)
    return total.view(-1, 2).sum(1)


def project_diagonal_sums(sums: Tensor) -> Tensor:
    """Toeplitz coefficients from ``sums[j]`` = sum of the j-th sub- and super-diagonal.

    ``sums[0]`` is the trace; the result is ``sums[j] / (d - j)``.
    """
    d = sums.shape[-1]  # (over the last dimension)
    counts = torch.arange(d, 0, -1, dtype=sums.dtype, device=sums.device)
    return sums / counts


#: The widest factor that takes the Gram route (:meth:`TrilToeplitzMatrix.gram_pays`):
#: its ``d x d`` Gram is at most 2^20 numbers, the size of the statistics' chunks of
#: rows; with the FFT buffers of the products with it the route's temporaries peak
#: at about 9 x 2^20 numbers at ``d = 1024`` (36 MiB in float32; ``inner_of`` over
#: chunks: 6 x 2^20), below ``inner_of``'s at ``d = 577`` (3.0 against 6.2 x 2^20)
#: and ``d = 289`` (0.7 against 6.2; a review's count of live temporaries).
GRAM_MAX_DIM = 1024


def _subdiagonal_sums(M: Tensor) -> Tensor:
    """``sums[j]`` = sum of the j-th sub-diagonal of ``M: [d, d]`` (``sums[0]`` its
    trace), without a loop over diagonals: read through a skewed view of ``M`` padded by
    ``d`` zero rows (``V[p, j] = M[p + j, p]``)."""
    d = M.shape[0]
    if d == 0:
        return M.new_zeros(0)
    padded = torch.cat([M, M.new_zeros(d, d)])  # [2d, d], contiguous
    return padded.as_strided((d, d), (d + 1, d)).sum(0)


def _diagonal_sums(M: Tensor) -> Tensor:
    """``sums[j]`` = sum of the j-th sub- and super-diagonal of ``M: [d, d]`` (``sums[0]``
    its trace), in at least float32 (:func:`_subdiagonal_sums` of ``M`` and of
    ``M^T``)."""
    M = M.to(_fft_dtype(M.dtype))
    if M.shape[0] == 0:
        return M.new_zeros(0)
    sums = _subdiagonal_sums(M) + _subdiagonal_sums(M.T.contiguous())
    sums[0] = M.diagonal().sum()
    return sums


def _gram_statistic(apply_transposed, G: StructuredMatrix, d: int) -> Tensor:
    """Toeplitz coefficients of ``P(X^T G X)`` for a dense Gram ``G`` (a
    :class:`DenseMatrix` of :meth:`TrilToeplitzMatrix.gram_of` sums), where
    ``apply_transposed(Y) = X^T Y``: ``M = X^T (X^T G)^T = (X^T G X)^T``, then its
    diagonal sums, projected (as ``from_dense``)."""
    if not isinstance(G, DenseMatrix) or G.dim != d:
        raise ValueError(f"Expected the dense Gram of dimension {d} (gram_of), got {G!r}.")
    S = apply_transposed(G.mat)
    M = apply_transposed(S.T)
    return project_diagonal_sums(_diagonal_sums(M))


def _symmetric_sums(half_sums: Tensor) -> Tensor:
    """Sub+super diagonal sums of a symmetric matrix from its sub-diagonal sums."""
    out = 2 * half_sums
    out[..., :1] = half_sums[..., :1]  # (nothing for d = 0; over the last dimension)
    return out


class TrilToeplitzMatrix(LowerTriangularMatrix):
    """Lower-triangular Toeplitz matrix with first column ``col`` (shape ``[d]``)."""

    family = "triltoeplitz"

    def __init__(self, col: Tensor) -> None:
        if col.ndim != 1:
            raise ValueError(f"col must be a vector, got shape {tuple(col.shape)}.")
        super().__init__(col.shape[0])
        self.col = col

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.col,)

    def options(self) -> tuple[int, ...]:
        return ()

    @classmethod
    def zeros(cls, dim, *options, dtype=None, device=None):
        return cls(torch.zeros(dim, dtype=dtype, device=device))

    def _with_tensors(self, tensors):
        return TrilToeplitzMatrix(*tensors)

    @property
    def stacks(self) -> bool:  # (members below FFT_MIN_DIM: products with the dense L)
        return not _use_fft(self.dim)

    def add_identity_(self, value: float) -> TrilToeplitzMatrix:
        self.stacked_add_identity_((self.col,), value)
        return self

    def stacked_add_identity_(self, storage: tuple[Tensor, ...], value: float) -> None:
        storage[0][..., :1] += value  # (nothing for d = 0)

    def trace(self) -> Tensor:
        return self.stacked_trace((self.col,))

    def stacked_trace(self, storage: tuple[Tensor, ...]) -> Tensor:
        col = storage[0]
        return col[..., :1].to(_fft_dtype(col.dtype)).sum(-1) * self.dim  # (0 for d = 0)

    def stacked_average_trace(self, storage: tuple[Tensor, ...]) -> Tensor:
        if not self.dim:  # 0 / 0, as every family's
            return super().stacked_average_trace(storage)
        return storage[0][..., 0].clone()

    def average_trace(self) -> Tensor:
        return self.stacked_average_trace((self.col,))

    def frobenius_sq(self) -> Tensor:
        return self.stacked_frobenius_sq((self.col,))

    def stacked_frobenius_sq(self, storage: tuple[Tensor, ...]) -> Tensor:
        col = storage[0]
        dtype = torch.promote_types(col.dtype, torch.float32)  # exact lengths
        lengths = torch.arange(self.dim, 0, -1, dtype=dtype, device=col.device)
        return (lengths * col.to(dtype).square()).sum(-1)

    def mm(self, X: Tensor) -> Tensor:
        check_rows(X, self.dim)
        return causal_conv(self.col, X)

    def tmm(self, X: Tensor) -> Tensor:
        check_rows(X, self.dim)
        return anticausal_conv(self.col, X)

    def outer_operator(self) -> ToeplitzOuterOperator:
        return ToeplitzOuterOperator(self.col, lower=True)

    def outer_operator_pays(self, columns: int, uses: int) -> bool:
        return True  # one FFT of a vector

    def matmul(self, other) -> TrilToeplitzMatrix:
        self._check_compatible(other)
        return TrilToeplitzMatrix(causal_conv(self.col, other.col.unsqueeze(1)).squeeze(1))

    def stacked_matmul(self, first: tuple[Tensor, ...], second: tuple[Tensor, ...]):
        # (members below FFT_MIN_DIM) L L' = the lower Toeplitz matrix with column L col'
        product = dense_lower_toeplitz(first[0]) @ second[0].unsqueeze(-1)
        return (product.squeeze(-1),)

    def _half_sums_of(self, col: Tensor) -> Tensor:
        """Sub-diagonal sums of ``L^T L`` (equal to those of ``L L^T``) for ``L`` with
        first column ``col``, in at least float32 (see :func:`column_autocorrelation`):
        ``s[j] = sum_{v >= j} (d - v) col[v] col[v - j]``. ``col: [d]``, or ``[..., d]``
        (several members' columns below ``FFT_MIN_DIM``, each with the dense ``L``)."""
        d = self.dim
        col = col.to(_fft_dtype(col.dtype))
        weights = torch.arange(d, 0, -1, dtype=col.dtype, device=col.device)
        if col.ndim == 1:
            return anticausal_conv(col, (weights * col).unsqueeze(1)).squeeze(1)
        return (dense_lower_toeplitz(col).mT @ (weights * col).unsqueeze(-1)).squeeze(-1)

    def inner(self) -> TrilToeplitzMatrix:
        return TrilToeplitzMatrix(self.stacked_inner((self.col,))[0])

    def stacked_inner(self, storage: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        col = storage[0]
        sums = _symmetric_sums(self._half_sums_of(col))
        return (project_diagonal_sums(sums).to(col.dtype),)

    def outer(self) -> TrilToeplitzMatrix:
        return self.inner()

    def project_gram(self, S: Tensor) -> TrilToeplitzMatrix:
        check_rows(S, self.dim)
        d, n = S.shape
        if n == 0:
            return TrilToeplitzMatrix.zeros(d, dtype=S.dtype, device=S.device)
        half = column_autocorrelation(S)
        return TrilToeplitzMatrix(project_diagonal_sums(_symmetric_sums(half)).to(S.dtype))

    def gram_of(self, Z: Tensor) -> DenseMatrix:
        """``Z Z^T``, all of it (``P(L^T G L)`` reads every entry), as a dense member:
        one matrix product at the machine's matmul rate where :meth:`inner_of` takes two
        FFT round trips per column of ``Z`` (a convolution's unfolded input: 25088
        columns of ``d = 289``). Only where :meth:`gram_pays` (``d <= GRAM_MAX_DIM``)."""
        check_rows(Z, self.dim)
        return DenseMatrix(self_outer(Z))

    def inner_of_gram(self, G: StructuredMatrix) -> TrilToeplitzMatrix:
        """``P(L^T G L)`` from a dense Gram ``G``: two products of ``L^T`` with a
        ``d x d`` matrix, then the diagonal sums."""
        col = _gram_statistic(self.tmm, G, self.dim)
        return TrilToeplitzMatrix(col.to(G.dtype))

    def gram_pays(self, columns: int) -> bool:
        # inner_of: per column of Z one product with L^T and one autocorrelation (two
        # FFT round trips from FFT_MIN_DIM on, two small dense products below); Gram: one
        # matrix product per column and, once, inner_of's cost for 2d columns. Measured
        # (2 threads, float32, median of 6): d = 289, n = 3600: 26.0 -> 6.2 ms; d = 577,
        # n = 1800: 22.6 -> 13.6 ms; d = 10, n = 25088: 0.62 -> 0.43 ms; but d = 289,
        # n = 512: 2.2 -> 3.2 ms and d = 513, n = 128: 1.3 -> 5.5 ms. Below FFT_MIN_DIM
        # (dense products, median of 60, since 268cf24): d = 130, n = 2048: 1.23 -> 0.71
        # ms, n = 391: 0.30 -> 0.31; d = 200, n = 601: 0.74 -> 0.67, n = 300: 0.39 ->
        # 0.56; d = 250, n = 2000: 3.41 -> 2.11. So from n > 3d (and the chunks of a
        # statistic share the one application of L).
        return self.dim <= GRAM_MAX_DIM and self._gram_pays_above(columns, 3 * self.dim)

    @classmethod
    def from_dense(cls, M: Tensor, *options: int) -> TrilToeplitzMatrix:
        check_square(M)  # (sums of d numbers: at least float32)
        return cls(project_diagonal_sums(_diagonal_sums(M)).to(M.dtype))

    def to_dense(self) -> Tensor:
        return dense_lower_toeplitz(self.col)


class TriuToeplitzMatrix(TransposedMatrix):
    """Upper-triangular Toeplitz matrix with first row ``lower.col``."""

    family = "triutoeplitz"
    BASE = TrilToeplitzMatrix

    def average_trace(self) -> Tensor:
        return self.lower.average_trace()

    def outer_operator(self) -> ToeplitzOuterOperator:
        return ToeplitzOuterOperator(self.lower.col, lower=False)  # U U^T = L^T L

    def outer_operator_pays(self, columns: int, uses: int) -> bool:
        return True

    # stacking (TransposedMatrix's, from L's) but the inner product: U^T U = L L^T, which
    # Toeplitz projects as L^T L (the same sums of diagonals)
    def stacked_inner(self, storage: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return self.lower.stacked_inner(storage)

    def gram_of(self, Z: Tensor) -> DenseMatrix:
        """``Z Z^T`` (see :meth:`TrilToeplitzMatrix.gram_of`)."""
        return self.lower.gram_of(Z)

    def inner_of_gram(self, G: StructuredMatrix) -> TriuToeplitzMatrix:
        """``P(U^T G U) = P(L G L^T)`` from a dense Gram ``G``."""
        col = _gram_statistic(self.lower.mm, G, self.dim)
        return TriuToeplitzMatrix(TrilToeplitzMatrix(col.to(G.dtype)))

    def gram_pays(self, columns: int) -> bool:
        return self.lower.gram_pays(columns)
