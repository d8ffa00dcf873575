"""``nn.EmbeddingBag`` with ``mode="sum"`` or ``"mean"``: a linear map of bag-count vectors.

Bag ``b``'s output is ``weight^T c_b``, with ``c_b`` (``[V]``) holding, per token, the
sum of its weights in the bag: ``per_sample_weights`` (or ones) for ``"sum"``, ones
divided by the bag's size for ``"mean"``; tokens equal to ``padding_idx`` are left out
(PyTorch leaves them out of the sum and of the size). So, as for ``nn.Embedding``,
``W = weight^T`` (``d_i = V``, ``K`` on the vocabulary side with the group option
``vocab_structure``) and ``a`` holds the rows ``c_b / sqrt(B)``, one per bag. The
forward hook records ``c`` as a sparse ``[B, V]`` tensor (only in observed passes);
with a diagonal ``K``, ``H_K`` comes from its squared entries without dense rows.
``mode="max"`` is not linear in the weight: such bags go to the fallback rule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from torchsingd.layers.base import (
    Observer,
    ObservingHook,
    finish_input_rows,
    inner_of_rows,
)
from torchsingd.layers.embedding import EmbeddingAdapter
from torchsingd.structures import DiagonalMatrix, StructuredMatrix


def bag_counts(
    module: nn.EmbeddingBag,
    input: Tensor,
    offsets: Tensor | None,
    per_sample_weights: Tensor | None,
    dtype: torch.dtype,
) -> Tensor:
    """The coalesced sparse ``[B, V]`` matrix of the bags' count vectors ``c_b``."""
    V = module.num_embeddings
    tokens = input.reshape(-1).long()
    if input.ndim == 2:
        B, L = input.shape
        bags = torch.arange(B, device=input.device).repeat_interleave(L)
    else:
        starts = offsets.long()
        if module.include_last_offset:
            starts, end = starts[:-1], starts[-1:]
        else:
            end = torch.tensor([tokens.numel()], device=input.device)
        B = starts.numel()
        sizes = torch.diff(torch.cat([starts, end]))
        bags = torch.arange(B, device=input.device).repeat_interleave(
            sizes, output_size=tokens.numel()
        )
    if per_sample_weights is not None:
        weights = per_sample_weights.detach().reshape(-1).to(dtype)
    else:
        weights = torch.ones(tokens.numel(), dtype=dtype, device=input.device)
    if module.padding_idx is not None:
        kept = tokens != module.padding_idx
        tokens, bags, weights = tokens[kept], bags[kept], weights[kept]
    if module.mode == "mean":
        size = torch.bincount(bags, minlength=B).to(dtype)
        weights = weights / size[bags]
    index = torch.stack([bags, tokens])
    return torch.sparse_coo_tensor(
        index, weights, (B, V), device=input.device, check_invariants=False
    ).coalesce()


class BagHook(ObservingHook):
    """A forward hook (``with_kwargs=True``) that reports the bags' count vectors."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        observer = self.observer
        if observer is None or not isinstance(output, Tensor) or not torch.is_grad_enabled():
            return
        if not observer.wants(module):
            return
        bound = dict(zip(("input", "offsets", "per_sample_weights"), args, strict=False))
        bound.update(kwargs)
        dtype = torch.promote_types(module.weight.dtype, torch.float32)
        counts = bag_counts(
            module,
            bound["input"],
            bound.get("offsets"),
            bound.get("per_sample_weights"),
            dtype,
        )
        observer(module, "", counts, output)


class EmbeddingBagAdapter(EmbeddingAdapter):
    """``x`` is the sparse count matrix that :class:`BagHook` records."""

    def supports(self, module: nn.Module) -> bool:
        return module.mode in ("sum", "mean")

    def install(self, module: nn.Module, observer: Observer) -> list[Any]:
        return [module.register_forward_hook(BagHook(observer), with_kwargs=True)]

    def input_rows(
        self,
        module: nn.EmbeddingBag,
        x: Tensor,
        kfac_approx: str,
        *,
        block: str = "",
        dtype: torch.dtype | None = None,
    ):
        """Rows ``c_b / sqrt(B)`` (one per bag for both approximations: a bag is one
        sample, with no shared dimension)."""
        rows = x.to_dense()
        return finish_input_rows(rows if dtype is None else rows.to(dtype), False)

    def input_count(self, module: nn.Module, x: Tensor, kfac_approx: str, *, block: str = ""):
        return x.shape[0]  # one row per bag

    def own_gradient(self, module: nn.EmbeddingBag, x: Tensor, grad_output: Tensor, *, block=""):
        if module.scale_grad_by_freq:
            return None  # (the tokens' frequencies are not in the recorded counts)
        g = grad_output.reshape(-1, module.embedding_dim)
        g = g.to(torch.promote_types(g.dtype, torch.float32))
        return torch.sparse.mm(x.t().to(g.dtype), g).T  # (c^T g)^T: [D, V]

    def input_statistic(
        self,
        module: nn.EmbeddingBag,
        x: Tensor,
        K: StructuredMatrix,
        kfac_approx: str,
        *,
        block: str = "",
    ) -> StructuredMatrix:
        if not isinstance(K, DiagonalMatrix):
            return inner_of_rows(K, self.input_rows(module, x, kfac_approx).to(K.dtype))
        B, V = x.shape
        squares = x.values().square()
        diag = torch.zeros(V, dtype=squares.dtype, device=squares.device)
        diag.index_add_(0, x.indices()[1], squares)
        return DiagonalMatrix(K.diag * K.diag * (diag / B).to(K.dtype))
