"""``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``: stride, dilation, groups, every padding.

``a`` holds unfolded patches (``[B * prod(O), C_in/groups * prod(k)]`` for "expand",
their average over output locations for "reduce"); input channels are averaged over
the groups first. ``"same"`` padding is applied as PyTorch does (left ``total // 2``,
right the rest, ``total = dilation * (k - 1)``), so asymmetric cases work; non-zero
padding modes (reflect, replicate, circular) pad first, as the module does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchsingd.layers.base import (
    LayerAdapter,
    finish_input_rows,
    loss_term_count,
    loss_terms_scale,
)
from torchsingd.structures import DiagonalMatrix, StructuredMatrix, TrilTopLeftDiagonalMatrix


def conv_padding(module: nn.modules.conv._ConvNd) -> list[int]:
    """``F.pad`` amounts (last dimension first) equivalent to the module's padding."""
    if module.padding_mode != "zeros":
        return list(module._reversed_padding_repeated_twice)
    if module.padding == "valid":
        return [0] * (2 * len(module.kernel_size))
    pads: list[int] = []
    if module.padding == "same":
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return pads
    for p in reversed(module.padding):
        pads += [p, p]
    return pads


def prepare_input(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """The input as the kernel sees it: batched, channels averaged over groups, padded."""
    return pad_input(module, group_input(module, x))


def group_input(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """The input batched, its channels averaged over the groups (not padded)."""
    if x.ndim == len(module.kernel_size) + 1:  # unbatched
        x = x.unsqueeze(0)
    B, C = x.shape[:2]
    if module.groups > 1:
        x = x.reshape(B, module.groups, C // module.groups, *x.shape[2:]).mean(1)
    return x


def pad_input(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """``x`` (``[B, C', *S]``) padded as the module pads its input."""
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    pads = conv_padding(module)
    if any(pads):
        x = F.pad(x, pads, mode=mode)
    return x


def extract_patches(
    module: nn.modules.conv._ConvNd, x: Tensor, stride: tuple[int, ...] | None = None
) -> Tensor:
    """Patches ``[B, prod(O), C' * prod(k)]`` of a prepared input ``[B, C', *S]``.

    The column order (channel, then kernel positions) matches ``weight.flatten(1)``.
    ``stride`` replaces the module's (a transposed convolution's prepared input is
    read with stride 1).
    """
    n = len(module.kernel_size)
    B = x.shape[0]
    stride = module.stride if stride is None else stride
    if n == 2:  # one fused kernel for the common case
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=stride)
        return cols.transpose(1, 2)
    for i, (k, s, d) in enumerate(zip(module.kernel_size, stride, module.dilation, strict=True)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]
    # x: [B, C', O_1..O_n, k_1..k_n] -> [B, O_1..O_n, C', k_1..k_n]
    c = x.shape[1]
    out_sizes = x.shape[2 : 2 + n]
    perm = [0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n)]
    x = x.permute(perm)
    return x.reshape(B, out_sizes.numel(), c * math.prod(module.kernel_size))


class ConvAdapter(LayerAdapter):
    def dims(self, module: nn.Module, *, block: str = "") -> tuple[int, int]:
        return module.weight.shape[1:].numel() + int(self.has_bias(module)), module.out_channels

    def is_batched(self, module: nn.Module, x: Tensor) -> bool:
        return x.ndim == len(module.kernel_size) + 2

    def prepare(self, module: nn.Module, x: Tensor) -> Tensor:
        """The block input as the patches are read from it (:func:`prepare_input`)."""
        return prepare_input(module, x)

    def patch_stride(self, module: nn.Module) -> tuple[int, ...]:
        """The stride at which patches are read from the prepared input."""
        return module.stride

    def input_rows(self, module: nn.Module, x: Tensor, kfac_approx: str, *, block: str = ""):
        # "expand": rows are all samples' patches
        patches = extract_patches(module, self.prepare(module, x), self.patch_stride(module))
        a = patches if kfac_approx == "expand" else patches.mean(1)
        return finish_input_rows(a, self.has_bias(module))

    def prepared_sizes(self, module: nn.Module, x: Tensor) -> list[int]:
        """Spatial sizes of :meth:`prepare`'s result, from ``x``'s shape alone."""
        n = len(module.kernel_size)
        pads = conv_padding(module)  # last dimension first
        return [
            size + pads[2 * (n - 1 - i)] + pads[2 * (n - 1 - i) + 1]
            for i, size in enumerate(x.shape[-n:])
        ]

    def input_count(self, module: nn.Module, x: Tensor, kfac_approx: str, *, block: str = ""):
        n = len(module.kernel_size)
        B = x.shape[0] if x.ndim == n + 2 else 1
        if kfac_approx != "expand":
            return B
        out = [
            (size - d * (k - 1) - 1) // s + 1
            for size, k, s, d in zip(
                self.prepared_sizes(module, x),
                module.kernel_size,
                self.patch_stride(module),
                module.dilation,
                strict=True,
            )
        ]
        return B * math.prod(out)

    def diagonal_statistic(self, module: nn.Module, x: Tensor, K: DiagonalMatrix) -> DiagonalMatrix:
        """``H_K`` for a diagonal ``K`` and ``"expand"``: ``diag(a^T a)[c, k]`` is the mean
        over samples and locations of the squared prepared input shifted by ``k``; square
        and sum over the batch first, then unfold one image."""
        # sums over the batch and locations before the division by N: float32 at
        # least (a float16 sum of squared pixels overflows)
        work = torch.float32 if K.dtype in (torch.float16, torch.bfloat16) else K.dtype
        prepared = self.prepare(module, x.to(work))
        diag = self._column_means(module, prepared.square(), self.patch_stride(module))
        diag = diag.to(K.dtype)
        if self.has_bias(module):
            diag = torch.cat([diag, diag.new_ones(1)])
        return DiagonalMatrix(K.diag * K.diag * diag)

    def input_statistic(
        self,
        module: nn.Module,
        x: Tensor,
        K: StructuredMatrix,
        kfac_approx: str,
        *,
        block: str = "",
    ) -> StructuredMatrix:
        """Without unfolding the batch where the statistic needs only per-column sums
        of the rows ``a`` (``"expand"``):

        - diagonal ``K``: ``diag(a^T a)[c, k] = sum over samples and locations of
          x[c, shifted by k]^2 / N``: square and sum the prepared input over the batch
          first, then unfold one image;
        - ``triltopleftdiag:1`` with a bias and float32/float64 factors
          (``K = [[diag(alpha), 0], [beta, gamma]]``, its dense row on the bias column,
          whose entries in ``a`` are all ``1 / sqrt(N)``): ``K^T a^T`` is
          ``(alpha * p + beta) / sqrt(N)`` above a constant row ``gamma / sqrt(N)``, with
          ``p`` the patches. Each channel is shifted by ``s`` (``p = p' + s``,
          ``beta' = alpha s + beta``), so that with ``mu`` and ``q`` the per-column means
          of ``p'`` and ``p'^2``, ``P(K^T a^T a K)`` has diagonal
          ``alpha^2 q + 2 alpha beta' mu + beta'^2``, row ``2 gamma (alpha mu + beta')``
          and corner ``gamma^2`` (:meth:`_centred_moments`); with ``s`` near the mean,
          ``q`` is never a small difference of large raw moments. 16-bit factors take
          the generic route.
        """
        if kfac_approx == "expand" and isinstance(K, DiagonalMatrix):
            return self.diagonal_statistic(module, x, K)
        if (
            kfac_approx == "expand"
            and isinstance(K, TrilTopLeftDiagonalMatrix)
            and K.C.shape[0] == 1
            and K.dtype in (torch.float32, torch.float64)
            and self.has_bias(module)
        ):
            mu, q, shift = self._centred_moments(module, x.to(K.dtype))
            per_column = module.weight.shape[2:].numel()  # kernel positions per channel
            alpha, gamma = K.a, K.C[0, 0]
            beta = alpha * shift.flatten().repeat_interleave(per_column) + K.b[0]
            diag = alpha * alpha * q + 2 * alpha * beta * mu + beta * beta
            row = 2 * gamma * (alpha * mu + beta)
            corner = (gamma * gamma).view(1, 1)
            return TrilTopLeftDiagonalMatrix(diag, row.unsqueeze(0), corner, K.k)
        return super().input_statistic(module, x, K, kfac_approx, block=block)

    @classmethod
    def _centred_moments(cls, module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(mu, q, s)``: per patch column, the means of ``p - s`` and ``(p - s)^2`` over
        all rows of ``a``, with ``s`` ``[1, C', 1, ...]`` the channel means of the first
        sample (close enough to the batch's for the squares not to cancel).

        The batch is centred and reduced unpadded (one temporary); the two per-position
        means are then padded as the input is: copies for reflect, replicate and
        circular padding, and for zero padding the centred values of a zero, ``-s`` and
        ``s^2``."""
        grouped = group_input(module, x)
        B, spatial = grouped.shape[0], tuple(range(1, grouped.ndim - 1))
        shift = grouped[0].mean(dim=spatial, keepdim=True).unsqueeze(0)
        centred = grouped - shift
        m = centred.sum(0, keepdim=True).div_(B)
        sq = centred.square_().sum(0, keepdim=True).div_(B)
        m_pad, sq_pad = pad_input(module, m), pad_input(module, sq)
        if module.padding_mode == "zeros" and m_pad.shape != m.shape:
            outside = 1.0 - pad_input(module, torch.ones_like(m))
            m_pad = m_pad - shift * outside
            sq_pad = sq_pad + shift.square() * outside
        return cls._column_means(module, m_pad), cls._column_means(module, sq_pad), shift

    @staticmethod
    def _column_means(
        module: nn.Module, prepared: Tensor, stride: tuple[int, ...] | None = None
    ) -> Tensor:
        """The mean over all rows of ``a`` (samples and locations) of each patch column
        of a prepared input (or of its square, passed squared), ``[C' * prod(k)]``:
        summed over the batch first and one image unfolded (``stride``: as for
        :func:`extract_patches`)."""
        summed = prepared.sum(0, keepdim=True)
        patches = extract_patches(module, summed, stride)  # [1, O, C' * prod(k)]
        return patches.sum(1).squeeze(0) / (prepared.shape[0] * patches.shape[1])

    def loss_terms(self, module, g: Tensor, loss_average, *, block: str = ""):
        n = len(module.kernel_size)
        B = g.shape[0] if g.ndim == n + 2 else 1
        return loss_term_count(B, math.prod(g.shape[-n:]), loss_average)

    def grad_rows(self, module, g: Tensor, loss_average, kfac_approx: str, *, block: str = ""):
        if g.ndim == len(module.kernel_size) + 1:  # unbatched
            g = g.unsqueeze(0)
        B, C = g.shape[:2]
        g3 = g.reshape(B, C, -1)
        scale = loss_terms_scale(B, g3.shape[2], loss_average)
        if kfac_approx != "expand":
            return g3.sum(2).mul_(scale)  # a fresh tensor: scaled in place
        # one pass: the scaled [B, L, C] view of g written into row-major rows
        rows = g.new_empty(B * g3.shape[2], C)
        torch.mul(g3.transpose(1, 2), scale, out=rows.view(B, g3.shape[2], C))
        return rows


def tf_same_pads(x: Tensor, module: nn.modules.conv._ConvNd) -> list[int]:
    """``F.pad`` amounts (last dimension first) of TensorFlow's "SAME" padding for the
    spatial size of ``x``: ``max((ceil(n / s) - 1) s + (k - 1) d + 1 - n, 0)`` in all,
    the smaller half before."""
    pads: list[int] = []
    spatial = x.shape[x.ndim - len(module.kernel_size) :]
    for n, k, s, d in zip(
        reversed(spatial),
        reversed(module.kernel_size),
        reversed(module.stride),
        reversed(module.dilation),
        strict=True,
    ):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads += [total // 2, total - total // 2]
    return pads


class TFSameConvAdapter(ConvAdapter):
    """A convolution that pads its input as TensorFlow's "SAME" in its own forward,
    for the input's size (timm's ``Conv2dSame``, in its ``tf_`` EfficientNets and
    MixNets), then convolves without padding: its patches are those of the padded
    input. Registered by name (timm is never imported)."""

    def supports(self, module: nn.Module) -> bool:
        """Only without padding of its own (as timm builds it)."""
        padding = module.padding
        unpadded = padding == "valid" or (not isinstance(padding, str) and not any(padding))
        return unpadded and super().supports(module)

    def capture_input(
        self, module: nn.Module, x: Tensor, output_shape: torch.Size, *, block: str = ""
    ) -> Tensor:
        pads = tf_same_pads(x, module)
        return F.pad(x, pads) if any(pads) else x
