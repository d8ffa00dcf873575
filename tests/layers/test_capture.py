"""Layer adapters against the rows ``a`` and ``g`` of ALGORITHM.md section 2.

Every expected value is built independently of torchsingd: input rows by explicit
loops over samples, positions and kernel offsets (padding applied by index mapping,
as PyTorch does it), output-gradient rows by explicit loops, and the identity
``grad(W) = sqrt(N_a / n) * g^T a`` (``expand``) checked against autograd.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from torchsingd.layers import get_adapter

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

DTYPE = torch.float64
LOSS_AVERAGES = [None, "batch", "batch+sequence"]
APPROXES = ["expand", "reduce"]


def n_loss_terms(loss_average: str | None, batch: int, shared: int) -> int:
    """``n`` of ALGORITHM.md section 2."""
    return {None: 1, "batch": batch, "batch+sequence": batch * shared}[loss_average]


def capture(module: nn.Module, x: torch.Tensor, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``loss_fn(module(x)).backward()``; return the layer input and output gradient."""
    out = module(x)
    out.retain_grad()
    loss_fn(out).backward()
    return x.detach(), out.grad.detach()


def weighted_loss(shape, average_over: int, seed: int):
    """A loss ``sum(R * out) / average_over`` with a fixed random ``R``."""
    R = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return lambda out: (R * out).sum() / average_over


# --------------------------------------------------------------------- Linear
LINEAR_SHAPES = [(4,), (4, 3), (3, 2, 3)]  # batch, then shared dims (before D)


def expected_linear_rows(x, go, bias, approx, loss_average):
    """``a`` and ``g`` for ``nn.Linear`` by explicit loops over samples and positions."""
    B, shared_shape = x.shape[0], x.shape[1:-1]
    positions = list(itertools.product(*[range(s) for s in shared_shape]))
    S = len(positions)
    a_rows, g_rows = [], []
    for b in range(B):
        xs = [x[(b, *pos)].tolist() + ([1.0] if bias else []) for pos in positions]
        gs = [go[(b, *pos)].tolist() for pos in positions]
        if approx == "expand":
            a_rows += xs
            g_rows += gs
        else:
            a_rows.append([sum(col) / S for col in zip(*xs, strict=True)])
            g_rows.append([sum(col) for col in zip(*gs, strict=True)])
    a = torch.tensor(a_rows, dtype=DTYPE) / math.sqrt(len(a_rows))
    g = torch.tensor(g_rows, dtype=DTYPE) * math.sqrt(n_loss_terms(loss_average, B, S))
    return a, g


@pytest.mark.parametrize("leading", LINEAR_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("approx", APPROXES)
@pytest.mark.parametrize("loss_average", LOSS_AVERAGES, ids=str)
def test_linear_rows(leading, bias, approx, loss_average):
    torch.manual_seed(0)
    D_in, D_out = 5, 3
    layer = nn.Linear(D_in, D_out, bias=bias).to(DTYPE)
    x = torch.randn(*leading, D_in, dtype=DTYPE)
    x_in, go = capture(layer, x, weighted_loss((*leading, D_out), 1, seed=1))
    adapter = get_adapter(layer)

    a = adapter.input_rows(layer, x_in, approx)
    g = adapter.grad_rows(layer, go, loss_average, approx)
    a_exp, g_exp = expected_linear_rows(x_in, go, bias, approx, loss_average)

    assert a.shape == a_exp.shape and g.shape == g_exp.shape
    torch.testing.assert_close(a, a_exp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, g_exp, rtol=1e-12, atol=1e-14)
    assert adapter.dims(layer) == (D_in + int(bias), D_out)
    assert a.shape[1] == adapter.dims(layer)[0] and g.shape[1] == adapter.dims(layer)[1]


@pytest.mark.parametrize("leading", LINEAR_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("loss_average", LOSS_AVERAGES, ids=str)
def test_linear_expand_rows_reproduce_weight_gradient(leading, bias, loss_average):
    """``g^T a = grad(W) * sqrt(n / N_a)`` for a loss averaged over ``n`` terms."""
    torch.manual_seed(2)
    D_in, D_out = 4, 3
    layer = nn.Linear(D_in, D_out, bias=bias).to(DTYPE)
    x = torch.randn(*leading, D_in, dtype=DTYPE)
    B, S = leading[0], math.prod(leading[1:])
    n = n_loss_terms(loss_average, B, S)
    x_in, go = capture(layer, x, weighted_loss((*leading, D_out), n, seed=3))
    adapter = get_adapter(layer)
    a = adapter.input_rows(layer, x_in, "expand")
    g = adapter.grad_rows(layer, go, loss_average, "expand")
    N_a = a.shape[0]
    assert N_a == B * S

    grad_W = layer.weight.grad
    if bias:
        grad_W = torch.cat([grad_W, layer.bias.grad[:, None]], dim=1)
    torch.testing.assert_close(g.T @ a * math.sqrt(N_a / n), grad_W, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(adapter.grad_matrix(layer), grad_W, rtol=0, atol=0)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_split_matrix_roundtrip(bias):
    layer = nn.Linear(4, 3, bias=bias).to(DTYPE)
    adapter = get_adapter(layer)
    M = torch.randn(3, 4 + int(bias), dtype=DTYPE)
    parts = adapter.split_matrix(layer, M)
    assert len(parts) == 1 + int(bias)
    assert torch.equal(parts[0], M[:, :4])
    assert parts[0].shape == layer.weight.shape
    if bias:
        assert torch.equal(parts[1], M[:, 4]) and parts[1].shape == layer.bias.shape


def test_linear_frozen_bias_is_not_a_column():
    layer = nn.Linear(4, 3).to(DTYPE)
    layer.bias.requires_grad_(False)
    adapter = get_adapter(layer)
    assert adapter.dims(layer) == (4, 3)
    a = adapter.input_rows(layer, torch.randn(2, 4, dtype=DTYPE), "expand")
    assert a.shape == (2, 4)


# --------------------------------------------------------------------- Conv2d
def _pads(module: nn.Conv2d) -> list[tuple[int, int]]:
    """``[(top, bottom), (left, right)]`` computed as PyTorch does (not from torchsingd)."""
    pads = []
    for dim in range(2):
        k, d = module.kernel_size[dim], module.dilation[dim]
        if module.padding == "valid":
            pads.append((0, 0))
        elif module.padding == "same":
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        else:
            pads.append((module.padding[dim], module.padding[dim]))
    return pads


def _source_index(i: int, size: int, mode: str) -> int | None:
    """Index into the unpadded axis for padded position ``i`` (``None``: a zero)."""
    if 0 <= i < size:
        return i
    if mode == "zeros":
        return None
    if mode == "reflect":
        return -i if i < 0 else 2 * (size - 1) - i
    if mode == "replicate":
        return min(max(i, 0), size - 1)
    if mode == "circular":
        return i % size
    raise AssertionError(mode)


def expected_conv_patches(module: nn.Conv2d, x: torch.Tensor) -> list[list[list[float]]]:
    """``patches[b][o1 * O2 + o2]``: unfolded patch (channels averaged over groups)."""
    B, C, H, W = x.shape
    G = module.groups
    Cg = C // G
    xl = x.tolist()
    xa = [
        [
            [
                [sum(xl[b][gi * Cg + c][h][w] for gi in range(G)) / G for w in range(W)]
                for h in range(H)
            ]
            for c in range(Cg)
        ]
        for b in range(B)
    ]
    (top, bottom), (left, right) = _pads(module)
    (k1, k2), (d1, d2), (s1, s2) = module.kernel_size, module.dilation, module.stride
    O1 = (H + top + bottom - d1 * (k1 - 1) - 1) // s1 + 1
    O2 = (W + left + right - d2 * (k2 - 1) - 1) // s2 + 1
    mode = module.padding_mode
    patches = []
    for b in range(B):
        rows = []
        for o1 in range(O1):
            for o2 in range(O2):
                row = []
                for c in range(Cg):
                    for i in range(k1):
                        for j in range(k2):
                            h = _source_index(o1 * s1 + i * d1 - top, H, mode)
                            w = _source_index(o2 * s2 + j * d2 - left, W, mode)
                            row.append(0.0 if h is None or w is None else xa[b][c][h][w])
                rows.append(row)
        patches.append(rows)
    return patches


CONV_CASES = {
    "s2_p1_d2": dict(in_channels=4, out_channels=3, kernel_size=3, stride=2, padding=1, dilation=2),
    "s2_p1_d2_g2": dict(
        in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, dilation=2, groups=2
    ),
    "g2_nobias": dict(in_channels=4, out_channels=4, kernel_size=2, groups=2, bias=False),
    "nobias_rect": dict(
        in_channels=3, out_channels=2, kernel_size=(2, 3), stride=(1, 2), padding=(2, 1), bias=False
    ),
    "same_odd": dict(in_channels=3, out_channels=2, kernel_size=3, padding="same"),
    "same_even_asym": dict(
        in_channels=3, out_channels=2, kernel_size=(4, 3), dilation=(1, 2), padding="same"
    ),
    "same_even_g2": dict(
        in_channels=4, out_channels=2, kernel_size=(2, 4), padding="same", groups=2
    ),
    "valid": dict(in_channels=3, out_channels=2, kernel_size=3, padding="valid"),
    "reflect": dict(
        in_channels=3, out_channels=2, kernel_size=3, padding=(1, 2), padding_mode="reflect"
    ),
    "circular_s2": dict(
        in_channels=3, out_channels=2, kernel_size=3, stride=2, padding=2, padding_mode="circular"
    ),
    "replicate_d2": dict(
        in_channels=3,
        out_channels=2,
        kernel_size=2,
        dilation=2,
        padding=(2, 1),
        padding_mode="replicate",
    ),
    "same_even_reflect": dict(
        in_channels=3,
        out_channels=2,
        kernel_size=(2, 3),
        dilation=(2, 1),
        padding="same",
        padding_mode="reflect",
    ),
    "same_even_circular_g3": dict(
        in_channels=3,
        out_channels=3,
        kernel_size=(4, 2),
        padding="same",
        padding_mode="circular",
        groups=3,
    ),
}
INPUT_HW = (7, 6)


def _make_conv(name: str, seed: int = 0) -> tuple[nn.Conv2d, torch.Tensor]:
    torch.manual_seed(seed)
    module = nn.Conv2d(**CONV_CASES[name]).to(DTYPE)
    x = torch.randn(2, module.in_channels, *INPUT_HW, dtype=DTYPE)
    return module, x


@pytest.mark.parametrize("name", list(CONV_CASES))
@pytest.mark.parametrize("approx", APPROXES)
@pytest.mark.parametrize("loss_average", LOSS_AVERAGES, ids=str)
def test_conv2d_rows(name, approx, loss_average):
    module, x = _make_conv(name)
    out_shape = module(x).shape
    x_in, go = capture(module, x, weighted_loss(out_shape, 1, seed=5))
    adapter = get_adapter(module)
    bias = module.bias is not None

    patches = expected_conv_patches(module, x_in)
    B, C_out, O1, O2 = go.shape
    assert len(patches[0]) == O1 * O2  # the explicit output size matches PyTorch's
    if approx == "expand":
        a_rows = [row for sample in patches for row in sample]
    else:
        a_rows = [[sum(c) / (O1 * O2) for c in zip(*sample, strict=True)] for sample in patches]
    if bias:
        a_rows = [row + [1.0] for row in a_rows]
    a_exp = torch.tensor(a_rows, dtype=DTYPE) / math.sqrt(len(a_rows))

    gl = go.tolist()
    if approx == "expand":
        g_rows = [
            [gl[b][c][o1][o2] for c in range(C_out)]
            for b in range(B)
            for o1 in range(O1)
            for o2 in range(O2)
        ]
    else:
        g_rows = [
            [sum(gl[b][c][o1][o2] for o1 in range(O1) for o2 in range(O2)) for c in range(C_out)]
            for b in range(B)
        ]
    g_exp = torch.tensor(g_rows, dtype=DTYPE) * math.sqrt(n_loss_terms(loss_average, B, O1 * O2))

    a = adapter.input_rows(module, x_in, approx)
    g = adapter.grad_rows(module, go, loss_average, approx)
    assert a.shape == a_exp.shape and g.shape == g_exp.shape
    torch.testing.assert_close(a, a_exp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, g_exp, rtol=1e-12, atol=1e-14)

    k1, k2 = module.kernel_size
    d_i = module.in_channels // module.groups * k1 * k2 + int(bias)
    assert adapter.dims(module) == (d_i, module.out_channels)
    assert a.shape[1] == d_i and g.shape[1] == module.out_channels


GROUPS1_CASES = [n for n, kw in CONV_CASES.items() if kw.get("groups", 1) == 1]


@pytest.mark.parametrize("name", GROUPS1_CASES)
@pytest.mark.parametrize("loss_average", LOSS_AVERAGES, ids=str)
def test_conv2d_expand_rows_reproduce_weight_gradient(name, loss_average):
    """``sqrt(N_a / n) g^T a = grad(W)`` (with bias column): validates the unfold order."""
    module, x = _make_conv(name, seed=7)
    out_shape = module(x).shape
    B, n_loc = out_shape[0], out_shape[2] * out_shape[3]
    n = n_loss_terms(loss_average, B, n_loc)
    x_in, go = capture(module, x, weighted_loss(out_shape, n, seed=8))
    adapter = get_adapter(module)
    a = adapter.input_rows(module, x_in, "expand")
    g = adapter.grad_rows(module, go, loss_average, "expand")
    N_a = a.shape[0]
    assert N_a == B * n_loc

    grad_W = module.weight.grad.reshape(module.out_channels, -1)
    if module.bias is not None:
        grad_W = torch.cat([grad_W, module.bias.grad[:, None]], dim=1)
    torch.testing.assert_close(g.T @ a * math.sqrt(N_a / n), grad_W, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(adapter.grad_matrix(module), grad_W, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["s2_p1_d2_g2", "nobias_rect"])
def test_conv2d_split_matrix_roundtrip(name):
    module, _ = _make_conv(name)
    adapter = get_adapter(module)
    d_i, d_o = adapter.dims(module)
    M = torch.randn(d_o, d_i, dtype=DTYPE)
    parts = adapter.split_matrix(module, M)
    assert parts[0].shape == module.weight.shape
    assert torch.equal(parts[0].reshape(d_o, -1), M[:, : module.weight[0].numel()])
    if module.bias is not None:
        assert torch.equal(parts[1], M[:, -1])


def test_conv2d_dims_examples():
    adapter = get_adapter(nn.Conv2d(4, 6, 3, groups=2))
    assert adapter.dims(nn.Conv2d(4, 6, 3, groups=2)) == (2 * 9 + 1, 6)
    assert adapter.dims(nn.Conv2d(4, 6, (2, 5), bias=False)) == (4 * 10, 6)
    assert get_adapter(nn.Linear(5, 3)).dims(nn.Linear(5, 3)) == (6, 3)
    assert get_adapter(nn.Linear(5, 3)).dims(nn.Linear(5, 3, bias=False)) == (5, 3)


def test_unbatched_inputs_are_one_sample():
    """A 1-d Linear input and a 3-d Conv2d input are a batch of one."""
    torch.manual_seed(9)
    lin = nn.Linear(4, 3).to(DTYPE)
    x = torch.randn(4, dtype=DTYPE)
    x_in, go = capture(lin, x, weighted_loss((3,), 1, seed=10))
    adapter = get_adapter(lin)
    a = adapter.input_rows(lin, x_in, "expand")
    g = adapter.grad_rows(lin, go, "batch", "expand")
    torch.testing.assert_close(a, torch.cat([x, torch.ones(1, dtype=DTYPE)])[None], rtol=0, atol=0)
    torch.testing.assert_close(g, go[None], rtol=0, atol=0)

    conv = nn.Conv2d(2, 3, 2, stride=2).to(DTYPE)
    x = torch.randn(2, 4, 4, dtype=DTYPE)
    x_in, go = capture(conv, x, weighted_loss((3, 2, 2), 1, seed=11))
    adapter = get_adapter(conv)
    a = adapter.input_rows(conv, x_in, "expand")
    patches = expected_conv_patches(conv, x_in[None])[0]
    a_exp = torch.tensor([row + [1.0] for row in patches], dtype=DTYPE) / 2.0
    torch.testing.assert_close(a, a_exp, rtol=1e-12, atol=1e-14)
    g = adapter.grad_rows(conv, go, "batch+sequence", "reduce")
    torch.testing.assert_close(g, go.sum((1, 2))[None] * 2.0, rtol=1e-12, atol=1e-14)
