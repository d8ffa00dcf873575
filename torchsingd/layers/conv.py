"""``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``: stride, dilation, groups, every padding.

``a`` holds unfolded patches (``[B * prod(O), C_in/groups * prod(k)]`` for "expand",
their average over output locations for "reduce"); input channels are averaged over
the groups first. ``"same"`` padding is applied as PyTorch does (left ``total // 2``,
right the rest, ``total = dilation * (k - 1)``), so asymmetric cases work; non-zero
padding modes (reflect, replicate, circular) pad first, as the module does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchsingd.layers.base as layers_base
from torchsingd.layers.base import (
    LayerAdapter,
    divide_into,
    finish_input_rows,
    loss_term_count,
    loss_terms_scale,
)
from torchsingd.structures import (
    DiagonalMatrix,
    HierarchicalMatrix,
    StructuredMatrix,
    TrilTopLeftDiagonalMatrix,
)
from torchsingd.structures.base import border_index


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


def patch_view(
    module: nn.modules.conv._ConvNd, x: Tensor, stride: tuple[int, ...] | None = None
) -> Tensor:
    """Patches of a prepared input ``[B, C', *S]`` as a view ``[B, C', O_1..O_n,
    k_1..k_n]`` of it (nothing copied): entry ``[b, c, o, j]`` is the input at location
    ``o * stride + j * dilation`` of channel ``c``. Flattening ``(c, j)`` gives the
    column order of ``weight.flatten(1)``. ``stride`` replaces the module's (a
    transposed convolution's prepared input is read with stride 1)."""
    stride = module.stride if stride is None else stride
    for i, (k, s, d) in enumerate(zip(module.kernel_size, stride, module.dilation, strict=True)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]
    return x


def write_patch_columns(view: Tensor, out: Tensor, divisor: float = 1.0) -> None:
    """Write a :func:`patch_view` ``[B, C', O.., k..]`` as the columns of ``out: [C'
    prod(k), B prod(O)]`` (one row per patch column, each sample's locations in
    order), divided by ``divisor``.

    Channel-major: the copy reads each row of the input in order (at the stride) and
    writes ``out`` in order. On the benchmark CNN (2 threads, batch 128; one pass
    that also divides by ``sqrt(N)``) this took 6.5 / 4.1 / 0.23 ms for its second,
    third and first convolutions' patches, against 41.5 / 9.8 / 2.3 ms for
    ``F.unfold`` then the division written into row-major rows ``[N, C' prod(k)]``,
    and the Gram products that follow read it faster too (the second convolution's
    rows and their ``a^T a`` over chunks 72.6 -> 34.6 ms).
    """
    n = (view.ndim - 2) // 2
    order = [1, *range(2 + n, 2 + 2 * n), 0, *range(2, 2 + n)]  # [C', k.., B, O..]
    moved = view.permute(order)
    target = out.view(moved.shape)
    if divisor == 1.0:
        target.copy_(moved)
    else:
        divide_into(moved, divisor, target)


def patch_gram(
    module: nn.modules.conv._ConvNd, x: Tensor, K: StructuredMatrix
) -> StructuredMatrix | None:
    """``K.gram_of(a^T)`` for the rows ``a`` of a 2-D convolution's batched input
    (``"expand"``) and a hierarchical ``K``, formed without the full unfold
    (:func:`_hierarchical_gram`: the border rows as the convolution's weight gradient
    for the border patches, the rest from summed images), or ``None`` where this does
    not apply (another family, padding that is not symmetric zeros, no middle
    diagonal) or the Gram route does not pay (:meth:`StructuredMatrix.gram_pays`).

    Measured on the benchmark CNN (2 threads, both routes alternated every iteration
    in one process): T=1 iterations 12.6% shorter than by per-sample products over
    the unfold (155.0 -> 135.4 ms, 2.09x -> 1.82x AdamW's). Against the rows route
    (channel-major rows, :func:`write_patch_columns`) the statistic of its second and
    third convolutions took 12.2 / 8.6 ms against 25.8 / 12.1 ms; for its first (one
    input channel, ``d = 10``: the border is every column) 9.4 against 3.7 ms, so
    without a middle diagonal the rows route serves. (Block-diagonal factors had a
    route of their own over the unfold's layout, 21.0 / 11.2 / 3.0 ms there; the
    channel-major rows route takes 16.9 / 8.0 / 1.3 ms.)
    """
    if not isinstance(K, HierarchicalMatrix) or not K.m:
        return None
    left, right, top, bottom = conv_padding(module)
    if module.padding_mode != "zeros" or left != right or top != bottom:
        return None
    padded = [size + 2 * pad for size, pad in zip(x.shape[2:], (top, left), strict=True)]
    out_sizes = output_sizes(module, padded, module.stride)
    locations = math.prod(out_sizes)
    # the weight gradient has k1 + k2 output channels over `locations` locations:
    # with fewer locations than that (a squeeze-excitation's 1x1 convolution on a
    # pooled input) the rows route is taken (it was 5-13x faster than the per-sample
    # products an earlier route used there)
    if locations < K.k1 + K.k2 or not K.gram_pays(x.shape[0] * locations):
        return None
    patches = (x.shape[1] // module.groups) * math.prod(module.kernel_size)
    if K.dim > patches and not K.k2:
        return None  # (the bias column in the middle: only with K2 = 0)
    g = group_input(module, x.to(K.dtype))
    parts = _hierarchical_gram(module, g, K, (top, left), out_sizes)
    if parts is None:
        return None
    R, c, count = parts
    return HierarchicalMatrix._packed(R.div_(count), c.div_(count), K.K1, K.K2)


def column_sums(
    module: nn.modules.conv._ConvNd, image: Tensor, stride: tuple[int, ...] | None = None
) -> tuple[Tensor, int]:
    """Per patch column of one prepared image ``[1, C', *S]`` (a batch summed first),
    the sum over its locations (``[C' * prod(k)]``), and the number of locations."""
    view = patch_view(module, image, stride)  # [1, C', O.., k..]
    n = (view.ndim - 2) // 2
    locations = math.prod(view.shape[2 : 2 + n])
    return view.sum(dim=tuple(range(2, 2 + n))).flatten(), locations


def output_sizes(
    module: nn.modules.conv._ConvNd, prepared: Sequence[int], stride: Sequence[int]
) -> list[int]:
    """The output locations per spatial dimension of ``module``'s kernel read at
    ``stride`` from a prepared (padded) input of spatial sizes ``prepared``."""
    return [
        (size - d * (k - 1) - 1) // s + 1
        for size, k, s, d in zip(prepared, module.kernel_size, stride, module.dilation, strict=True)
    ]


def _hierarchical_gram(
    module: nn.modules.conv._ConvNd,
    g: Tensor,
    K: HierarchicalMatrix,
    padding: tuple[int, int],
    out_sizes: list[int],
) -> tuple[Tensor, Tensor, int] | None:
    """``(R, c, N)`` of :meth:`HierarchicalMatrix.gram_of` of ``a^T`` (unscaled) for
    the grouped, unpadded input ``g`` of a 2-D convolution padded symmetrically by
    ``padding`` with zeros, whose output has ``out_sizes``; ``N`` rows.

    Without the unfold: the border rows against every patch column,
    ``sum_{b, l} U_B[b, :, l] U[b, :, l]^T``, are the weight gradient of this
    convolution for an output gradient ``U_B`` (the border patch columns, unfolded
    from the few channels they read) and are computed by PyTorch's convolution
    backward; the bias column's sums and the middle diagonal (sums of squares) come
    from one image unfolded after summing the batch (of ``g``, of ``g^2``). Measured
    on 2 CPU threads for the benchmark CNN's second and third convolutions (batch
    128, ``hierarchical:15,15``): 19.2 -> 11.9 ms and 8.5 -> 5.1 ms against the
    per-sample products over the full unfold (the same FLOPs; the unfold itself and
    the small per-sample products were the cost). In float32 the border rows carry
    oneDNN's rounding of the weight gradient: 1.4e-6 to 5.3e-6 of the largest entry
    against float64 (the per-sample products: 1.5e-7 to 2.8e-7), below the 1.7e-5
    the Gram route accepts (:meth:`StructuredMatrix.gram_precise`). ``None`` where no
    patch column is at the border."""
    k1, m, k2, d = K.k1, K.m, K.k2, K.dim
    batch, channels = g.shape[:2]
    kernel = module.kernel_size
    per_channel = math.prod(kernel)
    patches = channels * per_channel
    inside = [i for i in [*range(k1), *range(d - k2, d)] if i < patches]  # (bias: last)
    if not inside:  # (only a bias at the border: K1 = 0, not reachable by name)
        return None
    index = border_index(d, k1, k2, g.device)[: len(inside)]
    read = sorted({i // per_channel for i in inside})  # the channels they read
    where = {c: j for j, c in enumerate(read)}
    local = torch.tensor(
        [where[i // per_channel] * per_channel + i % per_channel for i in inside],
        device=g.device,
    )
    locations = math.prod(out_sizes)
    # samples per chunk: as many as the full unfold's chunk holds (at least one), which
    # bounds the border patches, g's square, and the im2col buffer PyTorch's own
    # convolution backward takes where oneDNN does not run it (float64, or oneDNN
    # off: a chunk sized by the border patches alone made it 8.6 chunks there)
    per = max(1, layers_base.STATISTIC_CHUNK_NUMEL // max(patches * locations, g[0].numel(), 1))
    weight = g.new_empty(1).expand(len(inside), channels, *kernel)  # (its shape only)
    border = sums = squares = None
    for start in range(0, batch, per):
        part = g[start : start + per]
        U_B = F.unfold(
            part[:, read], kernel, dilation=module.dilation, padding=padding, stride=module.stride
        ).index_select(1, local)
        grad_output = U_B.view(part.shape[0], len(inside), *out_sizes)
        dW = torch.ops.aten.convolution_backward(
            grad_output,
            part,
            weight,
            None,
            module.stride,
            list(padding),
            module.dilation,
            False,
            [0, 0],
            1,
            (False, True, False),
        )[1]
        summed, squared = part.sum(0), part.square().sum(0)
        if border is None:
            border, sums, squares = dW, summed, squared
        else:
            border.add_(dW), sums.add_(summed), squares.add_(squared)
    totals = column_sums(module, pad_input(module, sums.unsqueeze(0)))[0]  # [patches]
    R = g.new_empty(k1 + k2, d)
    R[: len(inside), :patches] = border.reshape(len(inside), patches)
    if d > patches:  # a bias: the last column (and the last border row)
        R[: len(inside), patches] = totals[index]
        R[len(inside) :, :patches] = totals
        R[len(inside) :, patches] = batch * locations
    if k2:
        R[k1:, :k1].zero_()  # (the family's fixed zero block)
    c = column_sums(module, pad_input(module, squares.unsqueeze(0)))[0][k1 : k1 + m]
    return R, c, batch * locations


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
        view = patch_view(module, self.prepare(module, x), self.patch_stride(module))
        n = len(module.kernel_size)
        B, patches = view.shape[0], view.shape[1] * math.prod(view.shape[2 + n :])
        if kfac_approx != "expand":  # one row per sample: its patches' mean
            a = view.mean(dim=tuple(range(2, 2 + n))).reshape(B, patches)
            return finish_input_rows(a, self.has_bias(module))
        # "expand": rows are all samples' patches, written channel-major ([d_i, N],
        # returned as its transpose: see write_patch_columns), the bias a row of ones
        N = B * math.prod(view.shape[2 : 2 + n])
        columns = view.new_empty(patches + int(self.has_bias(module)), N)
        write_patch_columns(view, columns[:patches], math.sqrt(N))
        if self.has_bias(module):
            columns[patches:].fill_(1.0).div_(math.sqrt(N))
        return columns.T

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
        out = output_sizes(module, self.prepared_sizes(module, x), self.patch_stride(module))
        return B * math.prod(out)

    def diagonal_statistic(self, module: nn.Module, x: Tensor, K: DiagonalMatrix) -> DiagonalMatrix:
        """``H_K`` for a diagonal ``K`` and ``"expand"``: ``diag(a^T a)[c, k]`` is the mean
        over samples and locations of the squared prepared input shifted by ``k``; square
        and sum over the batch first, then unfold one image. An empty batch (no rows)
        gives zeros, as the rows route does."""
        if self.is_batched(module, x) and x.shape[0] == 0:
            return DiagonalMatrix(torch.zeros_like(K.diag))
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
        if self.is_batched(module, x) and x.shape[0] == 0:
            # no rows: the generic route's zero statistic (the routes below divide by
            # the row count and read the first sample)
            return super().input_statistic(module, x, K, kfac_approx, block=block)
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
        if kfac_approx == "expand" and self._plain_2d(module) and self.is_batched(module, x):
            G = patch_gram(module, x, K)
            if G is not None:
                return K.inner_of_gram(G)
        return super().input_statistic(module, x, K, kfac_approx, block=block)

    def _plain_2d(self, module: nn.Module) -> bool:
        """A 2-D convolution whose patches this class reads (not a subclass that
        prepares its input otherwise, e.g. a transposed convolution)."""
        return (
            len(module.kernel_size) == 2
            and type(self).prepare is ConvAdapter.prepare
            and type(self).patch_stride is ConvAdapter.patch_stride
            and type(self).input_rows is ConvAdapter.input_rows
        )

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
        :func:`patch_view`)."""
        sums, locations = column_sums(module, prepared.sum(0, keepdim=True), stride)
        return sums / (prepared.shape[0] * locations)

    def loss_terms(self, module, g: Tensor, loss_average, *, block: str = ""):
        n = len(module.kernel_size)
        B = g.shape[0] if g.ndim == n + 2 else 1
        return loss_term_count(B, math.prod(g.shape[-n:]), loss_average)

    def grad_rows(self, module, g: Tensor, loss_average, kfac_approx: str, *, block: str = ""):
        if g.ndim == len(module.kernel_size) + 1:  # unbatched
            g = g.unsqueeze(0)
        B, C = g.shape[:2]
        g3 = g.flatten(2)  # (reshape(B, C, -1) is ambiguous for an empty batch)
        scale = loss_terms_scale(B, g3.shape[2], loss_average)
        if kfac_approx != "expand":
            return g3.sum(2).mul_(scale)  # a fresh tensor: scaled in place
        # one pass: g scaled and written channel-major ([C, B, L]: runs of L numbers
        # read and written in order), returned as its transpose, the rows [B L, C]; the
        # statistics read Z = rows^T, contiguous. Writing row-major rows instead
        # scattered every number: the statistic of the benchmark CNN's convolutions
        # (batch 128; 32 x 28 x 28, 64 x 14 x 14, 64 x 7 x 7 outputs) took 5.8 / 4.1 /
        # 0.9 ms that way against 4.2 / 2.5 / 0.7 ms (hierarchical; diagonal 3.8 / 2.4 /
        # 0.4 against 2.2 / 1.0 / 0.2 ms)
        L = g3.shape[2]
        rows = g.new_empty(C, B, L)
        torch.mul(g3.transpose(0, 1), scale, out=rows)
        return rows.view(C, B * L).T


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
