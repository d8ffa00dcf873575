"""``nn.Linear`` (and torch_geometric's ``Linear``) with any number of leading dimensions.

The dimensions between the first (batch) and the last (features) are shared.
torch_geometric's ``Linear`` (used inside ``GCNConv`` and most graph layers) is not an
``nn.Linear`` subclass; it is registered by name, so torch_geometric is never imported.
For node-level tasks the "batch" is the set of nodes the layer sees.
"""

from __future__ import annotations

from torch import Tensor, nn

from torchsingd.layers.base import (
    LayerAdapter,
    linear_grad_rows,
    linear_input_count,
    linear_input_rows,
)


class LinearAdapter(LayerAdapter):
    def dims(self, module: nn.Module, *, block: str = "") -> tuple[int, int]:
        d_o, d_i = module.weight.shape
        return d_i + int(self.has_bias(module)), d_o

    def is_batched(self, module: nn.Module, x: Tensor) -> bool:
        return x.ndim >= 2  # [N, D] or [B, ..., D] ("reduce" averages the middle only)

    def input_rows(self, module: nn.Module, x: Tensor, kfac_approx: str, *, block: str = ""):
        return linear_input_rows(x, kfac_approx, self.has_bias(module))

    def input_count(self, module: nn.Module, x: Tensor, kfac_approx: str, *, block: str = ""):
        return linear_input_count(x, kfac_approx)

    def rows_key(self, module: nn.Module, x: Tensor, *, block: str = "") -> tuple:
        return (type(self), self.has_bias(module))  # (the rows of x, with a ones column)

    def grad_rows(self, module, g: Tensor, loss_average, kfac_approx: str, *, block: str = ""):
        return linear_grad_rows(g, loss_average, kfac_approx)


class TransposedLinearAdapter(LinearAdapter):
    """A linear map whose weight is stored ``[d_in, d_out]``: ``y = x @ W + b``.

    Hugging Face's GPT-2 family (``transformers.pytorch_utils.Conv1D``, in GPT-2,
    GPT-Neo's predecessors, OpenAI-GPT, CTRL...) stores its projections so; registered
    by name, so transformers is never imported. The Kronecker factors are those of the
    ``nn.Linear`` with weight ``W^T``.
    """

    def dims(self, module: nn.Module, *, block: str = "") -> tuple[int, int]:
        d_i, d_o = module.weight.shape
        return d_i + int(self.has_bias(module)), d_o

    def weight_matrix(self, module: nn.Module, w: Tensor) -> Tensor:
        return w.t()

    def matrix_weight(self, module: nn.Module, mat: Tensor) -> Tensor:
        return mat.t().contiguous()
