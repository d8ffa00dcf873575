"""Input statistics over chunks of the batch equal the statistic of the whole batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchsingd.layers.base as layers_base
import torchsingd.layers.conv as conv_module
import torchsingd.structures.base as structures_base
from torchsingd.layers import get_adapter
from torchsingd.structures import HierarchicalMatrix, get_structure

F64 = torch.float64


def _random_K(name: str, d: int):
    K = get_structure(name).eye(d, dtype=F64)
    g = torch.Generator().manual_seed(d)
    for t in K.tensors():
        t.add_(0.3 * torch.randn(t.shape, generator=g, dtype=F64))
    return K


CASES = [
    ("conv", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (5, 3, 9, 9)),
    ("conv-nobias", lambda: nn.Conv2d(2, 3, (2, 3), dilation=(2, 1), bias=False), (5, 2, 8, 8)),
    ("linear-seq", lambda: nn.Linear(6, 4), (5, 3, 6)),
    ("linear", lambda: nn.Linear(7, 2), (5, 7)),
]


@pytest.mark.parametrize("gram_min", [0, None], ids=["gram-route", "default-rule"])
@pytest.mark.parametrize("structure", ["dense", "hierarchical:3,2", "blockdiagonal:3"])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("case, make, shape", CASES, ids=[c[0] for c in CASES])
def test_chunked_input_statistic(monkeypatch, case, make, shape, kfac_approx, structure, gram_min):
    """By either route: ``GRAM_MIN_NUMEL = 0`` takes the Gram route at these small
    sizes, the default rule the direct one."""
    if gram_min is not None:
        monkeypatch.setattr(structures_base, "GRAM_MIN_NUMEL", gram_min)
    torch.manual_seed(0)
    module = make().double()
    adapter = get_adapter(module)
    x = torch.randn(*shape, dtype=F64)
    d_i = adapter.dims(module)[0]
    K = _random_K(structure, d_i)
    # independent: the dense projection of K^T a^T a K over the whole batch
    a = adapter.input_rows(module, x, kfac_approx)
    Kd = K.to_dense()
    expected = get_structure(structure).from_dense(Kd.T @ a.T @ a @ Kd).to_dense()

    per_sample = adapter.input_rows(module, x[:1], kfac_approx).numel()
    monkeypatch.setattr(layers_base, "STATISTIC_CHUNK_NUMEL", 2 * per_sample)  # 2+2+1
    calls = []
    original = type(adapter).input_rows

    def spy(self, module, x, *args, **kwargs):
        calls.append(x.shape[0])
        return original(self, module, x, *args, **kwargs)

    monkeypatch.setattr(type(adapter), "input_rows", spy)
    unfolded = []
    unfold = torch.nn.functional.unfold

    def unfold_spy(x, *args, **kwargs):
        unfolded.append(x.shape[0])
        return unfold(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "unfold", unfold_spy)
    got = adapter.input_statistic(module, x, K, kfac_approx).to_dense()
    # a convolution's Gram route for hierarchical factors reads no rows
    # (conv.patch_gram): it unfolds the border patch columns of the channels they
    # read, in chunks of samples (within the chunk's numbers: [5] or [4, 1] here);
    # every other statistic reads the rows, patches as views (nothing unfolded)
    patch_route = (
        case.startswith("conv")
        and kfac_approx == "expand"
        and gram_min == 0
        and structure.startswith("hierarchical")
    )
    if patch_route:
        assert calls == [] and sum(unfolded) == 5
        assert all(size == unfolded[0] for size in unfolded[:-1]) and unfolded[-1] <= unfolded[0]
    else:
        assert calls == [1, 2, 2, 1]  # the probe, then three chunks
        assert unfolded == []
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_unbatched_conv_input_is_not_split(monkeypatch):
    module = nn.Conv2d(2, 3, 3).double()
    adapter = get_adapter(module)
    x = torch.randn(2, 6, 6, dtype=F64)  # [C, H, W]: dimension 0 is channels
    K = _random_K("dense", adapter.dims(module)[0])
    monkeypatch.setattr(layers_base, "STATISTIC_CHUNK_NUMEL", 1)
    a = adapter.input_rows(module, x, "expand")
    Kd = K.to_dense()
    got = adapter.input_statistic(module, x, K, "expand").to_dense()
    torch.testing.assert_close(got, Kd.T @ a.T @ a @ Kd, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "structure, route, gram_min",
    [
        ("diagonal", "inner_of", 0),
        ("hierarchical:3,2", "gram_of", 0),  # 9 rows > 2 (k1 + k2) = 8: the Gram route
        ("blockdiagonal:3", "gram_of", 0),  # 9 > 2 * 3
        ("triltoeplitz", "inner_of", 0),
        ("dense", "gram_of", 0),  # 9 > 2 * 4
        ("dense", "gram_of", 36),  # 9 * 4 numbers: at the threshold
        ("hierarchical:3,2", "inner_of", 37),  # below it: the direct route
        ("blockdiagonal:3", "inner_of", None),  # the default threshold (1 << 17)
        ("dense", "inner_of", None),
    ],
)
def test_inner_of_rows_sums_chunks(monkeypatch, structure, route, gram_min):
    """``P(X^T r^T r X)`` over row chunks (9 rows of width 4, chunks of 2 rows) equals
    the dense float64 statistic of all rows, by ``inner_of`` per chunk or by the sum
    of the chunks' ``gram_of``; the Gram route is taken from ``GRAM_MIN_NUMEL`` numbers
    of the rows on."""
    if gram_min is not None:
        monkeypatch.setattr(structures_base, "GRAM_MIN_NUMEL", gram_min)
    X = _random_K(structure, 4)
    rows = torch.randn(9, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(layers_base, "STATISTIC_CHUNK_NUMEL", 8)
    seen = []
    original = getattr(type(X), route)

    def spy(self, Z):
        seen.append(Z.shape[1])
        return original(self, Z)

    monkeypatch.setattr(type(X), route, spy)
    got = layers_base.inner_of_rows(X, rows).to_dense()
    assert seen == [2, 2, 2, 2, 1]
    Xd = X.to_dense()
    expected = get_structure(structure).from_dense(Xd.T @ rows.T @ rows @ Xd).to_dense()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("structure", ["dense", "blockdiagonal:3", "hierarchical:1,1"])
def test_row_chunks_are_bounded_by_rows_too(monkeypatch, structure):
    """Within ``STATISTIC_CHUNK_NUMEL`` numbers, at most ``STATISTIC_CHUNK_ROWS``
    rows per product (9 rows, chunks of 3), by either route."""
    monkeypatch.setattr(structures_base, "GRAM_MIN_NUMEL", 0)
    monkeypatch.setattr(layers_base, "STATISTIC_CHUNK_ROWS", 3)
    X = _random_K(structure, 4)
    rows = torch.randn(9, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    seen = []
    for route in ("gram_of", "inner_of"):
        original = getattr(type(X), route)

        def spy(self, Z, original=original):
            seen.append(Z.shape[1])
            return original(self, Z)

        monkeypatch.setattr(type(X), route, spy)
    got = layers_base.inner_of_rows(X, rows).to_dense()
    assert seen == [3, 3, 3]
    Xd = X.to_dense()
    expected = get_structure(structure).from_dense(Xd.T @ rows.T @ rows @ Xd).to_dense()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("structure", ["dense", "blockdiagonal:30", "triltoeplitz"])
def test_tall_float32_statistics_keep_their_precision(structure):
    """A narrow convolution's statistic over 100352 rows of positive inputs (the
    benchmark CNN's first layer: one channel, 3x3, batch 128 of 28 x 28) in float32
    is within 5e-5 of float64, relative to its largest entry: one product over all
    rows rounded by 1.6e-4 here (see ``STATISTIC_CHUNK_ROWS``)."""
    module = nn.Conv2d(1, 8, 3, padding=1)
    adapter = get_adapter(module)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(128, 1, 28, 28, generator=g) + 0.5
    K = get_structure(structure).eye(10)
    got = adapter.input_statistic(module, x, K, "expand").to_dense().double()
    K64 = get_structure(structure).eye(10, dtype=F64)
    exact = adapter.input_statistic(module.double(), x.double(), K64, "expand").to_dense()
    assert (got - exact).abs().max() <= 5e-5 * exact.abs().max()


@pytest.mark.parametrize(
    "name, d, n, pays",
    [
        ("hierarchical:15,15", 785, 128, False),  # the MLP's first layer at batch 128
        ("hierarchical:15,15", 785, 256, True),
        ("hierarchical:15,15", 65, 2048, True),  # 133120 numbers
        ("hierarchical:15,15", 65, 2016, False),  # 131040
        ("hierarchical:15,15", 4096, 40, False),  # FLOPs: 40 <= 2 (15 + 15)
        ("blockdiagonal:30", 513, 128, False),
        ("blockdiagonal:30", 513, 4096, True),
        ("dense", 257, 512, False),  # 131584 numbers, but 512 <= 2 d
        ("dense", 257, 515, True),
        ("dense", 10, 4096, False),  # 40960 numbers
    ],
)
def test_gram_route_rule(name, d, n, pays):
    """The Gram route needs more than the FLOP threshold's columns and at least
    ``GRAM_MIN_NUMEL`` numbers; in float32 and float64 only."""
    K = get_structure(name).eye(d, dtype=torch.float32)
    assert K.gram_pays(n) is pays
    assert K.to(F64).gram_pays(n) is pays
    assert not K.to(torch.bfloat16).gram_pays(n)


PATCH_CONVS = {
    "stride-pad": (dict(in_channels=8, out_channels=4, kernel_size=3, stride=2, padding=1), 19),
    "no-bias": (dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, bias=False), 9),
    "one-channel": (dict(in_channels=1, out_channels=4, kernel_size=3, padding=1), 9),
    "dilated": (
        dict(in_channels=4, out_channels=6, kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1)),
        10,
    ),
    "same-groups": (
        dict(in_channels=4, out_channels=6, kernel_size=3, padding="same", dilation=2, groups=2),
        10,
    ),
    "bias-fills-a-block": (dict(in_channels=10, out_channels=3, kernel_size=3), 11),  # d = 91
}


@pytest.mark.parametrize(
    "structure",
    ["hierarchical:15,15", "hierarchical:3,2", "hierarchical:2,4", "hierarchical:40,40"],
)
@pytest.mark.parametrize("chunk", [1 << 20, 1], ids=["one-chunk", "per-sample"])
@pytest.mark.parametrize("conv", list(PATCH_CONVS))
def test_patch_gram_equals_the_gram_of_the_rows(monkeypatch, conv, chunk, structure):
    """``conv.patch_gram`` (hierarchical: the border rows as a weight gradient) gives
    the family's ``gram_of`` of the rows ``a`` (built by ``input_rows``, whose patch
    order ``tests/layers/test_capture.py`` checks), for bias / no bias, stride,
    dilation, groups, "same" padding, every border layout (the bias in the border,
    ``d <= K1``; no middle: left to the rows), in one chunk or one sample per chunk."""
    monkeypatch.setattr(structures_base, "GRAM_MIN_NUMEL", 0)
    kwargs, size = PATCH_CONVS[conv]
    torch.manual_seed(0)
    module = nn.Conv2d(**kwargs).double()
    adapter = get_adapter(module)
    x = torch.randn(5, kwargs["in_channels"], size, size + 1, dtype=F64)
    K = _random_K(structure, adapter.dims(module)[0])
    expected = layers_base.gram_of_rows(K, adapter.input_rows(module, x, "expand"))
    monkeypatch.setattr(layers_base, "STATISTIC_CHUNK_NUMEL", chunk)
    got = conv_module.patch_gram(module, x, K)
    rows = adapter.input_count(module, x, "expand")
    if not K.m or rows // x.shape[0] < K.k1 + K.k2 or not K.gram_pays(rows):
        assert got is None  # (no middle, or few locations or rows: the rows route)
        return
    assert type(got) is type(K)
    torch.testing.assert_close(got.to_dense(), expected.to_dense(), rtol=1e-12, atol=1e-12)
    if isinstance(got, HierarchicalMatrix):
        assert torch.equal(got.R[got.k1 :, : got.k1], torch.zeros(got.k2, got.k1, dtype=F64))


@pytest.mark.parametrize(
    "kwargs, size, structure",
    [
        (dict(kernel_size=4, padding="same"), 9, "hierarchical:1,1"),  # asymmetric
        (dict(kernel_size=3, padding=1, padding_mode="reflect"), 9, "hierarchical:1,1"),
        # fewer output locations than border rows (a squeeze-excitation's 1x1
        # convolution on a pooled input: 5-13x slower this way)
        (dict(kernel_size=1), 1, "hierarchical:1,1"),
        (dict(kernel_size=3), 3, "hierarchical:1,1"),  # 1 location, 2 border rows
        (dict(kernel_size=3), 9, "hierarchical:15,15"),  # d = 28: no middle
        # the other families read the rows (block-diagonal's channel-major rows
        # were faster than a route of its own: see conv.patch_gram)
        (dict(kernel_size=3, padding=1), 9, "blockdiagonal:3"),
        (dict(kernel_size=3, padding=1), 9, "dense"),
    ],
)
def test_patch_gram_leaves_other_cases_to_the_rows(monkeypatch, kwargs, size, structure):
    monkeypatch.setattr(structures_base, "GRAM_MIN_NUMEL", 0)
    module = nn.Conv2d(3, 4, **kwargs).double()
    x = torch.randn(5, 3, size, size, dtype=F64)
    K = _random_K(structure, get_adapter(module).dims(module)[0])
    assert conv_module.patch_gram(module, x, K) is None


def test_hierarchical_patch_gram_chunks_bound_the_convolution_backward(monkeypatch):
    """The hierarchical route's chunks hold at most as many samples as the full
    unfold's chunk would (PyTorch's own convolution backward, which float64 takes,
    unfolds each chunk in full), and its result does not depend on them."""
    module = nn.Conv2d(4, 3, 3, padding=1).double()
    x = torch.randn(7, 4, 6, 6, dtype=F64)
    K = _random_K("hierarchical:3,2", get_adapter(module).dims(module)[0])
    monkeypatch.setattr(structures_base, "GRAM_MIN_NUMEL", 0)
    whole = conv_module.patch_gram(module, x, K).to_dense()
    seen = []
    unfold = torch.nn.functional.unfold

    def spy(part, *args, **kwargs):  # the border patches of each chunk
        seen.append(part.shape[0])
        return unfold(part, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "unfold", spy)
    unfolded = 4 * 9 * 36  # one sample's full unfold (patch columns x locations)
    monkeypatch.setattr(layers_base, "STATISTIC_CHUNK_NUMEL", 2 * unfolded)
    got = conv_module.patch_gram(module, x, K).to_dense()
    assert seen == [2, 2, 2, 1]  # (the column sums read views of two summed images)
    torch.testing.assert_close(got, whole, rtol=1e-12, atol=1e-12)


def test_hierarchical_patch_gram_without_border_patches_takes_the_rows():
    """A member whose border holds no patch column (``K1 = 0``, ``K2 = 1``: only the
    bias) leaves the statistic to the rows route, which gives it."""
    module = nn.Conv2d(2, 3, 3, padding=1).double()
    x = torch.randn(3, 2, 8, 8, dtype=F64)
    d = get_adapter(module).dims(module)[0]
    K = HierarchicalMatrix.zeros(d, 0, 1, dtype=F64).add_identity_(1.0)
    assert conv_module.patch_gram(module, x, K) is None
    a = get_adapter(module).input_rows(module, x, "expand")
    got = get_adapter(module).input_statistic(module, x, K, "expand")
    Kd = K.to_dense()
    expected = HierarchicalMatrix.from_dense(Kd.T @ a.T @ a @ Kd, 0, 1)
    torch.testing.assert_close(got.to_dense(), expected.to_dense(), rtol=1e-12, atol=1e-12)
