"""Tests of the structured matrix families (ALGORITHM.md section 4).

Every operation of :class:`torchsingd.structures.StructuredMatrix` is compared with the
dense float64 computation its docstring states. The projection ``P`` is re-implemented
here from the table in ALGORITHM.md (see ``project``), independently of the package's
``from_dense``, so that ``inner``/``inner_of``/``from_dense`` are checked against the
spec rather than against each other.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from torch import Tensor

from torchsingd.structures import (
    FAMILIES,
    BlockDiagonalMatrix,
    DenseMatrix,
    DiagonalMatrix,
    HierarchicalMatrix,
    StructuredMatrix,
    StructureSpec,
    TrilBottomRightDiagonalMatrix,
    TrilToeplitzMatrix,
    TrilTopLeftDiagonalMatrix,
    TriuBottomRightDiagonalMatrix,
    TriuToeplitzMatrix,
    TriuTopLeftDiagonalMatrix,
    get_structure,
)

F64 = torch.float64


# --------------------------------------------------------------------------- cases
DIMS = (1, 2, 3, 5, 7, 8, 13)
TRIANGULAR = ("triltopleftdiag", "trilbottomrightdiag", "triutopleftdiag", "triubottomrightdiag")

# structure name -> dimensions to test (sizes smaller than, equal to and not dividing
# the blocks / corners, plus d = 1).
SPEC_DIMS: dict[str, tuple[int, ...]] = {
    "dense": DIMS,
    "diagonal": DIMS,
    "blockdiagonal:3": DIMS,
    "blockdiagonal:4": DIMS,
    "blockdiagonal": (1, 13, 30, 31, 61),
    "hierarchical:3,2": DIMS,
    "hierarchical:2,4": DIMS,
    "hierarchical": (1, 15, 16, 30, 31, 40),
    "triltoeplitz": DIMS,
    "triutoeplitz": DIMS,
    **{f"{fam}:{k}": DIMS for fam in TRIANGULAR for k in (1, 2, 3)},
}
SPEC_NAMES = tuple(SPEC_DIMS)
CASES = [pytest.param(name, d, id=f"{name}-d{d}") for name, dims in SPEC_DIMS.items() for d in dims]


def seed_of(*parts: object) -> int:
    """A deterministic seed (Python's ``hash`` of strings is salted per process)."""
    return zlib.crc32("|".join(map(str, parts)).encode())


def gen(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(seed_of(*parts))


def randn(*shape: int, g: torch.Generator, dtype: torch.dtype = F64) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def random_member(spec: StructureSpec, d: int, *tag: object) -> StructuredMatrix:
    """A member with random values: fill every defining tensor in place."""
    X = spec.zeros(d, dtype=F64)
    g = gen(spec.name, d, *tag)
    for t in X.tensors():
        t.copy_(torch.randn(t.shape, generator=g, dtype=F64))
    return X


def random_symmetric(d: int, *tag: object, dtype: torch.dtype = F64) -> Tensor:
    A = randn(d, d, g=gen("sym", d, *tag))
    return ((A + A.T) / 2).to(dtype)


def sym(M: Tensor) -> Tensor:
    return (M + M.T) / 2


def assert_close(got: Tensor, expected: Tensor, tol: float = 1e-12) -> None:
    """``max|got - expected| <= tol * max(1, max|expected|)`` (same shape)."""
    assert got.shape == expected.shape, (got.shape, expected.shape)
    got, expected = got.to(F64), expected.to(F64)
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (got - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, f"max abs error {err:.3e} > {tol:.1e} * {scale:.3e}"


# ------------------------------------------- independent dense projections (the spec)
def hierarchical_sizes(d: int, K1: int, K2: int) -> tuple[int, int, int]:
    """ALGORITHM.md: d <= K1: only A; d <= K1+K2: A (K1) and E (d-K1); else A, diag, E."""
    if d <= K1:
        return d, 0, 0
    if d <= K1 + K2:
        return K1, 0, d - K1
    return K1, d - K1 - K2, K2


def _keep_diag(M: Tensor) -> Tensor:
    return torch.diag(torch.diagonal(M))


def _p_dense(M: Tensor) -> Tensor:
    return M.clone()


def _p_diagonal(M: Tensor) -> Tensor:
    return _keep_diag(M)


def _p_blockdiagonal(M: Tensor, B: int) -> Tensor:
    out = torch.zeros_like(M)
    d = M.shape[0]
    for start in range(0, d, B):
        end = min(start + B, d)
        out[start:end, start:end] = M[start:end, start:end]
    return out


def _p_hierarchical(M: Tensor, K1: int, K2: int) -> Tensor:
    k1, m, _ = hierarchical_sizes(M.shape[0], K1, K2)
    s = k1 + m
    out = torch.zeros_like(M)
    out[:k1, :k1] = M[:k1, :k1]  # A = M11
    out[:k1, k1:] = 2 * M[:k1, k1:]  # B = 2 M1,rest
    out[k1:s, k1:s] = _keep_diag(M[k1:s, k1:s])  # c = diag(M22)
    out[s:, k1:s] = 2 * M[s:, k1:s]  # D = 2 M32
    out[s:, s:] = M[s:, s:]  # E = M33
    return out


def _toeplitz_coefficients(M: Tensor) -> list[Tensor]:
    d = M.shape[0]
    coeffs = [torch.diagonal(M).sum() / d]
    for j in range(1, d):
        coeffs.append((torch.diagonal(M, -j).sum() + torch.diagonal(M, j).sum()) / (d - j))
    return coeffs


def _p_triltoeplitz(M: Tensor) -> Tensor:
    out = torch.zeros_like(M)
    for j, c in enumerate(_toeplitz_coefficients(M)):
        for i in range(j, M.shape[0]):
            out[i, i - j] = c
    return out


def _p_triutoeplitz(M: Tensor) -> Tensor:
    out = torch.zeros_like(M)
    for j, c in enumerate(_toeplitz_coefficients(M)):
        for i in range(j, M.shape[0]):
            out[i - j, i] = c
    return out


def _p_triltopleftdiag(M: Tensor, k: int) -> Tensor:
    m = M.shape[0] - min(k, M.shape[0])  # [diag 0; b C], C dense k x k
    out = torch.zeros_like(M)
    out[:m, :m] = _keep_diag(M[:m, :m])
    out[m:, :m] = M[m:, :m] + M[:m, m:].T
    out[m:, m:] = M[m:, m:]
    return out


def _p_trilbottomrightdiag(M: Tensor, k: int) -> Tensor:
    kk = min(k, M.shape[0])  # [A 0; b diag], A dense k x k
    out = torch.zeros_like(M)
    out[:kk, :kk] = M[:kk, :kk]
    out[kk:, :kk] = M[kk:, :kk] + M[:kk, kk:].T
    out[kk:, kk:] = _keep_diag(M[kk:, kk:])
    return out


def _p_triutopleftdiag(M: Tensor, k: int) -> Tensor:
    m = M.shape[0] - min(k, M.shape[0])  # [diag b; 0 C]
    out = torch.zeros_like(M)
    out[:m, :m] = _keep_diag(M[:m, :m])
    out[:m, m:] = M[:m, m:] + M[m:, :m].T
    out[m:, m:] = M[m:, m:]
    return out


def _p_triubottomrightdiag(M: Tensor, k: int) -> Tensor:
    kk = min(k, M.shape[0])  # [A b; 0 diag]
    out = torch.zeros_like(M)
    out[:kk, :kk] = M[:kk, :kk]
    out[:kk, kk:] = M[:kk, kk:] + M[kk:, :kk].T
    out[kk:, kk:] = _keep_diag(M[kk:, kk:])
    return out


PROJECTIONS = {
    "dense": _p_dense,
    "diagonal": _p_diagonal,
    "blockdiagonal": _p_blockdiagonal,
    "hierarchical": _p_hierarchical,
    "triltoeplitz": _p_triltoeplitz,
    "triutoeplitz": _p_triutoeplitz,
    "triltopleftdiag": _p_triltopleftdiag,
    "trilbottomrightdiag": _p_trilbottomrightdiag,
    "triutopleftdiag": _p_triutopleftdiag,
    "triubottomrightdiag": _p_triubottomrightdiag,
}


def project(spec: StructureSpec, M: Tensor) -> Tensor:
    """``P(M)`` as a dense matrix, from the table in ALGORITHM.md section 4."""
    return PROJECTIONS[spec.cls.family](M, *spec.options)


def pattern(spec: StructureSpec, d: int) -> Tensor:
    """Where members may be non-zero: ``P`` of the all-ones matrix is non-zero there."""
    return project(spec, torch.ones(d, d, dtype=F64)) != 0


def assert_member(spec: StructureSpec, Xd: Tensor, tol: float = 1e-12) -> None:
    """``Xd`` (dense) has the structure: zero off the pattern, Toeplitz if required."""
    d = Xd.shape[0]
    assert torch.all(Xd[~pattern(spec, d)] == 0), "non-zero entries off the pattern"
    if spec.cls.family in ("triltoeplitz", "triutoeplitz"):
        scale = max(1.0, Xd.abs().max().item())
        for j in range(-d + 1, d):
            diagonal = torch.diagonal(Xd, j)
            assert (diagonal - diagonal[0]).abs().max() <= tol * scale, f"diagonal {j}"


def expected_numel(spec: StructureSpec, d: int) -> int:
    """The documented number of stored values."""
    family, opts = spec.cls.family, spec.options
    if family == "dense":
        return d * d
    if family in ("diagonal", "triltoeplitz", "triutoeplitz"):
        return d
    if family == "blockdiagonal":
        (B,) = opts
        return (d // B) * B * B + (d % B) ** 2
    if family == "hierarchical":
        k1, m, k2 = hierarchical_sizes(d, *opts)
        return k1 * k1 + k1 * (m + k2) + m + k2 * m + k2 * k2
    assert family in TRIANGULAR
    k = min(opts[0], d)
    return (d - k) + k * (d - k) + k * k


# --------------------------------------------------------------------- meta tests
def test_every_registered_family_is_tested():
    tested = {get_structure(name).cls.family for name in SPEC_NAMES}
    assert tested == set(FAMILIES)
    assert set(PROJECTIONS) == set(FAMILIES)


# ------------------------------------------------------------- constructors/storage
@pytest.mark.parametrize("name, d", CASES)
def test_zeros_eye_and_numel(name, d):
    spec = get_structure(name)
    Z = spec.zeros(d, dtype=F64)
    Id = spec.eye(d, dtype=F64)
    for X in (Z, Id):
        assert isinstance(X, spec.cls)
        assert X.dim == d and X.shape == (d, d)
        assert X.options() == spec.options
        assert X.dtype == F64
        assert all(t.dtype == F64 for t in X.tensors())
    assert torch.equal(Z.to_dense(), torch.zeros(d, d, dtype=F64))
    assert torch.equal(Id.to_dense(), torch.eye(d, dtype=F64))
    assert Z.numel() == Id.numel() == expected_numel(spec, d) == spec.numel(d)
    assert spec.eye(d).dtype == spec.zeros(d).dtype == torch.get_default_dtype()
    assert Z.nbytes() == 8 * expected_numel(spec, d)


@pytest.mark.parametrize("name, d", CASES)
def test_member_layout_matches_spec(name, d):
    """A random member has exactly the spec's sparsity pattern, one stored number per
    free entry (Toeplitz: per diagonal), and ``from_dense`` recovers it from its
    symmetric part when its dense diagonal blocks are symmetric."""
    spec = get_structure(name)
    X = random_member(spec, d, "layout").to_dense()
    assert_member(spec, X)
    if spec.cls.family in ("triltoeplitz", "triutoeplitz"):
        assert int((X != 0).sum()) == d * (d + 1) // 2
    else:
        assert torch.equal(X != 0, pattern(spec, d))
        assert int(pattern(spec, d).sum()) == expected_numel(spec, d)
    # P(sym(X)) = X once the dense diagonal blocks (A, E, C, blocks) are symmetric.
    Xs = project(spec, sym(X))
    assert_member(spec, Xs)
    assert_close(project(spec, sym(Xs)), Xs)
    assert_close(spec.from_dense(sym(Xs)).to_dense(), Xs)


@pytest.mark.parametrize("name, d", CASES)
def test_projection_idempotent(name, d):
    spec = get_structure(name)
    PM = project(spec, random_symmetric(d, "idem"))
    assert_close(project(spec, sym(PM)), PM)
    assert_close(spec.from_dense(sym(PM)).to_dense(), PM)


@pytest.mark.parametrize("name, d", CASES)
def test_from_dense_equals_independent_projection(name, d):
    spec = get_structure(name)
    M = random_symmetric(d, "from_dense")
    M_before = M.clone()
    P = spec.from_dense(M)
    assert isinstance(P, spec.cls) and P.options() == spec.options and P.dim == d
    assert_close(P.to_dense(), project(spec, M))
    assert torch.equal(M, M_before)
    # The result does not alias the input.
    M.fill_(7.0)
    assert_close(P.to_dense(), project(spec, M_before))


@pytest.mark.parametrize("name, d", CASES)
def test_projection_keeps_trace(name, d):
    spec = get_structure(name)
    M = random_symmetric(d, "trace")
    avgtr = torch.trace(M) / d
    assert_close(torch.trace(project(spec, M)) / d, avgtr)
    P = spec.from_dense(M)
    assert_close(P.average_trace(), avgtr)
    assert_close(P.trace(), torch.trace(M))


# ---------------------------------------------------------------------- products
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("name, d", CASES)
def test_mm_and_tmm(name, d, n, layout):
    spec = get_structure(name)
    X = random_member(spec, d, "mm")
    Xd = X.to_dense()
    Z = randn(d, n, g=gen(name, d, n, "Z"))
    if layout == "transposed":
        Z = Z.T.contiguous().T  # same values, column-major strides
    Z_before = Z.clone()
    for got in (X.mm(Z), X @ Z):
        assert_close(got, Xd @ Z)
    T = X.tmm(Z)
    assert_close(T, Xd.T @ Z)
    T.fill_(1.0)  # results are fresh tensors: writing to them changes no input
    assert torch.equal(Z, Z_before)
    assert torch.equal(X.to_dense(), Xd)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("name, d", CASES)
def test_outer_operator(name, d, layout):
    """``outer_operator().mm(Z) = X X^T Z`` (the cached ``K K^T`` of every family)."""
    spec = get_structure(name)
    X = random_member(spec, d, "outer")
    Xd = X.to_dense()
    Z = randn(d, 3, g=gen(name, d, "outerZ"))
    if layout == "transposed":
        Z = Z.T.contiguous().T
    op = X.outer_operator()
    assert_close(op.mm(Z), Xd @ Xd.T @ Z)
    if hasattr(op, "mm_"):  # in place: the same numbers as mm, written into its argument
        Y = Z.clone()
        out = op.mm_(Y)
        assert out.data_ptr() == Y.data_ptr() or layout == "transposed"
        assert torch.equal(Y, op.mm(Z))
    pattern = X.sparse_pattern()
    if pattern is not None:  # the claimed form: diag(delta) off the border B
        B = list(range(pattern.head)) + list(range(d - pattern.tail, d))
        off = [i for i in range(d) if i not in B]
        dense = Xd if pattern.kind == "rows" else Xd.T
        expected = torch.diag(pattern.delta)[off]
        assert torch.equal(dense[off], expected)
        assert torch.equal(pattern.delta[B], torch.zeros(len(B), dtype=F64))
        assert X.outer_operator_pays(columns=len(B), uses=1)


@pytest.mark.parametrize("name, d", CASES)
def test_matmul_closure(name, d):
    """``X @ Y`` equals the dense product, and that product is again a member."""
    spec = get_structure(name)
    X, Y = random_member(spec, d, "X"), random_member(spec, d, "Y")
    Xd, Yd = X.to_dense(), Y.to_dense()
    XY = X @ Y
    assert isinstance(XY, spec.cls) and XY.options() == spec.options and XY.dim == d
    assert XY.numel() == X.numel()
    assert_close(XY.to_dense(), Xd @ Yd)
    assert_close(X.matmul(Y).to_dense(), Xd @ Yd)
    # Membership shown independently: the dense product has the structure's pattern.
    assert_member(spec, Xd @ Yd)
    # Inputs are untouched, and the result shares no storage with them.
    XY.mul_(0.0).add_identity_(2.0)
    assert torch.equal(X.to_dense(), Xd) and torch.equal(Y.to_dense(), Yd)


@pytest.mark.parametrize("name, d", CASES)
def test_inner(name, d):
    spec = get_structure(name)
    X = random_member(spec, d, "inner")
    Xd = X.to_dense()
    G = X.inner()
    assert isinstance(G, spec.cls) and G.options() == spec.options and G.dim == d
    assert_close(G.to_dense(), project(spec, Xd.T @ Xd))
    G.mul_(0.0).add_identity_(2.0)
    assert torch.equal(X.to_dense(), Xd)


@pytest.mark.parametrize("shape", ["n=1", "n<d", "n=d", "n>d"])
@pytest.mark.parametrize("name, d", CASES)
def test_inner_of(name, d, shape):
    n = {"n=1": 1, "n<d": max(1, d // 2), "n=d": d, "n>d": 2 * d + 3}[shape]
    spec = get_structure(name)
    X = random_member(spec, d, "inner_of")
    Xd = X.to_dense()
    Z = randn(d, n, g=gen(name, d, n, "inner_of_Z"))
    Z_before = Z.clone()
    expected = project(spec, Xd.T @ Z @ Z.T @ Xd)
    for Zl in (Z, Z.T.contiguous().T):  # contiguous and column-major
        G = X.inner_of(Zl)
        assert isinstance(G, spec.cls) and G.options() == spec.options and G.dim == d
        assert_close(G.to_dense(), expected)
        G.mul_(0.0).add_identity_(2.0)
    assert torch.equal(X.to_dense(), Xd) and torch.equal(Z, Z_before)


@pytest.mark.parametrize("name, d", CASES)
def test_gram_route(name, d):
    """``inner_of_gram`` of summed ``gram_of`` parts equals ``P(K^T Z Z^T K)`` of all
    columns (the spec's projection of the dense product), and ``gram_pays`` says yes
    for many columns exactly for the families that have the route."""
    spec = get_structure(name)
    X = random_member(spec, d, "gram")
    Xd = X.to_dense()
    Z = randn(d, 3 * d + 40, g=gen(name, d, "gram_Z"))
    G = X.gram_of(Z[:, :7])
    if G is None:
        assert not X.gram_pays(10**6)
        with pytest.raises(NotImplementedError, match="no Gram route"):
            X.inner_of_gram(X)
        return
    assert X.gram_pays(10**6) and not X.gram_pays(1)
    G.add_(X.gram_of(Z[:, 7:].T.contiguous().T))  # chunks add; column-major too
    H = X.inner_of_gram(G)
    assert isinstance(H, spec.cls) and H.options() == spec.options and H.dim == d
    assert_close(H.to_dense(), project(spec, Xd.T @ Z @ Z.T @ Xd))
    assert torch.equal(X.to_dense(), Xd)


@pytest.mark.parametrize(
    "name", ["dense", "blockdiagonal:8", "hierarchical:5,3", "triltoeplitz", "triutoeplitz"]
)
def test_gram_route_only_where_precise(name):
    """16-bit factors keep ``inner_of`` (the Gram route's rounding of ``Z Z^T`` would be
    amplified by a whitening ``K``); in float32 the route stays within 1e-4 of the
    float64 statistic for ``K ~ (G + 1e-3 I)^-1/2`` of inputs with spectrum 1..1e-6."""
    spec = get_structure(name)
    d, n = 40, 4096
    g = gen(name, "gram_precise")
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    Z = (
        Q
        @ torch.diag(torch.logspace(0, -3, d, dtype=F64))
        @ torch.randn(d, n, generator=g, dtype=F64)
    )
    Z /= n**0.5  # Z Z^T has spectrum ~1..1e-6
    evals, evecs = torch.linalg.eigh(Z @ Z.T + 1e-3 * torch.eye(d, dtype=F64))
    K64 = spec.from_dense(evecs @ torch.diag(evals.rsqrt()) @ evecs.T)
    exact = K64.inner_of(Z).to_dense()
    for dtype in (torch.bfloat16, torch.float16):
        assert not K64.to(dtype).gram_pays(n) and K64.to(dtype).gram_of(Z.to(dtype)) is not None
    K32 = K64.to(torch.float32)
    assert K32.gram_pays(n)
    got = K32.inner_of_gram(K32.gram_of(Z.float())).to_dense().double()
    assert torch.linalg.matrix_norm(got - exact) <= 1e-4 * torch.linalg.matrix_norm(exact)


# ----------------------------------------------------------------- element-wise
@pytest.mark.parametrize("name, d", CASES)
def test_trace_and_average_trace(name, d):
    spec = get_structure(name)
    X = random_member(spec, d, "trace")
    Xd = X.to_dense()
    assert X.trace().shape == () and X.average_trace().shape == ()
    assert_close(X.trace(), torch.trace(Xd))
    assert_close(X.average_trace(), torch.trace(Xd) / d)


@pytest.mark.parametrize("name, d", CASES)
def test_add_mul_add_identity(name, d):
    spec = get_structure(name)
    X, Y = random_member(spec, d, "X"), random_member(spec, d, "Y")
    Xd, Yd = X.to_dense(), Y.to_dense()

    assert X.add_(Y, alpha=-0.75) is X
    assert_close(X.to_dense(), Xd - 0.75 * Yd)
    assert torch.equal(Y.to_dense(), Yd)
    assert X.add_(Y) is X
    assert_close(X.to_dense(), Xd + 0.25 * Yd)
    X.add_(Y, alpha=torch.tensor(-0.25, dtype=F64))
    assert_close(X.to_dense(), Xd)

    assert Y.mul_(-2.5) is Y
    assert_close(Y.to_dense(), -2.5 * Yd)
    Y.mul_(torch.tensor(0.5, dtype=F64))
    assert_close(Y.to_dense(), -1.25 * Yd)

    Xd = X.to_dense()
    assert X.add_identity_(1.5) is X
    assert_close(X.to_dense(), Xd + 1.5 * torch.eye(d, dtype=F64))


@pytest.mark.parametrize("name, d", CASES)
def test_incompatible_operands_raise(name, d):
    spec = get_structure(name)
    X = spec.eye(d, dtype=F64)
    with pytest.raises(ValueError):
        X.add_(spec.eye(d + 1, dtype=F64))
    with pytest.raises(ValueError):
        X.matmul(spec.eye(d + 1, dtype=F64))
    other = get_structure("diagonal" if spec.cls.family == "dense" else "dense").eye(d)
    with pytest.raises(ValueError):
        X.add_(other)


@pytest.mark.parametrize("name, d", CASES)
def test_max_abs(name, d):
    """Every family here stores matrix entries, so ``max_abs`` is the dense max |entry|."""
    spec = get_structure(name)
    X = random_member(spec, d, "max_abs")
    assert_close(X.max_abs(), X.to_dense().abs().max())
    X.mul_(-3.0)
    assert_close(X.max_abs(), X.to_dense().abs().max())
    assert float(spec.zeros(d, dtype=F64).max_abs()) == 0.0
    assert float(spec.eye(d, dtype=F64).max_abs()) == 1.0
    assert X.is_finite()
    first = next(t for t in X.tensors() if t.numel())  # (a view: write in place)
    first[(0,) * first.ndim] = float("nan")
    assert not X.is_finite()


@pytest.mark.parametrize("name", ["dense", "hierarchical:3,2", "blockdiagonal:3", "diagonal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_is_finite(name, dtype):
    """Huge finite entries whose sum overflows are finite; one inf, -inf or NaN is not."""
    spec = get_structure(name)
    big = torch.finfo(dtype).max
    X = spec.zeros(7, dtype=dtype)
    for t in X.tensors():
        t.fill_(big)  # every sum overflows to inf: the entry-by-entry check decides
    assert X.is_finite()
    for bad in (float("inf"), float("-inf"), float("nan")):
        Y = spec.eye(7, dtype=dtype)
        last = Y.tensors()[-1]  # (views of the storage: written in place)
        last[(-1,) * last.ndim] = bad
        assert not Y.is_finite()
        W = X.clone()
        first = W.tensors()[0]
        first[(0,) * first.ndim] = bad
        assert not W.is_finite()


@pytest.mark.parametrize("name, d", CASES)
def test_add_and_mul_out_of_place(name, d):
    """``add``/``mul`` give the numbers of ``clone().add_``/``clone().mul_`` (bit for
    bit) and leave their operands alone."""
    spec = get_structure(name)
    X, Y = random_member(spec, d, "add_X"), random_member(spec, d, "add_Y")
    Xd, Yd = X.to_dense(), Y.to_dense()
    S = X.add(Y, alpha=-0.37)
    assert isinstance(S, spec.cls) and S.options() == spec.options
    assert torch.equal(S.to_dense(), X.clone().add_(Y, alpha=-0.37).to_dense())
    assert_close(S.to_dense(), Xd - 0.37 * Yd)
    P = X.mul(2.5)
    assert torch.equal(P.to_dense(), X.clone().mul_(2.5).to_dense())
    assert torch.equal(X.to_dense(), Xd) and torch.equal(Y.to_dense(), Yd)
    with pytest.raises(ValueError):
        X.add(spec.zeros(d + 1, dtype=F64))
    Xb, Yf = X.to(torch.bfloat16), Y.to(torch.float32)  # mixed: self's dtype, as add_
    Sb = Xb.add(Yf, alpha=-0.37)
    assert Sb.dtype == torch.bfloat16
    assert torch.equal(Sb.to_dense(), Xb.clone().add_(Yf, alpha=-0.37).to_dense())


@pytest.mark.parametrize("name, d", CASES)
def test_clone_copy_to(name, d):
    spec = get_structure(name)
    X = random_member(spec, d, "X")
    Xd = X.to_dense()

    C = X.clone()
    assert isinstance(C, spec.cls) and C.options() == spec.options
    assert torch.equal(C.to_dense(), Xd)
    C.mul_(2.0).add_identity_(1.0)
    assert torch.equal(X.to_dense(), Xd)  # the clone does not share storage
    X.add_identity_(3.0)
    assert torch.equal(C.to_dense(), 2 * Xd + torch.eye(d, dtype=F64))

    Y = random_member(spec, d, "Y")
    Yd = Y.to_dense()
    assert X.copy_(Y) is X
    assert torch.equal(X.to_dense(), Yd)
    X.mul_(5.0)
    assert torch.equal(Y.to_dense(), Yd)  # copy_ copies values, not storage

    for dtype in (torch.float32, torch.bfloat16):
        L = Y.to(dtype)
        assert isinstance(L, spec.cls) and L.options() == spec.options
        assert L.dtype == dtype and all(t.dtype == dtype for t in L.tensors())
        assert torch.equal(L.to_dense(), Yd.to(dtype))
        assert Y.dtype == F64
    assert torch.equal(Y.to(F64).to_dense(), Yd)


# ------------------------------------------------------------- low precision
LOW_TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
LOW_DIMS = {"triltoeplitz": (1, 5, 13, 40, 300), "triutoeplitz": (1, 5, 13, 40, 300)}
LOW_CASES = [
    pytest.param(name, d, dtype, id=f"{name}-d{d}-{str(dtype).split('.')[-1]}")
    for name in SPEC_NAMES
    for d in LOW_DIMS.get(name, (1, 5, 13, 40))  # Toeplitz: counts d - j > 256 in bf16
    for dtype in LOW_TOL
]


def _dense_results(X: StructuredMatrix, Y: StructuredMatrix, Z: Tensor) -> dict[str, Tensor]:
    return {
        "mm": X.mm(Z),
        "tmm": X.tmm(Z),
        "@": (X @ Y).to_dense(),
        "inner": X.inner().to_dense(),
        "inner_of": X.inner_of(Z).to_dense(),
        "add_identity_": X.clone().add_identity_(0.5).to_dense(),
        "outer_operator": X.outer_operator().mm(Z),
        "outer_operator (transposed Z)": X.outer_operator().mm(Z.T.contiguous().T),
    }


@pytest.mark.parametrize("name, d, dtype", LOW_CASES)
def test_low_precision(name, d, dtype):
    """Ops run in float32/bfloat16/float16, keep the dtype, and match float64.

    The float64 reference uses the same (rounded) inputs, so only the arithmetic's
    rounding is measured: ``max|err| <= tol * max|reference|``.
    """
    spec = get_structure(name)
    scale = 0.5 / d**0.5  # moderate magnitudes, well-conditioned (near I)

    def member(tag):
        X = random_member(spec, d, tag).mul_(scale).add_identity_(1.0)
        return X.to(dtype)

    X, Y = member("X"), member("Y")
    Z = randn(d, 8, g=gen(name, d, "Z"), dtype=dtype)
    Id = spec.eye(d, dtype=dtype)
    assert Id.dtype == dtype and all(t.dtype == dtype for t in Id.tensors())
    assert torch.equal(Id.to_dense(), torch.eye(d, dtype=dtype))

    low = _dense_results(X, Y, Z)
    ref = _dense_results(X.to(F64), Y.to(F64), Z.to(F64))
    failures = []
    for op, got in low.items():
        if got.dtype != dtype:
            failures.append(f"{op}: dtype {got.dtype}")
            continue
        err = (got.to(F64) - ref[op]).abs().max().item()
        bound = LOW_TOL[dtype] * ref[op].abs().max().item()
        if not err <= bound:
            failures.append(f"{op}: error {err:.3e} > {bound:.3e}")
    assert not failures, failures
    for R in (X @ Y, X.inner(), X.inner_of(Z), X.clone().add_identity_(1.0)):
        assert all(t.dtype == dtype for t in R.tensors())


# ----------------------------------------------- large dimensions: no d x d temporary
LARGE_D = 4096


@pytest.mark.parametrize("name", ["diagonal", "blockdiagonal:8"])
def test_large_dimension_runs(name):
    spec = get_structure(name)
    X = random_member(spec, LARGE_D, "large")
    Z = randn(LARGE_D, 16, g=gen(name, "largeZ"))
    Y = X.mm(Z)
    G = X.inner_of(Z)
    H = X.inner()
    assert Y.shape == (LARGE_D, 16)
    assert isinstance(G, spec.cls) and isinstance(H, spec.cls)
    assert X.numel() == G.numel() == H.numel() == expected_numel(spec, LARGE_D)
    assert spec.numel(LARGE_D) == expected_numel(spec, LARGE_D)
    # Spot check the first block against a small dense computation.
    b = 8 if spec.cls.family == "blockdiagonal" else 1
    Xb = _leading_block(X, b)
    assert_close(Y[:b], Xb @ Z[:b])
    assert_close(_leading_block(G, b), Xb.T @ Z[:b] @ Z[:b].T @ Xb)
    assert_close(_leading_block(H, b), Xb.T @ Xb)


def _leading_block(X: StructuredMatrix, b: int) -> Tensor:
    if isinstance(X, DiagonalMatrix):
        return torch.diag(X.diag[:b])
    assert isinstance(X, BlockDiagonalMatrix) and X.block_size == b
    return X.blocks[0]


NO_DENSE_D = 1024


@pytest.mark.parametrize("name", [n for n in SPEC_NAMES if n != "dense"])
def test_no_dense_temporary(name):
    """The optimizer's operations create no tensor with ``d^2 / 4`` or more entries."""
    dispatch = pytest.importorskip("torch.utils._python_dispatch")

    class LargestTensor(dispatch.TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    d = NO_DENSE_D
    spec = get_structure(name)
    X, Y = random_member(spec, d, "X"), random_member(spec, d, "Y")
    Z = randn(d, 16, g=gen(name, "noDenseZ"))
    with LargestTensor() as mode:
        K = spec.eye(d, dtype=F64)
        K.add_(X, alpha=0.1).mul_(0.9).add_identity_(0.1)
        K.mm(Z), K.tmm(Z), K @ Y, K.inner(), K.inner_of(Z), K.outer_operator().mm(Z)
        K.trace(), K.average_trace(), K.max_abs(), K.clone().copy_(Y)
    assert 0 < mode.largest < d * d // 4, mode.largest


@pytest.mark.parametrize("name", SPEC_NAMES)
@pytest.mark.parametrize("d", [1, 100, 1000, LARGE_D])
def test_numel_formula(name, d):
    spec = get_structure(name)
    assert spec.numel(d) == expected_numel(spec, d)


# ------------------------------------------------------------------------ registry
@pytest.mark.parametrize(
    "text, cls, options, canonical",
    [
        ("dense", DenseMatrix, (), "dense"),
        ("diagonal", DiagonalMatrix, (), "diagonal"),
        ("blockdiagonal", BlockDiagonalMatrix, (30,), "blockdiagonal:30"),
        ("blockdiagonal:32", BlockDiagonalMatrix, (32,), "blockdiagonal:32"),
        ("block30diagonal", BlockDiagonalMatrix, (30,), "blockdiagonal:30"),
        ("block3diagonal", BlockDiagonalMatrix, (3,), "blockdiagonal:3"),
        ("hierarchical", HierarchicalMatrix, (15, 15), "hierarchical:15,15"),
        ("hierarchical:16,8", HierarchicalMatrix, (16, 8), "hierarchical:16,8"),
        ("hierarchical15_15", HierarchicalMatrix, (15, 15), "hierarchical:15,15"),
        ("hierarchical3_2", HierarchicalMatrix, (3, 2), "hierarchical:3,2"),
        ("triltoeplitz", TrilToeplitzMatrix, (), "triltoeplitz"),
        ("triutoeplitz", TriuToeplitzMatrix, (), "triutoeplitz"),
        ("triltopleftdiag", TrilTopLeftDiagonalMatrix, (1,), "triltopleftdiag:1"),
        ("triltopleftdiag:4", TrilTopLeftDiagonalMatrix, (4,), "triltopleftdiag:4"),
        ("trilbottomrightdiag", TrilBottomRightDiagonalMatrix, (1,), "trilbottomrightdiag:1"),
        ("triutopleftdiag:2", TriuTopLeftDiagonalMatrix, (2,), "triutopleftdiag:2"),
        ("triubottomrightdiag", TriuBottomRightDiagonalMatrix, (1,), "triubottomrightdiag:1"),
        ("DENSE", DenseMatrix, (), "dense"),
        ("  Diagonal\n", DiagonalMatrix, (), "diagonal"),
        ("BlockDiagonal:32", BlockDiagonalMatrix, (32,), "blockdiagonal:32"),
        ("Block30Diagonal", BlockDiagonalMatrix, (30,), "blockdiagonal:30"),
        (" HIERARCHICAL:16,8 ", HierarchicalMatrix, (16, 8), "hierarchical:16,8"),
        ("Hierarchical15_15", HierarchicalMatrix, (15, 15), "hierarchical:15,15"),
        ("\tTrilTopLeftDiag:4", TrilTopLeftDiagonalMatrix, (4,), "triltopleftdiag:4"),
    ],
    ids=lambda value: repr(value) if isinstance(value, str) else "",
)
def test_get_structure_accepts(text, cls, options, canonical):
    spec = get_structure(text)
    assert spec.cls is cls
    assert spec.options == options
    assert spec.name == canonical == str(spec)
    assert get_structure(spec) is spec
    assert get_structure(spec.name) == spec
    for d in (1, 7, 50):
        assert spec.numel(d) == expected_numel(spec, d)
        assert spec.eye(d).numel() == spec.numel(d)


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_canonical_name_round_trip(name):
    spec = get_structure(name)
    assert get_structure(spec.name) == spec
    assert spec.name.startswith(spec.cls.family)


@pytest.mark.parametrize(
    "text",
    [
        "blockdiag",
        "foo",
        "",
        "   ",
        "blockdiagonal:x",
        "blockdiagonal:0",
        "blockdiagonal:-3",
        "blockdiagonal:3,4",
        "hierarchical:3",
        "hierarchical:0,3",
        "hierarchical:3,",
        "hierarchical0_15",
        "dense:3",
        "diagonal:1",
        "triltoeplitz:2",
        "block0diagonal",
        "triltopleftdiag:0",
        "triltopleftdiag:1,2",
        "blockdiagonal 32",
    ],
    ids=repr,
)
def test_get_structure_rejects(text):
    with pytest.raises(ValueError) as info:
        get_structure(text)
    message = str(info.value)
    assert "blockdiagonal" in message
    assert "hierarchical15_15" in message


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(text, id=repr(text))
        for text in (
            "blockdiagonal:",
            "dense:",
            "blockdiagonal:3_0",
            "block030diagonal",
            "blockdiagonal:+3",
            "blockdiagonal: 3",
        )
    ],
)
def test_get_structure_rejects_undocumented_forms(text):
    """Not of the documented forms ``FAMILY``, ``FAMILY:N[,M]``, ``blockBdiagonal``..."""
    with pytest.raises(ValueError):
        get_structure(text)


@pytest.mark.parametrize("value", [None, 3, ("dense",)], ids=repr)
def test_get_structure_rejects_non_strings(value):
    with pytest.raises(ValueError, match="hierarchical15_15"):
        get_structure(value)


# ---------------------------------------------------------- zero-column inputs
@pytest.mark.parametrize(
    "name, op",
    [
        pytest.param(name, op, id=f"{name}-{op}")
        for name in SPEC_NAMES
        for op in ("mm", "tmm", "inner_of")
    ],
)
def test_zero_columns(name, op):
    """A ``[d, 0]`` input (an empty batch) gives an empty product / the zero matrix."""
    d = 7
    spec = get_structure(name)
    X = random_member(spec, d, "zero_cols")
    Z = torch.zeros(d, 0, dtype=F64)
    out = getattr(X, op)(Z)
    if op == "inner_of":
        assert torch.equal(out.to_dense(), torch.zeros(d, d, dtype=F64))
    else:
        assert out.shape == (d, 0)


@pytest.mark.parametrize("name, d", CASES)
def test_stacked_factor_operations(name, d):
    """Members that stack (hierarchical, block-diagonal, the sparse triangular families;
    Toeplitz below ``FFT_MIN_DIM``):
    ``stacked_inner``, ``stacked_matmul``, ``stacked_trace``, ``stacked_average_trace``,
    ``stacked_frobenius_sq`` and ``stacked_add_identity_`` on three members' storages
    stacked along a new first dimension equal each member's own ``inner``, ``matmul``,
    ``trace``, ``average_trace``, ``frobenius_sq`` and ``add_identity_`` (float64; the
    batched products may round differently)."""
    spec = get_structure(name)
    members = [random_member(spec, d, "stack", i) for i in range(3)]
    others = [random_member(spec, d, "stack-other", i) for i in range(3)]
    family = name.partition(":")[0]
    forms = ("hierarchical", "blockdiagonal", *TRIANGULAR)  # (their operators too)
    expected = family in forms or (family.endswith("toeplitz") and d < 256)
    assert members[0].stacks == expected
    if not expected:
        return
    X0 = members[0]
    # update_factors_together decides by the default quick bound, then asks the
    # member's own bounded_step (which must leave alone what the quick bound passes)
    for method in ("bound_inputs", "_quick_inputs", "quick_norm_bound"):
        assert getattr(type(X0), method) is getattr(StructuredMatrix, method)
    beta = 0.5 / X0.quick_norm_bound()
    assert X0.bounded_step(beta, 0.5 + 1e-9) is None
    assert X0.bounded_step(4 * beta, 0.5) is not None or not X0.dim

    def stack(ms):
        return tuple(torch.stack(ts) for ts in zip(*(m._storage() for m in ms), strict=True))

    def unstacked(storage, i):
        return X0._from_storage(tuple(t[i] for t in storage)).to_dense()

    S, S_other = stack(members), stack(others)
    inner, product = X0.stacked_inner(S), X0.stacked_matmul(S, S_other)
    traces = X0.stacked_trace(S)
    averages, squares = X0.stacked_average_trace(S), X0.stacked_frobenius_sq(S)
    assert traces.shape == averages.shape == squares.shape == (3,)
    shifted = tuple(t.clone() for t in S)
    X0.stacked_add_identity_(shifted, -0.7)
    for i, (X, Y) in enumerate(zip(members, others, strict=True)):
        torch.testing.assert_close(
            unstacked(inner, i), X.inner().to_dense(), rtol=1e-13, atol=1e-13
        )
        torch.testing.assert_close(
            unstacked(product, i), X.matmul(Y).to_dense(), rtol=1e-13, atol=1e-13
        )
        torch.testing.assert_close(traces[i], X.trace(), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(averages[i], X.average_trace(), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(squares[i], X.frobenius_sq(), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(
            unstacked(shifted, i), X.clone().add_identity_(-0.7).to_dense(), rtol=0, atol=0
        )
    assert all(torch.equal(a, b) for a, b in zip(S, stack(members), strict=True))  # unchanged

    # what the optimizer forms of a group's new factors: finite sums, K K^T operators
    sums = X0.stacked_finite_sum(S)
    assert sums.shape == (3,) and sums.dtype == F64
    formed = X0.stacked_outer_operators(S)
    assert (formed is not None) == (family in forms)
    probe = randn(d, 5, g=gen(name, d, "stack probe"))
    for i, X in enumerate(members):
        torch.testing.assert_close(sums[i], X.finite_sum(), rtol=1e-13, atol=1e-13)
        if formed is None:
            continue
        own, dense = X.outer_operator(), X.to_dense()
        assert type(formed[i]) is type(own) and formed[i].batch_key() == own.batch_key()
        assert formed[i].nbytes() == own.nbytes()
        for Y in (probe, probe.T.contiguous().T):  # row-major and transposed operands
            torch.testing.assert_close(formed[i].mm(Y), own.mm(Y), rtol=1e-13, atol=1e-13)
            torch.testing.assert_close(formed[i].mm(Y), dense @ dense.T @ Y, rtol=1e-12, atol=1e-12)
    broken = tuple(t.clone() for t in S)
    next(t for t in broken if t[1].numel())[1].view(-1)[-1] = float("nan")  # member 1 only
    totals = X0.stacked_finite_sum(broken).tolist()
    finite = [
        X0._from_storage(tuple(t[i] for t in broken)).finite_given(v) for i, v in enumerate(totals)
    ]
    assert finite == [True, False, True]


@pytest.mark.parametrize("name, d", CASES)
def test_stacked_outer_operators(name, d):
    """Operators ``K K^T`` with one ``batch_key`` applied together (``stacked_mm``,
    the batched natural gradient's product) equal each one's ``mm``, for row-major and
    transposed ``X`` and in float32; a member of another size or dtype has another
    key. (Toeplitz operators of FFT size have none: applied one at a time.)"""
    spec = get_structure(name)
    ops = [random_member(spec, d, "stacked", i).outer_operator() for i in range(3)]
    key = ops[0].batch_key()
    assert key is not None and all(op.batch_key() == key for op in ops)
    other = random_member(spec, d + 1, "stacked", 9).outer_operator()
    assert other.batch_key() != key
    member32 = random_member(spec, d, "stacked", 9).to(torch.float32)
    assert member32.outer_operator().batch_key() != key
    g = gen(name, d, "stacked X")
    for X in (randn(3, d, 5, g=g), randn(3, 5, d, g=g).mT):
        expected = torch.stack([op.mm(x) for op, x in zip(ops, X, strict=True)])
        got = type(ops[0]).stacked_mm(ops, X)
        assert got.shape == (3, d, 5)
        assert_close(got, expected)
    ops32 = [
        op32.to(torch.float32).outer_operator()
        for op32 in (random_member(spec, d, "stacked", i) for i in range(3))
    ]
    X = randn(3, d, 5, g=g).float()
    expected = torch.stack([op.mm(x) for op, x in zip(ops32, X, strict=True)])
    assert_close(type(ops32[0]).stacked_mm(ops32, X), expected, tol=1e-5)
    if name.endswith("toeplitz"):
        from torchsingd.structures.toeplitz import FFT_MIN_DIM

        assert spec.eye(FFT_MIN_DIM).outer_operator().batch_key() is None


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_the_empty_member(name):
    """``d = 0`` (only built by hand: the optimizer leaves a layer without inputs out):
    the identity, products, statistics, projections and the factor-step bound give the
    empty matrix, a zero trace and norm bound. The Toeplitz families failed in
    ``add_identity_`` (so ``eye(0)``), ``inner``, ``inner_of`` and ``from_dense``,
    and every family but the diagonal and block-diagonal ones in the norm bound."""
    spec = get_structure(name)
    X = spec.eye(0, dtype=F64)
    Z = torch.zeros(0, 4, dtype=F64)
    assert X.dim == 0 and X.to_dense().shape == (0, 0)
    assert X.mm(Z).shape == X.tmm(Z).shape == (0, 4)
    for Y in (X.matmul(X), X.inner(), X.inner_of(Z), X.add(X, alpha=2.0), X.mul(2.0)):
        assert Y.dim == 0 and Y.to_dense().shape == (0, 0)
    assert spec.from_dense(torch.zeros(0, 0, dtype=F64)).dim == 0
    assert X.outer_operator().mm(Z).shape == (0, 4)
    assert float(X.trace()) == float(X.max_abs()) == float(X.frobenius_sq()) == 0.0
    assert float(X.spectral_norm_bound()) == 0.0
    assert X.bounded_step(0.1, 0.5) is None


# ------------------------------------------------- the reference package as oracle
def _reference_classes() -> dict[str, type]:
    pytest.importorskip("singd")
    from singd.structures.blockdiagonal import Block3DiagonalMatrix, Block30DiagonalMatrix
    from singd.structures.dense import DenseMatrix as RefDense
    from singd.structures.diagonal import DiagonalMatrix as RefDiagonal
    from singd.structures.hierarchical import Hierarchical3_2Matrix, Hierarchical15_15Matrix
    from singd.structures.trilbottomrightdiag import TrilBottomRightDiagonalMatrix as RefTrilBR
    from singd.structures.triltoeplitz import TrilToeplitzMatrix as RefTrilToeplitz
    from singd.structures.triltopleftdiag import TrilTopLeftDiagonalMatrix as RefTrilTL
    from singd.structures.triubottomrightdiag import TriuBottomRightDiagonalMatrix as RefTriuBR
    from singd.structures.triutoeplitz import TriuToeplitzMatrix as RefTriuToeplitz
    from singd.structures.triutopleftdiag import TriuTopLeftDiagonalMatrix as RefTriuTL

    return {
        "dense": RefDense,
        "diagonal": RefDiagonal,
        "blockdiagonal:30": Block30DiagonalMatrix,
        "blockdiagonal:3": Block3DiagonalMatrix,
        "hierarchical:15,15": Hierarchical15_15Matrix,
        "hierarchical:3,2": Hierarchical3_2Matrix,
        "triltoeplitz": RefTrilToeplitz,
        "triutoeplitz": RefTriuToeplitz,
        "triltopleftdiag:1": RefTrilTL,
        "trilbottomrightdiag:1": RefTrilBR,
        "triutopleftdiag:1": RefTriuTL,
        "triubottomrightdiag:1": RefTriuBR,
    }


REFERENCE_CASES = [
    pytest.param(name, d, id=f"{name}-d{d}")
    for name, dims in {
        "dense": DIMS,
        "diagonal": DIMS,
        "blockdiagonal:30": (1, 13, 30, 31, 61),
        "blockdiagonal:3": DIMS,
        "hierarchical:15,15": (1, 15, 16, 30, 31, 40),
        "hierarchical:3,2": DIMS,
        "triltoeplitz": DIMS,
        "triutoeplitz": DIMS,
        "triltopleftdiag:1": DIMS,
        "trilbottomrightdiag:1": DIMS,
        "triutopleftdiag:1": DIMS,
        "triubottomrightdiag:1": DIMS,
    }.items()
    for d in dims
]


@pytest.mark.reference
@pytest.mark.filterwarnings("ignore:Calling naive implementation:UserWarning")
@pytest.mark.parametrize("name, d", REFERENCE_CASES)
def test_reference_from_dense_eye_and_products(name, d):
    ref_cls = _reference_classes()[name]
    spec = get_structure(name)
    M = random_symmetric(d, "reference", dtype=torch.float32)
    ours, theirs = spec.from_dense(M), ref_cls.from_dense(M)
    torch.testing.assert_close(ours.to_dense(), theirs.to_dense(), rtol=1e-6, atol=1e-6)
    assert torch.equal(
        spec.eye(d, dtype=torch.float32).to_dense(),
        ref_cls.eye(d, dtype=torch.float32).to_dense(),
    )
    # Products with dense matrices and between members (members from P(M), P(M')).
    Z = randn(d, 3, g=gen(name, d, "refZ"), dtype=torch.float32)
    torch.testing.assert_close(ours.mm(Z), theirs @ Z, rtol=1e-5, atol=1e-5)
    M2 = random_symmetric(d, "reference2", dtype=torch.float32)
    torch.testing.assert_close(
        (ours @ spec.from_dense(M2)).to_dense(),
        (theirs @ ref_cls.from_dense(M2)).to_dense(),
        rtol=1e-5,
        atol=1e-5,
    )
    if spec.cls.family != "blockdiagonal":  # see test_reference_blockdiagonal_transpose_bug
        # Sums of float32 products in another order: entries that nearly cancel differ
        # by float32 rounding of the largest entry (~1e3 here), hence atol ~ scale.
        for got, want in (
            (ours.inner().to_dense(), theirs.from_inner().to_dense()),
            (ours.inner_of(Z).to_dense(), theirs.from_inner(X=Z).to_dense()),
        ):
            atol = 1e-6 * max(1.0, want.abs().max().item())
            torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)


@pytest.mark.reference
def test_reference_blockdiagonal_transpose_bug():
    """singd 0.0.5's ``rmatmat`` (hence ``from_inner``) multiplies by ``K``, not ``K^T``.

    For a non-symmetric block-diagonal ``K`` (SINGD's factors are not symmetric), the
    reference's ``K.rmatmat(X)`` differs from ``K^T X``; ours (``tmm``) does not.
    """
    pytest.importorskip("singd")
    from singd.structures.blockdiagonal import Block30DiagonalMatrix

    g = gen("transpose_bug")
    blocks = torch.randn(2, 30, 30, generator=g)
    last = torch.randn(5, 5, generator=g)
    X = torch.randn(65, 4, generator=g)
    theirs = Block30DiagonalMatrix(blocks, last)
    ours = BlockDiagonalMatrix(blocks.clone(), last.clone(), 30)
    K = ours.to_dense()
    assert torch.equal(theirs.to_dense(), K)
    assert not torch.allclose(K, K.T)

    torch.testing.assert_close(ours.tmm(X), K.T @ X)
    assert not torch.allclose(theirs.rmatmat(X), K.T @ X, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(theirs.rmatmat(X), K @ X)  # the reference's actual result


# --------------------------------------------- Toeplitz: the FFT path (d >= FFT_MIN_DIM)
@pytest.mark.parametrize("d", [47, 127, 128, 129, 157, 255, 256, 257, 300, 513, 785])
@pytest.mark.parametrize("name", ["triltoeplitz", "triutoeplitz"])
def test_toeplitz_fft_path(name, d):
    """Products through FFTs (lengths from ``conv_size``, from ``FFT_MIN_DIM`` on;
    circular ones that wrap onto 1 output for ``d = 257, 513`` and 33 for ``d = 785``)
    and through the small dense matrix (below) equal the dense float64 ones, for both
    layouts of ``Z``, including the cached ``outer_operator``."""
    from torchsingd.structures.toeplitz import FFT_MIN_DIM

    assert FFT_MIN_DIM == 256  # the cases above cover both sides of it
    spec = get_structure(name)
    X, Y = random_member(spec, d, "fft"), random_member(spec, d, "fftY")
    Xd = X.to_dense()
    Z = randn(d, 5, g=gen(name, d, "fftZ"))
    for layout in (Z, Z.T.contiguous().T):
        assert_close(X.mm(layout), Xd @ layout, 1e-10)
        assert_close(X.tmm(layout), Xd.T @ layout, 1e-10)
        assert_close(X.outer_operator().mm(layout), Xd @ Xd.T @ layout, 1e-10)
    assert_close((X @ Y).to_dense(), Xd @ Y.to_dense(), 1e-10)
    assert_close(X.inner().to_dense(), project(spec, Xd.T @ Xd), 1e-10)
    assert_close(X.inner_of(Z).to_dense(), project(spec, Xd.T @ Z @ Z.T @ Xd), 1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [256, 512])
def test_toeplitz_outer_operator_pads_once(d, dtype):
    """``L L^T X`` and ``L^T L X`` through buffers padded once and truncated in place
    are, bit for bit, two plain round trips ``irfft(rfft(x, n) * s, n)[:d]`` along
    the rows of ``X^T`` (in float32 for bfloat16), for both layouts of ``X`` (lengths
    that need no wrap-around correction)."""
    from torchsingd.structures.toeplitz import ToeplitzOuterOperator, conv_size, fft_size

    g = gen("pads-once", d, str(dtype))
    col = (torch.randn(d, generator=g) * 0.1).to(dtype)
    col[0] += 1
    X = torch.randn(d, 37, generator=g).to(dtype)
    size = fft_size(d)
    assert conv_size(d) == size
    s = torch.fft.rfft(col.float(), n=size)

    def trip(rows, spectrum):
        return torch.fft.irfft(torch.fft.rfft(rows, n=size, dim=1) * spectrum, n=size, dim=1)[:, :d]

    for lower in (True, False):
        first, second = (s.conj(), s) if lower else (s, s.conj())
        expected = trip(trip(X.T.float().contiguous(), first), second).T.to(dtype)
        for layout in (X, X.T.contiguous().T):
            got = ToeplitzOuterOperator(col, lower).mm(layout)
            assert got.dtype == dtype and torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [513, 785])
def test_toeplitz_wrapped_convolutions_in_low_precision(d, dtype):
    """The wrap-around correction in float32 and bfloat16 (FFTs in float32): as close
    to the float64 product as the unwrapped length ``fft_size(d)`` gets."""
    from torchsingd.structures import toeplitz

    g = gen("wrapped", d, str(dtype))
    col = torch.randn(d, generator=g, dtype=torch.float64) * 0.1
    col[0] += 1
    X = torch.randn(d, 23, generator=g, dtype=torch.float64)
    L = toeplitz.dense_lower_toeplitz(col)
    c, x = col.to(dtype), X.to(dtype)
    exact = {
        "conv": L @ X,
        "corr": L.T @ X,
        "outer": L @ (L.T @ X),
    }

    def products():
        return {
            "conv": toeplitz.causal_conv(c, x),
            "corr": toeplitz.anticausal_conv(c, x),
            "outer": toeplitz.ToeplitzOuterOperator(c, lower=True).mm(x),
        }

    got = products()
    assert toeplitz.conv_size(d) < toeplitz.fft_size(d)
    with pytest.MonkeyPatch.context() as mp:  # the same products without wrapping
        mp.setattr(toeplitz, "conv_size", toeplitz.fft_size)
        unwrapped = products()
    for key, want in exact.items():
        assert got[key].dtype == dtype
        err = (got[key].double() - want).abs().max()
        err_unwrapped = (unwrapped[key].double() - want).abs().max()
        assert err <= 1.5 * err_unwrapped + 1e-6 * want.abs().max(), (key, err, err_unwrapped)


@pytest.mark.parametrize("d, n", [(300, 7), (513, 2100), (785, 40)])
def test_column_autocorrelation(d, n):
    """``half[j] = sum of the j-th sub-diagonal of S S^T`` (dense float64), through
    FFTs of unwrapped (300), wrapped-by-1 (513, with more rows than one chunk of the
    power spectrum's sum) and wrapped-by-33 (785) lengths."""
    from torchsingd.structures.toeplitz import column_autocorrelation

    S = torch.randn(d, n, generator=gen("autocorrelation", d), dtype=torch.float64)
    gram = S @ S.T
    want = torch.stack([gram.diagonal(-j).sum() for j in range(d)])
    assert_close(column_autocorrelation(S), want, 1e-10)


@pytest.mark.parametrize(
    "d, size",
    [
        (128, 256),
        (129, 256),
        (157, 320),
        (300, 600),
        (513, 1024),
        (785, 1536),
        (2100, 4320),  # 4096 would wrap 103 outputs: more than MAX_WRAP
        (16385, 32768),
    ],
)
def test_conv_size_wraps_little(d, size):
    """A power of two (or three times one) a little below ``2 d - 1`` where one exists,
    else ``fft_size``; at most ``min(d // 16, 64)`` outputs wrap (the correction's
    ``[w, w]`` matrix stays small)."""
    from torchsingd.structures.toeplitz import conv_size, fft_size

    assert conv_size(d) == size
    assert d <= size <= fft_size(d) and 2 * d - 1 - size <= min(d // 16, 64)


@pytest.mark.parametrize("d", [1, 2, 24, 48, 100, 512, 785, 1000])
def test_fft_size_is_smooth_and_long_enough(d):
    from torchsingd.structures.toeplitz import fft_size

    size = fft_size(d)
    assert size >= 2 * d - 1
    rest = size
    for p in (2, 3, 5):
        while rest % p == 0:
            rest //= p
    assert rest == 1, size
    # the smallest such length: no 5-smooth number in [2d - 1, size)
    for smaller in range(max(2 * d - 1, 1), size):
        r = smaller
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        assert r != 1, (d, smaller)


@pytest.mark.parametrize("d", [0, 1, 2, 5, 65, 127])
@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])
def test_dense_lower_toeplitz(d, dtype):
    """``L[i, j] = col[i - j]`` for ``i >= j``, else 0, entry by entry."""
    from torchsingd.structures.toeplitz import dense_lower_toeplitz

    col = randn(d, g=gen("dense_lower_toeplitz", d), dtype=dtype)
    L = dense_lower_toeplitz(col)
    expected = torch.zeros(d, d, dtype=dtype)
    for i in range(d):
        for j in range(i + 1):
            expected[i, j] = col[i - j]
    assert L.dtype == dtype and L.is_contiguous() and torch.equal(L, expected)


@pytest.mark.parametrize("name, d", CASES)
def test_border_rows_and_the_operator_built_from_them(name, d, monkeypatch):
    """``border_rows`` (where a family provides it) is ``K[B, :]`` of the dense matrix,
    and the sparse ``K K^T`` operator built from it equals, bit for bit, the one built
    from products of ``K^T`` with unit vectors."""
    from torchsingd.structures.base import SparseOuterOperator

    spec = get_structure(name)
    X = random_member(spec, d, "border_rows")
    pattern = X.sparse_pattern()
    R = X.border_rows()
    if R is None:
        return
    assert pattern is not None and pattern.kind == "rows"
    rows = [*range(pattern.head), *range(d - pattern.tail, d)]
    assert torch.equal(R, X.to_dense()[rows])
    W = SparseOuterOperator(X, pattern).W
    monkeypatch.setattr(type(X), "border_rows", lambda self: None)
    assert torch.equal(W, SparseOuterOperator(X, pattern).W)


@pytest.mark.parametrize("name, d", CASES)
def test_sparse_border_matches_the_pattern(name, d):
    """``sparse_border`` (what ``outer_operator_pays`` reads, without building
    ``delta``) is the pattern's ``(head, tail)``, or ``None`` without a pattern; and
    the pattern's ``delta`` is the dense diagonal outside the border, zero on it."""
    X = random_member(get_structure(name), d, "sparse_border")
    pattern = X.sparse_pattern()
    border = X.sparse_border()
    if pattern is None:
        assert border is None
        return
    assert border == (pattern.head, pattern.tail)
    head, tail = border
    inside = torch.zeros(d, dtype=torch.bool)
    inside[head : d - tail] = True
    assert torch.equal(pattern.delta[inside], torch.diagonal(X.to_dense())[inside])
    assert not pattern.delta[~inside].any()


@pytest.mark.parametrize("K1, K2, d", [(3, 2, 13), (3, 2, 4), (15, 15, 40), (2, 4, 6)])
def test_hierarchical_zero_block_stays_zero_and_blocks_are_views(K1, K2, d):
    """The hierarchical family holds its border rows in one tensor ``R = [A B; 0 D E]``
    whose ``k2 x k1`` block is fixed at zero: every operation on finite values keeps it
    exactly zero, and ``A, B, D, E`` (what ``tensors()`` and checkpoints hold) are views
    of ``R``."""
    spec = get_structure(f"hierarchical:{K1},{K2}")
    k1, m, k2 = hierarchical_sizes(d, K1, K2)
    X, Y = random_member(spec, d, "zb", "X"), random_member(spec, d, "zb", "Y")
    Z = randn(d, 7, g=gen("zb", d))
    made = [
        X.matmul(Y),
        X.inner(),
        X.inner_of(Z),
        X.gram_of(Z),
        X.inner_of_gram(X.gram_of(Z)),
        spec.from_dense(random_symmetric(d, "zb")),
        X.add(Y, alpha=-0.5).mul(3.0),
        X.clone().add_identity_(2.0),
        X.to(torch.float32),
        spec.eye(d, dtype=F64),
    ]
    for M in made:
        assert M.R.shape == (k1 + k2, d)
        assert torch.equal(M.R[k1:, :k1], torch.zeros(k2, k1, dtype=M.dtype))
        assert torch.equal(M.to_dense()[k1 + m :, :k1], torch.zeros(k2, k1, dtype=M.dtype))
        for t in M.tensors()[:2] + M.tensors()[3:]:  # A, B, D, E
            assert t.untyped_storage().data_ptr() == M.R.untyped_storage().data_ptr()
    shapes = [tuple(t.shape) for t in X.tensors()]
    assert shapes == [(k1, k1), (k1, m + k2), (m,), (k2, m), (k2, k2)]  # the saved layout
    # a member rebuilt from its blocks (a checkpoint) is the same matrix
    assert torch.equal(X._with_tensors(tuple(t.clone() for t in X.tensors())).R, X.R)


def _strided_copy(R: Tensor, layout: str) -> Tensor:
    """``R``'s values in another memory layout: transposed, or a view at an offset."""
    if layout == "transposed":
        return R.T.contiguous().T
    if layout == "offset":
        big = torch.zeros(R.shape[0] + 2, R.shape[1] + 3, dtype=R.dtype)
        big[1:-1, 2:-1] = R
        return big[1:-1, 2:-1]
    return R.clone()


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "offset"])
@pytest.mark.parametrize("K1, K2, d", [(3, 2, 13), (3, 2, 4), (3, 2, 2), (2, 4, 9)])
def test_hierarchical_diagonal_views_and_projection_follow_strides(layout, K1, K2, d):
    """``trace``, ``add_identity_`` and ``_projected_`` address ``diag(A)``, ``diag(E)``
    and the zero block through views of ``R`` (its diagonals, slices), so they equal
    the dense computation for border rows held in any layout."""
    spec = get_structure(f"hierarchical:{K1},{K2}")
    k1, m, k2 = hierarchical_sizes(d, K1, K2)
    X = random_member(spec, d, "strides")
    R = _strided_copy(X.R, layout)
    assert R.is_contiguous() == (layout == "contiguous")
    Y = HierarchicalMatrix._packed(R, X.c.clone(), K1, K2)
    dense = X.to_dense()
    assert torch.equal(Y.to_dense(), dense)
    scale = dense.diagonal().abs().sum()
    assert torch.allclose(Y.trace(), dense.trace(), rtol=0, atol=1e-14 * float(scale))
    Y.add_identity_(-0.75)
    assert torch.equal(Y.to_dense(), dense - 0.75 * torch.eye(d, dtype=F64))
    assert Y.R.data_ptr() == R.data_ptr()  # in place, in the same storage
    # P's border rows of a symmetric S: B and D doubled, the k2 x k1 block zeroed
    S = random_symmetric(d, "strides")
    rows = torch.cat([S[:k1], S[k1 + m :]])
    M = _strided_copy(rows, layout)
    expected = rows.clone()
    expected[:k1, k1:] *= 2
    expected[k1:, k1 : k1 + m] *= 2
    expected[k1:, :k1] = 0
    assert torch.equal(Y._projected_(M), expected)
    assert torch.equal(spec.from_dense(S).R, expected)


def test_constants_are_kept_built_outside_inference_mode_and_not_under_a_mode():
    """:func:`constant` builds a tensor once per key and then returns the same one; one
    first built inside ``torch.inference_mode`` is a normal tensor (a backward pass may
    save it later); under a dispatch mode (fake tensors while ``torch.compile`` traces)
    it is built afresh and not kept."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from torchsingd.structures.base import border_index, constant

    built = []

    def make() -> Tensor:
        built.append(1)
        return torch.arange(3)

    key = ("test constant", 3)
    with torch.inference_mode():
        first = constant(key, make)
    assert not first.is_inference()
    assert constant(key, make) is first and len(built) == 1

    class Passing(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passing():
        again = constant(key, make)
    assert again is not first and len(built) == 2
    assert torch.equal(border_index(9, 2, 3, torch.device("cpu")), torch.tensor([0, 1, 6, 7, 8]))
    assert border_index(9, 2, 3, "cpu") is border_index(9, 2, 3, torch.device("cpu"))
    # a kept index saved by a backward pass that runs outside inference mode
    with torch.inference_mode():
        index = border_index(11, 1, 1, "cpu")
    x = torch.randn(11, requires_grad=True)
    x.index_select(0, index).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0] + [0.0] * 9 + [1.0]))


def test_hierarchical_methods_compile_without_graph_breaks():
    """The hierarchical family's factor-update methods trace as one graph under
    ``torch.compile(fullgraph=True)`` (no Python-level stride arithmetic on
    intermediates, no dispatch-mode lookup while compiling) and give the eager
    numbers."""
    spec = get_structure("hierarchical:3,2")
    X = random_member(spec, 13, "compile").to(torch.float32)
    Z = randn(13, 40, g=gen("compile", 13), dtype=torch.float32)

    def update(R: Tensor, c: Tensor, Z: Tensor):
        Y = HierarchicalMatrix._packed(R, c, 3, 2).clone().add_identity_(0.5)
        H = Y.inner_of_gram(Y.gram_of(Z))
        return Y.trace(), Y.inner().R, H.R, H.c

    eager = update(X.R.clone(), X.c.clone(), Z)
    torch._dynamo.reset()
    compiled = torch.compile(update, backend="eager", fullgraph=True)
    for got, want in zip(compiled(X.R.clone(), X.c.clone(), Z), eager, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["triltoeplitz", "triutoeplitz"])
def test_toeplitz_gram_route_bounds(name, monkeypatch):
    """The Toeplitz Gram route (a dense ``d x d`` Gram) is taken only up to
    ``GRAM_MAX_DIM`` and from more than ``3 d`` columns, and it equals ``inner_of`` at
    the FFT sizes (``d >= FFT_MIN_DIM``, a length with a wrap-around correction)."""
    import torchsingd.structures.base as structures_base
    from torchsingd.structures.toeplitz import FFT_MIN_DIM, GRAM_MAX_DIM

    spec = get_structure(name)
    wide_member = spec.eye(GRAM_MAX_DIM + 1, dtype=torch.float32)
    assert not wide_member.gram_pays(10**7)
    assert spec.eye(GRAM_MAX_DIM, dtype=torch.float32).gram_pays(10**7)
    d = FFT_MIN_DIM + 1  # 2d - 1 = 513: a circular length of 512, one output corrected
    monkeypatch.setattr(structures_base, "GRAM_MIN_NUMEL", 0)  # (the size rule alone)
    X = random_member(spec, d, "toeplitz gram")
    assert not X.gram_pays(3 * d) and X.gram_pays(3 * d + 1)
    Z = randn(d, 3 * d + 1, g=gen(name, d, "toeplitz gram Z"))
    got = X.inner_of_gram(X.gram_of(Z)).to_dense()
    assert_close(got, X.inner_of(Z).to_dense())
    with pytest.raises(ValueError, match="dense Gram"):
        X.inner_of_gram(X)


@pytest.mark.parametrize("name", ["triltoeplitz", "triutoeplitz"])
def test_toeplitz_gram_route_of_an_empty_factor(name):
    """``d = 0``: the Gram route gives the empty member (``_diagonal_sums`` indexed
    an empty vector)."""
    X = get_structure(name).eye(0)
    assert X.inner_of_gram(X.gram_of(torch.zeros(0, 5))).dim == 0
