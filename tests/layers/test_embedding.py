"""``nn.Embedding`` through its adapter and through ``SINGD``.

As a matrix the embedding weight is ``W = weight^T`` (``[D, V]``); its input rows are
one-hot vectors. Expected statistics are built here from explicit one-hot rows (Python
loops over tokens) and dense float64 products ``K^T a^T a K``, then projected.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchsingd import SINGD
from torchsingd.layers import EmbeddingAdapter, get_adapter
from torchsingd.structures import DenseMatrix, DiagonalMatrix

DTYPE = torch.float64
V, D = 11, 4


# ------------------------------------------------------------------ oracles
def one_hot_rows(x: torch.Tensor, vocab: int, approx: str) -> torch.Tensor:
    """``a`` (before nothing is left to append: no bias) by explicit loops, float64."""
    tokens = x.reshape(x.shape[0], -1).tolist() if x.ndim else [[int(x)]]
    rows = []
    for sample in tokens:
        vecs = []
        for t in sample:
            v = [0.0] * vocab
            v[t] = 1.0
            vecs.append(v)
        if approx == "expand":
            rows += vecs
        else:
            rows.append([sum(col) / len(vecs) for col in zip(*vecs, strict=True)])
    return torch.tensor(rows, dtype=DTYPE) / math.sqrt(len(rows))


def expected_H_K(x, K_dense: torch.Tensor, approx: str, diagonal: bool) -> torch.Tensor:
    a = one_hot_rows(x, K_dense.shape[0], approx)
    M = K_dense.T @ a.T @ a @ K_dense
    return torch.diag(torch.diagonal(M)) if diagonal else M


def random_dense(d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.eye(d, dtype=DTYPE) + 0.3 * torch.randn(d, d, generator=gen, dtype=DTYPE)


def random_diag(d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.5 + torch.rand(d, generator=gen, dtype=DTYPE)


# A vocabulary with a repeated token in a sample, an unused token and a token used by
# two samples; S = 3 so that per-sample frequencies (1/3, 2/3) are not dyadic.
INPUTS = {
    "BxS": torch.tensor([[1, 2, 2], [0, 10, 1], [5, 5, 5], [3, 4, 9]]),
    "B": torch.tensor([1, 2, 2, 7, 0]),
    "BxSxS2": torch.tensor([[[1, 2], [2, 3]], [[0, 0], [4, 10]]]),
}
# Tolerances: the adapter currently builds one-hot rows / frequencies in float32 (see
# test_float64_statistic_is_float64_accurate), so these check the math at 1e-6.
TOL = dict(rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("inp", list(INPUTS))
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_input_statistic_diagonal_K(inp, approx):
    emb = nn.Embedding(V, D).to(DTYPE)
    adapter = get_adapter(emb)
    assert isinstance(adapter, EmbeddingAdapter)
    K = DiagonalMatrix(random_diag(V, 0))
    H = adapter.input_statistic(emb, INPUTS[inp], K, approx)
    assert isinstance(H, DiagonalMatrix) and H.dtype == DTYPE
    expected = expected_H_K(INPUTS[inp], torch.diag(K.diag), approx, diagonal=True)
    torch.testing.assert_close(H.to_dense(), expected, **TOL)


@pytest.mark.parametrize("inp", list(INPUTS))
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_input_statistic_dense_K(inp, approx):
    emb = nn.Embedding(V, D).to(DTYPE)
    opt = SINGD(emb, vocab_structure="dense", structures=("diagonal", "diagonal"))
    layer = opt.layers[""]
    assert isinstance(layer.K, DenseMatrix) and layer.K.dim == V
    assert isinstance(layer.C, DiagonalMatrix) and layer.C.dim == D
    K = DenseMatrix(random_dense(V, 1))
    H = get_adapter(emb).input_statistic(emb, INPUTS[inp], K, approx)
    assert isinstance(H, DenseMatrix)
    expected = expected_H_K(INPUTS[inp], K.mat, approx, diagonal=False)
    torch.testing.assert_close(H.to_dense(), expected, **TOL)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_input_rows_are_scaled_one_hots(approx):
    emb = nn.Embedding(V, D).to(DTYPE)
    x = INPUTS["BxS"]
    a = get_adapter(emb).input_rows(emb, x, approx)
    torch.testing.assert_close(a.to(DTYPE), one_hot_rows(x, V, approx), **TOL)


@pytest.mark.parametrize("approx, dense", [("reduce", False), ("expand", True), ("reduce", True)])
def test_float64_statistic_is_float64_accurate(approx, dense):
    emb = nn.Embedding(V, D).to(DTYPE)
    x = INPUTS["BxS"]
    if dense:
        K = DenseMatrix(random_dense(V, 1))
        K_dense = K.mat
    else:
        K = DiagonalMatrix(random_diag(V, 0))
        K_dense = torch.diag(K.diag)
    H = get_adapter(emb).input_statistic(emb, x, K, approx)
    expected = expected_H_K(x, K_dense, approx, diagonal=not dense)
    torch.testing.assert_close(H.to_dense(), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("loss_average", [None, "batch", "batch+sequence"], ids=str)
def test_captured_statistics_after_one_backward(approx, loss_average):
    """``H_K``/``H_C`` held by SINGD after one backward pass at step 0 (``K = C = I``)."""
    torch.manual_seed(0)
    emb = nn.Embedding(V, D).to(DTYPE)
    opt = SINGD(emb, T=1, kfac_approx=approx, loss_average=loss_average)
    x = INPUTS["BxS"]
    out = emb(x)
    out.retain_grad()
    R = torch.randn(out.shape, dtype=DTYPE)
    (R * out).sum().backward()
    layer = opt.layers[""]
    expected = expected_H_K(x, torch.eye(V, dtype=DTYPE), approx, diagonal=True)
    torch.testing.assert_close(layer.H_K.to_dense(), expected, **TOL)

    B, S = x.shape
    go = out.grad
    g_rows = go.reshape(B * S, D) if approx == "expand" else go.sum(1)
    n = {None: 1, "batch": B, "batch+sequence": B * S}[loss_average]
    torch.testing.assert_close(layer.H_C.to_dense(), n * g_rows.T @ g_rows, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "structures, c_family",
    [
        (("dense", "diagonal"), "diagonal"),
        (("diagonal", "dense"), "dense"),
        ("dense", "dense"),
        (("dense", "blockdiagonal:2"), "blockdiagonal"),
        (("hierarchical:2,1", "triltoeplitz"), "triltoeplitz"),
    ],
    ids=["dense-diag", "diag-dense", "dense", "dense-block2", "hier-toeplitz"],
)
def test_default_vocab_structure_is_diagonal_and_C_follows_structures(structures, c_family):
    emb = nn.Embedding(V, D)
    lin = nn.Linear(D, 3)
    model = nn.Sequential(emb, lin)
    opt = SINGD(model, structures=structures)
    K, C = opt.layers["0"].K, opt.layers["0"].C
    assert isinstance(K, DiagonalMatrix) and K.dim == V and K.numel() == V
    assert type(C).family == c_family and C.dim == D
    # Linear layers still use structures[0] for K
    k_family = (structures if isinstance(structures, str) else structures[0]).split(":")[0]
    assert type(opt.layers["1"].K).family == k_family
    assert opt.fallback_parameters == {}


def test_grad_matrix_is_weight_grad_transposed_and_directions_transpose_back():
    torch.manual_seed(0)
    emb = nn.Embedding(V, D).to(DTYPE)
    adapter = get_adapter(emb)
    assert adapter.grad_matrix(emb) is None
    (torch.randn(4, 3, D, dtype=DTYPE) * emb(INPUTS["BxS"])).sum().backward()
    G = adapter.grad_matrix(emb)
    assert G.shape == (D, V) == tuple(reversed(adapter.dims(emb)))
    assert torch.equal(G, emb.weight.grad.T)
    M = torch.randn(D, V, dtype=DTYPE)
    (direction,) = adapter.directions(emb, {"": M})
    assert direction.shape == emb.weight.shape and torch.equal(direction, M.T)
    assert adapter.params(emb) == [emb.weight]


@pytest.mark.parametrize("vocab_structure", ["dense", "diagonal"])
def test_padding_idx_row_and_its_momentum_never_change(vocab_structure):
    torch.manual_seed(0)
    pad = 3
    model = nn.Sequential(nn.Embedding(V, D, padding_idx=pad), nn.Linear(D, 2)).to(DTYPE)
    emb = model[0]
    with torch.no_grad():
        emb.weight[pad] = torch.randn(D, dtype=DTYPE)  # non-zero, so decay would show
    row0 = emb.weight[pad].clone()
    opt = SINGD(
        model,
        lr=0.1,
        momentum=0.9,
        weight_decay=0.1,
        T=1,
        lr_cov=0.1,
        vocab_structure=vocab_structure,
        structures="dense",
    )
    gen = torch.Generator().manual_seed(1)
    others = emb.weight.detach().clone()
    buf_rows = []
    for _ in range(5):
        x = torch.randint(0, V, (6, 5), generator=gen)
        x[:, 0] = pad  # the padding token is always present
        opt.zero_grad()
        (model(x) ** 2).mean().backward()
        assert torch.equal(emb.weight.grad[pad], torch.zeros(D, dtype=DTYPE))
        opt.step()
        assert torch.equal(emb.weight[pad], row0)
        buf_rows.append(opt.state[emb.weight]["momentum_buffer"][pad].clone())
    assert torch.equal(buf_rows[0], torch.zeros(D, dtype=DTYPE))  # as if it never moved
    for row in buf_rows:
        assert torch.equal(row, buf_rows[0])
    # the preconditioner mixes vocabulary entries (dense K), but not into the padding row;
    # every other row moved
    moved = (emb.weight.detach() - others).abs().sum(1)
    assert moved[pad] == 0 and bool((moved[torch.arange(V) != pad] > 0).all())
    assert type(opt.layers["0"].K).family == vocab_structure


def test_sparse_embedding_is_rejected_at_construction():
    model = nn.Sequential(nn.Embedding(V, D, sparse=True), nn.Linear(D, 2))
    with pytest.raises(ValueError, match="sparse"):
        SINGD(model)


def test_language_model_trains():
    """Embedding -> Linear learns a deterministic next-token rule."""
    vocab, dim = 16, 8
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(vocab, dim), nn.Linear(dim, vocab))
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (32, 6), generator=gen)
    y = (3 * x + 1) % vocab
    opt = SINGD(model, lr=0.1, momentum=0.9, T=1, lr_cov=0.05, loss_average="batch+sequence")
    assert set(opt.layers) == {"0", "1"}
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.3 * losses[0], losses
    K = opt.layers["0"].K
    assert isinstance(K, DiagonalMatrix) and not torch.equal(K.diag, torch.ones(vocab))
    # the module itself is untouched: same outputs as a plain copy with the same weights
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_large_vocabulary_keeps_diagonal_state():
    """``num_embeddings=50000``: ``K`` stores 50000 numbers, never ``50000^2``."""
    vocab, dim = 50000, 4
    torch.manual_seed(0)
    emb = nn.Embedding(vocab, dim)
    opt = SINGD(emb, T=1, momentum=0.9, alpha1=0.5)
    x = torch.randint(0, vocab, (8, 16))
    for _ in range(2):
        opt.zero_grad()
        emb(x).square().mean().backward()
        opt.step()
    layer = opt.layers[""]
    assert isinstance(layer.K, DiagonalMatrix) and isinstance(layer.m_K, DiagonalMatrix)
    assert layer.K.numel() == vocab and layer.m_K.numel() == vocab
    assert layer.C.numel() == dim * dim
    # state: K, m_K and the cached K K^T (V numbers each), C, m_C and C C^T (D^2
    # each), one momentum buffer (V * D)
    assert isinstance(layer.KKt, DiagonalMatrix) and layer.CCt.numel() == dim * dim
    expected_numbers = 3 * vocab + 3 * dim * dim + vocab * dim
    assert opt.state_bytes() == 4 * expected_numbers
    assert opt.state_bytes() < vocab * vocab  # far below one dense V x V factor
    # unused tokens keep K = 1 exactly (their statistic is zero; only damping acts on
    # them, identically), used tokens moved
    used = torch.zeros(vocab, dtype=torch.bool)
    used[x.flatten()] = True
    unused_values = torch.unique(layer.K.diag[~used])
    assert unused_values.numel() == 1
    assert bool((layer.K.diag[used] != unused_values[0]).all())
