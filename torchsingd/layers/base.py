"""Layer adapters: how one module family becomes the matrices SINGD works with.

The optimizer never asks what kind of layer it holds. For each supported module it
asks the registry for an adapter that answers five questions (after kfac-pytorch's
``ModuleHelper``):

1. ``dims``: ``(d_i, d_o)`` of the weight as a matrix (``d_i`` includes the bias column);
2. ``input_rows``: the layer input as rows ``a`` (``[N_a, d_i]``, ALGORITHM.md section 2);
3. ``grad_rows``: the output gradient as rows ``g`` (``[N_g, d_o]``);
4. ``grad_matrix``: ``grad(W)`` as a ``[d_o, d_i]`` matrix (bias as the last column);
5. ``split_matrix``: a ``[d_o, d_i]`` update back into tensors shaped like the parameters.

Register a new layer type with :func:`register_layer`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from math import sqrt

import torch
from torch import Tensor, nn

KFAC_APPROXIMATIONS = ("expand", "reduce")
LOSS_AVERAGES = (None, "batch", "batch+sequence")


class LayerAdapter(ABC):
    """The five questions about one module family; see the module docstring."""

    def params(self, module: nn.Module) -> list[nn.Parameter]:
        """The parameters the Kronecker-factored preconditioner covers (weight, bias)."""
        out = [module.weight]
        if self.has_bias(module):
            out.append(module.bias)
        return out

    def has_bias(self, module: nn.Module) -> bool:
        """Whether the bias is trained as the extra last column of ``W``."""
        bias = getattr(module, "bias", None)
        return bias is not None and bias.requires_grad

    @abstractmethod
    def dims(self, module: nn.Module) -> tuple[int, int]:
        """``(d_i, d_o)``: sizes of ``K`` and ``C`` for this layer."""

    @abstractmethod
    def input_rows(self, module: nn.Module, x: Tensor, kfac_approx: str) -> Tensor:
        """``a``: ``[N_a, d_i]``, ones column appended for a bias, divided by ``sqrt(N_a)``."""

    @abstractmethod
    def grad_rows(
        self, module: nn.Module, g: Tensor, loss_average: str | None, kfac_approx: str
    ) -> Tensor:
        """``g``: ``[N_g, d_o]``, multiplied by ``sqrt(number of loss terms)``."""

    def grad_matrix(self, module: nn.Module) -> Tensor:
        """``grad(W)`` as ``[d_o, d_i]`` (bias gradient as the last column)."""
        G = module.weight.grad.flatten(start_dim=1)
        if self.has_bias(module):
            G = torch.cat([G, module.bias.grad.unsqueeze(1)], dim=1)
        return G

    def split_matrix(self, module: nn.Module, mat: Tensor) -> list[Tensor]:
        """Split a ``[d_o, d_i]`` matrix into tensors shaped like :meth:`params`."""
        if self.has_bias(module):
            return [mat[:, :-1].reshape_as(module.weight), mat[:, -1].reshape_as(module.bias)]
        return [mat.reshape_as(module.weight)]


def finish_input_rows(a: Tensor, with_bias: bool) -> Tensor:
    """Append a ones column (bias) and divide by ``sqrt(N_a)``."""
    if with_bias:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
    return a / sqrt(a.shape[0])


def loss_terms_scale(batch_size: int, shared_size: int, loss_average: str | None) -> float:
    """``sqrt(n)`` with ``n`` the number of terms the loss averages over."""
    if loss_average is None:
        return 1.0
    if loss_average == "batch":
        return sqrt(batch_size)
    if loss_average == "batch+sequence":
        return sqrt(batch_size * shared_size)
    raise ValueError(f"loss_average must be one of {LOSS_AVERAGES}, got {loss_average!r}.")


_ADAPTERS: dict[type[nn.Module], LayerAdapter] = {}


def register_layer(module_type: type[nn.Module], adapter: LayerAdapter) -> None:
    """Precondition modules of ``module_type`` (and its subclasses) with ``adapter``."""
    if not isinstance(adapter, LayerAdapter):
        raise TypeError(f"adapter must be a LayerAdapter instance, got {type(adapter).__name__}.")
    _ADAPTERS[module_type] = adapter


def get_adapter(module: nn.Module) -> LayerAdapter | None:
    """The adapter for ``module`` (most specific registered base class), or ``None``."""
    for cls in type(module).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    return None
