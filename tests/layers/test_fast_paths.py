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
