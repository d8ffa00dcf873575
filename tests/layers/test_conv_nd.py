"""``nn.Conv1d`` and ``nn.Conv3d`` adapters against ALGORITHM.md section 2, and training.

Expected patches are built by explicit loops over samples, output locations, channels
and kernel offsets, with padding applied by index mapping (zeros, reflect, replicate,
circular; ``"same"`` split as PyTorch splits it). The loops are validated twice against
PyTorch itself: the patches times the weight reproduce the module's output (every
``groups``), and ``sqrt(N_a / n) g^T a`` reproduces autograd's ``[grad W | grad b]``
(``groups=1``).
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from torch import nn

from torchsingd import SINGD
from torchsingd.layers import ConvAdapter, get_adapter

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

DTYPE = torch.float64
LOSS_AVERAGES = [None, "batch", "batch+sequence"]
APPROXES = ["expand", "reduce"]


def n_loss_terms(loss_average: str | None, batch: int, shared: int) -> int:
    return {None: 1, "batch": batch, "batch+sequence": batch * shared}[loss_average]


# ------------------------------------------------------------------ oracles
def _pads(module: nn.Module) -> list[tuple[int, int]]:
    """``(before, after)`` padding per spatial dimension, as PyTorch pads."""
    pads = []
    for dim in range(len(module.kernel_size)):
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


def _at(nested, idx):
    for i in idx:
        nested = nested[i]
    return nested


def group_patches(module: nn.Module, x: torch.Tensor):
    """``patches[b][gi][o]``: the patch of group ``gi`` at flat output location ``o``.

    ``x`` is batched ``[B, C, *spatial]``; ``o`` enumerates output locations in
    row-major order; a patch lists channel (within the group), then kernel offsets in
    row-major order (the order of ``weight.flatten(1)``). Also returns the output size.
    """
    n = len(module.kernel_size)
    B, C = x.shape[:2]
    spatial = list(x.shape[2:])
    G = module.groups
    Cg = C // G
    pads = _pads(module)
    k, d, s = module.kernel_size, module.dilation, module.stride
    out_size = [(spatial[i] + sum(pads[i]) - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(n)]
    mode = module.padding_mode
    xl = x.tolist()
    patches = []
    for b in range(B):
        per_group = []
        for gi in range(G):
            rows = []
            for o in itertools.product(*[range(m) for m in out_size]):
                row = []
                for c in range(Cg):
                    for off in itertools.product(*[range(kk) for kk in k]):
                        src = [
                            _source_index(
                                o[i] * s[i] + off[i] * d[i] - pads[i][0], spatial[i], mode
                            )
                            for i in range(n)
                        ]
                        if any(j is None for j in src):
                            row.append(0.0)
                        else:
                            row.append(_at(xl[b][gi * Cg + c], src))
                rows.append(row)
            per_group.append(rows)
        patches.append(per_group)
    return patches, out_size


def output_from_patches(module: nn.Module, patches, out_size) -> torch.Tensor:
    """The convolution output rebuilt from per-group patches: ``[B, C_out, *O]``."""
    G = module.groups
    W = module.weight.detach().flatten(1)  # [C_out, C_in/G * prod(k)]
    per_g = module.out_channels // G
    outs = []
    for sample in patches:
        cols = []
        for oc in range(module.out_channels):
            P = torch.tensor(sample[oc // per_g], dtype=DTYPE)  # [prod(O), cols]
            col = P @ W[oc]
            if module.bias is not None:
                col = col + module.bias.detach()[oc]
            cols.append(col)
        outs.append(torch.stack(cols))
    return torch.stack(outs).reshape(len(patches), module.out_channels, *out_size)


def expected_rows(module, patches, go, approx, loss_average):
    """``a`` and ``g`` of ALGORITHM.md section 2, from explicit patches and loops."""
    G = module.groups
    B, C_out = go.shape[:2]
    n_loc = math.prod(go.shape[2:])
    avg = [
        [[sum(vals) / G for vals in zip(*rows, strict=True)] for rows in zip(*sample, strict=True)]
        for sample in patches
    ]  # avg[b][o]: channels averaged over the groups
    if approx == "expand":
        a_rows = [row for sample in avg for row in sample]
    else:
        a_rows = [[sum(c) / n_loc for c in zip(*sample, strict=True)] for sample in avg]
    if module.bias is not None:
        a_rows = [row + [1.0] for row in a_rows]
    a = torch.tensor(a_rows, dtype=DTYPE) / math.sqrt(len(a_rows))

    gl = go.reshape(B, C_out, n_loc).tolist()
    if approx == "expand":
        g_rows = [[gl[b][c][o] for c in range(C_out)] for b in range(B) for o in range(n_loc)]
    else:
        g_rows = [[sum(gl[b][c]) for c in range(C_out)] for b in range(B)]
    g = torch.tensor(g_rows, dtype=DTYPE) * math.sqrt(n_loss_terms(loss_average, B, n_loc))
    return a, g


# -------------------------------------------------------------------- cases
CONV1D_CASES = {
    "s2_p1_d2": dict(in_channels=4, out_channels=3, kernel_size=3, stride=2, padding=1, dilation=2),
    "g2_s2_d2": dict(
        in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=2, dilation=2, groups=2
    ),
    "g2_nobias": dict(in_channels=4, out_channels=4, kernel_size=2, groups=2, bias=False),
    "nobias_p3": dict(in_channels=3, out_channels=2, kernel_size=4, padding=3, bias=False),
    "same_odd": dict(in_channels=3, out_channels=2, kernel_size=3, padding="same"),
    "same_even_asym": dict(in_channels=3, out_channels=2, kernel_size=4, padding="same"),
    "same_even_d3": dict(
        in_channels=2, out_channels=3, kernel_size=2, dilation=3, padding="same", bias=False
    ),
    "valid": dict(in_channels=3, out_channels=2, kernel_size=3, padding="valid"),
    "reflect": dict(
        in_channels=3, out_channels=2, kernel_size=3, padding=2, padding_mode="reflect"
    ),
    "replicate_d2": dict(
        in_channels=3,
        out_channels=2,
        kernel_size=2,
        dilation=2,
        padding=3,
        padding_mode="replicate",
    ),
    "circular_s2": dict(
        in_channels=3, out_channels=2, kernel_size=3, stride=2, padding=2, padding_mode="circular"
    ),
    "same_even_reflect_d2": dict(
        in_channels=3,
        out_channels=2,
        kernel_size=2,
        dilation=3,
        padding="same",
        padding_mode="reflect",
    ),
    "same_even_circular_g2": dict(
        in_channels=4,
        out_channels=2,
        kernel_size=4,
        padding="same",
        padding_mode="circular",
        groups=2,
    ),
    "same_even_replicate_g3": dict(
        in_channels=3,
        out_channels=3,
        kernel_size=4,
        padding="same",
        padding_mode="replicate",
        groups=3,
    ),
}
CONV3D_CASES = {
    "s_p_d": dict(
        in_channels=2,
        out_channels=3,
        kernel_size=(2, 3, 2),
        stride=(1, 2, 1),
        padding=(1, 0, 1),
        dilation=(1, 1, 2),
    ),
    "g2_nobias": dict(in_channels=4, out_channels=4, kernel_size=2, groups=2, bias=False),
    "same_odd": dict(in_channels=2, out_channels=2, kernel_size=3, padding="same"),
    "same_even_asym": dict(
        in_channels=2, out_channels=3, kernel_size=(2, 3, 4), dilation=(3, 1, 1), padding="same"
    ),
    "valid_s2": dict(in_channels=2, out_channels=2, kernel_size=2, stride=2, padding="valid"),
    "circular": dict(
        in_channels=2, out_channels=2, kernel_size=3, padding=(1, 2, 1), padding_mode="circular"
    ),
    "same_even_circular_g2": dict(
        in_channels=4,
        out_channels=2,
        kernel_size=(2, 2, 3),
        padding="same",
        padding_mode="circular",
        groups=2,
    ),
}
CASES = {
    **{f"1d_{k}": (nn.Conv1d, v) for k, v in CONV1D_CASES.items()},
    **{f"3d_{k}": (nn.Conv3d, v) for k, v in CONV3D_CASES.items()},
}
INPUT_SIZE = {nn.Conv1d: (9,), nn.Conv3d: (4, 5, 4)}


@functools.cache
def setup_case(name: str, seed: int = 0):
    """Module, input, output gradient (``sum(R * out) / n`` loss) and explicit patches.

    ``n`` is ``B * prod(O)``, so that the weight gradients are the ``batch+sequence``
    averages (the row checks are insensitive to ``n``).
    """
    cls, kwargs = CASES[name]
    torch.manual_seed(seed)
    module = cls(**kwargs).to(DTYPE)
    x = torch.randn(2, module.in_channels, *INPUT_SIZE[cls], dtype=DTYPE)
    out = module(x)
    out.retain_grad()
    R = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=DTYPE)
    n = out.shape[0] * math.prod(out.shape[2:])
    ((R * out).sum() / n).backward()
    patches, out_size = group_patches(module, x)
    return module, x, out.detach(), out.grad.detach(), patches, out_size


# -------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(CASES))
def test_explicit_patches_reproduce_the_module_output(name):
    """The oracle itself: explicit patches times the weight give PyTorch's output."""
    module, x, out, _, patches, out_size = setup_case(name)
    assert list(out.shape[2:]) == out_size
    rebuilt = output_from_patches(module, patches, out_size)
    torch.testing.assert_close(rebuilt, out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("approx", APPROXES)
@pytest.mark.parametrize("loss_average", LOSS_AVERAGES, ids=str)
def test_conv_rows(name, approx, loss_average):
    module, x, _, go, patches, _ = setup_case(name)
    adapter = get_adapter(module)
    assert isinstance(adapter, ConvAdapter)

    a = adapter.input_rows(module, x, approx)
    g = adapter.grad_rows(module, go, loss_average, approx)
    a_exp, g_exp = expected_rows(module, patches, go, approx, loss_average)
    assert a.shape == a_exp.shape and g.shape == g_exp.shape
    torch.testing.assert_close(a, a_exp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, g_exp, rtol=1e-12, atol=1e-14)
    d_i, d_o = adapter.dims(module)
    assert a.shape[1] == d_i and g.shape[1] == d_o


GROUPS1 = [n for n, (_, kw) in CASES.items() if kw.get("groups", 1) == 1]


@pytest.mark.parametrize("name", GROUPS1)
@pytest.mark.parametrize("loss_average", LOSS_AVERAGES, ids=str)
def test_expand_rows_reproduce_weight_gradient(name, loss_average):
    """``sqrt(N_a / n) g^T a = [grad W | grad b]`` for a loss averaged over ``n`` terms."""
    module, x, _, go, _, _ = setup_case(name)
    B, n_loc = go.shape[0], math.prod(go.shape[2:])
    n = n_loss_terms(loss_average, B, n_loc)
    # setup_case's loss is sum(R * out) / (B * n_loc): rescale its gradient to the loss
    # sum(R * out) / n that loss_average describes.
    rescale = B * n_loc / n
    adapter = get_adapter(module)
    a = adapter.input_rows(module, x, "expand")
    g = adapter.grad_rows(module, go * rescale, loss_average, "expand")
    N_a = a.shape[0]
    assert N_a == B * n_loc

    grad_W = module.weight.grad.reshape(module.out_channels, -1)
    if module.bias is not None:
        grad_W = torch.cat([grad_W, module.bias.grad[:, None]], dim=1)
    torch.testing.assert_close(
        g.T @ a * math.sqrt(N_a / n), grad_W * rescale, rtol=1e-11, atol=1e-12
    )
    torch.testing.assert_close(adapter.grad_matrix(module), grad_W, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["1d_g2_s2_d2", "1d_nobias_p3", "3d_s_p_d", "3d_g2_nobias"])
def test_split_matrix_and_directions_roundtrip(name):
    module = setup_case(name)[0]
    adapter = get_adapter(module)
    d_i, d_o = adapter.dims(module)
    M = torch.randn(d_o, d_i, dtype=DTYPE)
    parts = adapter.directions(module, {"": M})
    assert len(parts) == 1 + int(module.bias is not None)
    assert parts[0].shape == module.weight.shape
    assert torch.equal(parts[0].reshape(d_o, -1), M[:, : module.weight[0].numel()])
    if module.bias is not None:
        assert torch.equal(parts[1], M[:, -1])


@pytest.mark.parametrize(
    "module, expected",
    [
        (nn.Conv1d(4, 6, 3, groups=2), (2 * 3 + 1, 6)),
        (nn.Conv1d(5, 2, 4, bias=False), (5 * 4, 2)),
        (nn.Conv1d(3, 3, 1, padding="same"), (3 + 1, 3)),
        (nn.Conv3d(4, 6, (2, 3, 1), groups=2), (2 * 6 + 1, 6)),
        (nn.Conv3d(3, 2, 3, bias=False), (3 * 27, 2)),
        (nn.Conv3d(6, 3, (1, 2, 2), groups=3, padding_mode="circular", padding=1), (2 * 4 + 1, 3)),
    ],
    ids=["1d_g2", "1d_nobias", "1d_k1", "3d_g2", "3d_nobias", "3d_g3_circ"],
)
def test_dims(module, expected):
    adapter = get_adapter(module)
    assert isinstance(adapter, ConvAdapter)
    assert adapter.dims(module) == expected


def test_frozen_bias_is_not_a_column():
    module = nn.Conv1d(2, 3, 3).to(DTYPE)
    module.bias.requires_grad_(False)
    adapter = get_adapter(module)
    assert adapter.dims(module) == (2 * 3, 3)
    assert adapter.input_rows(module, torch.randn(2, 2, 5, dtype=DTYPE), "expand").shape == (6, 6)


@pytest.mark.parametrize(
    "cls, kwargs, size",
    [
        (nn.Conv1d, dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1), (7,)),
        (
            nn.Conv1d,
            dict(in_channels=2, out_channels=2, kernel_size=2, padding="same", groups=2),
            (6,),
        ),
        (
            nn.Conv3d,
            dict(in_channels=2, out_channels=3, kernel_size=2, padding=1, padding_mode="circular"),
            (3, 4, 3),
        ),
    ],
    ids=["1d", "1d_same_g2", "3d_circular"],
)
@pytest.mark.parametrize("approx", APPROXES)
@pytest.mark.parametrize("loss_average", LOSS_AVERAGES, ids=str)
def test_unbatched_input_is_one_sample(cls, kwargs, size, approx, loss_average):
    torch.manual_seed(3)
    module = cls(**kwargs).to(DTYPE)
    x = torch.randn(module.in_channels, *size, dtype=DTYPE)
    out = module(x)
    out.retain_grad()
    (torch.randn(out.shape, dtype=DTYPE) * out).sum().backward()
    go = out.grad.detach()
    adapter = get_adapter(module)
    a = adapter.input_rows(module, x, approx)
    g = adapter.grad_rows(module, go, loss_average, approx)

    patches, _ = group_patches(module, x[None])
    a_exp, g_exp = expected_rows(module, patches, go[None], approx, loss_average)
    torch.testing.assert_close(a, a_exp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, g_exp, rtol=1e-12, atol=1e-14)
    # and the same rows as for an explicit batch of one
    torch.testing.assert_close(a, adapter.input_rows(module, x[None], approx), rtol=0, atol=0)


# ----------------------------------------------------------------- training
def make_conv1d_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, padding="same", padding_mode="circular"),
        nn.Tanh(),
        nn.Conv1d(4, 4, 3, stride=2, groups=2, dilation=2, padding=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 6, 2),
    )


def make_conv3d_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv3d(1, 3, 2, padding=1),
        nn.Tanh(),
        nn.Conv3d(3, 2, (2, 3, 2), stride=2, bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 2 * 1 * 2, 2),
    )


NETS = {
    "conv1d": (make_conv1d_net, (1, 2, 12)),
    "conv3d": (make_conv3d_net, (1, 1, 4, 3, 4)),
}


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("structures", ["dense", "diagonal"])
def test_singd_trains_conv_net(net, structures):
    make, in_shape = NETS[net]
    model = make(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, *in_shape[1:], generator=gen)
    teacher = make(5)
    with torch.no_grad():
        y = teacher(x)
    opt = SINGD(model, lr=0.05, momentum=0.5, damping=1e-3, T=1, lr_cov=1e-2, structures=structures)
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv3d))]
    assert set(opt.layers) == {*convs, "5"}
    assert opt.fallback_parameters == {}
    K0 = {n: s.K.to_dense().clone() for n, s in opt.layers.items()}
    C0 = {n: s.C.to_dense().clone() for n, s in opt.layers.items()}
    for n, s in opt.layers.items():
        assert type(s.K).family == structures and type(s.C).family == structures
        torch.testing.assert_close(K0[n], torch.eye(K0[n].shape[0]), rtol=0, atol=0)

    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert opt.skipped_steps == 0
    for n, s in opt.layers.items():
        for X in (s.K, s.C, s.m_K, s.m_C):
            assert all(torch.isfinite(t).all() for t in X.tensors())
        assert not torch.allclose(s.K.to_dense(), K0[n]), n
        assert not torch.allclose(s.C.to_dense(), C0[n]), n
    for p in model.parameters():
        assert torch.isfinite(p).all()
