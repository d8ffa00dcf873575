"""``nn.ConvTranspose1d``, ``2d``, ``3d``: stride, padding, output padding (or
``output_size``), dilation, groups.

A transposed convolution is the convolution, with stride 1 and the same dilation, of
its input zero-stuffed (``stride - 1`` zeros between neighbours) and padded by
``dilation * (k - 1) - padding`` on the left and the rest of the output size on the
right, with the kernel's two channel axes swapped and its spatial axes flipped:
``y[o, q] = sum_{c, j} W[c, o, k - 1 - j] x_pad[c, q + j * dilation]``. So ``a`` holds
patches of that prepared input (channels averaged over the groups, as for
convolutions), and the weight as a matrix is ``[C_out, C_in/groups * prod(k)]`` with
``M[g * C_out/groups + o, (c, j)] = W[g * C_in/groups + c, o, k - 1 - j]`` (bias as the
last column). The right padding is read from the output's shape in the backward pass
(:meth:`ConvTransposeAdapter.capture_input`), so a forward call with ``output_size``
is captured exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchsingd.layers.base import LayerAdapter
from torchsingd.layers.conv import ConvAdapter, group_input
from torchsingd.structures import DiagonalMatrix, StructuredMatrix


class ConvTransposeAdapter(ConvAdapter):
    """``input_rows`` and ``input_statistic`` take the prepared input that
    :meth:`capture_input` returns, not the module's input."""

    def dims(self, module: nn.Module, *, block: str = "") -> tuple[int, int]:
        per_group = module.in_channels // module.groups
        return per_group * module.weight.shape[2:].numel() + int(self.has_bias(module)), (
            module.out_channels
        )

    def capture_input(
        self, module: nn.Module, x: Tensor, output_shape: torch.Size, *, block: str = ""
    ) -> Tensor:
        """``x`` batched, channels averaged over the groups, zero-stuffed and padded
        (cropped where ``padding`` exceeds ``dilation * (k - 1)``) to the input of the
        equivalent stride-1 convolution that gives ``output_shape``."""
        x = group_input(module, x)
        n = len(module.kernel_size)
        B, C, sizes = x.shape[0], x.shape[1], x.shape[2:]
        stuffed_sizes = [(size - 1) * s + 1 for size, s in zip(sizes, module.stride, strict=True)]
        if any(s > 1 for s in module.stride):
            stuffed = x.new_zeros(B, C, *stuffed_sizes)
            stuffed[(slice(None), slice(None), *(slice(None, None, s) for s in module.stride))] = x
        else:
            stuffed = x
        pads: list[int] = []
        for i in reversed(range(n)):  # F.pad lists the last dimension first
            reach = module.dilation[i] * (module.kernel_size[i] - 1)
            left = reach - module.padding[i]
            right = output_shape[-n + i] + reach - left - stuffed_sizes[i]
            pads += [left, right]
        return F.pad(stuffed, pads) if any(pads) else stuffed

    def prepare(self, module: nn.Module, x: Tensor) -> Tensor:
        return x  # capture_input prepared it

    def patch_stride(self, module: nn.Module) -> tuple[int, ...]:
        return (1,) * len(module.kernel_size)

    def prepared_sizes(self, module: nn.Module, x: Tensor) -> list[int]:
        return list(x.shape[-len(module.kernel_size) :])

    def input_statistic(
        self,
        module: nn.Module,
        x: Tensor,
        K: StructuredMatrix,
        kfac_approx: str,
        *,
        block: str = "",
    ) -> StructuredMatrix:
        """A diagonal ``K`` with ``"expand"``: as for convolutions (one unfolded image);
        otherwise the generic route over rows (the convolutions' centred-moment route
        for ``triltopleftdiag:1`` reads the unstuffed input)."""
        if kfac_approx == "expand" and isinstance(K, DiagonalMatrix):
            return self.diagonal_statistic(module, x, K)
        return LayerAdapter.input_statistic(self, module, x, K, kfac_approx, block=block)

    def weight_matrix(self, module: nn.Module, w: Tensor) -> Tensor:
        """``[C_in, C_out/groups, *k]`` -> ``[C_out, C_in/groups * prod(k)]`` (see the
        module docstring)."""
        G, n = module.groups, len(module.kernel_size)
        w = w.reshape(G, w.shape[0] // G, *w.shape[1:]).transpose(1, 2)
        return w.flip(tuple(range(3, 3 + n))).reshape(module.out_channels, -1)

    def matrix_weight(self, module: nn.Module, mat: Tensor) -> Tensor:
        G, n = module.groups, len(module.kernel_size)
        shape = (G, module.out_channels // G, module.in_channels // G, *module.kernel_size)
        w = mat.reshape(shape).flip(tuple(range(3, 3 + n))).transpose(1, 2)
        return w.reshape_as(module.weight)
