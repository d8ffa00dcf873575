"""Sums whose terms fit a 16-bit dtype but whose total does not, and empty operands.

A float16 factor ``K = 31 I`` (what damping ``1e-3`` grows ``K`` towards) has
``avgtr(K^T K) = 961``, but ``trace(K^T K)`` overflows float16 (65504) from ``d = 69``
on; the Toeplitz projections sum whole diagonals before dividing by their lengths.
Expected values are exact: ``961``, ``(3.5^2) * 64 = 784`` and ``1000``.
"""

from __future__ import annotations

import pytest
import torch

from torchsingd.optim.update import update_factors
from torchsingd.structures import get_structure

FAMILIES = [
    "dense",
    "diagonal",
    "blockdiagonal:30",
    "hierarchical:15,15",
    "triltopleftdiag:1",
    "trilbottomrightdiag:1",
    "triutopleftdiag:1",
    "triltoeplitz",
    "triutoeplitz",
]
DIMS = [100, 300]  # Toeplitz: below and above the FFT threshold (256)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_average_trace_of_a_large_half_factor(name, d, dtype):
    K = get_structure(name).eye(d, dtype=dtype).mul_(31.0)
    KtK = K.inner()
    entry = float(torch.tensor(961.0, dtype=dtype))  # 960 in bfloat16
    assert float(KtK.average_trace()) == entry
    assert float(KtK.trace()) == entry * d
    assert KtK.is_finite()
    assert float(KtK.to_dense().to(torch.float64).diagonal().mean()) == entry


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_frobenius_norm_of_a_large_half_factor(name, dtype):
    """``||40 I||_F^2 = 1600 d``: 102400 at d = 64, inf in float16 for every family
    but Toeplitz (which summed in float32 already)."""
    d = 64
    K = get_structure(name).eye(d, dtype=dtype).mul_(40.0)
    value = K.frobenius_sq()
    assert value.dtype == torch.float32
    assert float(value) == 1600.0 * d


@pytest.mark.parametrize("name", ["diagonal", "hierarchical:15,15", "triltoeplitz"])
def test_float16_factor_update_stays_finite(name):
    spec = get_structure(name)
    K = spec.eye(100, dtype=torch.float16).mul_(31.0)
    C = spec.eye(4, dtype=torch.float16)
    H_K = spec.eye(100, dtype=torch.float16).mul_(1e-3)
    H_C = spec.eye(4, dtype=torch.float16)
    new = update_factors(
        K,
        C,
        None,
        None,
        H_K,
        H_C,
        damping=1e-3,
        alpha1=0.0,
        lr_cov=1e-2,
        kfac_like=False,
        normalize_lr_cov=False,
    )
    assert new.K.is_finite() and new.C.is_finite()
    # C's step: m_C = (avgtr(H_K) H_C + damping avgtr(K^T K) I - I) / 2 = (0.001 + 0.961 - 1) / 2
    expected = 1.0 - 1e-2 * (1e-3 + 1e-3 * 961.0 - 1.0) / 2
    torch.testing.assert_close(
        new.C.to_dense().diagonal().double(),
        torch.full((4,), expected, dtype=torch.float64),
        rtol=2e-3,
        atol=0,
    )


@pytest.mark.parametrize("name", ["triltoeplitz", "triutoeplitz"])
@pytest.mark.parametrize("d", DIMS)
def test_float16_toeplitz_projections(name, d):
    spec = get_structure(name)
    half = torch.float16
    assert float(spec.eye(d, dtype=half).mul_(31.0).inner().to_dense()[0, 0]) == 961.0
    Z = torch.full((d, 64), 3.5, dtype=half)
    H = spec.eye(d, dtype=half).inner_of(Z)  # P(Z Z^T): every entry of Z Z^T is 784
    assert H.is_finite()
    torch.testing.assert_close(
        H.to_dense().double(), spec.from_dense(torch.full((d, d), 784.0)).to_dense().double()
    )
    assert float(spec.from_dense(1000 * torch.eye(d, dtype=half)).to_dense()[0, 0]) == 1000.0


@pytest.mark.parametrize("name", ["triltoeplitz", "triutoeplitz"])
@pytest.mark.parametrize("d", [127, 128, 200])
def test_toeplitz_products_with_no_columns(name, d):
    K = get_structure(name).eye(d).mul_(2.0)
    Z = torch.zeros(d, 0)
    assert K.mm(Z).shape == (d, 0) and K.tmm(Z).shape == (d, 0)
    assert K.outer_operator().mm(Z).shape == (d, 0)
    assert float(K.inner_of(Z).to_dense().abs().max()) == 0.0
