"""``self_outer`` (``X X^T`` by block columns from d = 256 on) and the dense products
that use it, against one float64 product."""

from __future__ import annotations

import pytest
import torch

import torchsingd.structures.base as structures_base
from torchsingd.structures import DenseMatrix, TrilToeplitzMatrix, TriuToeplitzMatrix
from torchsingd.structures.base import self_outer

F64 = torch.float64


@pytest.mark.parametrize(
    "d, n",
    [(255, 400), (256, 256), (257, 300), (301, 255), (303, 1000), (2, 3)],
)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_self_outer_equals_one_product(d, n, dtype):
    """Split (from d, n >= 256: uneven block edges at 257, 301, 303) or not, the
    product of ``X`` with its transpose: to float64 rounding in float64, to float32
    rounding in float32 (against float64), for a row-major ``X`` and a transposed view."""
    g = torch.Generator().manual_seed(d * 1000 + n)
    X64 = torch.randn(d, n, generator=g, dtype=F64)
    exact = X64 @ X64.T
    tol = 1e-12 if dtype == F64 else 1e-5
    for X in (X64.to(dtype), X64.T.contiguous().to(dtype).T):
        got = self_outer(X)
        assert got.shape == (d, d) and got.dtype == dtype
        torch.testing.assert_close(got.to(F64), exact, rtol=tol, atol=tol * n)


def test_self_outer_splits_from_the_threshold(monkeypatch):
    """Four block-column products (seen as matmuls of ``X[a:]`` with ``X[a:b]^T``)
    from ``SELF_OUTER_MIN_DIM`` on; one product below it."""
    monkeypatch.setattr(structures_base, "SELF_OUTER_MIN_DIM", 8)
    X = torch.randn(10, 9, dtype=F64)
    torch.testing.assert_close(self_outer(X), X @ X.T, rtol=1e-14, atol=1e-14)
    shapes = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("__matmul__", "matmul"):
                shapes.append((tuple(args[0].shape), tuple(args[1].shape)))
            return func(*args, **(kwargs or {}))

    with Spy():
        self_outer(X)
    assert shapes == [((10, 9), (9, 2)), ((8, 9), (9, 3)), ((5, 9), (9, 2)), ((3, 9), (9, 3))]
    shapes.clear()
    with Spy():
        self_outer(X[:7])
    assert shapes == [((7, 9), (9, 7))]


def test_dense_and_toeplitz_products_above_the_threshold():
    """At d = 300 (split products) the dense family's ``inner``, ``outer_operator``,
    ``inner_of``, ``gram_of`` and the Toeplitz families' ``gram_of`` equal the dense
    float64 formulas."""
    d, n = 300, 520
    g = torch.Generator().manual_seed(7)
    K = torch.randn(d, d, generator=g, dtype=F64)
    Z = torch.randn(d, n, generator=g, dtype=F64)
    dense = DenseMatrix(K.clone())
    close = dict(rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(dense.inner().to_dense(), K.T @ K, **close)
    torch.testing.assert_close(dense.outer_operator().to_dense(), K @ K.T, **close)
    torch.testing.assert_close(dense.inner_of(Z).to_dense(), K.T @ Z @ Z.T @ K, **close)
    torch.testing.assert_close(dense.gram_of(Z).to_dense(), Z @ Z.T, **close)
    col = torch.randn(d, generator=g, dtype=F64)
    for member in (TrilToeplitzMatrix(col), TriuToeplitzMatrix(TrilToeplitzMatrix(col))):
        torch.testing.assert_close(member.gram_of(Z).to_dense(), Z @ Z.T, **close)
