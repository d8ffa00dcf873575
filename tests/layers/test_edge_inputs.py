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
