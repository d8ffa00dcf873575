"""Layer adapters and their registry (one module per layer family)."""

from torch import nn

from torchsingd.layers.base import (
    KFAC_APPROXIMATIONS,
    LOSS_AVERAGES,
    LayerAdapter,
    get_adapter,
    register_layer,
)
from torchsingd.layers.conv import Conv2dAdapter
from torchsingd.layers.linear import LinearAdapter

register_layer(nn.Linear, LinearAdapter())
register_layer(nn.Conv2d, Conv2dAdapter())

__all__ = [
    "KFAC_APPROXIMATIONS",
    "LOSS_AVERAGES",
    "Conv2dAdapter",
    "LayerAdapter",
    "LinearAdapter",
    "get_adapter",
    "register_layer",
]
