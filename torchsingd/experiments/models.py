"""The small models of the comparison tasks (every layer type SINGD preconditions)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def digits_mlp() -> nn.Module:
    """MLP 64-128-128-10 with ReLU: ``[B, 1, 8, 8]`` -> logits ``[B, 10]``."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def digits_cnn() -> nn.Module:
    """Two 3x3 Conv2d blocks with max-pooling and a linear head: ``[B, 1, 8, 8]`` -> ``[B, 10]``."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # [B, 16, 4, 4]
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # [B, 32, 2, 2]
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def mnist1d_cnn() -> nn.Module:
    """Three Conv1d layers and a linear head: ``[B, 1, 40]`` -> logits ``[B, 10]``."""
    return nn.Sequential(
        nn.Conv1d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool1d(2),  # [B, 32, 20]
        nn.Conv1d(32, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool1d(2),  # [B, 32, 10]
        nn.Conv1d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(320, 10),
    )


def autoencoder() -> nn.Module:
    """Deep MLP autoencoder 64-128-64-32-8-32-64-128-64 (tanh, sigmoid output).

    ``[B, 1, 8, 8]`` -> reconstruction ``[B, 64]`` in (0, 1), through an 8-unit code.
    """
    sizes = (64, 128, 64, 32, 8, 32, 64, 128, 64)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers += [nn.Linear(d_in, d_out), nn.Tanh() if i < len(sizes) - 2 else nn.Sigmoid()]
    return nn.Sequential(*layers)


class CharTransformer(nn.Module):
    """Causal transformer language model over characters (pre-norm encoder layers).

    ``[B, L]`` int64 characters -> next-character logits ``[B, L, vocab]``. Token
    ``nn.Embedding``, a learned positional ``nn.Parameter`` (trained by SINGD's
    fallback rule), ``nn.TransformerEncoder`` with a causal mask, a final
    ``nn.LayerNorm`` and a linear head.
    """

    def __init__(
        self,
        vocab: int,
        context: int,
        d_model: int = 32,
        heads: int = 2,
        layers: int = 2,
        d_ff: int = 64,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.zeros(context, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, heads, d_ff, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        L = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(L, dtype=self.position.dtype)
        h = self.embed(tokens) + self.position[:L]
        h = self.encoder(h, mask=mask, is_causal=True)
        return self.head(self.norm(h))


class CharLSTM(nn.Module):
    """Recurrent language model over characters: ``[B, L]`` int64 characters ->
    next-character logits ``[B, L, vocab]`` through an ``nn.Embedding``, a 2-layer
    ``nn.LSTM`` and a linear head (every parameter preconditioned by SINGD)."""

    def __init__(self, vocab: int, d_embed: int = 32, hidden: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_embed)
        self.rnn = nn.LSTM(d_embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])
