"""``nn.ConvTranspose1d``/``2d``/``3d`` adapters against ALGORITHM.md section 2, and training.

The oracle builds each patch by explicit loops from the definition of a transposed
convolution (input position ``p`` reaches output ``q = p * stride - padding +
k * dilation``), not from the zero-stuffing the adapter uses: the patch of output
location ``q`` holds, for each input channel ``c`` and flipped kernel offset ``j``,
``x[c, p]`` with ``p = (q + padding - (k - 1 - j) * dilation) / stride`` where that is
an integer inside the input, else zero. It is validated against PyTorch twice: the
patches times the weight as a matrix (built by loops too) give the module's output
(every case, ``groups`` and ``output_size`` included), and ``sqrt(N_a / n) g^T a``
gives autograd's ``[grad W | grad b]``.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from torch import nn

from torchsingd import KFAC, SINGD
from torchsingd.layers import ConvTransposeAdapter, get_adapter
from torchsingd.structures import DiagonalMatrix, get_structure

DTYPE = torch.float64
LOSS_AVERAGES = [None, "batch", "batch+sequence"]
APPROXES = ["expand", "reduce"]


# ------------------------------------------------------------------ oracles
def matrix_weight(module: nn.Module) -> torch.Tensor:
    """``M[g * C_out/G + o, (c, j)] = W[g * C_in/G + c, o, k - 1 - j]`` by loops."""
    W = module.weight.detach()
    G, k = module.groups, module.kernel_size
    cin, cout = module.in_channels // G, module.out_channels // G
    offsets = list(itertools.product(*[range(kk) for kk in k]))
    M = torch.zeros(module.out_channels, cin * len(offsets), dtype=W.dtype)
    for gi in range(G):
        for o in range(cout):
            for c in range(cin):
                for col, j in enumerate(offsets):
                    flipped = tuple(kk - 1 - jj for kk, jj in zip(k, j, strict=True))
                    M[gi * cout + o, c * len(offsets) + col] = W[(gi * cin + c, o, *flipped)]
    return M


def group_patches(module: nn.Module, x: torch.Tensor, out_size):
    """``patches[b][gi][q]``: group ``gi``'s patch at flat output location ``q``."""
    B, G = x.shape[0], module.groups
    cin = module.in_channels // G
    k, s, d, pad = module.kernel_size, module.stride, module.dilation, module.padding
    spatial = x.shape[2:]
    xl = x.tolist()
    offsets = list(itertools.product(*[range(kk) for kk in k]))
    patches = []
    for b in range(B):
        per_group = []
        for gi in range(G):
            rows = []
            for q in itertools.product(*[range(m) for m in out_size]):
                row = []
                for c in range(cin):
                    for j in offsets:
                        src = []
                        for i in range(len(k)):
                            t = q[i] + pad[i] - (k[i] - 1 - j[i]) * d[i]
                            src.append(t // s[i] if t % s[i] == 0 else None)
                        inside = all(
                            p is not None and 0 <= p < n for p, n in zip(src, spatial, strict=True)
                        )
                        value = xl[b][gi * cin + c]
                        for p in src if inside else []:
                            value = value[p]
                        row.append(value if inside else 0.0)
                rows.append(row)
            per_group.append(rows)
        patches.append(per_group)
    return patches


def output_from_patches(module, patches, out_size) -> torch.Tensor:
    M = matrix_weight(module)
    per_g = module.out_channels // module.groups
    outs = []
    for sample in patches:
        cols = []
        for oc in range(module.out_channels):
            col = torch.tensor(sample[oc // per_g], dtype=DTYPE) @ M[oc]
            if module.bias is not None:
                col = col + module.bias.detach()[oc]
            cols.append(col)
        outs.append(torch.stack(cols))
    return torch.stack(outs).reshape(len(patches), module.out_channels, *out_size)


def expected_rows(module, patches, go, approx, loss_average):
    """``a`` and ``g`` of ALGORITHM.md section 2 from explicit patches."""
    B, C_out = go.shape[:2]
    n_loc = math.prod(go.shape[2:])
    avg = torch.tensor(patches, dtype=DTYPE).mean(1)  # [B, O, cols]: averaged over groups
    go3 = go.reshape(B, C_out, n_loc).transpose(1, 2)  # [B, O, C_out]
    terms = {None: 1, "batch": B, "batch+sequence": B * n_loc}[loss_average]
    if approx == "expand":
        a, g = avg.reshape(B * n_loc, -1), go3.reshape(B * n_loc, C_out)
    else:
        a, g = avg.mean(1), go3.sum(1)
    if module.bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=DTYPE)], 1)
    return a / math.sqrt(a.shape[0]), g * math.sqrt(terms)


CASES = {
    "1d_s2_p1_op1": (
        nn.ConvTranspose1d,
        dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1, output_padding=1),
        (5,),
        None,
    ),
    "1d_g2_d2": (
        nn.ConvTranspose1d,
        dict(in_channels=4, out_channels=2, kernel_size=2, groups=2, dilation=2, stride=3),
        (4,),
        None,
    ),
    "1d_crop": (  # padding beyond dilation * (k - 1): the prepared input is cropped
        nn.ConvTranspose1d,
        dict(in_channels=2, out_channels=2, kernel_size=3, stride=3, padding=5, dilation=2),
        (6,),
        None,
    ),
    "2d_s2_k2": (
        nn.ConvTranspose2d,
        dict(in_channels=2, out_channels=3, kernel_size=2, stride=2),
        (3, 2),
        None,
    ),
    "2d_mixed": (
        nn.ConvTranspose2d,
        dict(
            in_channels=2,
            out_channels=3,
            kernel_size=(2, 3),
            stride=(2, 1),
            padding=(0, 2),
            dilation=(1, 2),
            bias=False,
        ),
        (3, 4),
        None,
    ),
    "2d_output_size": (
        nn.ConvTranspose2d,
        dict(in_channels=2, out_channels=2, kernel_size=3, stride=2, padding=1),
        (3, 3),
        (6, 5),
    ),
    "2d_g2": (
        nn.ConvTranspose2d,
        dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2),
        (2, 3),
        None,
    ),
    "3d_s2": (
        nn.ConvTranspose3d,
        dict(
            in_channels=2, out_channels=2, kernel_size=(2, 1, 2), stride=2, output_padding=(1, 0, 0)
        ),
        (2, 2, 1),
        None,
    ),
}
GROUPS1 = [n for n, (_, kw, _, _) in CASES.items() if kw.get("groups", 1) == 1]


@functools.cache
def setup_case(name: str, seed: int = 0):
    """Module, input, output, output gradient (loss ``sum(R * out) / (B * prod(O))``)."""
    cls, kwargs, size, output_size = CASES[name]
    torch.manual_seed(seed)
    module = cls(**kwargs).to(DTYPE)
    x = torch.randn(2, module.in_channels, *size, dtype=DTYPE)
    out = module(x, output_size=output_size) if output_size else module(x)
    out.retain_grad()
    R = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=DTYPE)
    ((R * out).sum() / (out.shape[0] * math.prod(out.shape[2:]))).backward()
    patches = group_patches(module, x, out.shape[2:])
    return module, x, out.detach(), out.grad.detach(), patches


# -------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(CASES))
def test_explicit_patches_reproduce_the_module_output(name):
    """The oracle itself: explicit patches times the matrix weight give PyTorch's output."""
    module, _, out, _, patches = setup_case(name)
    rebuilt = output_from_patches(module, patches, out.shape[2:])
    torch.testing.assert_close(rebuilt, out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("approx", APPROXES)
@pytest.mark.parametrize("loss_average", LOSS_AVERAGES, ids=str)
def test_rows(name, approx, loss_average):
    module, x, out, go, patches = setup_case(name)
    adapter = get_adapter(module)
    assert isinstance(adapter, ConvTransposeAdapter)
    prepared = adapter.capture_input(module, x, out.shape)
    a = adapter.input_rows(module, prepared, approx)
    g = adapter.grad_rows(module, go, loss_average, approx)
    a_exp, g_exp = expected_rows(module, patches, go, approx, loss_average)
    assert a.shape == a_exp.shape and g.shape == g_exp.shape
    torch.testing.assert_close(a, a_exp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, g_exp, rtol=1e-12, atol=1e-14)
    assert adapter.dims(module) == (a.shape[1], g.shape[1])


@pytest.mark.parametrize("name", GROUPS1)
def test_expand_rows_reproduce_weight_gradient(name):
    """``sqrt(N_a / n) g^T a = [grad W | grad b]`` in the matrix layout of ``grad_matrix``."""
    module, x, out, go, _ = setup_case(name)
    adapter = get_adapter(module)
    B, n_loc = go.shape[0], math.prod(go.shape[2:])
    a = adapter.input_rows(module, adapter.capture_input(module, x, out.shape), "expand")
    g = adapter.grad_rows(module, go, "batch+sequence", "expand")
    grad = adapter.grad_matrix(module)
    torch.testing.assert_close(
        g.T @ a * math.sqrt(a.shape[0] / (B * n_loc)), grad, rtol=1e-11, atol=1e-12
    )
    # grad_matrix is the loops' layout of autograd's gradient
    with torch.no_grad():
        original = module.weight.clone()
        module.weight.copy_(module.weight.grad)
        expected = matrix_weight(module)
        module.weight.copy_(original)
    torch.testing.assert_close(grad[:, : expected.shape[1]], expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["1d_g2_d2", "2d_mixed", "2d_g2", "3d_s2"])
def test_split_matrix_inverts_grad_matrix(name):
    module = setup_case(name)[0]
    adapter = get_adapter(module)
    d_i, d_o = adapter.dims(module)
    M = torch.randn(d_o, d_i, dtype=DTYPE)
    parts = adapter.directions(module, {"": M})
    assert [p.shape for p in parts] == [p.shape for p in adapter.params(module)]
    with torch.no_grad():
        original = module.weight.clone()
        module.weight.copy_(parts[0])
        as_matrix = matrix_weight(module)
        module.weight.copy_(original)
    torch.testing.assert_close(as_matrix, M[:, : as_matrix.shape[1]], rtol=0, atol=0)
    if module.bias is not None:
        assert torch.equal(parts[1], M[:, -1])


@pytest.mark.parametrize("approx", APPROXES)
def test_unbatched_input_is_one_sample(approx):
    torch.manual_seed(4)
    module = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1).to(DTYPE)
    x = torch.randn(2, 3, 2, dtype=DTYPE)
    out = module(x)
    adapter = get_adapter(module)
    a = adapter.input_rows(module, adapter.capture_input(module, x, out.shape), approx)
    a_batched = adapter.input_rows(
        module, adapter.capture_input(module, x[None], out[None].shape), approx
    )
    torch.testing.assert_close(a, a_batched, rtol=0, atol=0)
    a_exp, _ = expected_rows(
        module, group_patches(module, x[None], out.shape[1:]), out[None], approx, None
    )
    torch.testing.assert_close(a, a_exp, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["1d_crop", "2d_output_size", "2d_g2", "3d_s2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_diagonal_statistic_equals_rows(name, dtype):
    """The diagonal shortcut (column means of the squared prepared input) equals
    ``P(K^T a^T a K)`` from the rows."""
    module, x, out, _, _ = setup_case(name)
    adapter = get_adapter(module)
    prepared = adapter.capture_input(module, x, out.shape)
    d_i = adapter.dims(module)[0]
    K = DiagonalMatrix(torch.linspace(0.5, 1.5, d_i, dtype=DTYPE).to(dtype))
    H = adapter.input_statistic(module, prepared, K, "expand")
    a = adapter.input_rows(module, prepared, "expand")
    Kd = K.to_dense().to(DTYPE)
    expected = torch.diagonal(Kd.T @ a.T @ a @ Kd)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == DTYPE else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(H.diag.to(DTYPE), expected, **tol)


# ----------------------------------------------------------------- training
def test_kfac_step_equals_dense_formula():
    """One KFAC step on a transposed convolution called with ``output_size``, from
    the oracle's rows (ALGORITHM.md section 5)."""
    torch.manual_seed(7)
    module = nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1).to(DTYPE)
    x = torch.randn(3, 2, 3, 3, dtype=DTYPE)
    lr, beta, lam = 0.1, 0.3, 0.05
    opt = KFAC(module, lr=lr, lr_cov=beta, damping=lam, T=1, momentum=0.0)
    W0 = torch.cat([matrix_weight(module), module.bias.detach()[:, None]], 1)
    y = module(x, output_size=(6, 5))
    y.retain_grad()
    R = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=DTYPE)
    ((R * y).sum() / y.shape[0]).backward()  # loss_average="batch", KFAC's default
    a, g = expected_rows(module, group_patches(module, x, (6, 5)), y.grad, "expand", "batch")
    d_i = a.shape[1]
    S_K = (1 - beta) * (1 - lam) * torch.eye(d_i, dtype=DTYPE) + beta * a.T @ a
    S_C = (1 - beta) * (1 - lam) * torch.eye(2, dtype=DTYPE) + beta * g.T @ g
    grad = get_adapter(module).grad_matrix(module)
    nat = torch.linalg.solve(S_C + lam * torch.eye(2, dtype=DTYPE), grad)
    nat = torch.linalg.solve(S_K + lam * torch.eye(d_i, dtype=DTYPE), nat.T).T
    opt.step()
    W1 = torch.cat([matrix_weight(module), module.bias.detach()[:, None]], 1)
    torch.testing.assert_close(W1, W0 - lr * nat, rtol=1e-10, atol=1e-12)


def make_decoder(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 8 * 3 * 3),
        nn.Unflatten(1, (8, 3, 3)),
        nn.Tanh(),
        nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1),  # 6x6
        nn.Tanh(),
        nn.ConvTranspose2d(4, 2, 2, stride=2, groups=2),  # 12x12
    )


@pytest.mark.parametrize("structures", ["dense", "diagonal", "hierarchical:3,3"])
def test_singd_trains_a_transposed_conv_decoder(structures):
    model = make_decoder(0)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(32, 4, generator=gen)
    with torch.no_grad():
        target = make_decoder(5)(z)
    opt = SINGD(model, lr=0.05, momentum=0.5, damping=1e-3, T=1, lr_cov=1e-2, structures=structures)
    assert set(opt.layers) == {"0", "3", "5"}
    assert opt.fallback_parameters == {}
    spec = get_structure(structures)
    assert type(opt.layers["3"].K) is type(spec.eye(2))
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = ((model(z) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert opt.skipped_steps == 0
