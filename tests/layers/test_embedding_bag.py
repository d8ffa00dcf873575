"""``nn.EmbeddingBag`` (``mode="sum"``/``"mean"``) against ALGORITHM.md section 2.

The oracle writes each bag's count vector ``c_b`` by a loop over its tokens (weight
``per_sample_weights`` or 1, ``1 / size`` for "mean", ``padding_idx`` left out); it is
validated against PyTorch (``weight^T c_b`` is the module's output), and
``sqrt(B) g^T a`` must give autograd's weight gradient.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch import nn

from torchsingd import KFAC, SINGD
from torchsingd.layers import EmbeddingBagAdapter, get_adapter
from torchsingd.structures import DiagonalMatrix

DTYPE = torch.float64
V, D = 7, 3


def bags_of(input, offsets, include_last_offset):
    """The bags as lists of token positions."""
    if input.ndim == 2:
        L = input.shape[1]
        return [list(range(b * L, (b + 1) * L)) for b in range(input.shape[0])]
    starts = offsets.tolist()
    if include_last_offset:
        ends = starts[1:]
        starts = starts[:-1]
    else:
        ends = [*starts[1:], input.numel()]
    return [list(range(s, e)) for s, e in zip(starts, ends, strict=True)]


def counts_oracle(module, input, offsets=None, psw=None):
    tokens = input.reshape(-1).tolist()
    weights = [1.0] * len(tokens) if psw is None else psw.reshape(-1).tolist()
    bags = bags_of(input, offsets, module.include_last_offset)
    C = torch.zeros(len(bags), module.num_embeddings, dtype=DTYPE)
    for b, positions in enumerate(bags):
        kept = [i for i in positions if tokens[i] != module.padding_idx]
        for i in kept:
            w = weights[i] / len(kept) if module.mode == "mean" else weights[i]
            C[b, tokens[i]] += w
    return C


CASES = {
    # name: (module kwargs, input, offsets, per_sample_weights)
    "2d_mean": (dict(mode="mean"), torch.tensor([[1, 2, 2], [0, 6, 3]]), None, False),
    "2d_sum": (dict(mode="sum"), torch.tensor([[4, 4, 4], [5, 1, 0]]), None, False),
    "offsets_sum_weights": (
        dict(mode="sum"),
        torch.tensor([1, 2, 2, 6, 0, 3, 3]),
        torch.tensor([0, 3, 3, 5]),  # bag 1 is empty
        True,
    ),
    "offsets_mean_padding": (
        dict(mode="mean", padding_idx=2),
        torch.tensor([1, 2, 2, 6, 2, 3, 5]),
        torch.tensor([0, 2, 4]),  # bag 0: one real token; bag 1: one
        False,
    ),
    "last_offset_sum_padding_weights": (
        dict(mode="sum", padding_idx=0, include_last_offset=True),
        torch.tensor([0, 2, 5, 5, 1, 0]),
        torch.tensor([0, 1, 4, 6]),
        True,
    ),
}


def setup_case(name):
    kwargs, input, offsets, weighted = CASES[name]
    torch.manual_seed(0)
    module = nn.EmbeddingBag(V, D, **kwargs).to(DTYPE)
    psw = torch.rand(input.shape, dtype=DTYPE) + 0.5 if weighted else None
    return module, input, offsets, psw


@pytest.mark.parametrize("name", list(CASES))
def test_counts_oracle_reproduces_the_module_output(name):
    module, input, offsets, psw = setup_case(name)
    out = module(input, offsets, per_sample_weights=psw)
    C = counts_oracle(module, input, offsets, psw)
    torch.testing.assert_close(C @ module.weight.detach(), out.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("loss_average", [None, "batch", "batch+sequence"], ids=str)
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_captured_rows_and_statistics(name, loss_average, approx):
    """Through the optimizer's own hook: the captured ``H_K`` (diagonal and dense
    vocabulary structure) and ``H_C`` at ``K = C = I`` equal ``a^T a`` and ``g^T g``
    from the oracle's rows; the rows reproduce the weight gradient."""
    module, input, offsets, psw = setup_case(name)
    adapter = get_adapter(module)
    assert isinstance(adapter, EmbeddingBagAdapter)
    C_exp = counts_oracle(module, input, offsets, psw)
    B = C_exp.shape[0]
    a_exp = C_exp / math.sqrt(B)
    for vocab in ("diagonal", "dense"):
        opt = SINGD(
            module,
            T=1,
            loss_average=loss_average,
            kfac_approx=approx,
            vocab_structure=vocab,
            structures="dense",
        )
        out = module(input, offsets, per_sample_weights=psw)
        out.retain_grad()
        R = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
        opt.zero_grad()
        (R * out).sum().backward()
        H_K, H_C = opt.layers[""].pending
        terms = {None: 1, "batch": B, "batch+sequence": B}[loss_average]
        g_exp = out.grad * math.sqrt(terms)
        expected_K = a_exp.T @ a_exp
        if vocab == "diagonal":
            expected_K = torch.diag(torch.diagonal(expected_K))
        torch.testing.assert_close(H_K.to_dense(), expected_K, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(H_C.to_dense(), g_exp.T @ g_exp, rtol=1e-12, atol=1e-14)
        grad = adapter.grad_matrix(module)
        torch.testing.assert_close(
            g_exp.T @ a_exp * math.sqrt(B / terms), grad, rtol=1e-12, atol=1e-14
        )
        opt.remove_hooks()


def test_kfac_step_equals_dense_formula():
    module, input, offsets, psw = setup_case("offsets_sum_weights")
    lr, beta, lam = 0.1, 0.3, 0.05
    opt = KFAC(module, lr=lr, lr_cov=beta, damping=lam, T=1, momentum=0.0, vocab_structure="dense")
    W0 = module.weight.detach().T.clone()
    out = module(input, offsets, per_sample_weights=psw)
    R = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    ((R * out).sum() / out.shape[0]).backward()
    B = out.shape[0]
    a = counts_oracle(module, input, offsets, psw) / math.sqrt(B)
    g = R / B * math.sqrt(B)
    S_K = (1 - beta) * (1 - lam) * torch.eye(V, dtype=DTYPE) + beta * a.T @ a
    S_C = (1 - beta) * (1 - lam) * torch.eye(D, dtype=DTYPE) + beta * g.T @ g
    nat = torch.linalg.solve(S_C + lam * torch.eye(D, dtype=DTYPE), module.weight.grad.T)
    nat = torch.linalg.solve(S_K + lam * torch.eye(V, dtype=DTYPE), nat.T).T
    opt.step()
    torch.testing.assert_close(module.weight.detach().T, W0 - lr * nat, rtol=1e-10, atol=1e-12)


def test_padding_row_never_changes_and_max_mode_goes_to_fallback():
    torch.manual_seed(1)
    bag = nn.EmbeddingBag(V, D, mode="mean", padding_idx=0)
    peak = nn.EmbeddingBag(V, D, mode="max")
    model = nn.ModuleDict({"bag": bag, "peak": peak})
    with pytest.warns(UserWarning, match="peak.weight"):
        opt = SINGD(model, T=1, lr=0.1)
    assert set(opt.layers) == {"bag"} and "peak.weight" in opt.fallback_parameters
    pad_row, peak_before = bag.weight[0].detach().clone(), peak.weight.detach().clone()
    ids = torch.tensor([[0, 1, 2], [3, 0, 0]])
    for _ in range(3):
        opt.zero_grad()
        (bag(ids).square().sum() + peak(ids).square().sum()).backward()
        opt.step()
    assert torch.equal(bag.weight[0], pad_row)
    assert not torch.equal(peak.weight, peak_before)  # the fallback trains it


def test_unobserved_passes_build_nothing_and_the_hook_pickles():
    module = nn.EmbeddingBag(V, D)
    opt = SINGD(module, T=2)
    ids = torch.tensor([[1, 2]])
    with torch.no_grad():
        module(ids)
    assert opt.layers[""].pending is None
    restored = pickle.loads(pickle.dumps(module))  # an inert hook
    assert torch.equal(restored(ids), module(ids))


def test_singd_trains_a_bag_of_words_classifier():
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 50, (64, 6), generator=gen)
    y = (ids < 25).sum(1).clamp(max=4)  # how many "low" tokens the bag holds
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(50, 16, mode="mean"), nn.Tanh(), nn.Linear(16, 5))
    opt = SINGD(model, lr=0.05, T=2, lr_cov=0.05, damping=1e-2, structures="diagonal")
    assert set(opt.layers) == {"0", "2"} and opt.fallback_parameters == {}
    assert isinstance(opt.layers["0"].K, DiagonalMatrix)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(ids), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0], losses
