"""timm's ``Conv2dSame`` and ``Linear`` (registered by name; timm is not imported).

Both override ``forward``, so the ``nn.Conv2d`` / ``nn.Linear`` adapters do not cover
them by inheritance. The classes below carry timm's qualified names and our own
forwards of what timm documents: ``Conv2dSame`` pads TensorFlow's "SAME" way for the
input's size (total ``max((ceil(n/s) - 1) s + (k - 1) d + 1 - n, 0)``, the smaller half
first) and convolves unpadded; ``Linear`` is ``F.linear``. Oracle: the same network
with the padding done by an explicit ``F.pad`` before a plain ``nn.Conv2d(padding=0)``
(its steps are checked elsewhere), in float64.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from torchsingd import SINGD


def tf_pad(x, kernel, stride, dilation):
    """TensorFlow's SAME padding of the last two dimensions, written out per dimension."""
    amounts = []
    for n, k, s, d in zip(x.shape[-2:], kernel, stride, dilation, strict=True):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        amounts.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = amounts
    return nn.functional.pad(x, (left, right, top, bottom))


class Conv2dSame(nn.Conv2d):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs, padding=0)

    def forward(self, x):
        x = tf_pad(x, self.kernel_size, self.stride, self.dilation)
        return nn.functional.conv2d(
            x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups
        )


class Linear(nn.Linear):
    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


Conv2dSame.__module__ = "timm.layers.conv2d_same"
Linear.__module__ = "timm.layers.linear"


class Padded(nn.Module):
    """The oracle's layer: explicit padding, then a plain convolution."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x):
        c = self.conv
        return c(tf_pad(x, c.kernel_size, c.stride, c.dilation))


CONVS = [  # (in, out, kernel, stride, dilation, groups)
    (2, 4, 3, 2, 1, 1),
    (4, 4, 5, 2, 1, 4),  # depthwise, as in EfficientNet
    (4, 3, (3, 2), (1, 2), (2, 1), 1),
]


def pair(size: int):
    torch.manual_seed(0)
    timm = nn.Sequential(
        *[Conv2dSame(i, o, k, stride=s, dilation=d, groups=g) for i, o, k, s, d, g in CONVS],
        nn.Flatten(),
        nn.LazyLinear(3),
    ).double()
    with torch.no_grad():
        timm(torch.zeros(1, 2, size, size, dtype=torch.float64))
    head = timm[-1]
    timm[-1] = Linear(head.in_features, 3).double()
    plain = nn.Sequential(
        *[Padded(nn.Conv2d(i, o, k, stride=s, dilation=d, groups=g)) for i, o, k, s, d, g in CONVS],
        nn.Flatten(),
        nn.Linear(head.in_features, 3),
    ).double()
    with torch.no_grad():
        for a, b in zip(timm.parameters(), plain.parameters(), strict=True):
            a.copy_(b)
    return timm, plain


def train(model, opt, size: int, steps: int = 4) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(3, 2, size, size, generator=gen, dtype=torch.float64)
        y = torch.randn(3, 3, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("structure", ["dense", "diagonal", "blockdiagonal:2", "triltopleftdiag:1"])
@pytest.mark.parametrize("size", [7, 8, 2])  # 2: smaller than the kernels (timm's 32px nets)
def test_timm_conv2d_same_and_linear_equal_explicit_padding(structure: str, size: int) -> None:
    timm, plain = pair(size)
    kw = dict(lr=0.05, lr_cov=0.05, T=2, structures=structure)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every parameter preconditioned: nothing said
        opt = SINGD(timm, **kw)
    assert set(opt.layers) == {"0", "1", "2", "4"} and not opt.fallback_parameters
    opt_plain = SINGD(plain, **kw)
    train(timm, opt, size)
    train(plain, opt_plain, size)
    for a, b in zip(timm.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    for ours, theirs in {"0": "0.conv", "1": "1.conv", "2": "2.conv", "4": "4"}.items():
        for factor in ("K", "C"):
            torch.testing.assert_close(
                getattr(opt.layers[ours], factor).to_dense(),
                getattr(opt_plain.layers[theirs], factor).to_dense(),
                rtol=1e-11,
                atol=1e-13,
            )


def test_conv2d_same_with_padding_of_its_own_goes_to_the_fallback() -> None:
    conv = Conv2dSame(2, 3, 3)
    conv.padding = (1, 1)  # not how timm builds it: what it computes is not known
    with pytest.warns(UserWarning, match=r"fallback rule"):
        opt = SINGD(nn.Sequential(conv), lr=0.01)
    assert not opt.layers
