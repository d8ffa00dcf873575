"""Inputs at the edges of what layers see in practice: 16-bit factors with large
statistics (squared raw pixels, frequent padding tokens), empty batches (an MoE expert
that receives no tokens) and legacy ``weight_norm`` layers. Oracles: the formulas of
ALGORITHM.md section 2 written out densely in float64, and runs without the edge case.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.optim.test_singd_behaviour import assert_states_equal, full_state
from torchsingd import SINGD
from torchsingd.layers import get_adapter
from torchsingd.structures import DiagonalMatrix

HP = dict(lr=0.05, lr_cov=0.05, T=1, structures="diagonal", warn_unsupported=False)


def test_float16_diagonal_conv_statistic_of_raw_pixels_is_finite_and_right():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.rand(128, 3, 32, 32) * 255.0  # raw pixels: sum of squares ~ 1e10
    K = DiagonalMatrix(torch.ones(3 * 9 + 1, dtype=torch.float16))
    H = get_adapter(conv).input_statistic(conv, x, K, "expand")
    patches = F.unfold(x.double(), 3, padding=1).transpose(1, 2).reshape(-1, 27)  # [N, 27]
    a = torch.cat([patches, torch.ones(len(patches), 1, dtype=torch.float64)], 1)
    expected = (a * a).sum(0) / len(a)  # diag(a^T a) / N, K = I
    assert H.diag.dtype == torch.float16 and torch.isfinite(H.diag).all()
    torch.testing.assert_close(H.diag.double(), expected, rtol=2e-3, atol=0)


def test_float16_embedding_counts_above_65504_stay_finite():
    emb = nn.Embedding(100, 8, padding_idx=0)
    x = torch.randint(1, 100, (64, 2048))
    x[:, 1024:] = 0  # 65536 padding tokens
    K = DiagonalMatrix(torch.ones(100, dtype=torch.float16))
    H = get_adapter(emb).input_statistic(emb, x, K, "expand")
    expected = torch.bincount(x.flatten(), minlength=100).double() / x.numel()
    assert torch.isfinite(H.diag).all()
    torch.testing.assert_close(H.diag.double(), expected, rtol=1e-3, atol=1e-7)


def _models():
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(5, 3).double(), lambda n: torch.randn(n, 5, dtype=torch.float64)),
        "conv": (
            nn.Conv2d(2, 3, 3).double(),
            lambda n: torch.randn(n, 2, 5, 5, dtype=torch.float64),
        ),
        "embedding": (nn.Embedding(7, 3).double(), lambda n: torch.randint(0, 7, (n, 4))),
    }


@pytest.mark.parametrize("kind", ["linear", "conv", "embedding"])
def test_an_empty_batch_adds_nothing(kind):
    """A backward pass over zero samples next to a normal one: the same step as the
    normal one alone (bit for bit), and no error in backward."""
    model, data = _models()[kind]
    model_ref, _ = _models()[kind]
    opt = SINGD(model, **HP)
    opt_ref = SINGD(model_ref, **HP)
    for t in range(3):
        torch.manual_seed(100 + t)
        x = data(6)
        model(data(0)).pow(2).sum().backward()  # the empty micro-batch
        model(x).pow(2).sum().backward()
        model_ref(x).pow(2).sum().backward()
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
    assert_states_equal(full_state(model_ref, opt_ref), full_state(model, opt))


def test_an_empty_batch_alone_leaves_the_factors():
    model, data = _models()["linear"]
    opt = SINGD(model, **HP)
    before = full_state(model, opt)
    model(data(0)).sum().backward()
    opt.step()
    after = full_state(model, opt)
    for key in before:
        if ".K." in key or ".C." in key:
            assert torch.equal(before[key], after[key]), key
    assert all(torch.isfinite(v).all() for v in after.values())


def test_legacy_weight_norm_layer_goes_to_the_fallback_rule():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the old API
        conv = nn.utils.weight_norm(nn.Conv1d(2, 3, 3))
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(3 * 6, 2)).double()
    with pytest.warns(UserWarning, match="weight_g"):
        opt = SINGD(model, **dict(HP, warn_unsupported=True))
    assert list(opt.layers) == ["2"]
    before = conv.weight_v.detach().clone()
    model(torch.randn(4, 2, 8, dtype=torch.float64)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(before, conv.weight_v)


@pytest.mark.parametrize("structure", ["dense", "triltoeplitz"])
def test_layer_with_an_empty_weight_goes_to_the_fallback(structure):
    """``nn.Linear(0, 3)`` (its bias still trains) crashed in the user's backward
    (reshaping the empty input); with Toeplitz ``Linear(3, 0)`` failed at construction.
    Such a layer now goes to the fallback rule, named in the construction warning; its
    bias takes the AdamW step torch.optim.AdamW takes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(0, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    bias = model[0].bias.detach().clone().requires_grad_()
    reference = torch.optim.AdamW([bias], lr=0.05, weight_decay=0.0)
    with pytest.warns(UserWarning, match=r"fallback rule.*0\.bias"):
        opt = SINGD(model, lr=0.05, T=1, structures=structure, weight_decay=0.0)
    assert set(opt.layers) == {"2"}
    x = torch.zeros(4, 0, dtype=torch.float64)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        reference.param_groups[0]["params"][0].grad = model[0].bias.grad.clone()
        opt.step()
        reference.step()
    torch.testing.assert_close(model[0].bias, reference.param_groups[0]["params"][0])


def _adapter_cases():
    """``(name, module, input of n samples)`` for the adapters' own statistic routes:
    convolutions (the diagonal and ``triltopleftdiag:1`` routes, the Gram routes),
    a transposed convolution (its diagonal route), linear and embedding layers."""
    torch.manual_seed(0)
    return [
        ("conv2d", nn.Conv2d(2, 3, 3, padding=1).double(), (2, 5, 5)),
        ("conv1d", nn.Conv1d(2, 3, 3, stride=2).double(), (2, 9)),
        ("conv_transpose2d", nn.ConvTranspose2d(2, 3, 3, stride=2).double(), (2, 4, 4)),
        ("linear", nn.Linear(5, 4).double(), (5,)),
    ]


ALL_FAMILIES = [
    "dense",
    "diagonal",
    "blockdiagonal:4",
    "hierarchical:2,3",
    "triltoeplitz",
    "triutoeplitz",
    "triltopleftdiag:1",
    "trilbottomrightdiag:1",
    "triutopleftdiag:2",
    "triubottomrightdiag:1",
]


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("case", range(4), ids=[c[0] for c in _adapter_cases()])
def test_statistic_of_an_empty_batch_is_zero(case, family):
    """An adapter asked for the statistic of zero samples (no rows ``a``): ``P(K^T 0
    K) = 0`` by every route. The convolutions' diagonal route divided 0 by 0 (NaN) and
    their ``triltopleftdiag:1`` route read the first sample (IndexError); the optimizer
    itself never asks (it skips empty outputs: ``test_an_empty_batch_adds_nothing``)."""
    from torchsingd.structures import get_structure

    _, module, shape = _adapter_cases()[case]
    adapter = get_adapter(module)
    d = adapter.dims(module)[0]
    torch.manual_seed(1)
    K = get_structure(family).from_dense(torch.eye(d, dtype=torch.float64) + 0.1)
    x = torch.randn(0, *shape, dtype=torch.float64)
    x = adapter.capture_input(module, x, module(x).shape)
    H = adapter.input_statistic(module, x, K, "expand")
    assert torch.equal(H.to_dense(), torch.zeros(d, d, dtype=torch.float64))


@pytest.mark.parametrize("case", range(4), ids=[c[0] for c in _adapter_cases()])
def test_input_rows_of_an_input_that_requires_grad(case):
    """With grad mode on and an input that requires a gradient, ``input_rows`` (one
    pass with ``torch.div(out=)``, which autograd refuses) takes a differentiable
    copy: the same rows, and their gradient reaches the input. Oracle: ``sum_{rows}
    <a, W>`` for a random ``W`` is linear in ``x``; its gradient by autograd equals
    the finite difference along a random direction, exactly up to rounding."""
    _, module, shape = _adapter_cases()[case]
    adapter = get_adapter(module)
    torch.manual_seed(2)
    x = torch.randn(3, *shape, dtype=torch.float64)
    with torch.no_grad():
        x = adapter.capture_input(module, x, module(x).shape)
    with torch.no_grad():
        expected = adapter.input_rows(module, x, "expand")
    leaf = x.clone().requires_grad_(True)
    rows = adapter.input_rows(module, leaf, "expand")
    torch.testing.assert_close(rows, expected, rtol=0, atol=0)
    W = torch.randn_like(rows)
    (rows * W).sum().backward()
    v = torch.randn_like(x)
    with torch.no_grad():
        step = (adapter.input_rows(module, x + v, "expand") * W).sum() - (expected * W).sum()
    # the bias column does not depend on x: the difference is the directional derivative
    torch.testing.assert_close((leaf.grad * v).sum(), step, rtol=1e-10, atol=1e-12)
