"""``nn.Embedding``: a linear map of one-hot inputs.

As a matrix, the weight is ``W = weight^T`` (``[D, V]``): ``d_i = V`` (the vocabulary,
``K``'s side) and ``d_o = D`` (``C``'s side). The input statistic ``a^T a`` of one-hot
rows is diagonal (token counts), so ``K``'s structure is the group option
``vocab_structure`` (default ``"diagonal"``), never a dense ``V x V`` matrix unless asked
for. With a diagonal ``K``, ``H_K`` comes from token counts without building one-hot
rows. Rows of ``padding_idx`` are never changed by the optimizer. Sparse gradients
(``sparse=True``) are not supported.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchsingd.layers.base import (
    LayerAdapter,
    finish_input_rows,
    inner_of_rows,
    linear_grad_rows,
)
from torchsingd.structures import DiagonalMatrix, StructuredMatrix


class EmbeddingAdapter(LayerAdapter):
    k_structure_option = "vocab_structure"

    def params(self, module: nn.Embedding) -> list[nn.Parameter]:
        return [module.weight]

    def has_bias(self, module: nn.Module) -> bool:
        return False

    def check(self, module: nn.Embedding, name: str) -> None:
        super().check(module, name)
        if module.sparse:
            raise ValueError(
                f"{type(module).__name__} {name!r} has sparse=True: Kronecker factors "
                "need dense gradients. Construct it with sparse=False to have it "
                "preconditioned, or leave its weight out of params (e.g. trained by "
                "torch.optim.SparseAdam)."
            )

    def dims(self, module: nn.Embedding, *, block: str = "") -> tuple[int, int]:
        return module.num_embeddings, module.embedding_dim

    def input_rows(
        self,
        module: nn.Embedding,
        x: Tensor,
        kfac_approx: str,
        *,
        block: str = "",
        dtype: torch.dtype | None = None,
    ):
        """One-hot rows in ``dtype`` (default: the weight's dtype, at least float32)."""
        if x.ndim == 0:
            x = x.unsqueeze(0)
        dtype = dtype or torch.promote_types(module.weight.dtype, torch.float32)
        onehot = F.one_hot(x.long(), module.num_embeddings).to(dtype)
        if kfac_approx == "expand":
            a = onehot.reshape(-1, module.num_embeddings)
        else:
            a = onehot.reshape(x.shape[0], -1, module.num_embeddings).mean(1)
        return finish_input_rows(a, False)

    def input_count(self, module: nn.Embedding, x: Tensor, kfac_approx: str, *, block: str = ""):
        if x.ndim == 0:
            return 1
        return x.numel() if kfac_approx == "expand" else x.shape[0]

    def own_gradient(self, module: nn.Embedding, x: Tensor, grad_output: Tensor, *, block=""):
        work = torch.promote_types(grad_output.dtype, torch.float32)
        idx = x.reshape(-1).long()
        g = grad_output.reshape(-1, module.embedding_dim).to(work)
        if module.scale_grad_by_freq:  # PyTorch divides by the token's count in the call
            g = g / torch.bincount(idx, minlength=module.num_embeddings)[idx, None]
        own = g.new_zeros(module.num_embeddings, module.embedding_dim).index_add_(0, idx, g)
        if module.padding_idx is not None:
            own[module.padding_idx] = 0.0
        return own.T

    def input_statistic(
        self,
        module: nn.Embedding,
        x: Tensor,
        K: StructuredMatrix,
        kfac_approx: str,
        *,
        block: str = "",
    ) -> StructuredMatrix:
        work = torch.promote_types(K.dtype, torch.float32)
        if not isinstance(K, DiagonalMatrix):
            a = self.input_rows(module, x, kfac_approx, dtype=work).to(K.dtype)
            return inner_of_rows(K, a)  # chunked; by the Gram route where it pays
        if x.ndim == 0:
            x = x.unsqueeze(0)
        V = module.num_embeddings
        idx = x.reshape(x.shape[0], -1).long()
        if kfac_approx == "expand":  # diag(a^T a) = token counts / N
            counts = torch.bincount(idx.flatten(), minlength=V).to(work)
            diag = (counts / idx.numel()).to(K.dtype)  # a count > 65504 is inf in float16
        else:  # rows are per-sample frequency vectors f_b: diag = sum_b f_b^2 / B
            B, S = idx.shape
            freq = torch.zeros(B, V, dtype=work, device=x.device)
            freq.scatter_add_(1, idx, torch.full(idx.shape, 1.0 / S, dtype=work, device=x.device))
            diag = ((freq * freq).sum(0) / B).to(K.dtype)
        return DiagonalMatrix(K.diag * K.diag * diag)

    def grad_rows(self, module, g: Tensor, loss_average, kfac_approx: str, *, block: str = ""):
        return linear_grad_rows(g, loss_average, kfac_approx)

    def grad_matrix(self, module: nn.Embedding, *, block: str = "") -> Tensor | None:
        grad = module.weight.grad
        if grad is None:
            return None
        if grad.is_sparse:
            raise ValueError("SINGD does not support sparse embedding gradients.")
        return grad.T

    def split_matrix(self, module: nn.Embedding, mat: Tensor) -> list[Tensor]:
        return [mat.T]

    def protected(self, module: nn.Embedding) -> list[tuple[nn.Parameter, Any]]:
        if module.padding_idx is None:
            return []
        return [(module.weight, module.padding_idx)]
