"""Block-diagonal matrices with blocks of size ``B``.

Members: ``floor(d / B)`` dense ``B x B`` blocks on the diagonal, then one dense block
of size ``d mod B`` (absent when ``B`` divides ``d``; the only block when ``d < B``).
``P(M)`` keeps the diagonal blocks of ``M``. Stores ``floor(d/B) B^2 + (d mod B)^2``
numbers (about ``d B``). Registry names: ``"blockdiagonal"`` (``B = 30``),
``"blockdiagonal:B"``, and the reference's ``"blockBdiagonal"`` (e.g. ``"block30diagonal"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from torchsingd.structures.base import (
    StructuredMatrix,
    check_rows,
    check_square,
    symmetrized,
    wide,
    written,
)

DEFAULT_BLOCK_SIZE = 30


class BlockDiagonalMatrix(StructuredMatrix):
    """``blockdiag(blocks[0], ..., blocks[n-1], last)``.

    Args:
        blocks: ``[n, B, B]`` full blocks.
        last: ``[r, r]`` trailing block with ``0 <= r < B``.
        block_size: ``B`` (needed when ``n == 0``).
    """

    family = "blockdiagonal"
    stacks = True

    def __init__(self, blocks: Tensor, last: Tensor, block_size: int) -> None:
        if blocks.ndim != 3 or blocks.shape[1:] != (block_size, block_size):
            raise ValueError(
                f"blocks must have shape [n, {block_size}, {block_size}], "
                f"got {tuple(blocks.shape)}."
            )
        r = check_square(last, "last")
        if r >= block_size:
            raise ValueError(f"The last block must be smaller than {block_size}, got {r}.")
        super().__init__(blocks.shape[0] * block_size + r)
        self.blocks, self.last, self.block_size = blocks, last, block_size

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.blocks, self.last)

    def options(self) -> tuple[int, ...]:
        return (self.block_size,)

    @classmethod
    def zeros(cls, dim, block_size=DEFAULT_BLOCK_SIZE, dtype=None, device=None):
        n, r = divmod(dim, block_size)
        blocks = torch.zeros(n, block_size, block_size, dtype=dtype, device=device)
        return cls(blocks, torch.zeros(r, r, dtype=dtype, device=device), block_size)

    def _with_tensors(self, tensors):
        return BlockDiagonalMatrix(*tensors, self.block_size)

    def add_identity_(self, value: float) -> BlockDiagonalMatrix:
        self.stacked_add_identity_((self.blocks, self.last), value)
        return self

    def stacked_add_identity_(self, storage: tuple[Tensor, ...], value: float) -> None:
        for part in storage:  # ([..., n, B, B] blocks, [..., r, r] last)
            part.diagonal(dim1=-2, dim2=-1).add_(value)

    def trace(self) -> Tensor:
        w = wide(self.dtype)
        return self.blocks.diagonal(dim1=1, dim2=2).sum(dtype=w) + self.last.diagonal().sum(dtype=w)

    def stacked_trace(self, storage: tuple[Tensor, ...]) -> Tensor:
        blocks, last = storage  # [m, n, B, B], [m, r, r]
        w = wide(blocks.dtype)
        diagonal = blocks.diagonal(dim1=-2, dim2=-1).flatten(1).sum(-1, dtype=w)
        return diagonal + last.diagonal(dim1=-2, dim2=-1).sum(-1, dtype=w)

    def _split(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """Split rows of ``X: [d, m]`` into ``[n, B, m]`` and ``[r, m]``."""
        check_rows(X, self.dim)
        n, B = self.blocks.shape[0], self.block_size
        return X[: n * B].reshape(n, B, X.shape[1]), X[n * B :]

    def _product(self, blocks: Tensor, last: Tensor, X: Tensor) -> Tensor:
        """``blockdiag(blocks, last) @ X``, each part written into one output."""
        top, bottom = self._split(X)
        out, rows = X.new_empty(X.shape), top.shape[0] * top.shape[1]
        written(torch.bmm, out[:rows].view(top.shape), blocks, top)
        written(torch.mm, out[rows:], last, bottom)
        return out

    def mm(self, X: Tensor) -> Tensor:
        return self._product(self.blocks, self.last, X)

    def tmm(self, X: Tensor) -> Tensor:
        return self._product(self.blocks.mT, self.last.T, X)

    def batch_key(self) -> tuple:
        blocks = self.blocks
        return (type(self), self.dim, self.block_size, blocks.dtype, blocks.device)

    @staticmethod
    def stacked_mm(members: Sequence[BlockDiagonalMatrix], X: Tensor) -> Tensor:
        m, d, c = X.shape
        n, B = members[0].blocks.shape[0], members[0].block_size
        blocks = torch.cat([M.blocks for M in members])  # [m n, B, B]
        top = torch.bmm(blocks, X[:, : n * B].reshape(m * n, B, c)).view(m, n * B, c)
        if d == n * B:
            return top
        last = torch.stack([M.last for M in members])  # [m, r, r]
        return torch.cat([top, torch.bmm(last, X[:, n * B :])], dim=1)

    def matmul(self, other: StructuredMatrix) -> BlockDiagonalMatrix:
        self._check_compatible(other)
        storage = self.stacked_matmul((self.blocks, self.last), (other.blocks, other.last))
        return BlockDiagonalMatrix(*storage, self.block_size)

    def stacked_matmul(self, first: tuple[Tensor, ...], second: tuple[Tensor, ...]):
        return tuple(torch.matmul(a, b) for a, b in zip(first, second, strict=True))

    def bounded_step(
        self, beta: float, max_step: float, inputs: list[float] | None = None
    ) -> BlockDiagonalMatrix | None:
        """``beta * self`` with each block scaled so that its spectral norm is at most
        ``max_step`` (the blocks are independent: the bound of
        :meth:`~torchsingd.structures.StructuredMatrix.spectral_norm_bound`, per block);
        ``None`` if no block exceeds it."""
        if beta == 0.0 or not self.dim or beta * self.quick_norm_bound(inputs) <= max_step:
            return None  # the whole matrix's bound holds, so does every block's
        dtype = torch.promote_types(self.dtype, torch.float32)
        parts = [self.blocks.to(dtype), self.last.to(dtype).unsqueeze(0)]
        bounds = torch.cat([_block_norm_bounds(p) for p in parts])
        if not bool((bounds * beta).max() > max_step):  # False for NaN: the repair's case
            return None
        scale = (max_step / bounds).clamp_(max=beta)
        n = self.blocks.shape[0]
        blocks = parts[0] * scale[:n, None, None]
        last = parts[1][0] * scale[n:].sum()  # a 0 x 0 last block has no scale
        return BlockDiagonalMatrix(blocks.to(self.dtype), last.to(self.dtype), self.block_size)

    def outer_operator(self) -> BlockDiagonalMatrix:
        return BlockDiagonalMatrix(
            torch.bmm(self.blocks, self.blocks.mT), self.last @ self.last.T, self.block_size
        )

    def stacked_outer_operators(self, storage: tuple[Tensor, ...]) -> list:
        blocks, last = (torch.matmul(part, part.mT) for part in storage)
        return [
            BlockDiagonalMatrix(b, r, self.block_size) for b, r in zip(blocks, last, strict=True)
        ]

    def outer_operator_pays(self, columns: int, uses: int) -> bool:
        return uses * columns >= min(self.block_size, self.dim)

    def inner(self) -> BlockDiagonalMatrix:
        return BlockDiagonalMatrix(*self.stacked_inner((self.blocks, self.last)), self.block_size)

    def stacked_inner(self, storage: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(torch.matmul(part.mT, part) for part in storage)

    def inner_of(self, Z: Tensor) -> BlockDiagonalMatrix:
        top, bottom = self._split(Z)
        S_top = torch.bmm(self.blocks.mT, top)
        S_bottom = self.last.T @ bottom
        return BlockDiagonalMatrix(
            torch.bmm(S_top, S_top.mT), S_bottom @ S_bottom.T, self.block_size
        )

    def gram_of(self, Z: Tensor) -> BlockDiagonalMatrix:
        top, bottom = self._split(Z)
        return BlockDiagonalMatrix(torch.bmm(top, top.mT), bottom @ bottom.T, self.block_size)

    def inner_of_gram(self, G: StructuredMatrix) -> BlockDiagonalMatrix:
        self._check_compatible(G)
        R = torch.bmm(self.blocks.mT, torch.bmm(G.blocks, self.blocks))
        r = self.last.T @ (G.last @ self.last)
        # symmetric, as S S^T is
        return BlockDiagonalMatrix(symmetrized(R), symmetrized(r), self.block_size)

    def gram_pays(self, columns: int) -> bool:
        # inner_of: 4 n d B flops (K^T Z, S S^T per block); Gram: 2 n d B + 4 d B^2 once
        return self._gram_pays_above(columns, 2 * min(self.block_size, self.dim))

    @classmethod
    def from_dense(cls, M: Tensor, block_size: int = DEFAULT_BLOCK_SIZE) -> BlockDiagonalMatrix:
        dim = check_square(M)
        n, _ = divmod(dim, block_size)
        B = block_size
        head = M[: n * B, : n * B].reshape(n, B, n, B)
        idx = torch.arange(n, device=M.device)
        blocks = head[idx, :, idx, :].clone()
        return cls(blocks, M[n * B :, n * B :].clone(), block_size)

    def to_dense(self) -> Tensor:
        return torch.block_diag(*self.blocks.unbind(0), self.last)


def _block_norm_bounds(blocks: Tensor) -> Tensor:
    """Upper bounds on the spectral norms of ``blocks: [n, B, B]`` (``[n]``): per block
    the smaller of ``|c| + ||M - cI||_F`` (``c`` the mean diagonal entry) and
    ``sqrt(||M||_1 ||M||_inf)``, as ``StructuredMatrix.spectral_norm_bound``."""
    if blocks.shape[-1] == 0:
        return blocks.new_zeros(blocks.shape[0])
    c = blocks.diagonal(dim1=1, dim2=2).mean(1)
    rest = blocks.clone()
    rest.diagonal(dim1=1, dim2=2).sub_(c[:, None])
    first = c.abs() + torch.linalg.vector_norm(rest, dim=(1, 2))
    A = blocks.abs()
    hoelder = (A.sum(2).amax(1) * A.sum(1).amax(1)).sqrt()
    return torch.where(torch.isfinite(first), torch.minimum(first, hoelder), hoelder)
