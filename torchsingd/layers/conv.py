"""``nn.Conv2d``: stride, dilation, groups, every padding (``"same"`` included).

``a`` holds unfolded patches (``[B * O1 * O2, C_in/groups * k1 * k2]`` for "expand",
their average over output locations for "reduce"); input channels are averaged over
the groups first. ``"same"`` padding is applied as PyTorch does (left ``total // 2``,
right the rest), so asymmetric cases work; non-zero padding modes pad first.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from torchsingd.layers.base import LayerAdapter, finish_input_rows, loss_terms_scale


def _explicit_padding(module: nn.Conv2d) -> tuple[int, int, int, int] | None:
    """``(left, right, top, bottom)`` for ``F.pad``, or ``None`` if ``unfold`` can pad."""
    if module.padding_mode != "zeros":
        return None
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0, 0, 0)
        pads = []
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    return None


def unfold_input(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Patches ``[B, O1 * O2, C_in/groups * k1 * k2]`` (channels averaged over groups)."""
    if x.ndim == 3:
        x = x.unsqueeze(0)
    B, C, H, W = x.shape
    if module.groups > 1:
        x = x.reshape(B, module.groups, C // module.groups, H, W).mean(1)
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    else:
        explicit = _explicit_padding(module)
        if explicit is not None:
            x = F.pad(x, explicit)
            padding = 0
        else:
            padding = module.padding
    cols = F.unfold(
        x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
    )
    return cols.transpose(1, 2)


class Conv2dAdapter(LayerAdapter):
    def dims(self, module: nn.Conv2d) -> tuple[int, int]:
        return module.weight.shape[1:].numel() + int(self.has_bias(module)), module.out_channels

    def input_rows(self, module: nn.Conv2d, x: Tensor, kfac_approx: str) -> Tensor:
        patches = unfold_input(module, x)
        a = patches.reshape(-1, patches.shape[-1]) if kfac_approx == "expand" else patches.mean(1)
        return finish_input_rows(a, self.has_bias(module))

    def grad_rows(self, module: nn.Conv2d, g: Tensor, loss_average, kfac_approx: str) -> Tensor:
        if g.ndim == 3:
            g = g.unsqueeze(0)
        B, C = g.shape[:2]
        g3 = g.reshape(B, C, -1)
        scale = loss_terms_scale(B, g3.shape[2], loss_average)
        rows = g3.transpose(1, 2).reshape(-1, C) if kfac_approx == "expand" else g3.sum(2)
        return rows * scale
