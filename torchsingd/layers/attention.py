"""``nn.MultiheadAttention``: its four projections, each preconditioned by SINGD.

The blocks are ``"q"``, ``"k"``, ``"v"`` (rows of the packed ``in_proj_weight``, or the
separate ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ, plus the matching slices of
``in_proj_bias``) and ``"out"`` (``out_proj``). ``F.multi_head_attention_forward``
applies the projections internally, where no hook can see them, so while the
optimizer is attached the module's forward computes the projections itself (batch
first), hands them to ``F.multi_head_attention_forward`` with identity projection
weights (masks, dropout, ``bias_k``/``bias_v``, ``add_zero_attn``, ``need_weights`` and
``is_causal`` keep PyTorch's own semantics), and applies ``out_proj`` itself. This costs
four extra ``E x E`` identity products per token, except in calls that return no
weights and have no padding mask, no ``bias_k``/``bias_v``, no zero attention and no
mask (or a causal one flagged ``is_causal``), e.g. ``nn.TransformerEncoderLayer``'s:
these call ``F.scaled_dot_product_attention`` on the projections directly, as PyTorch's
function does after its projections. It is used only in forward passes whose backward
is observed (grad enabled, a preconditioner-update step); other forward passes run
PyTorch's own (possibly fused) implementation. ``bias_k`` and ``bias_v`` are
trained by the fallback rule. Unbatched ``[L, E]`` inputs count as one sequence.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchsingd.layers.base import (
    LayerAdapter,
    Observer,
    install_forward,
    linear_grad_rows,
    linear_input_count,
    linear_input_rows,
)

BLOCKS = ("q", "k", "v", "out")


def _projection(
    module: nn.MultiheadAttention, block: str, grads: bool = False
) -> tuple[Tensor | None, Tensor | None]:
    """``(weight, bias)`` of a block as views into the module's parameters, or into their
    gradients with ``grads=True`` (``None`` where a bias or a gradient is missing)."""
    E = module.embed_dim
    if block == "out":
        weight, bias, rows = module.out_proj.weight, module.out_proj.bias, slice(None)
    else:
        i = "qkv".index(block)
        rows = slice(i * E, (i + 1) * E)
        packed = module._qkv_same_embed_dim
        weight = module.in_proj_weight if packed else getattr(module, f"{block}_proj_weight")
        bias = module.in_proj_bias
    if grads:
        weight = weight.grad
        bias = None if bias is None else bias.grad
    if weight is not None and (block == "out" or module._qkv_same_embed_dim):
        weight = weight[rows]
    return weight, None if bias is None else bias[rows]


class MultiheadAttentionAdapter(LayerAdapter):
    def blocks(self, module: nn.MultiheadAttention) -> tuple[str, ...]:
        return BLOCKS

    def params(self, module: nn.MultiheadAttention) -> list[nn.Parameter]:
        if module._qkv_same_embed_dim:
            out = [module.in_proj_weight]
        else:
            out = [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]
        if module.in_proj_bias is not None:
            out.append(module.in_proj_bias)
        out.append(module.out_proj.weight)
        if module.out_proj.bias is not None:
            out.append(module.out_proj.bias)
        return out

    def submodules(self, module: nn.MultiheadAttention) -> list[nn.Module]:
        return [module.out_proj]

    def check(self, module: nn.MultiheadAttention, name: str) -> None:
        super().check(module, name)
        frozen = [p for p in self.params(module) if not p.requires_grad]
        if frozen:
            raise ValueError(
                f"MultiheadAttention {name!r} has frozen projection parameters; freeze all "
                "of them or none (partially frozen attention is not supported)."
            )

    def _bias(self, module: nn.MultiheadAttention, block: str) -> bool:
        return _projection(module, block)[1] is not None

    def dims(self, module: nn.MultiheadAttention, *, block: str = "") -> tuple[int, int]:
        weight, bias = _projection(module, block)
        return weight.shape[1] + int(bias is not None), weight.shape[0]

    def has_gradient(self, module: nn.MultiheadAttention, *, block: str = "") -> bool:
        return _projection(module, block, grads=True)[0] is not None

    def grad_matrix(self, module: nn.MultiheadAttention, *, block: str = "") -> Tensor | None:
        wgrad, bgrad = _projection(module, block, grads=True)
        if wgrad is None or not self._bias(module, block):
            return wgrad
        if bgrad is None:
            bgrad = torch.zeros(wgrad.shape[0], dtype=wgrad.dtype, device=wgrad.device)
        return torch.cat([wgrad, bgrad.unsqueeze(1)], dim=1)

    def directions(self, module: nn.MultiheadAttention, mats: dict[str, Tensor]) -> list[Tensor]:
        def w(b: str) -> Tensor:
            return mats[b][:, :-1] if self._bias(module, b) else mats[b]

        out: list[Tensor] = []
        if module._qkv_same_embed_dim:
            out.append(torch.cat([w("q"), w("k"), w("v")]))
        else:
            out += [w("q"), w("k"), w("v")]
        if module.in_proj_bias is not None:
            out.append(torch.cat([mats[b][:, -1] for b in "qkv"]))
        out.append(w("out"))
        if module.out_proj.bias is not None:
            out.append(mats["out"][:, -1])
        return out

    def input_rows(self, module, x: Tensor, kfac_approx: str, *, block: str = ""):
        if x.ndim == 2:  # unbatched [L, E]: one sequence
            x = x.unsqueeze(0)
        return linear_input_rows(x, kfac_approx, self._bias(module, block))

    def rows_key(self, module, x: Tensor, *, block: str = "") -> tuple:
        # (query, key and value of a self-attention read one input)
        return (type(self), self._bias(module, block))

    def input_count(self, module, x: Tensor, kfac_approx: str, *, block: str = ""):
        return linear_input_count(x.unsqueeze(0) if x.ndim == 2 else x, kfac_approx)

    def loss_terms(self, module, g: Tensor, loss_average, *, block: str = ""):
        return super().loss_terms(module, g.unsqueeze(0) if g.ndim == 2 else g, loss_average)

    def grad_rows(self, module, g: Tensor, loss_average, kfac_approx: str, *, block: str = ""):
        if g.ndim == 2:
            g = g.unsqueeze(0)
        return linear_grad_rows(g, loss_average, kfac_approx)

    def block_parameter(self, module: nn.MultiheadAttention, *, block: str = "") -> nn.Parameter:
        if block == "out":
            return module.out_proj.weight
        if module._qkv_same_embed_dim:
            return module.in_proj_weight
        return getattr(module, f"{block}_proj_weight")

    def install(self, module: nn.MultiheadAttention, observer: Observer) -> list[Any]:
        return install_forward(module, observer, _observed_forward)


def _observed_forward(
    module: nn.MultiheadAttention,
    observer: Observer,
    query,
    key,
    value,
    key_padding_mask=None,
    need_weights=True,
    attn_mask=None,
    average_attn_weights=True,
    is_causal=False,
):
    batched = query.dim() == 3
    if batched and not module.batch_first:  # projections are captured batch first
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    projected = []
    for block, x in zip("qkv", (query, key, value), strict=True):
        weight, bias = _projection(module, block)
        y = F.linear(x, weight, bias)
        observer(module, block, x, y)
        projected.append(y.transpose(0, 1) if batched else y)
    if batched and _plain_attention(module, key_padding_mask, need_weights, attn_mask, is_causal):
        z, weights = _attend(module, *(t.transpose(0, 1) for t in projected), is_causal), None
    else:
        z, weights = _attend_general(
            module,
            projected,
            key_padding_mask,
            need_weights,
            attn_mask,
            average_attn_weights,
            is_causal,
        )
        if batched:
            z = z.transpose(0, 1)
    weight, bias = _projection(module, "out")
    out = F.linear(z, weight, bias)
    observer(module, "out", z, out)
    if batched and not module.batch_first:
        out = out.transpose(0, 1)
    return out, weights


def _plain_attention(module, key_padding_mask, need_weights, attn_mask, is_causal) -> bool:
    """Whether ``F.multi_head_attention_forward`` would reduce to one
    ``F.scaled_dot_product_attention`` of the projections without a mask tensor: no
    weights returned, no padding mask, no ``bias_k``/``bias_v`` or zero attention, and
    no attention mask or a causal one flagged ``is_causal`` (which it then drops)."""
    if need_weights or key_padding_mask is not None:
        return False
    if module.bias_k is not None or module.bias_v is not None or module.add_zero_attn:
        return False
    return (attn_mask is None and not is_causal) or (attn_mask is not None and is_causal)


def _attend(module: nn.MultiheadAttention, q: Tensor, k: Tensor, v: Tensor, is_causal: bool):
    """``F.multi_head_attention_forward``'s core for :func:`_plain_attention` calls,
    without its identity projections: heads split from the batch-first projections
    ``[N, S, E]`` (views), one ``scaled_dot_product_attention`` (the same call, so the
    same dropout draw), heads merged back to ``[N, L, E]``."""
    N, L, E = q.shape
    H = module.num_heads

    def heads(t: Tensor) -> Tensor:  # [N, S, E] -> [N, H, S, E / H]
        return t.unflatten(-1, (H, E // H)).transpose(1, 2)

    dropout = module.dropout if module.training else 0.0
    z = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), None, dropout, is_causal)
    return z.transpose(1, 2).reshape(N, L, E)


def _attend_general(
    module, projected, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
):
    """Every other call: PyTorch's own function with identity projection weights."""
    E = module.embed_dim
    eye = torch.eye(E, dtype=projected[0].dtype, device=projected[0].device)
    z, weights = F.multi_head_attention_forward(
        projected[0],
        projected[1],
        projected[2],
        E,
        module.num_heads,
        None,
        None,
        module.bias_k,
        module.bias_v,
        module.add_zero_attn,
        module.dropout,
        eye,
        None,
        training=module.training,
        key_padding_mask=key_padding_mask,
        need_weights=need_weights,
        attn_mask=attn_mask,
        use_separate_proj_weight=True,
        q_proj_weight=eye,
        k_proj_weight=eye,
        v_proj_weight=eye,
        average_attn_weights=average_attn_weights,
        is_causal=is_causal,
    )
    return z, weights
