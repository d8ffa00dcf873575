"""A zoo of small real architectures, each trained by ONE SINGD object.

Every model trains a few steps in float32 and in pure bfloat16 (parameters,
activations and preconditioners): the loss drops, every trainable parameter changes,
nothing becomes NaN, and every trainable parameter is either preconditioned or named
in ``fallback_parameters`` (none is left untrained).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from torchsingd import SINGD


class ViT(nn.Module):
    """Patch embedding (Conv2d), class token, positional embedding, encoder, head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, 16, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, 16))
        self.pos = nn.Parameter(torch.randn(1, 5, 16) * 0.02)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1) + self.pos
        return self.head(self.encoder(tokens)[:, 0])


class GPT(nn.Module):
    """Causal LM: tied token embedding / output projection, learned positions."""

    def __init__(self, vocab: int = 13, width: int = 16, length: int = 6) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(1, length, width) * 0.02)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 32), nn.GELU(), nn.Linear(32, width))
        self.out = nn.Linear(width, vocab, bias=False)
        self.out.weight = self.tok.weight  # tied
        self.register_buffer("mask", torch.triu(torch.ones(length, length), 1).bool())

    def forward(self, ids):
        h = self.tok(ids) + self.pos[:, : ids.shape[1]]
        a, _ = self.attn(h, h, h, attn_mask=self.mask, need_weights=False)
        h = self.norm(h + a)
        return self.out(h + self.mlp(h))


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        ResBlock(8),
        ResBlock(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def cnn1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(1, 8, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(8, 8, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def cnn3d() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv3d(4, 4, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8, 3),
    )


class UNet(nn.Module):
    """Segmentation: a strided Conv2d down, a ConvTranspose2d up, a skip connection and
    a per-pixel 1x1 head (output ``[B, H, W, classes]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.inc = nn.Conv2d(1, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 2, stride=2)
        self.up = nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1)
        self.norm = nn.GroupNorm(2, 16)
        self.head = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        skip = torch.relu(self.inc(x))
        up = torch.relu(self.up(torch.relu(self.down(skip))))
        return self.head(self.norm(torch.cat([skip, up], 1))).permute(0, 2, 3, 1)


def _pixels(gen):
    """Images and per-pixel classes (the pixel's value in three bands)."""
    x = torch.randn(12, 1, 8, 8, generator=gen)
    return x, ((x > -0.5).long() + (x > 0.5).long()).squeeze(1)


class BagOfWords(nn.Module):
    """Mean of token embeddings (padding ignored) and a linear classifier."""

    def __init__(self, vocab: int = 20, width: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width, padding_idx=0)
        self.head = nn.Linear(width, 3)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


class BagOfWordsOffsets(nn.Module):
    """EmbeddingBag over a flat token list with offsets (bags of sizes 1..7), summed."""

    def __init__(self, vocab: int = 20, width: int = 8) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(vocab, width, mode="sum", padding_idx=0)
        self.head = nn.Linear(width, 3)

    def forward(self, ids):
        sizes = torch.arange(len(ids), device=ids.device) % ids.shape[1] + 1
        flat = torch.cat([row[:n] for row, n in zip(ids, sizes.tolist(), strict=True)])
        offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
        return self.head(self.emb(flat, offsets))


class GCN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torch_geometric.nn import GCNConv

        self.conv1 = GCNConv(6, 16)
        self.conv2 = GCNConv(16, 3)

    def forward(self, data):
        x, edges = data
        return self.conv2(torch.relu(self.conv1(x, edges)), edges)


def _images(shape):
    def make(gen):
        x = torch.randn(12, *shape, generator=gen)
        y = torch.randint(0, 3, (12,), generator=gen)
        return x, y

    return make


def _tokens(vocab, length, lm=False):
    def make(gen):
        ids = torch.randint(1, vocab, (12, length), generator=gen)
        if lm:
            return ids, torch.roll(ids, -1, 1)
        return ids, torch.randint(0, 3, (12,), generator=gen)

    return make


def _graph(gen):
    n = 30
    blocks = torch.arange(n) % 3
    same = blocks[:, None] == blocks[None, :]
    p = torch.where(same, 0.4, 0.03)
    adj = torch.rand(n, n, generator=gen) < p
    adj = torch.triu(adj, 1)
    edges = torch.cat([adj.nonzero().T, adj.nonzero().T.flip(0)], 1)
    x = torch.nn.functional.one_hot(blocks, 6).float() + 0.5 * torch.randn(n, 6, generator=gen)
    return (x, edges), blocks


ZOO = {
    # name: (model factory, data factory, loss_average, integer inputs)
    "vit": (ViT, _images((1, 8, 8)), "batch"),
    "gpt": (GPT, _tokens(13, 6, lm=True), "batch+sequence"),
    "resnet": (resnet, _images((1, 6, 6)), "batch"),
    "cnn1d": (cnn1d, _images((1, 16)), "batch"),
    "cnn3d": (cnn3d, _images((1, 5, 5, 5)), "batch"),
    "unet": (UNet, _pixels, "batch"),
    "bag_of_words": (BagOfWords, _tokens(20, 7), "batch"),
    "embedding_bag": (BagOfWordsOffsets, _tokens(20, 7), "batch"),
    "gcn": (GCN, _graph, "batch"),
}


def _cast(x, dtype):
    if isinstance(x, tuple):
        return tuple(_cast(t, dtype) for t in x)
    return x.to(dtype) if x.is_floating_point() else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_trains_with_one_optimizer(name, dtype):
    if name == "gcn":
        pytest.importorskip("torch_geometric")
    make_model, make_data, loss_average = ZOO[name]
    torch.manual_seed(0)
    model = make_model().to(dtype)
    x, y = make_data(torch.Generator().manual_seed(1))
    x = _cast(x, dtype)
    opt = SINGD(
        model,
        lr=0.02,
        lr_cov=0.05,
        damping=1e-2,
        T=2,
        momentum=0.9,
        loss_average=loss_average,
        structures=("blockdiagonal:8", "diagonal"),
        warn_unsupported=False,
        fallback_lr=0.01,
    )
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    covered = set(opt.fallback_parameters)
    for entry in opt._entries.values():
        for p in entry.adapter.params(entry.module):
            covered.update(n for n, q in trainable.items() if q is p)
    assert covered == set(trainable), set(trainable) - covered  # nothing left untrained
    before = {n: p.detach().clone() for n, p in trainable.items()}
    losses = []
    for _ in range(20):
        opt.zero_grad()
        out = model(x).float()
        loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    assert opt.skipped_steps == 0
    for n, p in trainable.items():
        assert torch.isfinite(p).all(), n
        assert not torch.equal(p, before[n]), f"{n} did not change"
    for layer in opt.layers.values():
        for factor in layer.factors().values():
            if factor is not None:
                assert factor.dtype == dtype and factor.is_finite()
