"""The KFAC baseline: ALGORITHM.md section 5 against dense float64 formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from torchsingd import KFAC, SINGD
from torchsingd.structures import DiagonalMatrix

F64 = torch.float64


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)


def data(seed: int = 1, n: int = 16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, dtype=F64, generator=gen), torch.randn(n, 3, dtype=F64, generator=gen)


def test_one_step_equals_dense_formula():
    """S <- (1-b) S + b U, G_nat = (S_C + l I)^-1 grad (S_K + l I)^-1, then SGD-momentum step."""
    model, (X, y) = mlp(), data()
    lr, beta, lam, wd = 0.1, 0.3, 0.05, 0.01
    opt = KFAC(model, lr=lr, lr_cov=beta, damping=lam, T=1, momentum=0.9, weight_decay=wd)
    lin = model[2]
    W0 = torch.cat([lin.weight, lin.bias.unsqueeze(1)], 1).detach().clone()
    # independent rows for the last layer: its input h and output gradient
    h = model[1](model[0](X)).detach()
    out = lin(h.requires_grad_(False))
    out.retain_grad()
    loss = ((out - y) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    N = X.shape[0]
    a = torch.cat([h, torch.ones(N, 1, dtype=F64)], 1) / math.sqrt(N)
    g = out.grad * math.sqrt(N)  # loss_average="batch": sqrt(B)
    S_K = (1 - beta) * (1 - lam) * torch.eye(7, dtype=F64) + beta * a.T @ a
    S_C = (1 - beta) * (1 - lam) * torch.eye(3, dtype=F64) + beta * g.T @ g
    grad = torch.cat([lin.weight.grad, lin.bias.grad.unsqueeze(1)], 1)
    nat = torch.linalg.inv(S_C + lam * torch.eye(3, dtype=F64)) @ grad
    nat = nat @ torch.linalg.inv(S_K + lam * torch.eye(7, dtype=F64))
    expected = W0 - lr * (nat + wd * W0)  # first momentum buffer = the direction
    opt.step()
    state = opt.layers["2"]
    torch.testing.assert_close(state.S_K.to_dense(), S_K, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state.S_C.to_dense(), S_C, rtol=1e-10, atol=1e-12)
    W1 = torch.cat([lin.weight, lin.bias.unsqueeze(1)], 1).detach()
    torch.testing.assert_close(W1, expected, rtol=1e-10, atol=1e-12)


def test_factors_change_only_on_update_steps():
    model, (X, y) = mlp(), data()
    opt = KFAC(model, T=3, lr_cov=0.2)
    seen = []
    for _ in range(7):
        before = opt.layers["0"].S_K.to_dense().clone()
        opt.zero_grad()
        ((model(X) - y) ** 2).mean().backward()
        opt.step()
        seen.append(not torch.equal(before, opt.layers["0"].S_K.to_dense()))
    assert seen == [True, False, False, True, False, False, True]


def _trajectory(cls, beta: float, **kw) -> torch.Tensor:
    model, (X, y) = mlp(), data()
    opt = cls(model, lr=0.05, lr_cov=beta, damping=0.1, T=1, momentum=0.0, **kw)
    for _ in range(10):
        opt.zero_grad()
        ((model(X) - y) ** 2).mean().backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_ikfac_tracks_kfac_to_first_order():
    """IKFAC (kfac_like, dense, alpha1=0) and KFAC start from the same preconditioner;
    their trajectories differ by O(beta1^2): halving beta1 cuts the gap about 4x."""
    p0 = torch.cat([p.detach().flatten() for p in mlp().parameters()])
    gaps = []
    for beta in (0.02, 0.01):
        kfac = _trajectory(KFAC, beta)
        ikfac = _trajectory(SINGD, beta, kfac_like=True, alpha1=0.0, structures="dense")
        gaps.append(((kfac - ikfac).norm() / (kfac - p0).norm()).item())
    assert gaps[0] < 1e-2
    assert 3.0 < gaps[0] / gaps[1] < 5.0


def test_bfloat16_factors_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="half precision"):
        KFAC(mlp().to(torch.bfloat16))
    with pytest.raises(ValueError, match="half precision"):
        KFAC(mlp().float(), factor_dtype=torch.bfloat16)


def test_bfloat16_model_with_float32_factors_trains():
    model = mlp().to(torch.bfloat16)
    X, y = (t.to(torch.bfloat16) for t in data())
    opt = KFAC(model, factor_dtype=torch.float32, lr=0.05, lr_cov=0.1, damping=0.1, T=1)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = ((model(X) - y) ** 2).float().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert opt.layers["0"].S_K.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert losses[-1] < 0.7 * losses[0]


def test_embedding_vocabulary_factor_is_diagonal_counts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 4), nn.Linear(4, 2)).to(F64)
    opt = KFAC(model, lr_cov=1.0, damping=0.1, T=1)
    tokens = torch.tensor([[1, 2, 2], [3, 1, 1]])
    opt.zero_grad()
    model(tokens).sum().backward()
    opt.step()
    S_K = opt.layers["0"].S_K
    assert isinstance(S_K, DiagonalMatrix) and S_K.dim == 11
    counts = torch.bincount(tokens.flatten(), minlength=11).to(F64)
    torch.testing.assert_close(S_K.diag, counts / tokens.numel())


def test_invalid_vocab_structure_and_hyperparameters():
    with pytest.raises(ValueError, match="vocab_structure"):
        KFAC(mlp(), vocab_structure="blockdiagonal:3")
    with pytest.raises(ValueError, match="damping"):
        KFAC(mlp(), damping=-1.0)
    with pytest.raises(ValueError, match="lr_cov"):  # a running-average weight
        KFAC(mlp(), lr_cov=1.5)
    model = mlp()
    opt = KFAC(model, lr_cov=lambda t: 2.0)
    X, y = data()
    ((model(X) - y) ** 2).mean().backward()
    with pytest.raises(ValueError, match=r"lr_cov\(0\) returned 2.0"):
        opt.step()


def test_checkpoint_resume_is_bit_exact(tmp_path):
    X, y = data()

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            ((model(X) - y) ** 2).mean().backward()
            opt.step()

    model = mlp()
    opt = KFAC(model, T=3, lr_cov=lambda t: 0.1 / (1 + t))
    train(model, opt, 5)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    train(model, opt, 5)

    resumed = mlp(seed=7)
    opt2 = KFAC(resumed, T=3, lr_cov=lambda t: 0.1 / (1 + t))
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, 5)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    for name, state in opt.layers.items():
        for key, value in state.factors().items():
            assert torch.equal(value.to_dense(), opt2.layers[name].factors()[key].to_dense())


def test_dense_statistics_are_plain_grams(monkeypatch):
    """KFAC's dense statistics through the adapters' ``P(K^T a^T a K)`` with ``K = I``:
    ``a^T a`` of a convolution's unfolded input over batch chunks and ``g^T g`` of the
    output gradient, as plain dense members (one product each, no ``I^T a^T``)."""
    import torchsingd.layers.base as layers_base
    from torchsingd.layers import get_adapter
    from torchsingd.optim.kfac import identity_like
    from torchsingd.structures import DenseMatrix

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).to(F64)
    adapter = get_adapter(conv)
    x = torch.randn(5, 3, 9, 9, dtype=F64)
    a = adapter.input_rows(conv, x, "expand")
    per_sample = adapter.input_rows(conv, x[:1], "expand").numel()
    monkeypatch.setattr(layers_base, "STATISTIC_CHUNK_NUMEL", 2 * per_sample)  # 3 chunks
    identity = identity_like(DenseMatrix(torch.zeros(a.shape[1], a.shape[1], dtype=F64)))
    # no d x d identity is stored, and nothing may read one; products with it are
    # copies (for user adapters), which the built-in statistics never make
    assert identity.nbytes() == 0 and identity.dtype == F64 and identity.dim == a.shape[1]
    with pytest.raises(NotImplementedError, match="stores no entries"):
        identity.to_dense()
    ones = torch.ones(a.shape[1], 2, dtype=F64)
    assert torch.equal(identity.mm(ones), ones) and torch.equal(identity.tmm(ones), ones)

    def no_product(*args, **kwargs):
        raise AssertionError("the built-in statistic multiplied by the identity")

    monkeypatch.setattr(type(identity), "mm", no_product)
    monkeypatch.setattr(type(identity), "tmm", no_product)
    U = adapter.input_statistic(conv, x, identity, "expand")
    assert type(U) is DenseMatrix
    torch.testing.assert_close(U.to_dense(), a.T @ a, rtol=1e-12, atol=1e-12)
    g = torch.randn(40, 4, dtype=F64)
    V = layers_base.inner_of_rows(identity_like(DenseMatrix(torch.zeros(4, 4, dtype=F64))), g)
    assert type(V) is DenseMatrix
    torch.testing.assert_close(V.to_dense(), g.T @ g, rtol=1e-12, atol=1e-12)


def test_arguments_after_damping_are_keyword_only():
    """SINGD's sixth positional argument is alpha1; KFAC has none, so its later
    arguments are keyword only (a positional 0.5 became weight_decay)."""
    with pytest.raises(TypeError):
        KFAC(mlp(), None, 0.1, 0.9, 1e-3, 0.5)
    opt = KFAC(mlp(), None, 0.1, 0.9, 1e-3, weight_decay=0.5)
    assert opt.param_groups[0]["weight_decay"] == 0.5


def test_overflowing_statistic_is_repaired_not_stored():
    """An input whose square overflows float32 (``a^T a`` inf, every gradient finite):
    KFAC keeps the previous ``S_K`` and its inverse, counts and warns (it stored the inf,
    whose inverse had a zero row: that input's weights never moved again); with
    ``on_nonfinite="raise"`` the step raises and nothing is written."""
    from torchsingd.optim import NonFiniteError

    def overflowing(model):
        torch.manual_seed(0)
        x = torch.randn(8, 4)
        x[0, 0] = 1e20
        torch.tanh(model(x)).sum().backward()  # tanh saturates: finite gradients

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = KFAC(model, T=1, lr=0.1)
    before = opt.layers["0"].S_K.to_dense().clone()
    overflowing(model)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.warns(UserWarning, match="factor S_K of '0' was not finite"):
        opt.step()
    assert opt.safeguard_events["factor_repaired"] == 1 and opt.skipped_steps == 0
    assert torch.equal(opt.layers["0"].S_K.to_dense(), before)
    assert opt.layers["0"].S_C.is_finite() and opt.layers["0"].inv_K.is_finite()
    weight = model[0].weight.detach().clone()
    for _ in range(2):  # clean steps move every input's weights again
        opt.zero_grad()
        model(torch.randn(8, 4)).square().sum().backward()
        opt.step()
    assert (model[0].weight - weight)[:, 0].abs().max() > 0

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = KFAC(model, T=1, lr=0.1, on_nonfinite="raise")
    overflowing(model)
    start = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteError):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), start, strict=True))


def test_custom_input_statistic_applying_K_works_under_kfac():
    """A user adapter's input_statistic may apply K (K.mm, as under SINGD); KFAC's
    stand-in identity multiplies as I: the same statistic as the built-in route."""
    import torchsingd
    from torchsingd.layers import LinearAdapter
    from torchsingd.structures import DenseMatrix

    class Lin(nn.Linear):
        pass

    class StatAdapter(LinearAdapter):
        def input_statistic(self, module, x, K, kfac_approx, *, block=""):
            KtA = K.tmm(self.input_rows(module, x, kfac_approx).T)
            return DenseMatrix(KtA @ KtA.T)

    torchsingd.register_layer(Lin, StatAdapter())
    try:
        stats = []
        for cls in (nn.Linear, Lin):
            torch.manual_seed(0)
            model = nn.Sequential(cls(3, 2)).double()
            opt = KFAC(model, T=1)
            model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
            stats.append(opt.layers["0"].pending[0].to_dense())
        torch.testing.assert_close(stats[1], stats[0], rtol=1e-14, atol=1e-15)
    finally:
        torchsingd.unregister_layer(Lin)


@pytest.mark.parametrize("vocab_structure", ["dense", "diagonal"])
@pytest.mark.parametrize("damping", [1e-3, 0.3, 1.0])
def test_initial_inverse_is_the_identity_for_damping_up_to_one(vocab_structure, damping):
    """``(S + lambda I)^-1`` with ``S = (1 - lambda) I`` is ``I`` exactly (not computed:
    ``(1 - lambda) + lambda`` need not round to 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 2))
    opt = KFAC(model, damping=damping, vocab_structure=vocab_structure)
    for layer in opt.layers.values():
        assert torch.equal(layer.S_K.to_dense(), (1 - damping) * torch.eye(layer.S_K.dim))
        for inv in (layer.inv_K, layer.inv_C):
            assert torch.equal(inv.to_dense(), torch.eye(inv.dim))


@pytest.mark.parametrize("vocab_structure", ["dense", "diagonal"])
def test_a_damping_above_one_starts_the_factors_at_zero(vocab_structure):
    """``S = (1 - lambda) I`` is negative definite for ``lambda > 1``: once a schedule
    lowered the damping, ``S + lambda I`` was indefinite for dozens of updates and
    steps went uphill. Above 1 the factors start at 0, the inverse at ``I / lambda``
    (exactly, also for ``lambda = 2^25``, where a computed ``(1 - lambda) + lambda``
    rounded to 0: an all-inf inverse)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 2))
    for damping in (150.0, 2.0**25):
        opt = KFAC(model, damping=damping, vocab_structure=vocab_structure)
        for layer in opt.layers.values():
            for S, inv in ((layer.S_K, layer.inv_K), (layer.S_C, layer.inv_C)):
                assert torch.equal(S.to_dense(), torch.zeros(S.dim, S.dim))
                assert torch.equal(inv.to_dense(), torch.eye(inv.dim) / damping)


def test_a_damping_schedule_from_above_one_keeps_the_preconditioner_positive_definite():
    """K-FAC's usual start (lambda = 150, lowered 0.7x per step to 1e-2, lr_cov 0.05):
    every ``S + lambda I`` stays positive definite and every step goes downhill
    (``<step, grad> < 0``); with the old start ``S = (1 - 150) I`` the eigenvalues of
    ``S_C + lambda I`` sat near -80 and steps 51-88 included uphill ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(64, 6, dtype=torch.float64), torch.randint(0, 3, (64,))
    opt = KFAC(model, lr=0.05, lr_cov=0.05, damping=150.0, T=1, momentum=0.0)
    for step in range(90):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        moved = sum(
            (p.detach() - b).mul(g).sum()
            for p, b, g in zip(model.parameters(), before, grads, strict=True)
        )
        assert moved < 0, step
        damping = opt.param_groups[0]["damping"]
        for layer in opt.layers.values():
            for S in (layer.S_K, layer.S_C):
                assert torch.linalg.eigvalsh(S.to_dense()).min() + damping > 0, step
        opt.param_groups[0]["damping"] = max(1e-2, 0.7 * damping)
