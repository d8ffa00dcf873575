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

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchsingd.layers.base import LayerAdapter, finish_input_rows
from torchsingd.layers.conv import ConvAdapter, extract_patches, group_input
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

    def input_rows(self, module: nn.Module, x: Tensor, kfac_approx: str, *, block: str = ""):
        patches = extract_patches(module, x, (1,) * len(module.kernel_size))
        a = patches if kfac_approx == "expand" else patches.mean(1)
        return finish_input_rows(a, self.has_bias(module))

    def input_statistic(
        self,
        module: nn.Module,
        x: Tensor,
        K: StructuredMatrix,
        kfac_approx: str,
        *,
        block: str = "",
    ) -> StructuredMatrix:
        """A diagonal ``K`` with ``"expand"``: the column means of the squared prepared
        input, from one unfolded image (as for convolutions); otherwise the generic
        route over rows."""
        if kfac_approx == "expand" and isinstance(K, DiagonalMatrix):
            work = torch.float32 if K.dtype in (torch.float16, torch.bfloat16) else K.dtype
            ones = (1,) * len(module.kernel_size)
            diag = self._column_means(module, x.to(work).square(), ones).to(K.dtype)
            if self.has_bias(module):
                diag = torch.cat([diag, diag.new_ones(1)])
            return DiagonalMatrix(K.diag * K.diag * diag)
        return LayerAdapter.input_statistic(self, module, x, K, kfac_approx, block=block)

    @staticmethod
    def _as_matrix_layout(module: nn.Module, w: Tensor) -> Tensor:
        """``[C_in, C_out/groups, *k]`` -> ``[C_out, C_in/groups * prod(k)]`` (see the
        module docstring)."""
        G, n = module.groups, len(module.kernel_size)
        w = w.reshape(G, w.shape[0] // G, *w.shape[1:]).transpose(1, 2)
        w = w.flip(tuple(range(3, 3 + n)))
        return w.reshape(module.out_channels, -1)

    def grad_matrix(self, module: nn.Module, *, block: str = "") -> Tensor | None:
        if module.weight.grad is None:
            return None
        G = self._as_matrix_layout(module, module.weight.grad)
        if self.has_bias(module):
            bias_grad = module.bias.grad
            if bias_grad is None:
                bias_grad = torch.zeros_like(module.bias)
            G = torch.cat([G, bias_grad.unsqueeze(1)], dim=1)
        return G

    def split_matrix(self, module: nn.Module, mat: Tensor) -> list[Tensor]:
        G, n = module.groups, len(module.kernel_size)
        k = module.kernel_size
        width = module.in_channels // G * math.prod(k)
        w = mat[:, :width].reshape(G, module.out_channels // G, module.in_channels // G, *k)
        w = w.flip(tuple(range(3, 3 + n))).transpose(1, 2).reshape_as(module.weight)
        if self.has_bias(module):
            return [w, mat[:, -1].reshape_as(module.bias)]
        return [w]
