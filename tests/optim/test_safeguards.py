"""The safeguards of ``SINGD`` (not in the reference): the spectral-norm bound of the
structures, the factor-step bound, the KL trust region and the factor repair.

Every check compares with an independent dense float64 computation (or with the
reference rule, ``safeguards=False``, whose equality with the authors' package is
tested in ``test_reference_equivalence.py``).
"""

from __future__ import annotations

import copy
import io
import math
import warnings
import zlib

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.structures.test_structures import random_member
from torchsingd import SINGD
from torchsingd.optim.update import factor_step, trust_region_scale, update_factors
from torchsingd.structures import StructuredMatrix, get_structure

F64 = torch.float64

STRUCTURES = (
    "dense",
    "diagonal",
    "blockdiagonal:3",
    "hierarchical:3,2",
    "triltoeplitz",
    "triutoeplitz",
    "triltopleftdiag:1",
    "trilbottomrightdiag:1",
    "triutopleftdiag:1",
    "triubottomrightdiag:1",
)
DIMS = (1, 2, 5, 17, 40, 64)


def gen(*parts: object) -> torch.Generator:
    """A generator seeded deterministically from ``parts``."""
    return torch.Generator().manual_seed(zlib.crc32("|".join(map(str, parts)).encode()))


def spectral_norm(X: StructuredMatrix) -> float:
    return torch.linalg.matrix_norm(X.to_dense().double(), 2).item()


def dense_bound(M: torch.Tensor) -> float:
    """``min(|c| + ||M - cI||_F, sqrt(||M||_1 ||M||_inf))`` with ``c = avgtr(M)``, densely."""
    d = M.shape[0]
    c = torch.trace(M) / d
    triangle = c.abs() + torch.linalg.matrix_norm(M - c * torch.eye(d, dtype=M.dtype), "fro")
    hoelder = torch.sqrt(torch.linalg.matrix_norm(M, 1) * torch.linalg.matrix_norm(M, float("inf")))
    return min(triangle.item(), hoelder.item())


# ------------------------------------------------------- spectral_norm_bound
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_spectral_norm_bound_is_an_upper_bound(structure, d):
    spec = get_structure(structure)
    for sample in range(3):
        X = random_member(spec, d, sample)
        bound = X.spectral_norm_bound()
        assert bound.ndim == 0 and bound.dtype == F64
        exact = spectral_norm(X)
        assert bound.item() >= exact * (1 - 1e-6), (bound.item(), exact)
        if structure == "diagonal":
            assert bound.item() == pytest.approx(exact, rel=1e-6)
        else:  # the documented formula, evaluated densely
            assert bound.item() == pytest.approx(dense_bound(X.to_dense()), rel=1e-10)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_spectral_norm_bound_bfloat16(structure, d):
    X = random_member(get_structure(structure), d, "bf16").to(torch.bfloat16)
    bound = X.spectral_norm_bound()
    assert bound.ndim == 0 and torch.isfinite(bound)
    assert bound.item() >= spectral_norm(X) * (1 - 1e-2)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
def test_quick_norm_bound_is_an_upper_bound(structure, d, dtype):
    """``|c| + sqrt(||M||_F^2 - c^2 d + 1e-5 ||M||_F^2)``: an upper bound also when the
    difference cancels (``M`` a multiple of the identity, or nearly so, in float32)."""
    spec = get_structure(structure)
    c = 0.5
    for sample in range(3):
        X = random_member(spec, d, "quick", sample).to(dtype)
        Y = spec.eye(d, dtype=dtype).mul_(-c)
        noise = random_member(spec, d, "q", sample).to(dtype)
        Z = spec.eye(d, dtype=dtype).mul_(-c).add_(noise, alpha=1e-4)
        for M in (X, Y, Z):
            quick = M.quick_norm_bound()
            exact = spectral_norm(M)
            assert quick >= exact * (1 - 1e-12), (quick, exact)
            D = M.to_dense().double()  # the triangle term it approximates, densely
            mean = torch.trace(D) / d
            triangle = mean.abs() + torch.linalg.matrix_norm(D - mean * torch.eye(d, dtype=F64))
            slack = math.sqrt(1e-5) * torch.linalg.matrix_norm(D).item()
            assert triangle.item() <= quick <= triangle.item() + 1.01 * slack + 1e-9


def test_quick_norm_bound_skips_the_full_bound(monkeypatch):
    """A clearly small step never reaches ``spectral_norm_bound``; a NaN matrix does (and
    is left alone for the factor repair)."""
    m = random_member(get_structure("hierarchical:3,2"), 9, "skip")
    calls = []
    original = type(m).spectral_norm_bound
    monkeypatch.setattr(
        type(m), "spectral_norm_bound", lambda self: calls.append(1) or original(self)
    )
    assert m.bounded_step(1e-3 / m.quick_norm_bound(), 0.5) is None and calls == []
    assert m.bounded_step(100.0, 0.5) is not None and calls == [1]
    m.tensors()[0].fill_(math.nan)
    assert m.bounded_step(0.1, 0.5) is None and calls == [1, 1]


@pytest.mark.parametrize("d", (2, 5, 17, 40))
def test_spectral_norm_bound_tight_for_identity_plus_rank_one(d):
    """``M = cI + u u^T`` (c > 0), ``||M||_2 = c + |u|^2``.

    With all ``|u_i|`` equal the Hoelder bound is exact. For a general ``u`` the
    triangle bound is ``c + |u|^2 (1/d + sqrt(1 - 1/d))``: not attained for ``d > 1``
    (it exceeds ``||M||_2`` by at most ``0.25 |u|^2``), tight relative to ``c`` when
    ``|u|^2 << c``.
    """
    c = 3.0
    dense = get_structure("dense")
    g = gen("rank-one", d)
    eye = torch.eye(d, dtype=F64)

    u = 0.7 * torch.ones(d, 1, dtype=F64) * torch.where(torch.rand(d, 1, generator=g) < 0.5, -1, 1)
    M = dense.from_dense(c * eye + u @ u.T)
    assert M.spectral_norm_bound().item() == pytest.approx(c + (u * u).sum().item(), rel=1e-12)
    assert spectral_norm(M) == pytest.approx(c + (u * u).sum().item(), rel=1e-12)

    u = torch.randn(d, 1, generator=g, dtype=F64)
    u2 = (u * u).sum().item()
    M = dense.from_dense(c * eye + u @ u.T)
    exact = spectral_norm(M)
    assert exact == pytest.approx(c + u2, rel=1e-12)
    triangle = c + u2 * (1 / d + math.sqrt(1 - 1 / d))
    bound = M.spectral_norm_bound().item()
    assert exact <= bound <= triangle * (1 + 1e-12)
    assert bound - exact <= 0.25 * u2 + 1e-12

    small = 1e-3 * u
    M = dense.from_dense(c * eye + small @ small.T)
    assert M.spectral_norm_bound().item() == pytest.approx(spectral_norm(M), rel=1e-6)


# ------------------------------------------------------------ bounded_step
BLOCKWISE = ("diagonal", "blockdiagonal:3")  # bounded per entry / per block


@pytest.mark.parametrize("structure", ["dense", "hierarchical:3,2", "triltoeplitz", *BLOCKWISE])
def test_bounded_step_none_while_the_bound_holds(structure):
    m = random_member(get_structure(structure), 9, "step-holds")
    bound = m.spectral_norm_bound().item()
    assert m.bounded_step(0.9 * 0.5 / bound, 0.5) is None
    assert m.bounded_step(0.0, 0.5) is None


@pytest.mark.parametrize("structure", ["dense", "hierarchical:3,2", "triltoeplitz"])
def test_bounded_step_scales_the_whole_matrix(structure):
    m = random_member(get_structure(structure), 9, "step-whole")
    max_step = 0.5
    bound = m.spectral_norm_bound().item()
    step = m.bounded_step(10.0 * max_step / bound, max_step)
    assert step.family == m.family
    expected = m.to_dense() * (max_step / bound)
    torch.testing.assert_close(step.to_dense(), expected, rtol=1e-15, atol=0)
    assert spectral_norm(step) <= max_step * (1 + 1e-12)


def test_bounded_step_diagonal_clips_each_entry():
    d = torch.tensor([-30.0, -2.0, 0.5, 4.0, 9.0, 100.0], dtype=F64)
    m = get_structure("diagonal").from_dense(torch.diag(d))
    beta, max_step = 0.1, 0.5
    step = m.bounded_step(beta, max_step).to_dense().diagonal()
    expected = torch.tensor([-0.5, -0.2, 0.05, 0.4, 0.5, 0.5], dtype=F64)
    torch.testing.assert_close(step, expected, rtol=1e-15, atol=1e-15)
    assert m.bounded_step(beta, 100.0) is None  # 0.1 * 100 = 10 <= 100
    # an inf entry is not clamped (the unbounded step is inf, which the repair undoes)
    d[2] = math.inf
    inf = get_structure("diagonal").from_dense(torch.diag(d))
    assert inf.bounded_step(beta, max_step) is None
    huge = torch.tensor([3e38, 1.0])  # finite; beta * 3e38 overflows float32: clamped
    step = get_structure("diagonal").from_dense(torch.diag(huge)).bounded_step(3.0, max_step)
    assert torch.equal(step.to_dense().diagonal(), torch.tensor([0.5, 0.5]))


def test_bounded_step_blockdiagonal_scales_each_block():
    """Blocks of size 3 (and a last block of 2): only the blocks whose bound exceeds
    ``max_step / beta`` are scaled, each to its own bound; the others keep ``beta m``."""
    g = gen("step-blocks")
    blocks = [torch.randn(3, 3, generator=g, dtype=F64) for _ in range(3)]
    blocks[1] = blocks[1] * 50.0
    last = torch.randn(2, 2, generator=g, dtype=F64) * 80.0
    m = get_structure("blockdiagonal:3").from_dense(torch.block_diag(*blocks, last))
    beta, max_step = 0.1, 0.5
    step = m.bounded_step(beta, max_step).to_dense()
    for k, (block, lo) in enumerate(zip([*blocks, last], (0, 3, 6, 9), strict=True)):
        n = block.shape[0]
        got = step[lo : lo + n, lo : lo + n]
        bound = dense_bound(block)
        if beta * bound <= max_step:
            assert k in (0, 2)
            torch.testing.assert_close(got, beta * block, rtol=1e-15, atol=0)
        else:
            assert k in (1, 3)
            torch.testing.assert_close(got, block * (max_step / bound), rtol=1e-12, atol=0)
            assert torch.linalg.matrix_norm(got, 2) <= max_step * (1 + 1e-12)
    off = step.clone()
    for lo, n in ((0, 3), (3, 3), (6, 3), (9, 2)):
        off[lo : lo + n, lo : lo + n] = 0
    assert torch.count_nonzero(off) == 0


@pytest.mark.parametrize("structure", ["dense", "hierarchical:3,2", *BLOCKWISE])
def test_factor_step_matches_dense(structure):
    """``X (I - S)`` with the bounded step ``S`` (and the reference's ``X - beta X m``,
    bit for bit, where nothing exceeds)."""
    spec = get_structure(structure)
    X = random_member(spec, 9, "fs-X")
    m = random_member(spec, 9, "fs-m").mul_(20.0)
    beta = 0.1
    free = X.clone().add_(X.matmul(m), alpha=-beta)
    for max_step in (None, 1e6):
        new, acted = factor_step(X, m, beta, max_step)
        assert not acted
        for a, b in zip(new.tensors(), free.tensors(), strict=True):
            assert torch.equal(a, b)
    new, acted = factor_step(X, m, beta, 0.5)
    assert acted
    S = m.bounded_step(beta, 0.5).to_dense()
    assert torch.linalg.matrix_norm(S, 2) <= 0.5 * (1 + 1e-12)
    Xd = X.to_dense()
    torch.testing.assert_close(new.to_dense(), Xd - Xd @ S, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------- update_factors
def _spd(d: int, g: torch.Generator, scale: float) -> torch.Tensor:
    A = torch.randn(d, d, generator=g, dtype=F64)
    return scale * (A @ A.T / d + torch.eye(d, dtype=F64))


def _factor_inputs(structure: str, scale: float, tag: str):
    spec = get_structure(structure)
    g = gen(structure, tag)
    d_i, d_o = 6, 4
    K = spec.from_dense(torch.eye(d_i, dtype=F64) + 0.1 * _spd(d_i, g, 1.0))
    C = spec.from_dense(torch.eye(d_o, dtype=F64) + 0.1 * _spd(d_o, g, 1.0))
    H_K, H_C = spec.from_dense(_spd(d_i, g, scale)), spec.from_dense(_spd(d_o, g, scale))
    m_K, m_C = random_member(spec, d_i, tag, "mK"), random_member(spec, d_o, tag, "mC")
    m_K.mul_(0.01)
    m_C.mul_(0.01)
    return K, C, m_K, m_C, H_K, H_C


@pytest.mark.parametrize("structure", ["dense", "diagonal", "hierarchical:3,2", "triltoeplitz"])
@pytest.mark.parametrize("kfac_like", [False, True], ids=["singd", "ikfac"])
def test_update_factors_unchanged_when_bound_holds(structure, kfac_like):
    args = _factor_inputs(structure, 0.05, "mild")
    common = dict(damping=1e-3, alpha1=0.0 if kfac_like else 0.5, lr_cov=1e-2)
    common.update(kfac_like=kfac_like, normalize_lr_cov=False)
    free = update_factors(*args, **common, max_step=None)
    bounded = update_factors(*args, **common, max_step=0.5)
    assert bounded.beta1_K == bounded.beta1_C == free.beta1_K == free.beta1_C == 1e-2
    for name in ("K", "C", "m_K", "m_C"):
        a, b = getattr(free, name), getattr(bounded, name)
        if a is None:
            assert b is None
            continue
        for x, y in zip(a.tensors(), b.tensors(), strict=True):
            assert torch.equal(x, y), name


def test_update_factors_bound_prevents_blow_up():
    """Large curvature: ``beta1 ||m||_2 >> 1``. Unbounded, ``K`` grows ~100x in one update;
    bounded, ``K <- K (I - beta1_K m_K)`` with every singular value of
    ``I - beta1_K m_K`` within ``1 +- max_step``."""
    d_i, d_o, lr_cov, max_step = 5, 4, 0.1, 0.5
    dense = get_structure("dense")
    g = gen("blow-up")
    K, C = dense.eye(d_i, dtype=F64), dense.eye(d_o, dtype=F64)
    m_K, m_C = dense.zeros(d_i, dtype=F64), dense.zeros(d_o, dtype=F64)
    HKd, HCd = _spd(d_i, g, 100.0), _spd(d_o, g, 100.0)
    H_K, H_C = dense.from_dense(HKd), dense.from_dense(HCd)
    common = dict(damping=1e-3, alpha1=0.5, lr_cov=lr_cov, kfac_like=False, normalize_lr_cov=False)

    free = update_factors(K, C, m_K, m_C, H_K, H_C, **common, max_step=None)
    assert torch.linalg.matrix_norm(free.K.to_dense(), 2) > 10
    assert torch.linalg.matrix_norm(free.C.to_dense(), 2) > 10

    new = update_factors(K, C, m_K, m_C, H_K, H_C, **common, max_step=max_step)
    I_K, I_C = torch.eye(d_i, dtype=F64), torch.eye(d_o, dtype=F64)
    # m from ALGORITHM.md section 3 with K = C = I and zero old momentum, densely.
    mKd = 0.5 * (torch.trace(HCd) / d_o * HKd + 1e-3 * I_K - I_K)
    mCd = 0.5 * (torch.trace(HKd) / d_i * HCd + 1e-3 * I_C - I_C)
    torch.testing.assert_close(new.m_K.to_dense(), mKd, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new.m_C.to_dense(), mCd, rtol=1e-12, atol=1e-12)
    assert new.beta1_K == new.beta1_C == lr_cov and new.bounded == 2
    for X, mX, eye in ((K, new.m_K, I_K), (C, new.m_C, I_C)):
        Xd, md = X.to_dense(), mX.to_dense()
        beta = max_step / dense_bound(md)  # dense: lr_cov reduced for the whole factor
        assert 0 < beta < lr_cov
        expected = Xd - beta * Xd @ md
        got = new.K if X is K else new.C
        torch.testing.assert_close(got.to_dense(), expected, rtol=1e-12, atol=1e-12)
        sv = torch.linalg.svdvals(eye - beta * md)
        assert sv.min() >= 1 - max_step - 1e-6 and sv.max() <= 1 + max_step + 1e-6, sv
        assert torch.linalg.matrix_norm(got.to_dense(), 2) <= 1 + max_step + 1e-6


# --------------------------------------------------------- trust_region_scale
def test_trust_region_scale_noop_below_bound():
    g = gen("tr-noop")
    dirs = [torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)]
    before = [d.clone() for d in dirs]
    lr, kl = 0.1, 1e-2
    for inner in (0.0, 0.5, kl / lr**2):  # lr^2 * inner <= kl_clip (the last equal)
        assert trust_region_scale(dirs, lr, inner, kl) == 1.0
        assert all(torch.equal(a, b) for a, b in zip(dirs, before, strict=True))


def test_trust_region_scale_scales_above_bound():
    g = gen("tr-scale")
    dirs = [torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)]
    before = [d.clone() for d in dirs]
    lr, inner, kl = 0.1, 40.0, 1e-2
    factor = trust_region_scale(dirs, lr, inner, kl)
    expected = math.sqrt(kl / (lr * lr * inner))
    assert factor == pytest.approx(expected, rel=1e-15) and factor < 1
    for d, b in zip(dirs, before, strict=True):
        torch.testing.assert_close(d, b * expected, rtol=1e-15, atol=0)


# -------------------------------------------------------- optimizer: KL clip
def _linear(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 4)).to(F64)


def _data(step: int, n: int = 16, d_in: int = 6, d_out: int = 4, dtype=F64):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, d_in, generator=g, dtype=dtype), torch.randn(
        n, d_out, generator=g, dtype=dtype
    )


def _mse_step(model, opt, step):
    x, y = _data(step)
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    return loss.item()


def test_kl_clip_scales_the_reference_step():
    lr, kappa = 0.1, 1e-4
    hp = dict(lr=lr, momentum=0.0, weight_decay=0.0, T=1, alpha1=0.0, structures="dense")
    ref_model, our_model = _linear(), _linear()
    ref = SINGD(ref_model, safeguards=False, **hp)
    ours = SINGD(our_model, kl_clip=kappa, max_factor_step=None, **hp)
    start = [p.detach().clone() for p in ref_model.parameters()]

    _mse_step(ref_model, ref, 0)
    _mse_step(our_model, ours, 0)
    W, b = ref_model[0].weight, ref_model[0].bias
    G = torch.cat([W.grad, b.grad[:, None]], 1)
    assert torch.equal(G, torch.cat([our_model[0].weight.grad, our_model[0].bias.grad[:, None]], 1))
    ref_delta = [p.detach() - s for p, s in zip(ref_model.parameters(), start, strict=True)]
    G_nat = -torch.cat([ref_delta[0], ref_delta[1][:, None]], 1) / lr
    inner = (G_nat * G).sum().item()
    assert lr**2 * inner > 10 * kappa  # the trust region acts
    factor = math.sqrt(kappa / (lr**2 * inner))
    for p, s, d in zip(our_model.parameters(), start, ref_delta, strict=True):
        torch.testing.assert_close(p.detach() - s, factor * d, rtol=1e-6, atol=1e-15)
    assert ours.safeguard_events == {
        "kl_clipped": 1,
        "factor_step_bounded": 0,
        "factor_repaired": 0,
    }
    assert ref.safeguard_events["kl_clipped"] == 0
    # the factors are those of the reference rule (max_factor_step=None)
    for name in ("K", "C"):
        assert torch.equal(
            getattr(ours.layers["0"], name).to_dense(), getattr(ref.layers["0"], name).to_dense()
        )


def _clip_run(kappa: float, steps: int, lr: float = 0.1, groups: bool = False):
    """A run whose trust region acts in every step where ``kappa`` is tiny; returns the
    optimizer and the messages about it."""
    model = _linear()
    params = None
    if groups:  # weight layer in group 0 (clipped), an extra free parameter in group 1
        extra = nn.Parameter(torch.zeros(3, dtype=F64))
        model.register_parameter("extra", extra)
        params = [{"params": list(model[0].parameters())}, {"params": [extra]}]
    opt = SINGD(model, params=params, lr=lr, T=1, kl_clip=kappa, warn_unsupported=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            _mse_step(model, opt, step)
    return opt, [str(w.message) for w in caught if "trust region" in str(w.message)]


def test_a_trust_region_that_sets_the_step_length_is_said_once_per_group():
    """While kl_clip scales (almost) every step, lr and an LR schedule do nothing: said
    once, after the first window of KL_WINDOW steps with at least 90% scaled."""
    window = SINGD.KL_WINDOW
    opt, messages = _clip_run(1e-12, window - 1)
    assert messages == [] and opt.safeguard_events["kl_clipped"] == window - 1
    opt, messages = _clip_run(1e-12, 3 * window, groups=True)
    assert opt.safeguard_events["kl_clipped"] == 3 * window  # counted as before
    assert messages == [
        f"The trust region (kl_clip=1e-12) scaled {window} of the last {window} steps of "
        "param group 0: while it acts, the step's length is set by kl_clip, not lr, and "
        "an LR schedule has no effect. Lower lr if that is not intended (or raise kl_clip; "
        "None turns it off). Said once per group; safeguard_events['kl_clipped'] counts."
    ]
    # a group with fallback parameters is told that those step with the full lr
    model = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4)).to(F64)
    opt = SINGD(model, lr=0.1, T=1, kl_clip=1e-12, warn_unsupported=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(window):
            _mse_step(model, opt, step)
    (message,) = [str(w.message) for w in caught if "trust region" in str(w.message)]
    assert "the fallback rule steps them with the full lr" in message
    # a trust region that never acts says nothing
    opt, messages = _clip_run(1e12, 2 * window)
    assert messages == [] and opt.safeguard_events["kl_clipped"] == 0


def test_safeguard_counts_and_the_trust_region_window_survive_a_checkpoint():
    """``safeguard_events`` and the trust region's warning window were not saved: a
    resumed run counted from zero and warned a window later than the uninterrupted
    one. Saved now (and read back with ``weights_only=True``): after the load both runs
    count the same and warn in the same step; a load that fails keeps the counts."""
    window, cut = SINGD.KL_WINDOW, SINGD.KL_WINDOW - 3
    model = _linear()
    opt = SINGD(model, lr=0.1, T=1, kl_clip=1e-12, max_factor_step=1e-3)
    for step in range(cut):
        _mse_step(model, opt, step)
    assert opt.safeguard_events["kl_clipped"] == cut
    assert opt.safeguard_events["factor_step_bounded"] > 0
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = copy.deepcopy(model)
    resumed = SINGD(resumed_model, lr=0.1, T=1, kl_clip=1e-12, max_factor_step=1e-3)
    logged = resumed.safeguard_events  # (a reference taken before the load stays live)
    resumed.load_state_dict(saved)
    assert logged is resumed.safeguard_events == opt.safeguard_events
    warned = []
    for m, o in ((model, opt), (resumed_model, resumed)):
        steps = []
        for step in range(cut, cut + 6):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _mse_step(m, o, step)
            steps += [step for w in caught if "trust region" in str(w.message)]
        warned.append(steps)
    assert warned[0] == warned[1] == [window - 1]
    assert resumed.safeguard_events == opt.safeguard_events
    assert opt.safeguard_events["kl_clipped"] == cut + 6
    events = dict(resumed.safeguard_events)
    wrong = SINGD(nn.Sequential(nn.Linear(6, 5)).to(F64), kl_clip=1e-12).state_dict()
    with pytest.raises(ValueError):
        resumed.load_state_dict(wrong)
    assert resumed.safeguard_events == events


def test_trust_region_advice_counts_windows():
    opt = SINGD(_linear(), warn_unsupported=False)
    window, share = opt.KL_WINDOW, opt.KL_WARN_SHARE
    below = math.ceil(share * window) - 1  # one scaled step short of the share
    pattern = [True] * below + [False] * (window - below)
    assert [opt._trust_region_advice(0, 1e-2, c) for c in pattern] == [None] * window
    pattern = [False] * (window - below - 1) + [True] * (below + 1)  # the share exactly
    advice = [opt._trust_region_advice(0, 1e-2, c) for c in pattern]
    assert advice[:-1] == [None] * (window - 1) and f"scaled {below + 1} of the last" in advice[-1]
    assert all(opt._trust_region_advice(0, 1e-2, True) is None for _ in range(2 * window))
    assert opt._trust_region_advice(1, 1e-2, True) is None  # group 1 has its own window


def test_kfac_kl_clip_scales_its_step():
    """KFAC's optional trust region: the step is KFAC's own, scaled by
    ``sqrt(kl_clip / (lr^2 <G_nat, G>))``; off by default."""
    from torchsingd import KFAC

    lr, kappa = 0.1, 1e-4
    hp = dict(lr=lr, momentum=0.0, weight_decay=0.0, T=1)
    plain_model, clipped_model = _linear(), _linear()
    plain = KFAC(plain_model, **hp)
    clipped = KFAC(clipped_model, kl_clip=kappa, **hp)
    assert plain.param_groups[0]["kl_clip"] is None
    start = [p.detach().clone() for p in plain_model.parameters()]
    _mse_step(plain_model, plain, 0)
    _mse_step(clipped_model, clipped, 0)
    W, b = plain_model[0].weight, plain_model[0].bias
    G = torch.cat([W.grad, b.grad[:, None]], 1)
    delta = [p.detach() - s for p, s in zip(plain_model.parameters(), start, strict=True)]
    G_nat = -torch.cat([delta[0], delta[1][:, None]], 1) / lr
    inner = (G_nat * G).sum().item()
    assert lr**2 * inner > 10 * kappa
    factor = math.sqrt(kappa / (lr**2 * inner))
    for p, s, d in zip(clipped_model.parameters(), start, delta, strict=True):
        torch.testing.assert_close(p.detach() - s, factor * d, rtol=1e-6, atol=1e-15)
    assert clipped.safeguard_events["kl_clipped"] == 1
    assert plain.safeguard_events["kl_clipped"] == 0
    with pytest.raises(ValueError, match="kl_clip"):
        KFAC(_linear(), kl_clip=-1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64], ids=str)
@pytest.mark.parametrize(
    "poison",
    [
        {0: math.inf},  # times a nonzero G: +-inf
        {0: -math.inf, 1: math.inf},  # inf - inf: NaN
        {2: math.nan},
        {3: math.inf},  # G is 0 there: inf * 0 = NaN
    ],
    ids=["inf", "inf-inf", "nan", "inf*0"],
)
def test_trust_region_sum_is_not_finite_where_a_direction_is_not(poison, dtype):
    """Why a group with a trust region needs no finiteness check of its directions:
    ``<G_nat, G>`` as the optimizer computes it (float32 accumulation) is non-finite
    whenever ``G_nat`` holds an inf or NaN, whatever the (finite) ``G``."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(4, 5, generator=g, dtype=dtype)
    G.view(-1)[3] = 0
    nat = torch.randn(4, 5, generator=g, dtype=dtype) * 1e3
    for index, value in poison.items():
        nat.view(-1)[index] = value
    acc = torch.promote_types(dtype, torch.float32)
    dot = torch.dot(nat.reshape(-1).to(acc), G.reshape(-1).to(acc)).float()
    assert not math.isfinite(float(dot))


class _Entry:
    def __init__(self, group_index: int) -> None:
        self.group_index = group_index


def test_finiteness_check_reads_trust_region_sums():
    """``_finite``: a group's trust-region sum stands for its directions; groups without
    one and fallback gradients are reduced; a non-finite total is confirmed tensor by
    entry by entry (float32 overflow of finite numbers' sums does not skip a step)."""
    opt = SINGD(_linear(), T=1)
    f32 = torch.float32
    big = torch.full((3,), 3e38, dtype=f32)  # finite, but sums overflow
    nan = torch.tensor([1.0, math.nan])

    def check(pending, fallback, inners):
        inners = dict(inners)
        return opt._finite(pending, fallback, inners), inners

    one = torch.tensor(1.5, dtype=f32)
    # the sum is finite: the group's directions are taken as finite (not reduced)
    ok, inners = check([(_Entry(0), {}, [torch.ones(2)], one)], [], {0: one})
    assert ok and inners == {0: 1.5}
    # an overflowing sum with finite directions: confirmed finite, the inf is kept
    inf = torch.tensor(math.inf, dtype=f32)
    ok, inners = check([(_Entry(0), {}, [big], inf)], [], {0: inf})
    assert ok and inners == {0: math.inf}
    # a non-finite direction makes its group's sum non-finite: skipped
    ok, _ = check([(_Entry(0), {}, [nan], torch.tensor(math.nan))], [], {0: torch.tensor(math.nan)})
    assert not ok
    # no trust region (inner None): the directions themselves are reduced
    assert not check([(_Entry(1), {}, [nan], None)], [], {})[0]
    assert check([(_Entry(1), {}, [big, big], None)], [], {})[0]  # overflow only
    # fallback gradients are always reduced
    assert not check([(_Entry(0), {}, [torch.ones(2)], one)], [(0, None, nan)], {0: one})[0]
    assert check([], [(0, None, big)], {})[0]
    assert check([], [], {})[0]


# -------------------------------------------- optimizer: nothing triggers
def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(F64)


@pytest.mark.parametrize("structure", ["dense", "diagonal", "hierarchical:3,2", "triltoeplitz"])
def test_safeguards_inactive_equal_reference_rule(structure):
    hp = dict(lr=1e-3, lr_cov=1e-3, T=2, structures=structure)
    models, opts = [], []
    for safe in (True, False):
        model = _mlp()
        models.append(model)
        opts.append(SINGD(model, safeguards=safe, **hp))
        for step in range(8):
            _mse_step(model, opts[-1], step)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)
    for opt in opts:
        assert opt.skipped_steps == 0
        assert opt.safeguard_events == {
            "kl_clipped": 0,
            "factor_step_bounded": 0,
            "factor_repaired": 0,
        }
    for name, layer in opts[0].layers.items():
        other = opts[1].layers[name]
        for attr in ("K", "C", "m_K", "m_C"):
            assert torch.equal(getattr(layer, attr).to_dense(), getattr(other, attr).to_dense())


# ---------------------------------------------------------- factor repair
def _repair_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3))


def _repair_data(step: int, huge: bool = False) -> torch.Tensor:
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
    if huge:
        x[0, 1] = 1e25  # finite in float32, x^T x is not
    return x


def _repair_loss(model, x):
    # tanh saturates at the huge example: its output gradient is exactly 0, so the
    # weight gradient stays finite while the input statistic a^T a overflows.
    return torch.tanh(model(x)).sum() / x.shape[0]


@pytest.mark.parametrize("structure", ["dense", "diagonal", "blockdiagonal:2"])
@pytest.mark.parametrize("safeguards", [False, True])
@pytest.mark.parametrize("kfac_like", [False, True], ids=["singd", "ikfac"])
def test_factor_repair(safeguards, kfac_like, structure):
    """An overflowing statistic: the factor update is undone and its momentum reset.
    (Diagonal factors: the factor-step bound used to clamp an inf entry of ``beta1 m``
    to ``max_factor_step``, leaving a finite factor, no repair and an inf momentum that
    stayed in the state and shrank the factor at every later update.)"""
    model = _repair_model()
    opt = SINGD(
        model,
        structures=structure,
        lr=0.1,
        momentum=0.0,
        T=1,
        alpha1=0.0 if kfac_like else 0.5,
        safeguards=safeguards,
        kfac_like=kfac_like,
    )
    for step in range(3):
        opt.zero_grad()
        _repair_loss(model, _repair_data(step)).backward()
        opt.step()
    layer = opt.layers["0"]
    K0, C0 = layer.K.to_dense().clone(), layer.C.to_dense().clone()
    assert K0.shape == (5, 5)  # the bias column
    assert not torch.equal(K0, torch.eye(5))  # earlier updates moved K away from I
    before = [p.detach().clone() for p in model.parameters()]

    x = _repair_data(5, huge=True)
    a = torch.cat([x, torch.ones(8, 1)], 1)
    assert not torch.isfinite(a.T @ a).all()
    opt.zero_grad()
    _repair_loss(model, x).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    if not safeguards:
        with pytest.warns(UserWarning, match="skipped a step"):
            opt.step()
        assert opt.skipped_steps == 1
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
        assert torch.equal(layer.K.to_dense(), K0) and torch.equal(layer.C.to_dense(), C0)
        return

    with pytest.warns(UserWarning, match="was not finite") as record:
        opt.step()
    repaired = sorted(
        name for name in "KC" for w in record if f" {name} of '0' was not finite" in str(w)
    )
    assert repaired == (["K"] if kfac_like else ["C", "K"])
    assert opt.skipped_steps == 0
    layer = opt.layers["0"]
    assert torch.equal(layer.K.to_dense(), K0)
    if kfac_like:  # IKFAC's C update does not involve H_K: only K is repaired
        assert opt.safeguard_events["factor_repaired"] == 1
        assert layer.m_K is None
        assert layer.C.is_finite() and not torch.equal(layer.C.to_dense(), C0)
    else:  # SINGD's C update uses avgtr(H_K) = inf: both factors are repaired
        assert opt.safeguard_events["factor_repaired"] == 2
        assert torch.equal(layer.C.to_dense(), C0)
        assert torch.equal(layer.m_K.to_dense(), torch.zeros(5, 5))
        assert torch.equal(layer.m_C.to_dense(), torch.zeros(3, 3))
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.isfinite(p).all() and not torch.equal(p, q)
    # and training goes on with finite factors
    opt.zero_grad()
    _repair_loss(model, _repair_data(6)).backward()
    opt.step()
    assert opt.skipped_steps == 0 and layer.K.is_finite() and opt.layers["0"].K.is_finite()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------- a constructed divergence
DIVERGENCE_HP = dict(
    lr=1e-2, lr_cov=0.1, momentum=0.9, damping=1e-3, alpha1=0.5, weight_decay=1e-4, T=5
)


@pytest.fixture(scope="module")
def mnist1d():
    pytest.importorskip("mnist1d")
    from torchsingd.experiments.sweep import mnist1d_images

    return mnist1d_images(0)


def _train_mnist1d(split, make_opt, steps: int = 120):
    """Seeded batches of 100; returns (losses, optimizer, first non-finite/skipped step)."""
    from torchsingd.experiments.sweep import mnist1d_sweep_model

    torch.manual_seed(0)
    model = mnist1d_sweep_model()
    opt = make_opt(model)
    g = torch.Generator().manual_seed(0)
    losses, first_bad = [], None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(steps):
            idx = torch.randint(0, len(split.y_train), (100,), generator=g)
            opt.zero_grad()
            loss = F.cross_entropy(model(split.X_train[idx]), split.y_train[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bad = not math.isfinite(losses[-1]) or getattr(opt, "skipped_steps", 0) > 0
            if bad and first_bad is None:
                first_bad = step
    return losses, opt, first_bad


def test_mnist1d_reference_rule_diverges_safeguards_do_not(mnist1d):
    def make(safe):
        return lambda m: SINGD(m, structures="dense", safeguards=safe, **DIVERGENCE_HP)

    losses, opt, first_bad = _train_mnist1d(mnist1d, make(False))
    assert first_bad is not None and 40 <= first_bad < 120, first_bad
    assert opt.skipped_steps > 0 or not all(math.isfinite(v) for v in losses)

    losses, opt, first_bad = _train_mnist1d(mnist1d, make(True))
    assert first_bad is None and opt.skipped_steps == 0
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) / 10 < 2.0, losses[-10:]
    assert opt.safeguard_events["kl_clipped"] > 0  # the safeguards were what acted


@pytest.mark.reference
def test_mnist1d_reference_package_diverges(mnist1d):
    reference = pytest.importorskip("singd.optim.optimizer")

    def make(model):
        return reference.SINGD(model, structures=("dense", "dense"), **DIVERGENCE_HP)

    losses, _, first_bad = _train_mnist1d(mnist1d, make)
    assert first_bad is not None and not all(math.isfinite(v) for v in losses)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(max_factor_step=0), "max_factor_step"),
        (dict(max_factor_step=-1), "max_factor_step"),
        (dict(max_factor_step="x"), "max_factor_step"),
        (dict(kl_clip=0), "kl_clip"),
        (dict(kl_clip=-1), "kl_clip"),
        (dict(safeguards="yes"), "safeguards"),
    ],
)
def test_invalid_safeguard_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SINGD(_linear(), **kwargs)


def test_safeguards_can_be_switched_off_individually():
    model = _linear()
    opt = SINGD(model, max_factor_step=None, kl_clip=None)
    assert opt.param_groups[0]["max_factor_step"] is None
    assert opt.param_groups[0]["kl_clip"] is None
    assert opt.param_groups[0]["safeguards"] is True
    _mse_step(model, opt, 0)
    assert opt.skipped_steps == 0


# --------------------------------------------------------------- checkpoints
def test_state_dict_keeps_safeguard_settings():
    model = _linear()
    opt = SINGD(model, T=1, safeguards=True, max_factor_step=0.3, kl_clip=5e-3)
    _mse_step(model, opt, 0)
    sd = copy.deepcopy(opt.state_dict())
    group = sd["param_groups"][0]
    assert (group["safeguards"], group["max_factor_step"], group["kl_clip"]) == (True, 0.3, 5e-3)

    other = SINGD(_linear(), T=1, safeguards=False, max_factor_step=0.7, kl_clip=None)
    other.load_state_dict(sd)
    group = other.param_groups[0]
    assert (group["safeguards"], group["max_factor_step"], group["kl_clip"]) == (True, 0.3, 5e-3)


def test_load_state_dict_without_safeguard_keys():
    """A checkpoint from before the safeguards existed still loads and steps."""
    model = _linear()
    opt = SINGD(model, T=1)
    _mse_step(model, opt, 0)
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        for key in ("safeguards", "max_factor_step", "kl_clip"):
            del group[key]

    loaded_model = _linear()
    loaded_model.load_state_dict(model.state_dict())
    loaded = SINGD(loaded_model, T=1, kl_clip=0.5)
    loaded.load_state_dict(sd)
    for group in loaded.param_groups:  # missing keys come from the loading optimizer
        assert group["safeguards"] is True
        assert group["max_factor_step"] == 0.5 and group["kl_clip"] == 0.5
    before = [p.detach().clone() for p in loaded_model.parameters()]
    for step in (1, 2):
        loss = _mse_step(loaded_model, loaded, step)
        assert math.isfinite(loss)
    assert loaded.skipped_steps == 0 and loaded.steps == 3
    for p, q in zip(loaded_model.parameters(), before, strict=True):
        assert torch.isfinite(p).all() and not torch.equal(p, q)


# ---------------------------------------------- review fixes: overflow, raise, notes


@pytest.mark.parametrize("name", STRUCTURES)
def test_bound_survives_overflowing_squares(name):
    """``m = 1e19 I`` in float32: its squares overflow, the bound must not become NaN
    (a NaN bound would switch the factor-step bound off exactly when it is needed)."""
    m = get_structure(name).zeros(100, dtype=torch.float32).add_identity_(1e19)
    bound = float(m.spectral_norm_bound())
    assert bound == pytest.approx(1e19, rel=1e-6)
    step = m.bounded_step(0.1, 0.5)
    assert step is not None and spectral_norm(step) == pytest.approx(0.5, rel=1e-5)


def _two_layers(seed: int = 0) -> nn.ModuleList:
    torch.manual_seed(seed)
    return nn.ModuleList([nn.Linear(4, 3), nn.Linear(4, 3)])


@pytest.mark.parametrize("structure", ["dense", "diagonal"])
def test_factor_overflow_raises_under_on_nonfinite_raise(structure):
    """``on_nonfinite="raise"``: a factor update that overflows is not repaired; it
    raises (diagonal: also where only the momentum overflowed, the bounded factor not)."""
    from torchsingd.optim import NonFiniteError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = SINGD(model, T=1, on_nonfinite="raise", structures=structure)
    x = torch.full((8, 4), 1e20)
    model(x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteError):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert opt.safeguard_events["factor_repaired"] == 0


def test_safeguards_of_a_skipped_step_are_not_counted():
    """Layer 0's factors overflow (would be repaired), layer 1's gradient is inf: the step
    is skipped, so no repair is counted or warned and nothing changes."""
    model = _two_layers()
    opt = SINGD(model, params=list(model.parameters()), T=1)
    x0 = torch.full((8, 4), 1e20)
    x1 = torch.randn(8, 4)
    x1[0, 0] = math.inf
    (model[0](x0).sum() + model[1](x1).sum()).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    messages = [str(w.message) for w in caught]
    assert opt.skipped_steps == 1
    assert opt.safeguard_events == {"kl_clipped": 0, "factor_step_bounded": 0, "factor_repaired": 0}
    assert not any("was not finite" in m for m in messages), messages
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_old_checkpoint_takes_missing_options_from_each_loading_group():
    """Per-group safeguard settings of the loading optimizer survive an old checkpoint."""
    model = _two_layers()
    groups = [
        {"params": list(model[0].parameters()), "safeguards": False},
        {"params": list(model[1].parameters()), "kl_clip": 0.25},
    ]
    saved = SINGD(model, params=groups, T=1).state_dict()
    for group in saved["param_groups"]:
        for key in ("safeguards", "max_factor_step", "kl_clip"):
            del group[key]
    other = _two_layers()
    loading_groups = [
        {"params": list(other[0].parameters()), "safeguards": False},
        {"params": list(other[1].parameters()), "kl_clip": 0.25},
    ]
    loading = SINGD(other, params=loading_groups, T=1)
    loading.load_state_dict(saved)
    g0, g1 = loading.param_groups
    assert g0["safeguards"] is False and g0["kl_clip"] == 1e-2
    assert g1["safeguards"] is True and g1["kl_clip"] == 0.25


@pytest.mark.parametrize("name", STRUCTURES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_bounded_step_low_precision(name, dtype):
    """The bounded step keeps the factor's dtype and its bound (up to that dtype's
    rounding of ``max_step``)."""
    m = random_member(get_structure(name), 17, "low").mul_(40.0).to(dtype)
    step = m.bounded_step(0.1, 0.5)
    assert step is not None and all(t.dtype == dtype for t in step.tensors())
    assert spectral_norm(step) <= 0.5 * (1 + 2e-2)
