"""The pure update functions against ALGORITHM.md sections 3 and 5, written out densely.

Oracles here use only dense float64 matrices and projections written in this file
(``P`` of ALGORITHM.md section 4 for dense, diagonal, block-diagonal, hierarchical and
lower-triangular Toeplitz); torchsingd's structured matrices are only the inputs.
"""

from __future__ import annotations

import pytest
import torch

from torchsingd.optim.update import (
    FactorJob,
    natural_gradient,
    parameter_step,
    update_factors,
    update_factors_together,
)
from torchsingd.structures import get_structure

DTYPE = torch.float64
D_I, D_O = 7, 5


# ------------------------------------------------------------------ oracles
def project(name: str, M: torch.Tensor) -> torch.Tensor:
    """Dense ``P(M)`` for a symmetric ``M`` (ALGORITHM.md section 4), written out."""
    d = M.shape[0]
    family, _, opts = name.partition(":")
    if family == "dense":
        return M.clone()
    if family == "diagonal":
        return torch.diag(torch.diagonal(M))
    if family == "blockdiagonal":
        B = int(opts)
        out = torch.zeros_like(M)
        for start in range(0, d, B):
            stop = min(start + B, d)
            out[start:stop, start:stop] = M[start:stop, start:stop]
        return out
    if family == "hierarchical":
        K1, K2 = (int(o) for o in opts.split(","))
        if d <= K1:
            k1, m = d, 0
        elif d <= K1 + K2:
            k1, m = K1, 0
        else:
            k1, m = K1, d - K1 - K2
        s = k1 + m
        out = torch.zeros_like(M)
        out[:k1, :k1] = M[:k1, :k1]
        out[:k1, k1:] = 2 * M[:k1, k1:]
        for i in range(k1, s):
            out[i, i] = M[i, i]
        out[s:, k1:s] = 2 * M[s:, k1:s]
        out[s:, s:] = M[s:, s:]
        return out
    if family == "triutoeplitz":  # P_U(M) = P_L(M)^T for a symmetric M
        return project("triltoeplitz", M).T
    if family in ("triutopleftdiag", "triubottomrightdiag"):  # (as for Toeplitz)
        return project(name.replace("triu", "tril", 1), M).T
    if family in ("triltopleftdiag", "trilbottomrightdiag"):
        # a diagonal part, a dense k x k corner (k clipped to d) and the block between
        # coupled as M21 + M12^T
        kk = min(int(opts) if opts else 1, d)
        top = d - kk if family == "triltopleftdiag" else kk  # rows of the first part
        out = torch.zeros_like(M)
        out[top:, :top] = M[top:, :top] + M[:top, top:].T
        if family == "triltopleftdiag":
            out[:top, :top] = torch.diag(torch.diagonal(M[:top, :top]))
            out[top:, top:] = M[top:, top:]
        else:
            out[:top, :top] = M[:top, :top]
            out[top:, top:] = torch.diag(torch.diagonal(M[top:, top:]))
        return out
    if family == "triltoeplitz":
        out = torch.zeros_like(M)
        for j in range(d):
            if j == 0:
                coeff = torch.trace(M) / d
            else:
                coeff = (torch.diagonal(M, -j).sum() + torch.diagonal(M, j).sum()) / (d - j)
            for i in range(j, d):
                out[i, i - j] = coeff
        return out
    raise AssertionError(name)


def in_structure(name: str, X: torch.Tensor) -> bool:
    """Whether the dense ``X`` has the sparsity pattern of the structure."""
    ones = torch.ones_like(X)
    pattern = project(name, ones + ones.T) != 0  # projected all-ones: the allowed entries
    if name.startswith("triltoeplitz"):
        diagonals_const = all(
            torch.allclose(torch.diagonal(X, -j), torch.diagonal(X, -j)[0].expand(X.shape[0] - j))
            for j in range(X.shape[0])
        )
        return bool((X[~pattern] == 0).all()) and diagonals_const
    return bool((X[~pattern] == 0).all())


def avgtr(M: torch.Tensor) -> torch.Tensor:
    return torch.trace(M) / M.shape[0]


def dense_update(
    name_K, name_C, K, C, m_K, m_C, H_K, H_C, damping, alpha1, lr_cov, kfac_like, normalize, hcs
):
    """ALGORITHM.md section 3, step 1, with dense matrices (returns K, C, m_K, m_C)."""
    I_K, I_C = torch.eye(K.shape[0], dtype=DTYPE), torch.eye(C.shape[0], dtype=DTYPE)
    s = 0.5 * (1 - alpha1) if normalize else 0.5
    PKtK, PCtC = project(name_K, K.T @ K), project(name_C, C.T @ C)
    if kfac_like:
        mK = s * (H_K + damping * PKtK - I_K)
        mC = s * (hcs * H_C + damping * PCtC - I_C)
    else:
        mK = s * (avgtr(hcs * H_C) * H_K + damping * avgtr(C.T @ C) * PKtK - I_K)
        mC = s * (avgtr(H_K) * hcs * H_C + damping * avgtr(K.T @ K) * PCtC - I_C)
    if alpha1 != 0:
        mK = alpha1 * m_K + mK
        mC = alpha1 * m_C + mC
    bK = bC = lr_cov
    if normalize:
        bK = lr_cov / max(1.0, mK.abs().max().item())
        bC = lr_cov / max(1.0, mC.abs().max().item())
    return K - bK * K @ mK, C - bC * C @ mC, mK, mC


def random_member(name: str, d: int, gen: torch.Generator, scale: float = 0.3, eye=True):
    """A random member of the structure (``I + noise`` when ``eye``)."""
    spec = get_structure(name)
    Z = spec.zeros(d, dtype=DTYPE)
    X = Z._with_tensors(
        tuple(scale * torch.randn(t.shape, generator=gen, dtype=DTYPE) for t in Z.tensors())
    )
    if eye:
        X.add_identity_(1.0)
    return X


STRUCTURES = ["dense", "diagonal", "blockdiagonal:3", "hierarchical:2,2", "triltoeplitz"]


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize(
    "kfac_like, alpha1",
    [(False, 0.0), (False, 0.5), (True, 0.0)],
    ids=["singd", "singd-mom", "ikfac"],
)
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
@pytest.mark.parametrize("hcs", [1.0, 0.25], ids=["hcs1", "hcs0.25"])
def test_update_factors_matches_dense_formula(structure, kfac_like, alpha1, normalize, hcs):
    gen = torch.Generator().manual_seed(
        10 * STRUCTURES.index(structure) + 2 * kfac_like + int(alpha1 > 0)
    )
    # Pair different structures for K and C to catch a K/C mix-up.
    name_K, name_C = structure, ("dense" if structure != "dense" else "diagonal")
    K = random_member(name_K, D_I, gen)
    C = random_member(name_C, D_O, gen)
    m_K = m_C = None
    if alpha1 != 0:
        m_K = random_member(name_K, D_I, gen, eye=False)
        m_C = random_member(name_C, D_O, gen, eye=False)
    a = 1.5 * torch.randn(10, D_I, generator=gen, dtype=DTYPE)
    g = 1.5 * torch.randn(12, D_O, generator=gen, dtype=DTYPE)
    Kd, Cd = K.to_dense(), C.to_dense()
    assert in_structure(name_K, Kd) and in_structure(name_C, Cd)
    H_K, H_C = K.inner_of(a.T), C.inner_of(g.T)
    HKd = project(name_K, Kd.T @ a.T @ a @ Kd)
    HCd = project(name_C, Cd.T @ g.T @ g @ Cd)
    torch.testing.assert_close(H_K.to_dense(), HKd, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(H_C.to_dense(), HCd, rtol=1e-12, atol=1e-12)
    before = [t.clone() for X in (K, C, H_K, H_C) for t in X.tensors()]

    damping, lr_cov = 0.1, 0.3
    new = update_factors(
        K,
        C,
        m_K,
        m_C,
        H_K,
        H_C,
        damping=damping,
        alpha1=alpha1,
        lr_cov=lr_cov,
        kfac_like=kfac_like,
        normalize_lr_cov=normalize,
        H_C_scale=hcs,
    )
    K1, C1, mK1, mC1 = dense_update(
        name_K,
        name_C,
        Kd,
        Cd,
        None if m_K is None else m_K.to_dense(),
        None if m_C is None else m_C.to_dense(),
        HKd,
        HCd,
        damping,
        alpha1,
        lr_cov,
        kfac_like,
        normalize,
        hcs,
    )
    if normalize:  # the test must exercise the max(1, max|m|) branch
        assert mK1.abs().max() > 1 or mC1.abs().max() > 1
    assert type(new.K) is type(K) and type(new.C) is type(C)
    torch.testing.assert_close(new.K.to_dense(), K1, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(new.C.to_dense(), C1, rtol=1e-11, atol=1e-12)
    if alpha1 == 0:
        assert new.m_K is None and new.m_C is None
    else:
        torch.testing.assert_close(new.m_K.to_dense(), mK1, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(new.m_C.to_dense(), mC1, rtol=1e-11, atol=1e-12)
    after = [t for X in (K, C, H_K, H_C) for t in X.tensors()]
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True)), "inputs modified"


STACKING = [
    "hierarchical:2,2",
    "hierarchical:3,1",
    "hierarchical:5,4",
    "hierarchical:9,1",
    "triltoeplitz",
    "triutoeplitz",
    "blockdiagonal:3",
    "blockdiagonal:2",
    "triltopleftdiag:2",
    "trilbottomrightdiag:1",
    "triutopleftdiag:1",
    "triubottomrightdiag:3",
]


@pytest.mark.parametrize("structure", STACKING)
@pytest.mark.parametrize(
    "kfac_like, alpha1",
    [(False, 0.0), (False, 0.5), (True, 0.0)],
    ids=["singd", "singd-mom", "ikfac"],
)
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
def test_update_factors_together_matches_dense_formula(structure, kfac_like, alpha1, normalize):
    """Four blocks updated together (``H_C_scale`` and the statistics' sizes differ per
    block, so every per-block number differs) each equal the dense formula, as
    :func:`update_factors` one at a time does; their inputs stay unchanged and each
    result holds tensors of its own (no view of a stacked tensor)."""
    gen = torch.Generator().manual_seed(len(structure) + 2 * kfac_like + int(alpha1 > 0))
    jobs, expected = [], []
    damping, lr_cov = 0.1, 0.3
    for i in range(4):
        K, C = random_member(structure, D_I, gen), random_member(structure, D_O, gen)
        m_K = m_C = None
        if alpha1 != 0:
            m_K = random_member(structure, D_I, gen, eye=False)
            m_C = random_member(structure, D_O, gen, eye=False)
        a = (1 + i) * torch.randn(10, D_I, generator=gen, dtype=DTYPE)
        g = 1.5 * torch.randn(12, D_O, generator=gen, dtype=DTYPE)
        jobs.append(FactorJob(K, C, m_K, m_C, K.inner_of(a.T), C.inner_of(g.T), 0.25 * (1 + i)))
        Kd, Cd = K.to_dense(), C.to_dense()
        expected.append(
            dense_update(
                structure,
                structure,
                Kd,
                Cd,
                None if m_K is None else m_K.to_dense(),
                None if m_C is None else m_C.to_dense(),
                project(structure, Kd.T @ a.T @ a @ Kd),
                project(structure, Cd.T @ g.T @ g @ Cd),
                damping,
                alpha1,
                lr_cov,
                kfac_like,
                normalize,
                0.25 * (1 + i),
            )
        )
    before = [t.clone() for j in jobs for X in (j.K, j.C, j.H_K, j.H_C) for t in X.tensors()]
    new = update_factors_together(
        jobs,
        damping=damping,
        alpha1=alpha1,
        lr_cov=lr_cov,
        kfac_like=kfac_like,
        normalize_lr_cov=normalize,
    )
    if normalize:  # the test must exercise the max(1, max|m|) branch, per block
        assert len({n.beta1_K for n in new}) > 1
    for n, (K1, C1, mK1, mC1) in zip(new, expected, strict=True):
        torch.testing.assert_close(n.K.to_dense(), K1, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(n.C.to_dense(), C1, rtol=1e-11, atol=1e-12)
        if alpha1 == 0:
            assert n.m_K is None and n.m_C is None
        else:
            torch.testing.assert_close(n.m_K.to_dense(), mK1, rtol=1e-11, atol=1e-12)
            torch.testing.assert_close(n.m_C.to_dense(), mC1, rtol=1e-11, atol=1e-12)
        for X in (n.K, n.C) + ((n.m_K, n.m_C) if alpha1 else ()):
            for t in X._storage():
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    after = [t for j in jobs for X in (j.K, j.C, j.H_K, j.H_C) for t in X.tensors()]
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True)), "inputs modified"


@pytest.mark.parametrize(
    "structure",
    [
        "hierarchical:3,2",
        "triltoeplitz",
        "triutoeplitz",
        "blockdiagonal:3",
        "triltopleftdiag:2",
        "triubottomrightdiag:1",
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_step", [0.5, 0.05, None])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
def test_update_factors_together_bounds_each_block(structure, dtype, max_step, normalize):
    """With the factor-step bound: blocks whose step it reduces (statistics of very
    different sizes: some are, some are not) take their own bounded step; every
    result equals update_factors one at a time (16-bit: to its rounding, in the
    factors' dtype) and counts the same bounded steps; also with ``beta1`` normalised
    per block and without the bound."""
    gen = torch.Generator().manual_seed(7)
    jobs = []
    for i in range(5):
        K = random_member(structure, 9, gen).to(dtype)
        C = random_member(structure, 8, gen).to(dtype)
        a = 0.1 * 4**i * torch.randn(30, 9, generator=gen, dtype=DTYPE)
        g = 0.1 * 4**i * torch.randn(30, 8, generator=gen, dtype=DTYPE)
        H_K, H_C = K.inner_of(a.T.to(dtype)), C.inner_of(g.T.to(dtype))
        jobs.append(FactorJob(K, C, K.mul(0.1), C.mul(-0.1), H_K, H_C, 1.0))
    options = dict(damping=1e-3, alpha1=0.5, kfac_like=False, normalize_lr_cov=normalize)
    options["lr_cov"] = 0.05 if not normalize else 0.5
    new = update_factors_together(jobs, max_step=max_step, **options)
    one = [
        update_factors(j.K, j.C, j.m_K, j.m_C, j.H_K, j.H_C, max_step=max_step, **options)
        for j in jobs
    ]
    counts = [o.bounded for o in one]
    if max_step is not None and not normalize:
        assert 0 in counts and max(counts) > 0  # (both kinds of block)
    if normalize:  # (blocks of different beta1)
        assert len({o.beta1_K for o in one}) > 1
    assert [n.bounded for n in new] == counts
    assert [n.beta1_K for n in new] == pytest.approx([o.beta1_K for o in one], rel=1e-6)
    # relative to each matrix's largest entry: without the bound the statistics' 4^i
    # scales grow entries to ~8e3 beside entries of ~1e2 that are differences of such
    # numbers, whose float32 rounding depends on the BLAS kernels of the machine (an
    # Intel Xeon's MKL: 1.4e-5 of that entry, 1.4e-7 of the largest; every float32 case
    # here within 1.7e-7 of each other and 5.4e-7 of float64, largest-entry-relative)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
    for n, o in zip(new, one, strict=True):
        for x, y in ((n.K, o.K), (n.C, o.C), (n.m_K, o.m_K), (n.m_C, o.m_C)):
            assert x.dtype == dtype
            X, Y = x.to_dense().double(), y.to_dense().double()
            assert (X - Y).abs().max() <= tol * max(Y.abs().max().item(), 1.0)


def test_update_factors_from_identity_dense_closed_form():
    """From ``K = C = I`` (step 0): ``K1 = I - b/2 (avgtr(H_C) H_K + lambda I - I)``."""
    gen = torch.Generator().manual_seed(3)
    spec = get_structure("dense")
    K, C = spec.eye(4, dtype=DTYPE), spec.eye(3, dtype=DTYPE)
    a = torch.randn(6, 4, generator=gen, dtype=DTYPE)
    g = torch.randn(5, 3, generator=gen, dtype=DTYPE)
    U, G = a.T @ a, g.T @ g
    lam, b = 0.01, 0.1
    new = update_factors(
        K,
        C,
        None,
        None,
        K.inner_of(a.T),
        C.inner_of(g.T),
        damping=lam,
        alpha1=0.0,
        lr_cov=b,
        kfac_like=False,
        normalize_lr_cov=False,
    )
    I4, I3 = torch.eye(4, dtype=DTYPE), torch.eye(3, dtype=DTYPE)
    K1 = I4 - b / 2 * (torch.trace(G) / 3 * U + lam * I4 - I4)
    C1 = I3 - b / 2 * (torch.trace(U) / 4 * G + lam * I3 - I3)
    torch.testing.assert_close(new.K.to_dense(), K1, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(new.C.to_dense(), C1, rtol=1e-13, atol=1e-14)


# -------------------------------------------------------------- natural gradient
@pytest.mark.parametrize(
    "structures",
    [("dense", "dense"), ("blockdiagonal:3", "diagonal"), ("hierarchical:2,2", "triltoeplitz")],
)
def test_natural_gradient_matches_dense(structures):
    gen = torch.Generator().manual_seed(4)
    K = random_member(structures[0], D_I, gen)
    C = random_member(structures[1], D_O, gen)
    G = torch.randn(D_O, D_I, generator=gen, dtype=DTYPE)
    Kd, Cd = K.to_dense(), C.to_dense()
    expected = Cd @ Cd.T @ G @ Kd @ Kd.T
    out = natural_gradient(K, C, G)
    assert out.dtype == DTYPE and out.shape == G.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


BATCHED = [
    "dense",
    "diagonal",
    "blockdiagonal:3",
    "hierarchical:2,2",
    "triltoeplitz",
    "triutoeplitz",
    "triltopleftdiag:2",
    "triubottomrightdiag:2",
    "triutopleftdiag:2",
]


@pytest.mark.parametrize("structure", BATCHED)
def test_natural_gradients_batch_equal_layers(structure, monkeypatch):
    """Blocks of equal shapes and kinds are computed together, each side one
    ``stacked_mm`` for the group: every result equals ``C C^T G K K^T`` densely
    (float64), whether it was computed in a group, in a group of one (another shape),
    alone (another dtype), or alone because its gradient is larger than
    ``BATCH_MAX_NUMEL``; a group's results are views of one tensor."""
    from torchsingd.optim import update
    from torchsingd.optim.update import NaturalGradientTask, natural_gradients

    gen = torch.Generator().manual_seed(6)
    shapes = [(D_O, D_I)] * 3 + [(D_I, D_O)] + [(D_O, D_I)]
    dtypes = [DTYPE] * 4 + [torch.float32]
    tasks = []
    for (d_o, d_i), dtype in zip(shapes, dtypes, strict=True):
        K = random_member(structure, d_i, gen).to(dtype)
        C = random_member(structure, d_o, gen).to(dtype)
        G = torch.randn(d_o, d_i, generator=gen, dtype=DTYPE).to(dtype)
        tasks.append(NaturalGradientTask(K, C, G, K.outer_operator(), C.outer_operator()))
    big = random_member(structure, 9, gen), random_member(structure, 8, gen)
    G_big = torch.randn(8, 9, generator=gen, dtype=DTYPE)
    monkeypatch.setattr(update, "BATCH_MAX_NUMEL", 71)  # 8 x 9 = 72 numbers: alone
    tasks.append(NaturalGradientTask(*big, G_big, big[0].outer_operator(), big[1].outer_operator()))
    assert tasks[-1].key is None and all(t.key is not None for t in tasks[:-1])
    assert tasks[0].key == tasks[1].key == tasks[2].key
    assert len({tasks[0].key, tasks[3].key, tasks[4].key}) == 3

    calls = []
    for op in {type(t.KKt) for t in tasks}:
        original = op.stacked_mm
        monkeypatch.setattr(
            op,
            "stacked_mm",
            staticmethod(lambda ops, X, f=original: calls.append(len(ops)) or f(ops, X)),
        )
    natural_gradients(tasks)
    assert calls == [3, 3]  # one group of three, its K side and its C side
    for t in tasks:
        Kd, Cd = t.K.to_dense().double(), t.C.to_dense().double()
        expected = Cd @ Cd.T @ t.G.double() @ Kd @ Kd.T
        assert t.result.dtype == t.G.dtype and t.result.shape == t.G.shape
        tol = 1e-12 if t.G.dtype == DTYPE else 1e-5
        torch.testing.assert_close(t.result.double(), expected, rtol=tol, atol=tol)
    base = tasks[0].result._base
    assert base is not None and all(t.result._base is base for t in tasks[:3])


def test_natural_gradient_mixed_dtypes():
    gen = torch.Generator().manual_seed(5)
    K = random_member("dense", D_I, gen).to(torch.float32)
    C = random_member("blockdiagonal:3", D_O, gen)  # float64
    G = torch.randn(D_O, D_I, generator=gen, dtype=DTYPE)
    Kd, Cd = K.to_dense().to(DTYPE), C.to_dense()
    expected = Cd @ Cd.T @ G @ Kd @ Kd.T
    out = natural_gradient(K, C, G)
    assert out.dtype == torch.float64  # the gradient's dtype
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    Kb, Cb = K.to(torch.bfloat16), C.to(torch.bfloat16)
    out_b = natural_gradient(Kb, Cb, G.float())
    assert out_b.dtype == torch.float32
    ref = (
        Cb.to_dense().double()
        @ Cb.to_dense().double().T
        @ G
        @ Kb.to_dense().double()
        @ Kb.to_dense().double().T
    )
    assert ((out_b.double() - ref).norm() / ref.norm()) < 3e-2


# -------------------------------------------------------------- parameter step
def test_parameter_step_weight_decay_momentum_lr():
    gen = torch.Generator().manual_seed(6)
    W = torch.randn(3, 4, generator=gen, dtype=DTYPE)
    b = torch.randn(3, generator=gen, dtype=DTYPE)
    u1 = [torch.randn(3, 4, generator=gen, dtype=DTYPE), torch.randn(3, generator=gen, dtype=DTYPE)]
    u2 = [torch.randn(3, 4, generator=gen, dtype=DTYPE), torch.randn(3, generator=gen, dtype=DTYPE)]
    lr, mom, wd = 0.1, 0.9, 0.01
    W0, b0 = W.clone(), b.clone()

    bufs = parameter_step([W, b], u1, [None, None], lr=lr, momentum=mom, weight_decay=wd)
    # step 1: buffer created as u = G_nat + wd * W (no alpha2 factor); W <- W - lr * u
    e_buf = [u1[0] + wd * W0, u1[1] + wd * b0]
    assert all(x is not None for x in bufs)
    torch.testing.assert_close(bufs[0], e_buf[0], rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(bufs[1], e_buf[1], rtol=1e-14, atol=1e-15)
    W1, b1 = W0 - lr * e_buf[0], b0 - lr * e_buf[1]
    torch.testing.assert_close(W, W1, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(b, b1, rtol=1e-14, atol=1e-15)

    # step 2: buffer updated in place: b <- alpha2 b + u
    ids = [id(x) for x in bufs]
    bufs2 = parameter_step([W, b], u2, bufs, lr=lr, momentum=mom, weight_decay=wd)
    assert [id(x) for x in bufs2] == ids
    e_buf2 = [mom * e_buf[0] + u2[0] + wd * W1, mom * e_buf[1] + u2[1] + wd * b1]
    torch.testing.assert_close(bufs2[0], e_buf2[0], rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(W, W1 - lr * e_buf2[0], rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(b, b1 - lr * e_buf2[1], rtol=1e-14, atol=1e-15)


def test_parameter_step_without_momentum_or_decay():
    W = torch.ones(2, 2, dtype=DTYPE)
    u = torch.full((2, 2), 3.0, dtype=DTYPE)
    out = parameter_step([W], [u], [None], lr=0.5, momentum=0.0, weight_decay=0.0)
    assert out == [None]
    assert torch.equal(W, torch.full((2, 2), 1.0 - 1.5, dtype=DTYPE))
    assert torch.equal(u, torch.full((2, 2), 3.0, dtype=DTYPE))  # direction untouched


def test_parameter_step_mixed_buffers_equal_one_tensor_at_a_time():
    """One call over several tensors (some with a momentum buffer, some without, two
    dtypes) gives the numbers of separate calls, bit for bit."""
    gen = torch.Generator().manual_seed(9)
    shapes = [(5, 7), (5,), (3, 3, 2), (0,)]
    dtypes = [torch.float32, torch.float32, torch.float64, torch.float32]
    params = [torch.randn(s, generator=gen).to(t) for s, t in zip(shapes, dtypes, strict=True)]
    dirs = [torch.randn(s, generator=gen).to(t) for s, t in zip(shapes, dtypes, strict=True)]
    bufs = [torch.randn(shapes[0], generator=gen), None, torch.randn(shapes[2]).double(), None]
    dirs_before = [d.clone() for d in dirs]
    one = [p.clone() for p in params]
    one_bufs = [None if b is None else b.clone() for b in bufs]
    kw = dict(lr=0.03, momentum=0.8, weight_decay=0.02)
    out = parameter_step(params, dirs, bufs, **kw)
    for i in range(len(one)):
        (one_bufs[i],) = parameter_step([one[i]], [dirs[i]], [one_bufs[i]], **kw)
    for p, q in zip(params, one, strict=True):
        assert torch.equal(p, q)
    for b, c in zip(out, one_bufs, strict=True):
        assert torch.equal(b, c)
    assert out[0] is bufs[0] and out[2] is bufs[2]  # existing buffers updated in place
    assert all(torch.equal(d, e) for d, e in zip(dirs, dirs_before, strict=True))
    # and against the formula for the entry that had no buffer
    torch.testing.assert_close(out[1], dirs[1] + 0.02 * one[1].add(out[1], alpha=0.03))


def test_parameter_step_rejects_lists_of_different_lengths():
    with pytest.raises(ValueError, match="differ in length: 2, 1, 2"):
        parameter_step(
            [torch.ones(1)] * 2,
            [torch.ones(1)],
            [None, None],
            lr=1.0,
            momentum=0.0,
            weight_decay=0.0,
        )


# ------------------------------------------------------- IKFAC first-order theorem
def _ikfac_error(beta1: float, d: int = 6, lam: float = 0.1) -> tuple[float, float]:
    """One IKFAC step from ``K0 K0^T = (S_K0 + lam I)^-1``: (error, first-order change)."""
    gen = torch.Generator().manual_seed(11)
    eye = torch.eye(d, dtype=DTYPE)
    M = torch.randn(d, d, generator=gen, dtype=DTYPE)
    S0 = M @ M.T / d + 0.5 * eye
    a = torch.randn(20, d, generator=gen, dtype=DTYPE) / 20**0.5
    U = a.T @ a
    L = torch.linalg.cholesky(torch.linalg.inv(S0 + lam * eye))
    spec = get_structure("dense")
    K0 = spec.from_dense(L)  # dense: P(M) = M, so this holds L (not symmetric) as is
    assert torch.equal(K0.to_dense(), L)
    C0 = spec.eye(3, dtype=DTYPE)
    g = torch.randn(4, 3, generator=gen, dtype=DTYPE)
    new = update_factors(
        K0,
        C0,
        None,
        None,
        K0.inner_of(a.T),
        C0.inner_of(g.T),
        damping=lam,
        alpha1=0.0,
        lr_cov=beta1,
        kfac_like=True,
        normalize_lr_cov=False,
    )
    K1 = new.K.to_dense()
    # the closed form of ALGORITHM.md section 5
    K1_formula = L @ (eye - beta1 / 2 * (L.T @ U @ L + lam * L.T @ L - eye))
    torch.testing.assert_close(K1, K1_formula, rtol=1e-13, atol=1e-14)
    S1 = (1 - beta1) * S0 + beta1 * U
    target = torch.linalg.inv(S1 + lam * eye)
    err = torch.linalg.matrix_norm(K1 @ K1.T - target).item()
    change = torch.linalg.matrix_norm(target - torch.linalg.inv(S0 + lam * eye)).item()
    return err, change


@pytest.mark.parametrize("beta1", [1e-2, 1e-3])
def test_ikfac_matches_kfac_to_first_order(beta1):
    err, change = _ikfac_error(beta1)
    err_half, _ = _ikfac_error(beta1 / 2)
    ratio = err / err_half
    assert 3.5 <= ratio <= 4.5, f"err({beta1})/err({beta1 / 2}) = {ratio}"
    # first order matches: the error is O(beta1) smaller than the change of the target
    assert err < 2 * beta1 * change, (err, change)
