"""The structures' products under autograd (a public API: users may differentiate
through them; the optimizer itself runs them under ``no_grad``).

Products that write their blocks into one output used ``out=`` variants, which
autograd rejects ("functions with out=... arguments don't support automatic
differentiation") as soon as an operand requires grad: block-diagonal, hierarchical
and the four sparse triangular families failed in ``mm``/``tmm`` and in their
``K K^T`` operators. Gradients are checked against the same function computed
through ``to_dense()`` of the same tensors, in float64.
"""

from __future__ import annotations

import pytest
import torch

from torchsingd.structures import get_structure

NAMES = [
    "dense",
    "diagonal",
    "blockdiagonal:4",
    "hierarchical:3,2",
    "triltoeplitz",
    "triutoeplitz",
    "triltopleftdiag:2",
    "trilbottomrightdiag:3",
    "triutopleftdiag:1",
    "triubottomrightdiag:2",
]


@pytest.mark.parametrize("d", [1, 6, 11, 140])  # 140: the Toeplitz FFT path
@pytest.mark.parametrize("name", NAMES)
def test_products_are_differentiable(name, d):
    gen = torch.Generator().manual_seed(d)
    M = get_structure(name).from_dense(torch.randn(d, d, generator=gen, dtype=torch.float64))
    tensors = [t.detach().requires_grad_(True) for t in M.tensors()]
    M = M._with_tensors(tuple(tensors))
    X = torch.randn(d, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    W = torch.randn(3, d, 5, generator=gen, dtype=torch.float64)

    structured = (
        (M.mm(X) * W[0]).sum() + (M.tmm(X) * W[1]).sum() + (M.outer_operator().mm(X) * W[2]).sum()
    )
    D = M.to_dense()
    dense = ((D @ X) * W[0]).sum() + ((D.T @ X) * W[1]).sum() + ((D @ D.T @ X) * W[2]).sum()
    assert torch.allclose(structured, dense, rtol=1e-12, atol=1e-12)
    inputs = [t for t in tensors if t.numel() > 0] + [X]
    # (retain_graph: a family may hold its tensors as views of one, built from them
    # once for both graphs)
    got = torch.autograd.grad(structured, inputs, allow_unused=True, retain_graph=True)
    want = torch.autograd.grad(dense, inputs, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        g = torch.zeros_like(w) if g is None else g
        w = torch.zeros_like(g) if w is None else w
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_no_grad_products_unchanged(name):
    """Without autograd the products still write into one output (and agree)."""
    gen = torch.Generator().manual_seed(0)
    M = get_structure(name).from_dense(torch.randn(11, 11, generator=gen))
    X = torch.randn(11, 4, generator=gen)
    with torch.no_grad():
        plain = M.mm(X), M.tmm(X)
    M = M._with_tensors(tuple(t.detach().requires_grad_(True) for t in M.tensors()))
    tracked = M.mm(X), M.tmm(X)
    for a, b in zip(plain, tracked, strict=True):
        assert torch.equal(a, b.detach())
