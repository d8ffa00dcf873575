"""Blocks that read one input tensor share its Gram (``KroneckerOptimizer._input_statistic``).

An attention's query, key and value projections (and separate ``nn.Linear``
projections of one hidden state) make the same input rows: the Gram of those rows is
computed once per backward pass and each block applies its own ``K``. The oracle is the
same optimizer with sharing switched off: training must be equal bit for bit, with
fewer Grams computed.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import torchsingd.structures.base as structures_base
from torchsingd import KFAC, SINGD
from torchsingd.layers import LayerAdapter, register_layer, unregister_layer
from torchsingd.layers.linear import LinearAdapter

F64 = torch.float64


class Net(nn.Module):
    """Self-attention (``q``, ``k``, ``v`` read ``x``), three linear projections of one
    hidden state (``q`` and ``k`` with a bias share; ``v`` has none: other rows), and a
    head on another tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.q, self.k = nn.Linear(6, 4), nn.Linear(6, 4)
        self.v = nn.Linear(6, 4, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.attn(x, x, x, need_weights=False)[0] + x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        s = torch.softmax(q @ k.transpose(1, 2), -1) @ v
        return self.head(s.mean(1))


def _train(make_opt, share: bool, monkeypatch, steps: int = 3):
    """Parameters after ``steps`` steps (two micro-batches each, the second with two
    losses through one forward) and the number of input Grams computed."""
    torch.manual_seed(0)
    model = Net().to(F64)
    opt = make_opt(model)
    if not share:
        monkeypatch.setattr(opt, "_shared_input", lambda *args: None)
    grams = []
    original = LayerAdapter._input_sum

    def spy(self, *args, **kwargs):
        by_gram, H = original(self, *args, **kwargs)
        grams.append(by_gram)
        return by_gram, H

    monkeypatch.setattr(LayerAdapter, "_input_sum", spy)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(4, 8, 6, generator=g, dtype=F64)
        model(x).square().mean().backward()
        del x  # (its memory may be taken by the next micro-batch's input)
        gc.collect()
        out = model(torch.randn(3, 8, 6, generator=g, dtype=F64))
        out[:, 0].sum().backward(retain_graph=True)  # two losses, one forward
        out[:, 1:].square().sum().backward()
        opt.step()
        assert not opt._inputs  # emptied by the step
    monkeypatch.setattr(LayerAdapter, "_input_sum", original)
    return [p.detach().clone() for p in model.parameters()], grams


OPTIMIZERS = {
    "singd-dense": lambda m: SINGD(m, structures="dense", lr=0.1, T=1),
    "singd-hierarchical": lambda m: SINGD(m, structures="hierarchical:2,1", lr=0.1, T=1),
    "singd-blockdiagonal": lambda m: SINGD(m, structures="blockdiagonal:2", lr=0.1, T=1),
    "singd-triltoeplitz": lambda m: SINGD(m, structures="triltoeplitz", lr=0.1, T=1),
    "singd-diagonal": lambda m: SINGD(m, structures="diagonal", lr=0.1, T=1),
    "kfac": lambda m: KFAC(m, lr=0.1, T=1),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_blocks_reading_one_input_share_its_gram(monkeypatch, name):
    monkeypatch.setattr(structures_base, "GRAM_MIN_NUMEL", 0)  # the Gram route at this size
    shared, grams_shared = _train(OPTIMIZERS[name], True, monkeypatch)
    alone, grams_alone = _train(OPTIMIZERS[name], False, monkeypatch)
    for a, b in zip(shared, alone, strict=True):
        assert torch.equal(a, b)
    # per forward (3 steps, 2 forwards each): attention q, k, v (one input), out;
    # linear q, k (one input and rows), v; the head (a few rows: no Gram route)
    assert len(grams_alone) == 3 * 2 * 8
    if name == "singd-diagonal":  # (no Gram route: every block its own statistic)
        assert not any(grams_alone) and len(grams_shared) == len(grams_alone)
    elif name == "kfac":  # (its statistic is the Gram itself, at any size)
        assert all(grams_alone) and all(grams_shared) and len(grams_shared) == 3 * 2 * 5
    else:
        assert sorted(grams_alone) == 3 * 2 * [False] + 3 * 2 * 7 * [True]
        assert sorted(grams_shared) == 3 * 2 * [False] + 3 * 2 * 4 * [True]


def test_no_gram_route_no_sharing(monkeypatch):
    """Below the Gram route's size (the default rule here) nothing is shared: each
    block computes its statistic directly, as before."""
    shared, grams_shared = _train(OPTIMIZERS["singd-hierarchical"], True, monkeypatch)
    alone, grams_alone = _train(OPTIMIZERS["singd-hierarchical"], False, monkeypatch)
    for a, b in zip(shared, alone, strict=True):
        assert torch.equal(a, b)
    assert not any(grams_shared) and len(grams_shared) == len(grams_alone) == 3 * 2 * 8


class SpiedLinear(nn.Linear):
    pass


class OwnStatistic(LinearAdapter):
    """A user adapter with its own ``input_statistic`` (inherits ``rows_key``)."""

    calls = 0

    def input_statistic(self, module, x, K, kfac_approx, *, block=""):
        OwnStatistic.calls += 1
        return super().input_statistic(module, x, K, kfac_approx, block=block)


def test_an_adapter_with_its_own_statistic_is_asked_for_every_block(monkeypatch):
    monkeypatch.setattr(structures_base, "GRAM_MIN_NUMEL", 0)
    register_layer(SpiedLinear, OwnStatistic())
    try:
        torch.manual_seed(0)
        layers = nn.ModuleList(SpiedLinear(5, 2) for _ in range(3))
        opt = SINGD(layers, structures="hierarchical:2,1", T=1)
        x = torch.randn(8, 5)
        OwnStatistic.calls = 0
        sum(layer(x).square().sum() for layer in layers).backward()
        opt.step()
        assert OwnStatistic.calls == 3
    finally:
        unregister_layer(SpiedLinear)


def test_shared_grams_are_dropped_after_the_last_capture(monkeypatch):
    """The Gram is kept only until every block that joined has been captured; a block
    whose backward never comes (not in the loss) keeps it until the step."""
    monkeypatch.setattr(structures_base, "GRAM_MIN_NUMEL", 0)
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Linear(5, 2) for _ in range(3))
    opt = SINGD(layers, structures="dense", T=1)
    x = torch.randn(20, 5)  # (more rows than 2 d: the Gram route)
    outs = [layer(x) for layer in layers]
    (record,) = opt._inputs.values()
    assert record.waiting == 3 and not record.grams
    outs[0].sum().backward(retain_graph=True)
    assert record.waiting == 2 and len(record.grams) == 1
    (outs[1].sum() + outs[2].sum()).backward()
    assert record.waiting == 0 and not record.grams
    y = [layer(x) for layer in layers[:2]]  # a new forward of the same input
    assert record.waiting == 2  # (joins the same record: the same memory and version)
    y[0].sum().backward()
    assert record.waiting == 1 and len(record.grams) == 1  # layers[1]'s never comes
    opt.step()
    assert not opt._inputs


class Scaled(nn.Linear):
    scale = 1.0


class ScaledRows(LinearAdapter):
    """Inherits ``rows_key`` but makes its rows another way (scaled per module)."""

    def input_rows(self, module, x, kfac_approx, *, block=""):
        return super().input_rows(module, module.scale * x, kfac_approx, block=block)


def _two_layers_on_one_input(make_layer, share, monkeypatch, between=None):
    """Two layers on one input (their backward passes apart, ``between`` them), one
    step: the layers' factors."""
    torch.manual_seed(0)
    layers = nn.ModuleList(make_layer() for _ in range(2))
    opt = SINGD(layers, structures="hierarchical:2,1", T=1)
    if not share:
        monkeypatch.setattr(opt, "_shared_input", lambda *args: None)
    x = torch.randn(40, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (x itself is not saved)
        ys = [layer(x) for layer in layers]
    ys[0].float().square().sum().backward()
    if between is not None:
        between(x)
    ys[1].float().square().sum().backward()
    opt.step()
    return [t.clone() for layer in opt.layers.values() for t in layer.K.tensors()]


def test_an_input_changed_between_backward_passes_is_read_again(monkeypatch):
    """An input changed in place after the forward (autograd keeps only its bfloat16
    copy here, so it does not object) between the two layers' backward passes: the
    second layer's statistic reads it as changed, as without sharing."""
    monkeypatch.setattr(structures_base, "GRAM_MIN_NUMEL", 0)

    def change(x):
        with torch.no_grad():
            x.mul_(2)

    shared = _two_layers_on_one_input(lambda: nn.Linear(5, 3), True, monkeypatch, change)
    alone = _two_layers_on_one_input(lambda: nn.Linear(5, 3), False, monkeypatch, change)
    for a, b in zip(shared, alone, strict=True):
        assert torch.equal(a, b)


def test_a_subclass_that_makes_other_rows_is_not_shared(monkeypatch):
    from torchsingd.optim.base import _rows_keyed

    assert _rows_keyed(LinearAdapter) and not _rows_keyed(ScaledRows)
    assert not _rows_keyed(OwnStatistic)
    monkeypatch.setattr(structures_base, "GRAM_MIN_NUMEL", 0)
    register_layer(Scaled, ScaledRows())
    try:
        scales = iter([1.0, 3.0, 1.0, 3.0])

        def make():
            layer = Scaled(5, 3)
            layer.scale = next(scales)
            return layer

        shared = _two_layers_on_one_input(make, True, monkeypatch)
        alone = _two_layers_on_one_input(make, False, monkeypatch)
        for a, b in zip(shared, alone, strict=True):
            assert torch.equal(a, b)
    finally:
        unregister_layer(Scaled)
