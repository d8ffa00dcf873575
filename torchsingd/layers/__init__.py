"""Layer adapters and their registry (one module per layer family).

Supported: ``nn.Linear``, ``nn.Conv1d``/``2d``/``3d``,
``nn.ConvTranspose1d``/``2d``/``3d``, ``nn.Embedding``, ``nn.EmbeddingBag`` (sum, mean),
``nn.MultiheadAttention`` (hence every ``nn.Transformer*`` layer), ``nn.RNN``,
``nn.LSTM``, ``nn.GRU`` and their cells,
torch_geometric's ``Linear`` (inside ``GCNConv`` and most graph layers) and Hugging
Face's ``Conv1D`` (GPT-2's projections, weight stored ``[d_in, d_out]``). Parameters
of other modules are trained by SINGD's fallback rule.
"""

from torch import nn

from torchsingd.layers.attention import MultiheadAttentionAdapter
from torchsingd.layers.base import (
    KFAC_APPROXIMATIONS,
    LOSS_AVERAGES,
    LayerAdapter,
    Observer,
    StepGradients,
    find_adapter,
    get_adapter,
    overrides_forward,
    register_layer,
    unregister_layer,
)
from torchsingd.layers.conv import ConvAdapter, TFSameConvAdapter
from torchsingd.layers.conv_transpose import ConvTransposeAdapter
from torchsingd.layers.embedding import EmbeddingAdapter
from torchsingd.layers.embedding_bag import EmbeddingBagAdapter
from torchsingd.layers.linear import LinearAdapter, TransposedLinearAdapter
from torchsingd.layers.rnn import RNNAdapter, RNNCellAdapter

register_layer(nn.Linear, LinearAdapter())
register_layer("torch_geometric.nn.dense.linear.Linear", LinearAdapter())
register_layer("transformers.pytorch_utils.Conv1D", TransposedLinearAdapter())
# timm's subclasses that override forward (so the nn.Linear / nn.Conv2d adapters are
# not used for them): its Linear is F.linear outside TorchScript; Conv2dSame pads first
for _timm in ("timm.layers", "timm.models.layers"):
    register_layer(f"{_timm}.linear.Linear", LinearAdapter())
    register_layer(f"{_timm}.conv2d_same.Conv2dSame", TFSameConvAdapter())
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer(_conv, ConvAdapter())
for _conv in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_layer(_conv, ConvTransposeAdapter())
register_layer(nn.Embedding, EmbeddingAdapter())
register_layer(nn.EmbeddingBag, EmbeddingBagAdapter())
register_layer(nn.MultiheadAttention, MultiheadAttentionAdapter())
for _rnn in (nn.RNN, nn.LSTM, nn.GRU):
    register_layer(_rnn, RNNAdapter())
for _cell in (nn.RNNCell, nn.LSTMCell, nn.GRUCell):
    register_layer(_cell, RNNCellAdapter())

__all__ = [
    "KFAC_APPROXIMATIONS",
    "LOSS_AVERAGES",
    "ConvAdapter",
    "ConvTransposeAdapter",
    "EmbeddingAdapter",
    "EmbeddingBagAdapter",
    "LayerAdapter",
    "LinearAdapter",
    "MultiheadAttentionAdapter",
    "RNNAdapter",
    "RNNCellAdapter",
    "TFSameConvAdapter",
    "TransposedLinearAdapter",
    "Observer",
    "StepGradients",
    "find_adapter",
    "get_adapter",
    "overrides_forward",
    "register_layer",
    "unregister_layer",
]
