"""Triangular Toeplitz matrices: one number per diagonal.

``"triltoeplitz"``: ``L[i, j] = col[i - j]`` for ``i >= j``, zero above the diagonal.
``"triutoeplitz"``: the transpose, ``U[i, j] = col[j - i]`` for ``j >= i``.
Products of such matrices are again triangular Toeplitz (they are polynomials in the
shift matrix), and a product with a dense matrix is a causal convolution along its
rows, computed by FFT (``O(n d log d)``) from ``d = FFT_MIN_DIM`` on, by direct
convolution below; nothing here is ``O(d^2)`` in memory. Half-precision inputs are
transformed in float32 (PyTorch has no half-precision CPU FFT) and rounded back.

``P(M)``: ``col[0] = avgtr(M)``, ``col[j] = (sum of the j-th sub-diagonal + sum of the
j-th super-diagonal of M) / (d - j)``; for symmetric ``M`` the two triangular families
share this vector. Stores ``d`` numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from torchsingd.structures.base import check_rows, check_square
from torchsingd.structures.transposed import LowerTriangularMatrix, TransposedMatrix

#: From this dimension on, products use FFTs (O(n d log d)) instead of direct
#: convolutions (O(n d^2)); measured crossover on CPU is around d = 32..64.
FFT_MIN_DIM = 48


def _use_fft(d: int) -> bool:
    return d >= FFT_MIN_DIM


def _fft_dtype(dtype: torch.dtype) -> torch.dtype:
    """FFTs run in float32 for half-precision inputs (PyTorch has no half CPU FFT)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def causal_conv(col: Tensor, X: Tensor) -> Tensor:
    """``Y[i] = sum_{s <= i} col[s] X[i - s]`` along the rows of ``X: [d, n]``."""
    d, n = X.shape
    if _use_fft(d):
        work = _fft_dtype(X.dtype)
        size = 2 * d
        spectrum = torch.fft.rfft(col.to(work), n=size).unsqueeze(1)
        spectrum = spectrum * torch.fft.rfft(X.to(work), n=size, dim=0)
        return torch.fft.irfft(spectrum, n=size, dim=0)[:d].to(X.dtype)
    inp = F.pad(X.T.unsqueeze(1), (d - 1, 0))
    return F.conv1d(inp, col.flip(0).view(1, 1, d)).view(n, d).T


def anticausal_conv(col: Tensor, X: Tensor) -> Tensor:
    """``Y[i] = sum_{s} col[s] X[i + s]`` along the rows of ``X: [d, n]``."""
    d, n = X.shape
    if _use_fft(d):  # correlation = convolution with the reversed sequence
        return causal_conv(col, X.flip(0)).flip(0)
    inp = F.pad(X.T.unsqueeze(1), (0, d - 1))
    return F.conv1d(inp, col.view(1, 1, d)).view(n, d).T


def column_autocorrelation(S: Tensor) -> Tensor:
    """``half[j] = sum_{p, k} S[p + j, k] S[p, k]`` for ``S: [d, n]`` (shape ``[d]``)."""
    d, n = S.shape
    if _use_fft(d):
        work = _fft_dtype(S.dtype)
        spectrum = torch.fft.rfft(S.to(work), n=2 * d, dim=0)
        power = (spectrum.real.square() + spectrum.imag.square()).sum(1)
        return torch.fft.irfft(power, n=2 * d)[:d].to(S.dtype)
    inp = F.pad(S.T.unsqueeze(0), (0, d - 1))
    return F.conv1d(inp, S.T.unsqueeze(0)).view(d)


def project_diagonal_sums(sums: Tensor) -> Tensor:
    """Toeplitz coefficients from ``sums[j]`` = sum of the j-th sub- and super-diagonal.

    ``sums[0]`` is the trace; the result is ``sums[j] / (d - j)``.
    """
    d = sums.shape[0]
    counts = torch.arange(d, 0, -1, dtype=sums.dtype, device=sums.device)
    return sums / counts


def _symmetric_sums(half_sums: Tensor) -> Tensor:
    """Sub+super diagonal sums of a symmetric matrix from its sub-diagonal sums."""
    out = 2 * half_sums
    out[0] = half_sums[0]
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

    def add_identity_(self, value: float) -> TrilToeplitzMatrix:
        self.col[0] += value
        return self

    def trace(self) -> Tensor:
        return self.col[0] * self.dim

    def average_trace(self) -> Tensor:
        return self.col[0].clone()

    def frobenius_sq(self) -> Tensor:
        dtype = torch.promote_types(self.col.dtype, torch.float32)  # exact lengths
        lengths = torch.arange(self.dim, 0, -1, dtype=dtype, device=self.col.device)
        return (lengths * self.col.to(dtype).square()).sum()

    def mm(self, X: Tensor) -> Tensor:
        check_rows(X, self.dim)
        return causal_conv(self.col, X)

    def tmm(self, X: Tensor) -> Tensor:
        check_rows(X, self.dim)
        return anticausal_conv(self.col, X)

    def matmul(self, other) -> TrilToeplitzMatrix:
        self._check_compatible(other)
        return TrilToeplitzMatrix(causal_conv(self.col, other.col.unsqueeze(1)).squeeze(1))

    def _gram_half_sums(self) -> Tensor:
        """Sub-diagonal sums of ``L^T L`` (equal to those of ``L L^T``).

        ``s[j] = sum_{v >= j} (d - v) col[v] col[v - j]``.
        """
        d = self.dim
        weights = torch.arange(d, 0, -1, dtype=self.dtype, device=self.device)
        return anticausal_conv(self.col, (weights * self.col).unsqueeze(1)).squeeze(1)

    def inner(self) -> TrilToeplitzMatrix:
        return TrilToeplitzMatrix(project_diagonal_sums(_symmetric_sums(self._gram_half_sums())))

    def outer(self) -> TrilToeplitzMatrix:
        return self.inner()

    def project_gram(self, S: Tensor) -> TrilToeplitzMatrix:
        check_rows(S, self.dim)
        d, n = S.shape
        if n == 0:
            return TrilToeplitzMatrix.zeros(d, dtype=S.dtype, device=S.device)
        half = column_autocorrelation(S)
        return TrilToeplitzMatrix(project_diagonal_sums(_symmetric_sums(half)))

    @classmethod
    def from_dense(cls, M: Tensor, *options: int) -> TrilToeplitzMatrix:
        d = check_square(M)
        sums = torch.stack(
            [M.diagonal().sum()] + [M.diagonal(-j).sum() + M.diagonal(j).sum() for j in range(1, d)]
        )
        return cls(project_diagonal_sums(sums))

    def to_dense(self) -> Tensor:
        d = self.dim
        idx = torch.arange(d, device=self.device)
        diff = idx.unsqueeze(1) - idx.unsqueeze(0)
        out = self.col[diff.clamp(min=0)]
        return torch.where(diff >= 0, out, torch.zeros_like(out))


class TriuToeplitzMatrix(TransposedMatrix):
    """Upper-triangular Toeplitz matrix with first row ``lower.col``."""

    family = "triutoeplitz"
    BASE = TrilToeplitzMatrix

    def average_trace(self) -> Tensor:
        return self.lower.average_trace()
