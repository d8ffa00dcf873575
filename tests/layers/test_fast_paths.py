"""Structure-specific shortcuts in the adapters equal the generic row computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchsingd.layers import get_adapter
from torchsingd.structures import get_structure

F64 = torch.float64

CONVS = {
    "conv2d_stride_groups": (
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        (5, 4, 9, 8),
    ),
    "conv2d_same_even": (
        lambda: nn.Conv2d(3, 2, (4, 3), padding="same", dilation=(1, 2)),
        (2, 3, 7, 9),
    ),
    "conv1d_reflect": (
        lambda: nn.Conv1d(3, 5, 4, padding="same", dilation=2, padding_mode="reflect"),
        (4, 3, 17),
    ),
    "conv1d_unbatched": (lambda: nn.Conv1d(2, 3, 3, stride=2), (2, 11)),
    "conv3d_nobias": (lambda: nn.Conv3d(2, 3, 3, stride=(1, 2, 1), bias=False), (2, 2, 6, 7, 5)),
    "conv3d_circular": (
        lambda: nn.Conv3d(2, 2, 2, padding=1, padding_mode="circular"),
        (1, 2, 4, 4, 4),
    ),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_diagonal_conv_statistic_equals_unfolded_rows(name):
    """For a diagonal K and "expand", H_K is computed from batch-summed squares."""
    torch.manual_seed(0)
    make, shape = CONVS[name]
    conv = make().to(F64)
    x = torch.randn(*shape, dtype=F64)
    adapter = get_adapter(conv)
    K = get_structure("diagonal").zeros(adapter.dims(conv)[0], dtype=F64)
    K.diag.copy_(torch.rand(K.dim, dtype=F64) + 0.5)
    fast = adapter.input_statistic(conv, x, K, "expand").to_dense()
    a = adapter.input_rows(conv, x, "expand")
    Kd = K.to_dense()
    expected = torch.diag(torch.diagonal(Kd.T @ a.T @ a @ Kd))
    torch.testing.assert_close(fast, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_finish_input_rows_writes_a_view_in_one_pass(dtype, with_bias):
    """Rows from a transposed ``[B, L, d]`` view of patches equal (bit for bit) the
    plain computation: reshape to ``[N, d]``, append ones, divide by ``sqrt(N)``; the
    result is row-major and the patches are not modified."""
    from math import sqrt

    from torchsingd.layers.base import finish_input_rows

    g = torch.Generator().manual_seed(3)
    cols = torch.randn(4, 6, 9, generator=g).to(dtype)  # an unfold's [B, d, L]
    patches = cols.transpose(1, 2)  # [B, L, d], not contiguous
    before = patches.clone()
    a = patches.reshape(-1, 6)
    if with_bias:
        a = torch.cat([a, torch.ones(36, 1, dtype=dtype)], dim=1)
    expected = a / sqrt(36)
    rows = finish_input_rows(patches, with_bias)
    assert rows.is_contiguous() and rows.dtype == dtype
    assert torch.equal(rows, expected)
    assert torch.equal(patches, before)


@pytest.mark.parametrize("shape", [(7, 5, 9, 9), (7, 5, 1, 1), (5, 9, 9), (0, 5, 9, 9)])
@pytest.mark.parametrize("loss_average", ["batch", "batch+sequence", None])
def test_conv_grad_rows_one_pass(shape, loss_average):
    """Output-gradient rows of a convolution: ``[B * L, C]``, the transpose of a
    contiguous channel-major ``[C, B * L]`` (what the statistics read), equal (bit for
    bit) to ``g`` moved to channels-last, flattened and scaled by ``sqrt(n)``; an empty
    batch gives no rows (``reshape(B, C, -1)`` raised)."""
    from torchsingd.layers.base import loss_terms_scale

    module = nn.Conv2d(3, 5, 3)
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    before = g.clone()
    g4 = g if g.ndim == 4 else g.unsqueeze(0)
    B, C, L = g4.shape[0], g4.shape[1], g4.shape[2] * g4.shape[3]
    expected = g4.permute(0, 2, 3, 1).reshape(B * L, C) * loss_terms_scale(B, L, loss_average)
    rows = get_adapter(module).grad_rows(module, g, loss_average, "expand")
    assert rows.T.is_contiguous() and torch.equal(rows, expected)
    assert torch.equal(g, before)
    assert get_adapter(module).grad_rows(module, g, loss_average, "reduce").shape == (B, C)


def statistic_and_route(monkeypatch, adapter, conv, x, K):
    """``(H_K, whether the column-sum route of ConvAdapter produced it)``."""
    from torchsingd.layers.conv import ConvAdapter

    calls = []
    original = ConvAdapter._centred_moments
    counted = staticmethod(lambda module, x: calls.append(1) or original(module, x))
    monkeypatch.setattr(ConvAdapter, "_centred_moments", counted)
    return adapter.input_statistic(conv, x, K, "expand"), bool(calls)


@pytest.mark.parametrize("structure", ["triltopleftdiag:1", "triltopleftdiag:2"])
@pytest.mark.parametrize("name", list(CONVS))
def test_triltopleftdiag_conv_statistic_equals_unfolded_rows(name, structure, monkeypatch):
    """For ``triltopleftdiag:1`` with a bias (its dense row on the bias column) and
    "expand", ``H_K`` comes from per-column means of the channel-centred patches and of
    their squares (no unfold of the batch); it equals ``P(K^T a^T a K)`` from the unfolded rows
    (dense float64). Without a bias, or with a wider corner, the generic route."""
    torch.manual_seed(0)
    make, shape = CONVS[name]
    conv = make().to(F64)
    x = torch.randn(*shape, dtype=F64)
    adapter = get_adapter(conv)
    spec = get_structure(structure)
    K = spec.zeros(adapter.dims(conv)[0], dtype=F64)
    for t in K.tensors():
        t.copy_(torch.randn(t.shape, dtype=F64))
    fast, column_sums = statistic_and_route(monkeypatch, adapter, conv, x, K)
    a = adapter.input_rows(conv, x, "expand")
    Kd = K.to_dense()
    expected = spec.from_dense(Kd.T @ a.T @ a @ Kd).to_dense()
    torch.testing.assert_close(fast.to_dense(), expected, rtol=1e-10, atol=1e-12)
    assert column_sums == (structure == "triltopleftdiag:1" and conv.bias is not None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triltopleftdiag_conv_statistic_with_a_large_input_mean(dtype, monkeypatch):
    """Inputs whose mean is 300 times their spread, and a K that centres them (the
    bias row ``beta = -alpha * mean``, as a whitening K does): the float32 statistic
    from column sums of channel-centred inputs stays within 5e-4 of the float64 one
    from unfolded rows (about what the float32 inputs' own rounding allows, 7e-5 here;
    from raw moments, whose difference is 1e5 times smaller than they are, it would be
    off by 4e-2); 16-bit factors take the generic route."""
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, stride=2)  # no zero padding: every patch entry near 300
    x = torch.randn(6, 3, 9, 9) + 300.0
    adapter = get_adapter(conv)
    spec = get_structure("triltopleftdiag:1")
    d = adapter.dims(conv)[0]
    K = spec.zeros(d, dtype=torch.float64)
    K.a.copy_(torch.rand(d - 1, dtype=F64) + 0.5)
    rows = adapter.input_rows(conv.to(F64), x.to(F64), "expand")
    means = rows[:, :-1].sum(0) / rows[:, -1].sum()  # per-column mean of the patches
    K.b[0].copy_(-K.a * means + 0.01 * torch.randn(d - 1, dtype=F64))
    K.C.fill_(1.3)
    Kd = K.to_dense()
    expected = spec.from_dense(Kd.T @ rows.T @ rows @ Kd).to_dense()
    Kx = spec.zeros(d, dtype=dtype)
    for t, s in zip(Kx.tensors(), K.tensors(), strict=True):
        t.copy_(s.to(dtype))
    got, column_sums = statistic_and_route(monkeypatch, adapter, conv.to(dtype), x.to(dtype), Kx)
    got = got.to_dense()
    assert column_sums == (dtype == torch.float32)
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=5e-4)
