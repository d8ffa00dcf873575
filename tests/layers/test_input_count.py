"""``LayerAdapter.input_count``: the number of input rows ``N_a`` a capture has.

It weights a rank's input-side statistic when ranks are combined, so it must equal
the rows ``input_rows`` builds, for every built-in adapter, counted from shapes
alone. Checked two ways: against ``input_rows(...).shape[0]`` on the very input the
optimizer captured, and against an independent count from the layer's output
(``"expand"``: one row per output position, ``numel / d_out``; ``"reduce"``: one
row per sample).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchsingd import SINGD
from torchsingd import distributed as tdist
from torchsingd.layers import get_adapter
from torchsingd.layers.base import LayerAdapter

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


CASES = {
    "linear-1d": (lambda: nn.Linear(3, 2), lambda: _x(3), 1),
    "linear-2d": (lambda: nn.Linear(3, 2), lambda: _x(5, 3), 5),
    "linear-4d": (lambda: nn.Linear(3, 2, bias=False), lambda: _x(2, 3, 4, 3), 2),
    "conv1d-stride-dilation": (
        lambda: nn.Conv1d(2, 4, 3, stride=2, dilation=2),
        lambda: _x(3, 2, 11),
        3,
    ),
    "conv2d-same-reflect": (
        lambda: nn.Conv2d(2, 3, (2, 3), padding="same", padding_mode="reflect"),
        lambda: _x(2, 2, 5, 6),
        2,
    ),
    "conv2d-groups-pad": (
        lambda: nn.Conv2d(4, 4, 3, padding=(2, 1), groups=2, stride=(1, 2)),
        lambda: _x(2, 4, 5, 7),
        2,
    ),
    "conv2d-unbatched-circular": (
        lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
        lambda: _x(2, 4, 4),
        1,
    ),
    "conv3d-valid": (
        lambda: nn.Conv3d(1, 2, (2, 1, 3), padding="valid"),
        lambda: _x(2, 1, 3, 2, 4),
        2,
    ),
    "convT1d-stride-outpad": (
        lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1),
        lambda: _x(2, 2, 5),
        2,
    ),
    "convT2d-dilation-groups": (
        lambda: nn.ConvTranspose2d(4, 2, 3, stride=(2, 1), dilation=(1, 2), groups=2),
        lambda: _x(3, 4, 3, 4),
        3,
    ),
    "embedding-0d": (lambda: nn.Embedding(7, 3), lambda: torch.tensor(4), 1),
    "embedding-1d": (lambda: nn.Embedding(7, 3), lambda: torch.tensor([1, 2, 2, 6]), 4),
    "embedding-2d": (lambda: nn.Embedding(7, 3), lambda: torch.tensor([[1, 2, 3], [0, 0, 6]]), 2),
}


class _Wrap(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _observed_counts(module, x, approx, monkeypatch, **forward_kwargs):
    """One forward and backward pass as rank 0 of 2 (the counts are asked only where
    ranks are combined); return ``(input_count, rows of input_rows)`` per capture and
    the optimizer's recorded rows per block."""
    monkeypatch.setattr(tdist, "world", lambda group=None: (0, 2))
    torch.manual_seed(0)
    model = module if forward_kwargs else _Wrap(module)
    opt = SINGD(model, lr=0.0, T=1, kfac_approx=approx, warn_unsupported=False)
    seen = []
    for entry in opt._entries.values():
        adapter = entry.adapter
        original = type(adapter).input_count

        def counted(mod, xin, kfac_approx, *, block="", adapter=adapter, original=original):
            n = original(adapter, mod, xin, kfac_approx, block=block)
            rows = adapter.input_rows(mod, xin, kfac_approx, block=block).shape[0]
            seen.append((n, rows))
            return n

        monkeypatch.setattr(adapter, "input_count", counted)
    out = model(x, **forward_kwargs)
    out = out[0] if isinstance(out, tuple) else out
    (out.double() ** 2).sum().backward()
    recorded = {name: layer.rows for name, layer in opt.layers.items()}
    return out, seen, recorded


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", list(CASES))
def test_input_count_equals_the_rows_built(name, approx, monkeypatch):
    make, inputs, batch = CASES[name]
    module, x = make(), inputs()
    out, seen, recorded = _observed_counts(module, x, approx, monkeypatch)
    assert len(seen) == 1
    (n, rows) = seen[0]
    assert n == rows
    d_out = (
        out.shape[-1]
        if isinstance(module, (nn.Linear, nn.Embedding))
        else out.shape[-len(module.kernel_size) - 1]
    )
    expected = out.numel() // d_out if approx == "expand" else batch
    assert n == expected
    assert list(recorded.values()) == [float(expected)]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("batch_first, unbatched", [(True, False), (False, False), (False, True)])
def test_attention_input_count(approx, batch_first, unbatched, monkeypatch):
    mha = nn.MultiheadAttention(4, 2, batch_first=batch_first, kdim=3, vdim=5)
    L, S, B = 3, 4, 2
    if unbatched:
        q, k, v = _x(L, 4), _x(S, 3), _x(S, 5)
    elif batch_first:
        q, k, v = _x(B, L, 4), _x(B, S, 3), _x(B, S, 5)
    else:
        q, k, v = _x(L, B, 4), _x(S, B, 3), _x(S, B, 5)
    _, seen, recorded = _observed_counts(mha, q, approx, monkeypatch, key=k, value=v)
    assert len(seen) == 4 and all(n == rows for n, rows in seen)
    batch = 1 if unbatched else B
    if approx == "expand":
        expected = {"q": batch * L, "k": batch * S, "v": batch * S, "out": batch * L}
    else:
        expected = dict.fromkeys(("q", "k", "v", "out"), batch)
    by_block = {name.rsplit(".", 1)[-1]: rows for name, rows in recorded.items()}
    assert by_block == {b: float(expected[b]) for b in ("q", "k", "v", "out")}


def test_embedding_bag_input_count(monkeypatch):
    bag = nn.EmbeddingBag(9, 3, mode="mean")
    idx = torch.tensor([1, 2, 4, 5, 4, 3, 2, 8])
    offsets = torch.tensor([0, 2, 5])

    class Bags(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = bag

        def forward(self, x):
            return self.bag(x, offsets)

    _, seen, recorded = _observed_counts(Bags(), idx, "expand", monkeypatch)
    assert seen == [(3, 3)] and list(recorded.values()) == [3.0]


class _RowsOnly(LayerAdapter):
    """A user adapter with only the required methods: the default ``input_count``."""

    def dims(self, module, *, block=""):
        return module.weight.shape[1], module.weight.shape[0]

    def is_batched(self, module, x):
        return x.ndim >= 2

    def input_rows(self, module, x, kfac_approx, *, block=""):
        a = x.reshape(-1, x.shape[-1]) if kfac_approx == "expand" else x.mean(1)
        return a / a.shape[0] ** 0.5

    def grad_rows(self, module, g, loss_average, kfac_approx, *, block=""):
        return g.reshape(-1, g.shape[-1])


@pytest.mark.parametrize("shape", [(3,), (5, 3), (4, 2, 3)])
def test_default_input_count_of_a_user_adapter(shape):
    x = _x(*shape)
    module = nn.Linear(3, 2, bias=False)
    adapter = _RowsOnly()
    for approx in ("expand", "reduce") if len(shape) == 3 else ("expand",):
        rows = adapter.input_rows(module, x if x.ndim > 1 else x[None], approx).shape[0]
        got = adapter.input_count(module, x if x.ndim > 1 else x[None], approx)
        assert got == rows == (x.numel() // 3 if approx == "expand" else shape[0])


@pytest.mark.parametrize("loss_average", [None, "batch", "batch+sequence"])
@pytest.mark.parametrize("name", list(CASES))
def test_loss_terms_is_what_grad_rows_scales_by(name, loss_average):
    """``loss_terms`` is the ``n`` of ALGORITHM.md section 2: ``grad_rows`` with it
    equals ``grad_rows`` of a sum loss times ``sqrt(n)``; ``n`` is the batch size
    for ``"batch"`` and one per output position for ``"batch+sequence"``."""
    make, inputs, batch = CASES[name]
    module, x = make(), inputs()
    adapter = get_adapter(module)
    out = module(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    n = adapter.loss_terms(module, g, loss_average)
    conv = not isinstance(module, (nn.Linear, nn.Embedding))
    d_out = out.shape[-len(module.kernel_size) - 1] if conv else out.shape[-1]
    expected = {None: 1, "batch": batch, "batch+sequence": out.numel() // d_out}
    assert n == expected[loss_average]
    for approx in ("expand", "reduce"):
        summed = adapter.grad_rows(module, g, None, approx)
        scaled = adapter.grad_rows(module, g, loss_average, approx)
        torch.testing.assert_close(scaled, summed * n**0.5)


@pytest.mark.parametrize("unbatched", [False, True])
def test_attention_loss_terms(unbatched):
    mha = nn.MultiheadAttention(4, 2)
    adapter = get_adapter(mha)
    g = _x(3, 4) if unbatched else _x(3, 2, 4)  # [L, (B,) E]: batch_first=False
    g = g if unbatched else g.transpose(0, 1)  # the adapter sees batch-first rows
    for loss_average, n in [
        (None, 1),
        ("batch", 1 if unbatched else 2),
        ("batch+sequence", 3 if unbatched else 6),
    ]:
        assert adapter.loss_terms(mha, g, loss_average, block="q") == n
        torch.testing.assert_close(
            adapter.grad_rows(mha, g, loss_average, "expand", block="q"),
            adapter.grad_rows(mha, g, None, "expand", block="q") * n**0.5,
        )


def test_a_single_process_asks_no_counts(monkeypatch):
    """The counts weight ranks; a single process does not ask for them (a user
    adapter's default ``input_count`` may build the rows again)."""

    def refuse(*args, **kwargs):
        raise AssertionError("counted in a single process")

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = SINGD(model, T=1)
    for adapter in {id(e.adapter): e.adapter for e in opt._entries.values()}.values():
        monkeypatch.setattr(adapter, "input_count", refuse)
        monkeypatch.setattr(adapter, "loss_terms", refuse)
    model(_x(5, 3)).square().sum().backward()
    assert all(layer.pending is not None for layer in opt.layers.values())
    opt.step()
