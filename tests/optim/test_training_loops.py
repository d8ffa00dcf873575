"""SINGD inside realistic training loops: unused and reused layers, tied and frozen
parameters, activation checkpointing, evaluation passes, closures, clipping,
non-finite steps, fallback rules, ``torch.compile``, user-registered layers and a
full ``nn.TransformerEncoder``.

Every expected number is computed independently here: dense float64 formulas of
ALGORITHM.md, a second run without the feature under test, or ``torch.optim`` as
the oracle of the fallback rules.
"""

from __future__ import annotations

import math
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import torchsingd
from torchsingd import SINGD, LayerAdapter
from torchsingd.layers import get_adapter
from torchsingd.layers.base import _ADAPTERS
from torchsingd.optim.singd import NonFiniteError

DTYPE = torch.float64


# ------------------------------------------------------------------ helpers
def make_mlp(seed: int = 0, widths=(6, 8, 3), dtype=DTYPE) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        if i:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers).to(dtype)


def batch(step: int, shape=(16, 6), d_out: int = 3, dtype=DTYPE):
    """The data of one step: depends only on ``step`` (no global RNG)."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(shape[0], d_out, generator=gen, dtype=torch.float64).to(dtype)
    return x, y


def learnable(shape, d_out: int, seed: int = 77):
    """A fixed batch with targets a smooth function of the inputs (the loss can fall)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=DTYPE)
    w = torch.randn(shape[-1], d_out, generator=gen, dtype=DTYPE)
    y = torch.sin(x @ w / math.sqrt(shape[-1]))
    return x, (y if y.ndim == 2 else y.mean(1))


def mse(out, y):
    return ((out - y) ** 2).mean()


def train(model, opt, start, stop, shape=(16, 6), d_out=3, forward=None, dtype=DTYPE):
    forward = model if forward is None else forward
    losses = []
    for t in range(start, stop):
        x, y = batch(t, shape, d_out, dtype=dtype)
        opt.zero_grad()
        loss = mse(forward(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def snapshot(model: nn.Module, opt: SINGD) -> dict[str, torch.Tensor]:
    """Every parameter, buffer, factor, factor momentum and per-parameter state (cloned)."""
    out = {f"param.{n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"buffer.{n}": b.detach().clone() for n, b in model.named_buffers()})
    for name, layer in opt.layers.items():
        for attr in ("K", "C", "m_K", "m_C"):
            X = getattr(layer, attr)
            if X is not None:
                for i, t in enumerate(X.tensors()):
                    out[f"layer.{name}.{attr}.{i}"] = t.detach().clone()
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in opt.state.items():
        for key, value in state.items():
            value = value.detach().clone() if torch.is_tensor(value) else torch.tensor(value)
            out[f"state.{names[id(p)]}.{key}"] = value
    return out


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"not bit-identical: {diff}"


def assert_close(a: dict, b: dict, rtol: float, atol: float = 0.0) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def project(like, M: torch.Tensor) -> torch.Tensor:
    """``P(M)`` of the structure of ``like`` (a symmetric ``M``), as a dense matrix."""
    return type(like).from_dense(M, *like.options()).to_dense()


def with_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def nat_grad(layer, G: torch.Tensor) -> torch.Tensor:
    """``C C^T G K K^T`` with dense factors."""
    K, C = layer.K.to_dense(), layer.C.to_dense()
    return C @ C.T @ G @ K @ K.T


def quiet_singd(model, **kwargs) -> SINGD:
    return SINGD(model, warn_unsupported=False, **kwargs)


# ----------------------------------------------- 1. unused layers, stale captures
class TwoBranch(nn.Module):
    """``a`` is trained every step; ``b`` only when a test routes a loss through it."""

    def __init__(self, with_b: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(5, 3)
        if with_b:
            self.b = nn.Linear(5, 2)
        self.to(DTYPE)


HP1 = dict(lr=0.1, momentum=0.9, lr_cov=0.05, alpha1=0.5, weight_decay=1e-3)


@pytest.mark.parametrize("T", [1, 2])
def test_branch_run_but_not_reached_by_loss_leaves_no_trace(T):
    """``b`` runs forward at capture steps, but no loss reaches it: identical to no ``b``."""
    model, ref = TwoBranch(), TwoBranch(with_b=False)
    opt, opt_ref = SINGD(model, T=T, **HP1), SINGD(ref, T=T, **HP1)
    b0 = {n: p.detach().clone() for n, p in model.b.named_parameters()}
    for t in range(6):
        x, y = batch(t, (8, 5))
        for m, o in ((model, opt), (ref, opt_ref)):
            o.zero_grad()
            if m is model:
                unused = m.b(x).square().sum()  # grad-enabled forward, never backpropagated
                assert unused.requires_grad
            mse(m.a(x), y[:, :3]).backward()
            o.step()
        assert model.b.weight.grad is None
        assert opt.layers["b"].H_K is None
    state = snapshot(model, opt)
    for n, p in model.b.named_parameters():
        assert torch.equal(p, b0[n])
    assert torch.equal(opt.layers["b"].K.to_dense(), torch.eye(6, dtype=DTYPE))
    assert torch.equal(opt.layers["b"].C.to_dense(), torch.eye(2, dtype=DTYPE))
    assert not any(k.startswith("state.b.") for k in state)
    only_a = {k: v for k, v in state.items() if ".b." not in k}
    assert_equal(only_a, snapshot(ref, opt_ref))


def test_layer_without_grad_is_not_updated_by_momentum():
    """``b`` is trained at step 0, then unused (grad None): it stays put, buffer too."""
    model = TwoBranch()
    opt = SINGD(model, T=1, **HP1)
    x, y = batch(0, (8, 5))
    opt.zero_grad()
    (mse(model.a(x), y[:, :3]) + model.b(x).square().mean()).backward()
    opt.step()
    after0 = snapshot(model, opt)
    assert "state.b.weight.momentum_buffer" in after0
    for t in range(1, 4):
        x, y = batch(t, (8, 5))
        opt.zero_grad()
        mse(model.a(x), y[:, :3]).backward()
        assert model.b.weight.grad is None
        opt.step()
    later = snapshot(model, opt)
    for key in after0:
        same = torch.equal(after0[key], later[key])
        assert same == (".b." in key), key


@pytest.mark.parametrize("fresh_use", [False, True], ids=["stale_only", "stale_and_fresh"])
@pytest.mark.parametrize("T", [1, 2])
def test_capture_from_an_earlier_step_is_never_applied(T, fresh_use):
    """``b`` runs at capture step 0; its output's backward only happens at step ``T``.

    Statistics of a forward pass whose backward came late never leak into a later
    step: at step ``T`` the statistics of ``b`` hold only the forward passes of step
    ``T`` itself (none at all when ``b`` did not run at step ``T``).
    """
    model = TwoBranch()
    # safeguards off: the exact plain-gradient-descent step below is the point
    opt = SINGD(model, T=T, safeguards=False, **dict(HP1, momentum=0.0, weight_decay=0.0))
    x0, _ = batch(0, (8, 5))
    late = model.b(x0)  # forward at capture step 0, kept for later
    for t in range(T):
        x, y = batch(t, (8, 5))
        opt.zero_grad()
        mse(model.a(x), y[:, :3]).backward()
        opt.step()
    assert opt.steps == T and opt.layers["b"].H_K is None
    xT, yT = batch(T, (8, 5))
    opt.zero_grad()
    loss = mse(model.a(xT), yT[:, :3]) + late.square().mean()
    if fresh_use:
        fresh_in = batch(100, (8, 5))[0]
        loss = loss + model.b(fresh_in).square().mean()
    loss.backward()
    layer = opt.layers["b"]
    if fresh_use:  # K = I: H_K is a^T a of the fresh input only
        a = with_ones(fresh_in) / math.sqrt(8)
        assert layer.H_K is not None
        torch.testing.assert_close(layer.H_K.to_dense(), a.T @ a, rtol=1e-12, atol=1e-14)
    else:
        assert layer.H_K is None, "the late backward of step 0's forward was captured"
    w = model.b.weight.detach().clone()
    G = model.b.weight.grad.clone()
    opt.step()
    if not fresh_use:  # K = C = I stay: the update is plain gradient descent
        assert torch.equal(layer.K.to_dense(), torch.eye(6, dtype=DTYPE))
        torch.testing.assert_close(model.b.weight, w - 0.1 * G, rtol=1e-12, atol=1e-14)


# ------------------------------------------------- 2. one layer applied twice
class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)
        self.to(DTYPE)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.out(h)


@pytest.mark.parametrize("structures", ["dense", ("blockdiagonal:4", "diagonal")])
def test_layer_applied_twice_sums_both_applications(structures):
    model = Twice()
    opt = quiet_singd(model, lr=0.1, damping=0.1, lr_cov=0.05, T=1, structures=structures)
    train(model, opt, 0, 3, shape=(10, 4), d_out=2)  # K, C are no longer the identity

    x, y = batch(3, (10, 4), 2)
    opt.zero_grad()
    mse(model(x), y).backward()

    # independent replay: output gradients of each application with autograd
    Wi, bi = model.inp.weight, model.inp.bias
    Ws, bs = model.shared.weight, model.shared.bias
    h0 = torch.tanh(F.linear(x, Wi, bi))
    z1 = F.linear(h0, Ws, bs)
    h1 = torch.tanh(z1)
    z2 = F.linear(h1, Ws, bs)
    loss = mse(model.out(torch.tanh(z2)), y)
    g1, g2 = torch.autograd.grad(loss, [z1, z2])
    B = x.shape[0]
    layer = opt.layers["shared"]
    K, C = layer.K.to_dense(), layer.C.to_dense()
    H_K = torch.zeros(7, 7, dtype=DTYPE)
    H_C = torch.zeros(6, 6, dtype=DTYPE)
    for inp, g in ((h0, g1), (h1, g2)):
        a = with_ones(inp.detach()) / math.sqrt(B)
        g = g * math.sqrt(B)
        H_K += project(layer.K, K.T @ a.T @ a @ K)
        H_C += project(layer.C, C.T @ g.T @ g @ C)
    torch.testing.assert_close(layer.H_K.to_dense(), H_K, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(layer.H_C.to_dense(), H_C, rtol=1e-10, atol=1e-13)
    # and one application alone is clearly not it
    a1 = with_ones(h0.detach()) / math.sqrt(B)
    assert not torch.allclose(layer.H_K.to_dense(), project(layer.K, K.T @ a1.T @ a1 @ K))
    opt.step()

    x, y = learnable((32, 4), 2)  # fixed batch: the loss must go down
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    assert opt.skipped_steps == 0


# --------------------------------------------------------------- 3. tied weights
class TiedLM(nn.Module):
    def __init__(self, V: int = 11, D: int = 6):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight
        self.to(DTYPE)

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.emb(idx))))


def lm_batch(step: int, V: int = 11, B: int = 8, S: int = 5):
    gen = torch.Generator().manual_seed(2000 + step)
    seq = torch.randint(0, V, (B, 1), generator=gen) + torch.arange(S + 1)
    return seq[:, :-1] % V, seq[:, 1:] % V


def test_tied_embedding_and_head_go_to_the_fallback_once():
    model = TiedLM()
    with pytest.warns(UserWarning) as record:
        opt = SINGD(model, lr=0.1, lr_cov=0.05, T=1, fallback_lr=0.02, fallback_weight_decay=0.1)
    msg = " ".join(str(w.message) for w in record)
    assert "Tied" in msg and "'emb'" in msg and "'head'" in msg and "emb.weight" in msg
    assert set(opt.layers) == {"mix"}
    assert opt.fallback_parameters == {"emb.weight": "adamw"}

    shared = model.emb.weight
    oracle = nn.Parameter(shared.detach().clone())
    adamw = torch.optim.AdamW([oracle], lr=0.02, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    losses = []
    for t in range(12):
        idx, target = lm_batch(t)
        opt.zero_grad()
        loss = F.cross_entropy(model(idx).reshape(-1, 11), target.reshape(-1))
        loss.backward()
        oracle.grad = shared.grad.clone()  # the sum over both uses
        opt.step()
        adamw.step()
        torch.testing.assert_close(shared, oracle, rtol=1e-12, atol=1e-14)
        assert opt.state[shared]["step"] == t + 1  # exactly one update per step
        losses.append(loss.item())
    state = opt.state[shared]
    torch.testing.assert_close(state["exp_avg"], adamw.state[oracle]["exp_avg"], rtol=1e-12, atol=0)
    assert not torch.equal(opt.layers["mix"].K.to_dense(), torch.eye(7, dtype=DTYPE))
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses


# ------------------------------------------------------------ 4. frozen parameters
class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l0 = nn.Linear(6, 8)  # frozen weight, trainable bias
        self.l1 = nn.Linear(8, 8)  # trainable weight, frozen bias
        self.l2 = nn.Linear(8, 3)
        self.unused = nn.Parameter(torch.randn(3))  # never used: grad stays None
        self.to(DTYPE)
        self.l0.weight.requires_grad_(False)
        self.l1.bias.requires_grad_(False)

    def forward(self, x):
        h1 = torch.tanh(self.l0(x))
        self.h1 = h1.detach()
        return self.l2(torch.tanh(self.l1(h1)))


@pytest.mark.parametrize("pass_all", [False, True], ids=["default_params", "all_params"])
def test_frozen_parameters_never_change_and_have_no_state(pass_all):
    model = Frozen()
    params = list(model.parameters()) if pass_all else None
    lr = 0.1
    opt = quiet_singd(model, params=params, lr=lr, momentum=0.0, lr_cov=0.05, T=1)
    assert set(opt.layers) == {"l1", "l2"}
    expected_fallback = {"l0.bias", "unused"}
    if pass_all:
        expected_fallback |= {"l0.weight", "l1.bias"}
    assert set(opt.fallback_parameters) == expected_fallback
    frozen = {"l0.weight": model.l0.weight, "l1.bias": model.l1.bias, "unused": model.unused}
    start = {n: p.detach().clone() for n, p in frozen.items()}
    # l1 has no bias column: d_i = in_features
    assert opt.layers["l1"].K.to_dense().shape == (8, 8)
    assert opt.layers["l1"].C.to_dense().shape == (8, 8)
    assert opt.layers["l2"].K.to_dense().shape == (9, 9)

    for t in range(5):
        x, y = batch(t)
        opt.zero_grad()
        mse(model(x), y).backward()
        layer = opt.layers["l1"]
        K = layer.K.to_dense()
        a = model.h1 / math.sqrt(x.shape[0])  # no ones column
        torch.testing.assert_close(layer.H_K.to_dense(), K.T @ a.T @ a @ K, rtol=1e-12, atol=0)
        w = model.l1.weight.detach().clone()
        G = model.l1.weight.grad.clone()
        opt.step()
        expected = w - lr * nat_grad(layer, G)  # factors of this step (updated first)
        torch.testing.assert_close(model.l1.weight, expected, rtol=1e-12, atol=1e-14)
        for name, p in frozen.items():
            assert torch.equal(p, start[name]), name
            assert p not in opt.state, name
    if not pass_all:
        grouped = {id(p) for g in opt.param_groups for p in g["params"]}
        assert id(model.l0.weight) not in grouped and id(model.l1.bias) not in grouped
    assert not torch.equal(model.l0.bias, Frozen().l0.bias)  # the trainable bias trains


# ------------------------------------------------------ 5. activation checkpointing
class CkptNet(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        torch.manual_seed(0)
        self.mode = mode
        self.inp = nn.Linear(6, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.out = nn.Linear(8, 3)
        self.to(DTYPE)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        if self.mode == "plain":
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.mode == "reentrant")
        return self.out(torch.tanh(h))


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_activation_checkpointing_counts_each_forward_once(mode):
    hp = dict(lr=0.1, lr_cov=0.05, T=2, weight_decay=1e-3)
    ref, model = CkptNet("plain"), CkptNet(mode)
    opt_ref, opt = SINGD(ref, **hp), SINGD(model, **hp)
    for t in range(7):
        x, y = batch(t)
        for m, o in ((ref, opt_ref), (model, opt)):
            o.zero_grad()
            mse(m(x), y).backward()
        for name in opt_ref.layers:
            a, b = opt_ref.layers[name], opt.layers[name]
            assert (a.H_K is None) == (b.H_K is None) == (t % 2 == 1), (t, name)
            if a.H_K is not None:
                torch.testing.assert_close(b.H_K.to_dense(), a.H_K.to_dense(), rtol=1e-12, atol=0)
                torch.testing.assert_close(b.H_C.to_dense(), a.H_C.to_dense(), rtol=1e-12, atol=0)
        opt_ref.step()
        opt.step()
    assert_close(snapshot(ref, opt_ref), snapshot(model, opt), rtol=1e-12, atol=1e-15)
    assert not torch.equal(opt.layers["block.0"].K.to_dense(), torch.eye(9, dtype=DTYPE))


@pytest.mark.parametrize("probe", ["grad_inputs", "backward_inputs", "grad_params"])
def test_input_gradient_probes_add_no_statistics(probe):
    """A backward pass that does not accumulate the weights' gradients (an adversarial
    example's ``autograd.grad`` w.r.t. the input, ``backward(inputs=[x])``) adds no
    statistics: the step equals one without the probe. ``autograd.grad`` w.r.t. the
    parameters cannot be told apart from a gradient the caller writes into ``.grad``
    itself, so it is captured (as before)."""
    hp = dict(lr=0.1, lr_cov=0.05, T=1, weight_decay=1e-3)
    ref, model = CkptNet("plain"), CkptNet("plain")
    opt_ref, opt = SINGD(ref, **hp), SINGD(model, **hp)
    for t in range(3):
        x, y = batch(t)
        x_adv = x.clone().requires_grad_(True)
        opt_ref.zero_grad()
        opt.zero_grad()
        loss = mse(model(x_adv), y)
        if probe == "grad_inputs":
            torch.autograd.grad(loss, x_adv)
        elif probe == "backward_inputs":
            loss.backward(inputs=[x_adv])
        else:
            torch.autograd.grad(loss, list(model.parameters()))
        assert all(p.grad is None for p in model.parameters())
        captured = opt.layers["inp"].pending is not None
        assert captured == (probe == "grad_params")
        if captured:
            return
        for m in (ref, model):
            mse(m(x), y).backward()
        opt_ref.step()
        opt.step()
    assert_close(snapshot(ref, opt_ref), snapshot(model, opt), rtol=0, atol=0)


def test_losses_backpropagated_one_by_one_count_the_inputs_once():
    """Two losses of one forward, each with its own ``backward`` (``retain_graph``):
    the input statistic is that of one pass (it was counted twice), the output
    statistic the sum of the two passes'. Oracle: dense float64 of KFAC's factors at
    ``lr_cov=1`` (the factors are this step's statistics), ``x̄^T x̄ / N`` and
    ``N (g1^T g1 + g2^T g2)`` with ``g_b = d l_b / d out``; the step's ``.grad`` is
    that of ``(l1 + l2).backward()``."""
    torch.manual_seed(0)
    x, y, z = torch.randn(16, 5, dtype=DTYPE), torch.randint(0, 3, (16,)), torch.randn(16, 3)
    lin = nn.Linear(5, 3).to(DTYPE)
    opt = torchsingd.KFAC(lin, lr=1e-2, T=1, lr_cov=1.0, momentum=0.0)
    out = lin(x)
    losses = [F.cross_entropy(out, y), (out - z.to(DTYPE)).square().mean()]
    # (gradients with respect to the output only: not captured)
    g1, g2 = (torch.autograd.grad(loss, out, retain_graph=True)[0] for loss in losses)
    losses[0].backward(retain_graph=True)
    losses[1].backward()
    opt.step()
    layer = opt.layers[""]
    N = x.shape[0]
    xb = with_ones(x)
    torch.testing.assert_close(layer.S_K.to_dense(), xb.T @ xb / N, rtol=1e-12, atol=0)
    S_C = N * (g1.T @ g1 + g2.T @ g2)
    torch.testing.assert_close(layer.S_C.to_dense(), S_C, rtol=1e-12, atol=0)
    torch.testing.assert_close(lin.weight.grad, (g1 + g2).T @ x, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("structures", ["dense", "diagonal", "hierarchical:2,1"])
def test_second_backward_through_a_forward_adds_its_output_side_only(structures):
    """SINGD: the pending statistics after ``l1.backward(retain_graph=True);
    l2.backward()`` are the input side of ``l1``'s pass alone and the sum of the two
    passes' output sides (each pass on its own optimizer of a copy of the model), for
    each layer of an MLP."""
    pendings = []
    for which in ("both", "first", "second"):
        model = make_mlp(0)
        opt = quiet_singd(model, structures=structures, T=1, **HP1)
        x, y = batch(0)
        out = model(x)
        losses = [mse(out, y), out.tanh().sum() / 7]
        if which == "both":
            losses[0].backward(retain_graph=True)
            losses[1].backward()
        else:
            losses[which == "second"].backward()
        pendings.append({n: [s.to_dense() for s in L.pending] for n, L in opt.layers.items()})
    both, first, second = pendings
    for name in both:
        assert torch.equal(both[name][0], first[name][0]), name
        torch.testing.assert_close(
            both[name][1], first[name][1] + second[name][1], rtol=1e-14, atol=0
        )


def test_captured_inputs_are_released_at_the_step():
    """A caller holding ``loss`` past ``step()`` (``loss = ...`` of the next iteration
    runs its forward first) keeps the graph alive, with the observed layers' hooks:
    their inputs are released at the step, not with the graph."""
    model = make_mlp(0)
    opt = quiet_singd(model, T=1, **HP1)
    x, y = batch(0)
    loss = mse(model(x), y)
    loss.backward()
    held = [weakref.ref(a.x) for a in opt._applications]
    assert len(held) == 2 and all(r() is not None for r in held)
    opt.step()
    assert all(r() is None for r in held)
    assert loss.grad_fn is not None  # (the graph is still there)


# ----------------------------------------------------------- 6. evaluation passes
def make_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(48, 3),
    ).to(DTYPE)


CNN_SHAPE = (8, 2, 4, 4)


@pytest.mark.parametrize("T", [1, 2])
def test_evaluation_passes_between_steps_change_nothing(T):
    hp = dict(lr=0.05, lr_cov=0.05, T=T, weight_decay=1e-3)
    ref, model = make_cnn(), make_cnn()
    opt_ref, opt = quiet_singd(ref, **hp), quiet_singd(model, **hp)
    x_val = batch(999, CNN_SHAPE)[0]

    def evaluate(m, grad: bool):
        m.eval()
        with torch.set_grad_enabled(grad):
            out = m(x_val)
        m.train()
        return out

    torch.manual_seed(7)
    train(ref, opt_ref, 0, 6, CNN_SHAPE)
    torch.manual_seed(7)  # same dropout masks
    for t in range(6):
        x, y = batch(t, CNN_SHAPE)
        evaluate(model, grad=False)
        model.eval()  # (a train-mode forward would move the BN statistics)
        with torch.inference_mode():
            model(x_val)
        model.train()
        opt.zero_grad()
        evaluate(model, grad=True)  # grad enabled, never backpropagated
        loss = mse(model(x), y)
        evaluate(model, grad=True).sum()
        loss.backward()
        evaluate(model, grad=False)
        evaluate(model, grad=True)
        opt.step()
        evaluate(model, grad=False)
    assert_equal(snapshot(ref, opt_ref), snapshot(model, opt))
    assert not torch.equal(opt.layers["0"].K.to_dense(), torch.eye(19, dtype=DTYPE))


# ----------------------------------------------------------------- 7. closures
@pytest.mark.parametrize("T", [1, 3])
def test_step_with_closure_equals_plain_loop(T):
    hp = dict(lr=0.1, lr_cov=0.05, T=T, weight_decay=1e-3)
    ref, model = make_mlp(0), make_mlp(0)
    opt_ref, opt = SINGD(ref, **hp), SINGD(model, **hp)
    ref_losses = train(ref, opt_ref, 0, 7)
    K_seen = []
    for t in range(7):
        x, y = batch(t)
        returned = []

        def closure(x=x, y=y, returned=returned):
            opt.zero_grad()
            loss = mse(model(x), y)
            loss.backward()
            returned.append(loss)
            return loss

        with torch.no_grad():  # step enables grad for the closure itself
            out = opt.step(closure)
        assert len(returned) == 1 and out is returned[0]
        assert out.item() == ref_losses[t]
        K_seen.append(opt.layers["0"].K.to_dense().clone())
    assert_equal(snapshot(ref, opt_ref), snapshot(model, opt))
    changed = [not torch.equal(K_seen[i], K_seen[i - 1]) for i in range(1, 7)]
    assert changed == [i % T == 0 for i in range(1, 7)]  # captured in the closure's backward


# ----------------------------------------------------------------- 8. clipping
def make_ln_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)
    ).to(DTYPE)


def test_clip_grad_norm_before_step_equals_manual_clipping():
    hp = dict(lr=0.1, lr_cov=0.05, T=2, weight_decay=1e-3)
    max_norm = 0.3
    models = {k: make_ln_mlp() for k in ("torch", "manual", "none")}
    opts = {k: quiet_singd(m, **hp) for k, m in models.items()}
    triggered = 0
    for t in range(6):
        x, y = batch(t)
        for k, m in models.items():
            opts[k].zero_grad()
            mse(m(x), y).backward()
            grads = [p.grad for p in m.parameters()]
            norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
            if k == "torch":
                returned = torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm)
                assert float(returned) == pytest.approx(norm, rel=1e-12)
                triggered += norm > max_norm
            elif k == "manual":
                coef = min(1.0, max_norm / (norm + 1e-6))  # torch's documented rule
                for g in grads:
                    g.mul_(coef)
            opts[k].step()
    assert triggered >= 3
    clipped = snapshot(models["torch"], opts["torch"])
    assert_close(clipped, snapshot(models["manual"], opts["manual"]), rtol=1e-12, atol=1e-15)
    unclipped = snapshot(models["none"], opts["none"])
    assert not torch.allclose(clipped["param.0.weight"], unclipped["param.0.weight"])


def _directions(model, opt, names):
    """Dense ``C C^T G K K^T`` of each named ``nn.Linear`` (factors after the step)."""
    out = {}
    for name in names:
        module = model[int(name)]
        G = torch.cat([module.weight.grad, module.bias.grad[:, None]], dim=1)
        out[name] = nat_grad(opt.layers[name], G)
    return out


@pytest.mark.parametrize("clip", ["always", "never"])
def test_max_update_norm_clips_each_groups_joint_direction(clip):
    """Group 0 (layers 0, 3 and the LayerNorm) is clipped; group 1 (layer 5) is not."""
    lr, max_norm = 0.1, {"always": 1e-3, "never": 1e6}[clip]

    def build(model, clip_it):
        groups = [
            {
                "params": [*model[0].parameters(), *model[2].parameters(), *model[3].parameters()],
                "max_update_norm": max_norm if clip_it else None,
            },
            {"params": model[5].parameters()},
        ]
        hp = dict(lr=lr, momentum=0.0, weight_decay=0.0, lr_cov=0.05, T=1)
        return quiet_singd(model, params=groups, **hp)

    model, free = make_ln_mlp(), make_ln_mlp()
    opt, opt_free = build(model, True), build(free, False)
    ln_oracle = [nn.Parameter(p.detach().clone()) for p in model[2].parameters()]
    adamw = torch.optim.AdamW(ln_oracle, lr=lr, weight_decay=0.0)
    for t in range(5):
        x, y = batch(t)
        old = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        mse(model(x), y).backward()
        for q, p in zip(ln_oracle, model[2].parameters(), strict=True):
            q.grad = p.grad.clone()
        opt.step()
        adamw.step()
        dirs = _directions(model, opt, ["0", "3", "5"])
        norm0 = math.sqrt(sum(float((dirs[n] ** 2).sum()) for n in ("0", "3")))
        scale = min(1.0, max_norm / norm0)
        assert (scale < 1.0) == (clip == "always")
        deltas = {
            n: p.detach() - o for (n, p), o in zip(model.named_parameters(), old, strict=True)
        }
        for name, d in dirs.items():
            s = scale if name != "5" else 1.0
            expected = -lr * s * d
            # (p_new - p_old carries an absolute rounding error of about eps * |p|)
            for key, e in (("weight", expected[:, :-1]), ("bias", expected[:, -1])):
                torch.testing.assert_close(deltas[f"{name}.{key}"], e, rtol=1e-10, atol=1e-15)
        if clip == "always":
            joint = math.sqrt(
                sum(
                    float((deltas[f"{n}.{k}"] ** 2).sum()) for n in "03" for k in ("weight", "bias")
                )
            )
            assert joint == pytest.approx(lr * max_norm, rel=1e-12)
        for q, p in zip(ln_oracle, model[2].parameters(), strict=True):  # fallback unclipped
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    train(free, opt_free, 0, 5)
    if clip == "never":
        assert_equal(snapshot(model, opt), snapshot(free, opt_free))


def test_max_update_norm_is_exact_in_float64():
    lr, max_norm = 0.1, 1e-3
    model = make_mlp(0)
    opt = SINGD(model, lr=lr, momentum=0.0, weight_decay=0.0, T=1, max_update_norm=max_norm)
    for t in range(3):
        x, y = batch(t)
        old = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
        norm = math.sqrt(
            sum(
                float(((p.detach() - o) ** 2).sum())
                for p, o in zip(model.parameters(), old, strict=True)
            )
        )
        assert norm == pytest.approx(lr * max_norm, rel=1e-12, abs=0)


# ------------------------------------------------------------- 9. non-finite steps
HP9 = dict(lr=0.1, momentum=0.9, lr_cov=0.05, alpha1=0.5, weight_decay=1e-3)


def _nan_loss_step(model, opt, t, poison):
    x, y = batch(t)
    opt.zero_grad()
    loss = mse(model(x), y)
    if poison == "nan_loss":
        loss = loss * float("nan")
    loss.backward()
    if poison == "inf_fallback_grad":  # the LayerNorm weight: a fallback parameter
        model[2].weight.grad[1] = math.inf
    return loss


@pytest.mark.parametrize("poison", ["nan_loss", "inf_fallback_grad"])
@pytest.mark.parametrize("T", [1, 2])
def test_non_finite_step_is_skipped_as_if_it_never_happened(T, poison):
    """A skipped step changes nothing and does not count: training on ends where an
    optimizer that never saw the poisoned batch ends (bit for bit), so a skipped
    factor-update step is retried by the next step (counting it delayed the next
    factor update by ``T``)."""
    model, ref = make_ln_mlp(), make_ln_mlp()
    opt, opt_ref = quiet_singd(model, T=T, **HP9), quiet_singd(ref, T=T, **HP9)
    train(model, opt, 0, 4)
    train(ref, opt_ref, 0, 4)
    _nan_loss_step(model, opt, 4, poison)
    assert all(layer.H_K is not None for layer in opt.layers.values())  # a capture step
    before = snapshot(model, opt)
    assert any(".m_K." in k for k in before) and "state.2.weight.exp_avg_sq" in before
    assert "state.0.weight.momentum_buffer" in before
    with pytest.warns(UserWarning, match="skipped"):
        opt.step()
    assert_equal(before, snapshot(model, opt))
    assert opt.skipped_steps == 1 and opt.steps == 4
    assert all(layer.H_K is None for layer in opt.layers.values())

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, opt, 5, 10)
    train(ref, opt_ref, 5, 10)
    after = snapshot(model, opt)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert_equal(snapshot(ref, opt_ref), after)
    assert opt.skipped_steps == 1 and opt_ref.skipped_steps == 0


@pytest.mark.parametrize("poison", ["nan_loss", "inf_fallback_grad"])
def test_non_finite_step_raises_and_changes_nothing(poison):
    model = make_ln_mlp()
    opt = quiet_singd(model, T=1, on_nonfinite="raise", **HP9)
    train(model, opt, 0, 3)
    _nan_loss_step(model, opt, 3, poison)
    before = snapshot(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # raise, not warn
        with pytest.raises(NonFiniteError):
            opt.step()
    assert_equal(before, snapshot(model, opt))
    assert opt.skipped_steps == 0
    losses = train(model, opt, 4, 8)
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(v).all() for v in snapshot(model, opt).values())


# ------------------------------------------------------------ 10. fallback rules
def _fallback_oracle_run(model, opt, oracle_opt, pairs, steps=6):
    for t in range(steps):
        x, y = batch(t)
        opt.zero_grad()
        mse(model(x), y).backward()
        for p, q in pairs:
            q.grad = p.grad.clone()
        opt.step()
        oracle_opt.step()
        for p, q in pairs:
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("explicit", [True, False], ids=["fallback_hp", "group_hp"])
def test_sgd_fallback_follows_torch_sgd(explicit):
    model = make_ln_mlp()
    kwargs = dict(fallback_lr=0.03, fallback_weight_decay=0.05) if explicit else {}
    opt = quiet_singd(model, lr=0.1, momentum=0.9, weight_decay=0.01, fallback="sgd", **kwargs)
    assert opt.fallback_parameters == {"2.weight": "sgd", "2.bias": "sgd"}
    pairs = [(p, nn.Parameter(p.detach().clone())) for p in model[2].parameters()]
    lr, wd = (0.03, 0.05) if explicit else (0.1, 0.01)
    oracle = torch.optim.SGD([q for _, q in pairs], lr=lr, momentum=0.9, weight_decay=wd)
    _fallback_oracle_run(model, opt, oracle, pairs)
    for p, q in pairs:
        torch.testing.assert_close(
            opt.state[p]["momentum_buffer"], oracle.state[q]["momentum_buffer"], rtol=1e-12, atol=0
        )


@pytest.mark.parametrize("explicit", [True, False], ids=["fallback_hp", "group_hp"])
def test_adamw_fallback_follows_torch_adamw(explicit):
    model = make_ln_mlp()
    if explicit:
        kwargs = dict(
            fallback_lr=0.02,
            fallback_betas=(0.8, 0.95),
            fallback_eps=1e-6,
            fallback_weight_decay=0.1,
        )
        oracle_hp = dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    else:
        kwargs = {}
        oracle_hp = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    opt = quiet_singd(model, lr=0.1, weight_decay=0.01, **kwargs)
    pairs = [(p, nn.Parameter(p.detach().clone())) for p in model[2].parameters()]
    oracle = torch.optim.AdamW([q for _, q in pairs], **oracle_hp)
    _fallback_oracle_run(model, opt, oracle, pairs)
    for p, q in pairs:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], oracle.state[q][key], rtol=1e-12, atol=0)
        assert int(opt.state[p]["step"]) == int(oracle.state[q]["step"]) == 6


class PosNet(nn.Module):
    """A learned positional embedding (free parameter), a LayerNorm and two Linears."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.pos = nn.Parameter(0.1 * torch.randn(4, 6))
        self.inp = nn.Linear(3, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)
        self.to(DTYPE)

    def forward(self, x):
        return self.out(self.norm(torch.tanh(self.inp(x) + self.pos))).mean(1)


POS_SHAPE = (8, 4, 3)


@pytest.mark.parametrize("fallback", ["adamw", "sgd"])
def test_fallback_state_is_checkpointed_and_resumes_bit_exactly(tmp_path, fallback):
    hp = dict(lr=0.05, lr_cov=0.05, T=3, weight_decay=1e-3, fallback=fallback, fallback_lr=0.01)
    model_a = PosNet()
    opt_a = quiet_singd(model_a, **hp)
    train(model_a, opt_a, 0, 10, POS_SHAPE)

    model_b = PosNet()
    opt_b = quiet_singd(model_b, **hp)
    train(model_b, opt_b, 0, 5, POS_SHAPE)
    sd = opt_b.state_dict()
    index = {id(p): i for i, p in enumerate(opt_b.param_groups[0]["params"])}
    key = "exp_avg" if fallback == "adamw" else "momentum_buffer"
    for p in (model_b.pos, model_b.norm.weight, model_b.norm.bias):
        assert key in sd["state"][index[id(p)]]
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model_b.state_dict(), "opt": sd}, path)
    del model_b, opt_b, sd

    model_c = PosNet(seed=123)
    opt_c = quiet_singd(model_c, **hp)
    ckpt = torch.load(path)
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    train(model_c, opt_c, 5, 10, POS_SHAPE)
    state_a = snapshot(model_a, opt_a)
    assert f"state.pos.{key}" in state_a
    assert_equal(state_a, snapshot(model_c, opt_c))


# ---------------------------------------------------------------- 11. torch.compile
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile_check(backend: str, where: str):
    """SINGD on the compiled module or on the original (then compiled): same numbers."""
    hp = dict(lr=0.1, lr_cov=0.05, T=2, weight_decay=1e-3)
    f32 = torch.float32
    ref = make_ln_mlp().float()
    opt_ref = quiet_singd(ref, **hp)
    model = make_ln_mlp().float()
    if where == "compiled_module":  # unwrapped: the same layer names either way
        compiled = torch.compile(model, backend=backend)
        opt = quiet_singd(compiled, **hp)
    else:
        opt = quiet_singd(model, **hp)
        compiled = torch.compile(model, backend=backend)
    assert set(opt.layers) == set(opt_ref.layers)
    assert set(opt.fallback_parameters) == set(opt_ref.fallback_parameters)
    for t in range(6):
        x, y = batch(t, dtype=f32)
        opt_ref.zero_grad()
        mse(ref(x), y).backward()
        opt.zero_grad()
        loss = mse(compiled(x), y)
        loss.backward()
        for name, layer in opt_ref.layers.items():
            mine = opt.layers[name]
            assert (mine.H_K is None) == (layer.H_K is None) == (t % 2 == 1), (t, name)
            if layer.H_K is not None:
                torch.testing.assert_close(
                    mine.H_K.to_dense(), layer.H_K.to_dense(), rtol=1e-5, atol=1e-7
                )
                torch.testing.assert_close(
                    mine.H_C.to_dense(), layer.H_C.to_dense(), rtol=1e-5, atol=1e-7
                )
        opt_ref.step()
        opt.step()
    eye = torch.eye(7, dtype=f32)
    assert not torch.equal(opt.layers["0"].K.to_dense(), eye)
    expected = snapshot(ref, opt_ref)
    # parameter names (and those of opt.state) come from the original module either way
    assert_close(expected, snapshot(model, opt), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("where", ["compiled_module", "original_module"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_eager_backends(fresh_dynamo, backend, where):
    _compile_check(backend, where)


def test_torch_compile_deep_model_stays_within_the_recompile_limit(fresh_dynamo):
    """The observing hooks run eagerly (one graph break each), so Dynamo does not
    compile a hook frame per layer: 12 layers stay under its recompile limit (8)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(12)])
    compiled = torch.compile(model, backend="eager")
    opt = SINGD(compiled, lr=1e-2, T=2, warn_unsupported=False)
    counters.clear()
    for t in range(4):
        x, _ = batch(t, dtype=torch.float32)  # [16, 6]: an autoencoding target
        opt.zero_grad()
        mse(compiled(x), x).backward()
        opt.step()
    frames = counters["frames"]
    assert frames["total"] == frames["ok"], dict(frames)  # none gave up on the limit
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])


@pytest.mark.slow
def test_torch_compile_inductor(fresh_dynamo):
    _compile_check("inductor", "compiled_module")


# ------------------------------------------------------ 12. a user-registered layer
class Dense(nn.Module):
    """``y = x @ kernel + offset`` (``kernel``: ``[d_in, d_out]``): not an ``nn.Linear``."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(d_in, d_out) / math.sqrt(d_in))
        self.offset = nn.Parameter(0.1 * torch.randn(d_out))

    def forward(self, x):
        return x @ self.kernel + self.offset


class DenseAdapter(LayerAdapter):
    """Written from ALGORITHM.md section 2 for inputs ``[B, S, d_in]``, batch loss average."""

    def params(self, module):
        return [module.kernel, module.offset]

    def has_bias(self, module):
        return True

    def dims(self, module, *, block=""):
        d_in, d_out = module.kernel.shape
        return d_in + 1, d_out

    def input_rows(self, module, x, kfac_approx, *, block=""):
        rows = x.reshape(-1, x.shape[-1])
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows / math.sqrt(rows.shape[0])

    def grad_rows(self, module, g, loss_average, kfac_approx, *, block=""):
        assert loss_average == "batch"
        return g.reshape(-1, g.shape[-1]) * math.sqrt(g.shape[0])

    def grad_matrix(self, module, *, block=""):
        if module.kernel.grad is None:
            return None
        return torch.cat([module.kernel.grad.T, module.offset.grad[:, None]], dim=1)

    def split_matrix(self, module, mat):
        return [mat[:, :-1].T, mat[:, -1]]


class DenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.dense = Dense(4, 5)
        self.head = nn.Linear(5, 2)
        self.to(DTYPE)

    def forward(self, x):  # x: [B, S, 4]
        return self.head(torch.tanh(self.dense(x))).mean(1)


@pytest.fixture
def dense_registered():
    torchsingd.register_layer(Dense, DenseAdapter())
    yield
    torchsingd.unregister_layer(Dense)


DENSE_SHAPE = (6, 3, 4)


def test_registry_replaces_with_a_warning_and_unregisters():
    """The latest registration of a class wins, by type or by fully qualified name;
    replacing one warns; unregister_layer removes either form; a bare name (which
    would never match a module) is refused."""
    name = f"{Dense.__module__}.{Dense.__qualname__}"
    first, second = DenseAdapter(), ForgetfulAdapter()
    try:
        torchsingd.register_layer(Dense, first)
        assert get_adapter(Dense(2, 2)) is first
        with pytest.warns(UserWarning, match="had the adapter DenseAdapter; now ForgetfulAdapter"):
            torchsingd.register_layer(name, second)  # by name after by type: the name wins
        assert get_adapter(Dense(2, 2)) is second
        assert torchsingd.unregister_layer(Dense) is second
        assert get_adapter(Dense(2, 2)) is None and Dense not in _ADAPTERS
        assert torchsingd.unregister_layer(Dense) is None
        with pytest.raises(ValueError, match="fully qualified class name"):
            torchsingd.register_layer("Dense", first)

        def make():  # two classes with one qualified name (a factory called twice)
            class Proj(Dense):
                pass

            return Proj

        one, two = make(), make()
        torchsingd.register_layer(one, first)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # another class: nothing replaced
            torchsingd.register_layer(two, second)
        assert get_adapter(one(2, 2)) is first and get_adapter(two(2, 2)) is second
        assert torchsingd.unregister_layer(one) is first and get_adapter(two(2, 2)) is second
        torchsingd.unregister_layer(two)
    finally:
        torchsingd.unregister_layer(Dense)


def test_unregistered_custom_layer_goes_to_the_fallback():
    assert get_adapter(Dense(2, 2)) is None
    opt = quiet_singd(DenseNet())
    assert set(opt.layers) == {"head"}
    assert set(opt.fallback_parameters) == {"dense.kernel", "dense.offset"}


class ForgetfulAdapter(DenseAdapter):
    """``split_matrix`` forgets to transpose the kernel back."""

    def split_matrix(self, module, mat):
        return [mat[:, :-1], mat[:, -1]]


def test_wrongly_shaped_directions_raise_before_anything_is_written():
    """A user adapter returning directions of the wrong shapes: an error naming the
    layer and the method, and nothing written (the step had already written the other
    layer's parameters and both layers' factors when torch raised a size mismatch)."""
    torchsingd.register_layer(Dense, ForgetfulAdapter())
    try:
        model = DenseNet()
        opt = SINGD(model, lr=0.1, lr_cov=0.05, T=1)
        x, y = batch(0, DENSE_SHAPE, 2)
        mse(model(x), y).backward()
        params = [p.detach().clone() for p in model.parameters()]
        factors = {n: layer.K.to_dense().clone() for n, layer in opt.layers.items()}
        with pytest.raises(ValueError, match=r"Layer 'dense': ForgetfulAdapter.directions"):
            opt.step()
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
        assert all(torch.equal(opt.layers[n].K.to_dense(), K) for n, K in factors.items())
        assert opt.steps == 0 and not any(opt.state[p] for p in model.parameters())
    finally:
        torchsingd.unregister_layer(Dense)


def test_registered_custom_layer_is_preconditioned(dense_registered):
    model = DenseNet()
    lr = 0.1
    opt = SINGD(model, lr=lr, momentum=0.0, lr_cov=0.05, T=1, structures="dense")
    assert set(opt.layers) == {"dense", "head"} and opt.fallback_parameters == {}
    assert opt.layers["dense"].K.to_dense().shape == (5, 5)
    assert opt.layers["dense"].C.to_dense().shape == (5, 5)
    for t in range(4):
        x, y = batch(t, DENSE_SHAPE, 2)
        opt.zero_grad()
        mse(model(x), y).backward()
        # oracle: rows from ALGORITHM.md, output gradient from autograd
        z = x @ model.dense.kernel + model.dense.offset
        (gz,) = torch.autograd.grad(mse(model.head(torch.tanh(z)).mean(1), y), [z])
        B, S = x.shape[:2]
        a = with_ones(x.reshape(B * S, 4)) / math.sqrt(B * S)
        g = gz.reshape(B * S, 5) * math.sqrt(B)
        layer = opt.layers["dense"]
        K, C = layer.K.to_dense(), layer.C.to_dense()
        torch.testing.assert_close(layer.H_K.to_dense(), K.T @ a.T @ a @ K, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(layer.H_C.to_dense(), C.T @ g.T @ g @ C, rtol=1e-12, atol=1e-15)
        G = torch.cat([model.dense.kernel.grad.T, model.dense.offset.grad[:, None]], dim=1)
        kernel, offset = model.dense.kernel.detach().clone(), model.dense.offset.detach().clone()
        opt.step()
        delta = -lr * nat_grad(layer, G)
        torch.testing.assert_close(
            model.dense.kernel, kernel + delta[:, :-1].T, rtol=1e-12, atol=1e-14
        )
        torch.testing.assert_close(
            model.dense.offset, offset + delta[:, -1], rtol=1e-12, atol=1e-14
        )
    assert not torch.equal(opt.layers["dense"].K.to_dense(), torch.eye(5, dtype=DTYPE))

    x, y = learnable((24, 3, 4), 2)  # fixed batch: training works
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


# ------------------------------------------------- 13. a full TransformerEncoder
V_TR, E_TR, S_TR, B_TR = 12, 16, 8, 16


class TinyTransformer(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V_TR, E_TR)
        self.pos = nn.Parameter(0.1 * torch.randn(S_TR, E_TR))
        layer = nn.TransformerEncoderLayer(
            E_TR, 2, dim_feedforward=32, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(E_TR, V_TR)
        self.to(DTYPE)

    def forward(self, idx):
        S = idx.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(S, dtype=self.head.weight.dtype)
        h = self.emb(idx) + self.pos[:S]
        return self.head(self.encoder(h, mask=mask, is_causal=True))


def sequence_batch(step: int):
    """Arithmetic progressions mod V with a per-sequence stride: next-token prediction."""
    gen = torch.Generator().manual_seed(500 + step)
    start = torch.randint(0, V_TR, (B_TR, 1), generator=gen)
    stride = torch.randint(1, 4, (B_TR, 1), generator=gen)
    seq = (start + stride * torch.arange(S_TR + 1)) % V_TR
    return seq[:, :-1], seq[:, 1:]


TR_HP = dict(lr=0.05, lr_cov=0.05, T=3, fallback_lr=0.01, loss_average="batch+sequence")


def train_lm(model, opt, start, stop):
    losses = []
    for t in range(start, stop):
        idx, target = sequence_batch(t)
        opt.zero_grad()
        loss = F.cross_entropy(model(idx).reshape(-1, V_TR), target.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_transformer_encoder_every_parameter_is_trained_by_one_singd():
    model = TinyTransformer()
    with pytest.warns(UserWarning, match="fallback"):
        opt = SINGD(model, **TR_HP)
    modules = dict(model.named_modules())
    covered: dict[int, str] = {}
    for name in opt.layers:
        mod_name = name if name in modules else name.rsplit(".", 1)[0]
        module = modules[mod_name]
        for p in get_adapter(module).params(module):
            covered[id(p)] = mod_name
    fallback = opt.fallback_parameters
    trainable = dict(model.named_parameters())
    for n, p in trainable.items():
        assert (id(p) in covered) != (n in fallback), n  # exactly one owner
    assert set(fallback) <= set(trainable)
    assert len(covered) + len(fallback) == len(trainable)
    assert "pos" in fallback and "emb" in opt.layers and "head" in opt.layers
    for i in range(2):
        for block in ("q", "k", "v", "out"):
            assert f"encoder.layers.{i}.self_attn.{block}" in opt.layers

    start = {n: p.detach().clone() for n, p in trainable.items()}
    losses = train_lm(model, opt, 0, 40)
    unchanged = [n for n, p in trainable.items() if torch.equal(p, start[n])]
    assert not unchanged
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, losses
    assert all(math.isfinite(v) for v in losses)


def test_transformer_encoder_checkpoint_resume_is_bit_exact(tmp_path):
    model_a = TinyTransformer()
    opt_a = quiet_singd(model_a, **TR_HP)
    train_lm(model_a, opt_a, 0, 12)

    model_b = TinyTransformer()
    opt_b = quiet_singd(model_b, **TR_HP)
    train_lm(model_b, opt_b, 0, 7)  # mid-interval: 7 % T != 0
    path = tmp_path / "tr.pt"
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, path)
    del model_b, opt_b

    model_c = TinyTransformer(seed=5)
    opt_c = quiet_singd(model_c, **TR_HP)
    ckpt = torch.load(path)
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    assert opt_c.steps == 7
    train_lm(model_c, opt_c, 7, 12)
    state_a = snapshot(model_a, opt_a)
    assert any(k.startswith("layer.encoder.layers.1.self_attn.q.K") for k in state_a)
    assert_equal(state_a, snapshot(model_c, opt_c))


@pytest.mark.parametrize("T", [1, 2])
def test_torch_compile_transformer_encoder(fresh_dynamo, T):
    """Compiled (``backend="eager"``) vs eager, steps with and without captures."""
    hp = dict(TR_HP, T=T)
    ref, model = TinyTransformer().float(), TinyTransformer().float()
    opt_ref, opt = quiet_singd(ref, **hp), quiet_singd(model, **hp)
    compiled = torch.compile(model, backend="eager")
    for t in range(3):
        idx, target = sequence_batch(t)
        losses = []
        for m, o in ((ref, opt_ref), (compiled, opt)):
            o.zero_grad()
            loss = F.cross_entropy(m(idx).reshape(-1, V_TR), target.reshape(-1))
            loss.backward()
            losses.append(loss.item())
        no_grad = [n for n, p in model.named_parameters() if p.grad is None]
        assert not no_grad, (t, no_grad)
        assert losses[1] == pytest.approx(losses[0], rel=1e-6), t
        opt_ref.step()
        opt.step()
    assert_close(snapshot(ref, opt_ref), snapshot(model, opt), rtol=1e-5, atol=1e-6)


class KeywordCalls(nn.Module):
    """Embedding, convolution and linear layers called with ``input=`` or positionally."""

    def __init__(self, keyword: bool):
        super().__init__()
        torch.manual_seed(0)
        self.keyword = keyword
        self.emb = nn.Embedding(7, 4)
        self.conv = nn.Conv1d(4, 3, 2)
        self.fc = nn.Linear(3, 2)
        self.to(DTYPE)

    def forward(self, idx):
        call = (lambda m, x: m(input=x)) if self.keyword else (lambda m, x: m(x))
        h = call(self.emb, idx).transpose(1, 2)  # [B, 4, S]
        h = torch.tanh(call(self.conv, h)).mean(2)
        return call(self.fc, h)


@pytest.mark.parametrize("structure", ["dense", "diagonal", "triltoeplitz"])
def test_layers_called_with_the_input_as_a_keyword_are_observed(structure):
    """``layer(input=x)``: the forward hook saw no positional input and captured
    nothing, so K and C stayed the identity forever, silently."""
    states = []
    for keyword in (False, True):
        model = KeywordCalls(keyword)
        opt = SINGD(model, lr=0.1, lr_cov=0.05, T=1, structures=structure)
        for t in range(3):
            gen = torch.Generator().manual_seed(t)
            idx = torch.randint(0, 7, (5, 6), generator=gen)
            opt.zero_grad()
            model(idx).square().sum().backward()
            opt.step()
        states.append(
            {
                **{n: p.detach() for n, p in model.named_parameters()},
                **{
                    f"{n}.{k}": f.to_dense()
                    for n, layer in opt.layers.items()
                    for k, f in (("K", layer.K), ("C", layer.C))
                },
            }
        )
        assert not torch.equal(opt.layers["fc"].K.to_dense(), torch.eye(4, dtype=DTYPE))
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
