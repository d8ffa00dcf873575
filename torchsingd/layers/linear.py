"""``nn.Linear`` with any number of leading (batch and shared) dimensions."""

from __future__ import annotations

from torch import Tensor, nn

from torchsingd.layers.base import LayerAdapter, finish_input_rows, loss_terms_scale


class LinearAdapter(LayerAdapter):
    """Inputs ``[B, ..., d_in]``; the dimensions between ``B`` and ``d_in`` are shared."""

    def dims(self, module: nn.Linear) -> tuple[int, int]:
        d_o, d_i = module.weight.shape
        return d_i + int(self.has_bias(module)), d_o

    def input_rows(self, module: nn.Linear, x: Tensor, kfac_approx: str) -> Tensor:
        if x.ndim == 1:
            x = x.unsqueeze(0)
        if kfac_approx == "expand":
            a = x.reshape(-1, x.shape[-1])
        else:
            a = x.reshape(x.shape[0], -1, x.shape[-1]).mean(1)
        return finish_input_rows(a, self.has_bias(module))

    def grad_rows(self, module: nn.Linear, g: Tensor, loss_average, kfac_approx: str) -> Tensor:
        if g.ndim == 1:
            g = g.unsqueeze(0)
        g3 = g.reshape(g.shape[0], -1, g.shape[-1])
        scale = loss_terms_scale(g3.shape[0], g3.shape[1], loss_average)
        rows = g3.reshape(-1, g.shape[-1]) if kfac_approx == "expand" else g3.sum(1)
        return rows * scale
