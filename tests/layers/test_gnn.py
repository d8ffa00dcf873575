"""torch_geometric's ``GCNConv`` through ``SINGD``: node classification on a stochastic
block model graph generated here.

SINGD preconditions the inner ``lin`` (torch_geometric's ``Linear``, registered by
name) of every ``GCNConv``; the convolution's own ``bias`` goes to the fallback rule.
The captured statistics of ``conv1.lin`` are checked against a dense float64
re-implementation of GCN (``A_hat = D^-1/2 (A + I) D^-1/2``) and autograd.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchsingd import SINGD
from torchsingd.layers import LinearAdapter, get_adapter
from torchsingd.structures import DenseMatrix

pyg_nn = pytest.importorskip("torch_geometric.nn")

BLOCK_SIZES = (30, 30, 30)
P_IN, P_OUT = 0.3, 0.02
N_EXTRA = 5  # pure-noise feature columns


def sbm_graph(seed: int = 0, dtype=torch.float32):
    """``(x, edge_index, y, train_mask, A)``: an undirected SBM graph without self loops."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), i) for i, n in enumerate(BLOCK_SIZES)])
    N = y.numel()
    probs = torch.where(y[:, None] == y[None, :], P_IN, P_OUT)
    upper = torch.triu(torch.rand(N, N, generator=gen) < probs, diagonal=1)
    A = (upper | upper.T).to(dtype)
    edge_index = A.nonzero().T.contiguous()
    features = F.one_hot(y, len(BLOCK_SIZES)).to(dtype)
    features = features + 0.8 * torch.randn(N, len(BLOCK_SIZES), generator=gen, dtype=dtype)
    noise = torch.randn(N, N_EXTRA, generator=gen, dtype=dtype)
    x = torch.cat([features, noise], dim=1)
    train_mask = torch.rand(N, generator=gen) < 0.5
    return x, edge_index, y, train_mask, A


class GCN(nn.Module):
    def __init__(self, d_in: int, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.conv1 = pyg_nn.GCNConv(d_in, hidden)
        self.conv2 = pyg_nn.GCNConv(hidden, n_classes)

    def forward(self, x, edge_index):
        return self.conv2(torch.relu(self.conv1(x, edge_index)), edge_index)


def test_graph_is_a_stochastic_block_model():
    x, edge_index, y, train_mask, A = sbm_graph()
    assert torch.equal(A, A.T) and A.diagonal().sum() == 0
    same = y[:, None] == y[None, :]
    p_in = A[same].sum() / (same.sum() - y.numel())
    p_out = A[~same].sum() / (~same).sum()
    assert abs(p_in - P_IN) < 0.05 and abs(p_out - P_OUT) < 0.015
    assert 20 < int(train_mask.sum()) < 70


def test_gcn_layers_are_preconditioned_and_bias_uses_fallback():
    x, *_ = sbm_graph()
    torch.manual_seed(0)
    model = GCN(x.shape[1], 16, 3)
    assert isinstance(get_adapter(model.conv1.lin), LinearAdapter)
    assert get_adapter(model.conv1) is None
    opt = SINGD(model, warn_unsupported=False)
    assert set(opt.layers) == {"conv1.lin", "conv2.lin"}
    assert opt.fallback_parameters == {"conv1.bias": "adamw", "conv2.bias": "adamw"}
    # GCNConv's lin has no bias: d_i = input features
    assert opt.layers["conv1.lin"].K.dim == x.shape[1] and opt.layers["conv1.lin"].C.dim == 16
    assert opt.layers["conv2.lin"].K.dim == 16 and opt.layers["conv2.lin"].C.dim == 3
    with pytest.warns(UserWarning, match="conv1.bias"):
        SINGD(model)


@pytest.mark.parametrize("loss_average", [None, "batch"], ids=str)
def test_captured_statistics_of_conv1_lin(loss_average):
    """``a`` rows of ``conv1.lin`` are the node features; ``g`` the gradient w.r.t.
    ``X W^T`` (before propagation), from a dense re-implementation."""
    dtype = torch.float64
    x, edge_index, y, train_mask, A = sbm_graph(dtype=dtype)
    torch.manual_seed(0)
    model = GCN(x.shape[1], 8, 3).to(dtype)
    opt = SINGD(model, T=1, structures="dense", loss_average=loss_average, warn_unsupported=False)
    layer = opt.layers["conv1.lin"]
    gen = torch.Generator().manual_seed(5)
    K = torch.eye(layer.K.dim, dtype=dtype) + 0.2 * torch.randn(
        layer.K.dim, layer.K.dim, generator=gen, dtype=dtype
    )
    C = torch.eye(layer.C.dim, dtype=dtype) + 0.2 * torch.randn(
        layer.C.dim, layer.C.dim, generator=gen, dtype=dtype
    )
    layer.K, layer.C = DenseMatrix(K.clone()), DenseMatrix(C.clone())

    out = model(x, edge_index)
    F.cross_entropy(out[train_mask], y[train_mask]).backward()

    # dense GCN, float64, autograd
    A_tilde = A + torch.eye(A.shape[0], dtype=dtype)
    d = A_tilde.sum(1).rsqrt()
    A_hat = d[:, None] * A_tilde * d[None, :]
    W1 = model.conv1.lin.weight.detach().clone()
    W2 = model.conv2.lin.weight.detach().clone()
    b1, b2 = model.conv1.bias.detach(), model.conv2.bias.detach()
    Z1 = (x @ W1.T).requires_grad_(True)
    h = torch.relu(A_hat @ Z1 + b1)
    ref_out = A_hat @ (h @ W2.T) + b2
    torch.testing.assert_close(ref_out, out.detach(), rtol=1e-10, atol=1e-12)  # oracle check
    (gZ1,) = torch.autograd.grad(F.cross_entropy(ref_out[train_mask], y[train_mask]), Z1)

    N = x.shape[0]
    a = x / math.sqrt(N)  # node features as rows, no bias column
    g = gZ1 * math.sqrt(N if loss_average == "batch" else 1)
    torch.testing.assert_close(layer.H_K.to_dense(), K.T @ a.T @ a @ K, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.H_C.to_dense(), C.T @ g.T @ g @ C, rtol=1e-10, atol=1e-12)
    # and the adapter's rows themselves are the features
    adapter = get_adapter(model.conv1.lin)
    torch.testing.assert_close(adapter.input_rows(model.conv1.lin, x, "expand"), a)


@pytest.mark.parametrize("structures", ["dense", "diagonal"])
def test_gcn_node_classification_trains(structures):
    x, edge_index, y, train_mask, _ = sbm_graph()
    torch.manual_seed(0)
    model = GCN(x.shape[1], 16, 3)
    opt = SINGD(
        model,
        lr=0.05,
        momentum=0.9,
        T=5,
        lr_cov=0.05,
        structures=structures,
        fallback_lr=0.01,
        warn_unsupported=False,
    )
    bias0 = model.conv1.bias.detach().clone()
    K0 = opt.layers["conv1.lin"].K.to_dense().clone()
    losses, accs = [], []
    for _ in range(100):
        opt.zero_grad()
        out = model(x, edge_index)
        loss = F.cross_entropy(out[train_mask], y[train_mask])
        loss.backward()
        opt.step()
        losses.append(loss.item())
        accs.append((out[train_mask].argmax(1) == y[train_mask]).float().mean().item())
    assert accs[0] < 0.5  # not solved at initialisation
    assert max(accs) > 0.9 and accs[-1] > 0.9, accs
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.1 * losses[0]
    assert not torch.equal(model.conv1.bias, bias0)  # trained by the fallback
    assert not torch.allclose(opt.layers["conv1.lin"].K.to_dense(), K0)
    with torch.no_grad():
        final = (model(x, edge_index).argmax(1)[train_mask] == y[train_mask]).float().mean()
    assert final > 0.9
