"""What the forward hooks cannot see: in-place operations on a layer's output view,
a weight used outside its module's forward, a subclass with its own forward.

In-place operations on an observed layer's output:

``nn.Linear`` with a bias on a 3-D input returns a *view* (``addmm(...).view(...)``);
an in-place operation on it (``ReLU(inplace=True)``, ``Dropout(inplace=True)``,
``y += r``) rebases the view's autograd history, so a gradient hook on the view never
fires. Such a layer must still be preconditioned, with the numbers of the same model
written out of place: the reference package (an independent implementation, which
raises on the in-place model) is the oracle for the out-of-place one. A view the
optimizer cannot follow is reported, not silently left with its initial factors.

A layer whose weight is used without calling the module (torchvision's Swin attention
calls ``F.linear(x, qkv.weight, qkv.bias)``) has a gradient and no statistics: reported.
A subclass of a supported layer that overrides ``forward`` (timm's ``Conv2dSame`` pads
in it, ``StdConv2d`` standardises its weight) computes something its adapter does not
know: its parameters go to the fallback rule, and the construction warning says so.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import torchsingd.optim.base as base
from torchsingd import KFAC, SINGD

RefSINGD = pytest.importorskip("singd.optim.optimizer").SINGD

HYPER = dict(lr=0.02, lr_cov=0.05, momentum=0.9, damping=1e-3, alpha1=0.5, weight_decay=1e-3)


class Net(nn.Module):
    """``Linear -> op -> Linear`` on ``[batch, sequence, features]`` inputs."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.fc1, self.fc2, self.op = nn.Linear(4, 6), nn.Linear(6, 3), op

    def forward(self, x):
        h = self.fc1(x)
        if self.op == "relu_":
            h = torch.relu_(h)
        elif self.op == "relu":
            h = torch.relu(h)
        elif self.op == "add_":
            h += 0.5  # in place on fc1's output
        elif self.op == "add":
            h = h + 0.5
        elif self.op == "dropout_":  # in place (the same global RNG draws as "dropout")
            h = nn.functional.dropout(h, 0.25, training=True, inplace=True)
        elif self.op == "dropout":
            h = nn.functional.dropout(h, 0.25, training=True)
        return self.fc2(h)


OUT_OF_PLACE = {"relu_": "relu", "add_": "add", "dropout_": "dropout"}


def train(impl, op: str, steps: int = 4, **kwargs) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = Net(op).double()
    opt = impl(model, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(5, 7, 4, generator=gen, dtype=torch.float64)
        y = torch.randn(5, 7, 3, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt


def max_diff(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max((p - q).abs().max().item() for p, q in pairs)


@pytest.mark.parametrize("op", list(OUT_OF_PLACE))
@pytest.mark.parametrize("structure", ["dense", "diagonal"])
@pytest.mark.parametrize("T", [1, 2])
def test_inplace_after_a_linear_view_is_preconditioned(op: str, structure: str, T: int) -> None:
    """Ours with the in-place op equals the reference with the out-of-place op."""
    kw = dict(HYPER, T=T, structures=(structure, structure))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, _ = train(RefSINGD, OUT_OF_PLACE[op], **kw)
        ours, opt = train(SINGD, op, safeguards=False, **kw)
        initial, _ = train(SINGD, op, steps=0, **kw)
    assert max_diff(ours, ref) < 1e-12
    # the layer was preconditioned: its factors moved away from the identity
    K = opt.layers["fc1"].K.to_dense()
    assert (K - torch.eye(K.shape[0], dtype=K.dtype)).abs().max() > 1e-3
    assert max_diff(ours, initial) > 1e-3


@pytest.mark.parametrize("op", ["relu_", "add_"])
def test_kfac_inplace_after_a_linear_view(op: str) -> None:
    """KFAC: the in-place model's steps equal the out-of-place model's."""
    kw = dict(lr=0.02, damping=1e-2, T=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, _ = train(KFAC, op, **kw)
        b, _ = train(KFAC, OUT_OF_PLACE[op], **kw)
    assert max_diff(a, b) < 1e-13


def test_a_view_that_cannot_be_followed_is_reported(monkeypatch) -> None:
    """Where the optimizer cannot hook the view's base, an in-place op loses the
    output gradient: one warning names the layer; the factors stay as they were."""
    monkeypatch.setattr(base, "_whole_view", lambda view, root: False)
    kw = dict(HYPER, T=1, structures=("dense", "dense"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, opt = train(SINGD, "relu_", **kw)
    lost = [str(w.message) for w in caught if "never reached" in str(w.message)]
    assert len(lost) == 1 and "'fc1'" in lost[0], lost
    K = opt.layers["fc1"].K.to_dense()
    assert torch.equal(K, torch.eye(K.shape[0], dtype=K.dtype))
    assert not torch.equal(opt.layers["fc2"].K.to_dense(), torch.eye(3, dtype=K.dtype))
    # out of place nothing is lost, nothing reported
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(SINGD, "relu", **kw)
    assert not [w for w in caught if "never reached" in str(w.message)]


def test_no_report_when_gradients_are_zeroed_without_a_backward() -> None:
    """``zero_grad(set_to_none=False)`` after a forward without its backward leaves
    zero gradients and no statistics: nothing was lost, nothing is reported."""
    torch.manual_seed(0)
    model = Net("relu").double()
    opt = SINGD(model, lr=0.01, T=1)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(x).sum().backward()
        opt.step()
        model(x)  # a forward with gradients on, never backpropagated
        opt.zero_grad(set_to_none=False)
        opt.step()
    assert not [w for w in caught if "never reached" in str(w.message)]


class Functional(nn.Module):
    """``proj``'s weight applied with ``F.linear`` (its forward never runs)."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.proj, self.head, self.functional = nn.Linear(4, 6), nn.Linear(6, 3), functional

    def forward(self, x):
        if self.functional:
            h = nn.functional.linear(x, self.proj.weight, self.proj.bias)
        else:
            h = self.proj(x)
        return self.head(torch.tanh(h))


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(n)]


def run(model, opt, data, penalty: float = 0.0) -> None:
    for x, y in data:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if penalty:
            loss = loss + penalty * sum(p.square().sum() for p in model.parameters())
        loss.backward()
        opt.step()


def snapshot(model: nn.Module, opt) -> bytes:
    """Model and optimizer state through ``torch.save`` (a copy, as on disk)."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    return buffer.getvalue()


def restore(saved: bytes, T: int) -> tuple[nn.Module, SINGD, dict]:
    """A new ``Functional(True)`` with the saved weights, a new SINGD for it (not yet
    loaded) and the saved optimizer state."""
    state = torch.load(io.BytesIO(saved), weights_only=False)
    model = Functional(True)
    model.load_state_dict(state["model"])
    return model, SINGD(model, lr=0.01, T=T), state["opt"]


@pytest.mark.parametrize("impl", [SINGD, KFAC])
@pytest.mark.parametrize("T", [1, 3])
def test_a_weight_used_outside_its_forward_is_handed_to_the_fallback(impl, T: int) -> None:
    """At the HAND_OVER_AFTER-th factor-update step without a forward of the layer (the
    other layers' observed), one warning; from that step on its parameters take exactly
    torch.optim.AdamW's steps (the fallback rule)."""
    handover = (base.HAND_OVER_AFTER - 1) * T  # the step that hands it over
    data = batches(handover + 3)
    for functional in (True, False):
        torch.manual_seed(0)
        model = Functional(functional).double()
        opt = impl(model, lr=0.01, T=T)
        shadow, adamw = None, None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for t, (x, y) in enumerate(data):
                opt.zero_grad()
                nn.functional.mse_loss(model(x.double()), y.double()).backward()
                if t == handover:
                    shadow = [p.detach().clone().requires_grad_() for p in model.proj.parameters()]
                    adamw = torch.optim.AdamW(shadow, lr=0.01, weight_decay=0.0)
                if shadow is not None:
                    for s, p in zip(shadow, model.proj.parameters(), strict=True):
                        s.grad = p.grad.clone()
                    adamw.step()
                opt.step()
                if t == handover - 1:
                    assert "proj" in opt.layers  # not yet
        found = [str(w.message) for w in caught if "has not run" in str(w.message)]
        if functional:  # once, naming the layer
            assert len(found) == 1 and "['proj']" in found[0], found
            assert f"step {handover}" in found[0] and "fallback rule (adamw)" in found[0]
            assert "proj" not in opt.layers and "head" in opt.layers
            assert set(opt.fallback_parameters) == {"proj.weight", "proj.bias"}
            for s, p in zip(shadow, model.proj.parameters(), strict=True):
                torch.testing.assert_close(p, s, rtol=1e-12, atol=1e-14)
        else:
            assert found == [] and "proj" in opt.layers


def test_an_optimizer_constructed_after_a_backward_hands_nothing_over() -> None:
    """Gradients exist before the first observed forward (another optimizer's step, a
    late construction): no layer's forward was seen, so none is blamed."""
    torch.manual_seed(0)
    model = Functional(False)
    data = batches(4)
    nn.functional.mse_loss(model(data[0][0]), data[0][1]).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = SINGD(model, lr=0.01, T=1)
        opt.step()
        run(model, opt, data[1:])
    assert set(opt.layers) == {"proj", "head"} and not opt.fallback_parameters
    assert not [w for w in caught if "has not run" in str(w.message)]


class Heads(nn.Module):
    """A trunk and several heads used in turns, all under a weight penalty."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 6)
        self.heads = nn.ModuleList(nn.Linear(6, 3) for _ in range(heads))
        self.turn = 0

    def forward(self, x):
        head = self.heads[self.turn % len(self.heads)]
        self.turn += 1
        return head(torch.tanh(self.trunk(x)))


def test_heads_used_in_turns_under_a_weight_penalty_stay_preconditioned() -> None:
    """A head whose forward skips the first steps while the penalty gives its weight a
    gradient is not handed over before its turn comes."""
    torch.manual_seed(0)
    model = Heads(base.HAND_OVER_AFTER)
    opt = SINGD(model, lr=0.01, T=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(model, opt, batches(2 * base.HAND_OVER_AFTER), penalty=1e-3)
    assert not [w for w in caught if "has not run" in str(w.message)]
    assert len(opt.layers) == 1 + base.HAND_OVER_AFTER and not opt.fallback_parameters


def _factors_of(opt, name: str) -> list[torch.Tensor]:
    factors = opt.layers[name].factors()
    return [factors[n].to_dense() for n in sorted(factors) if factors[n] is not None]


@pytest.mark.parametrize("impl", [SINGD, KFAC])
@pytest.mark.parametrize(("heads", "T", "idle"), [(2, 2, {1}), (4, 2, {1, 3}), (3, 2, set())])
def test_a_layer_whose_forward_misses_every_factor_update_is_reported(impl, heads, T, idle):
    """Heads used in turns: with two heads and T=2 the second one's forward runs only
    in odd steps, so no statistic ever reaches its factors and it has no gradient in
    the factor-update steps (the hand-over check never sees it). At its
    ``HAND_OVER_AFTER * T``-th such step one warning names it, and only it; its
    factors are still the initial ones. With three heads each one's turn falls on a
    factor-update step: no warning, every head's factors moved."""
    torch.manual_seed(0)
    model = Heads(heads)
    opt = impl(model, lr=0.01, T=T)
    initial = {name: _factors_of(opt, name) for name in opt.layers}
    warned_at = {}
    for t, batch in enumerate(batches(12 * T * heads)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(model, opt, [batch])
        for w in caught:
            assert "steps between factor updates" in str(w.message), str(w.message)
            warned_at[str(w.message).split("'")[1]] = (t, str(w.message))
    assert {name for name in warned_at} == {f"heads.{i}" for i in idle}
    for name, (t, message) in warned_at.items():
        uses = [s for s in range(t + 1) if s % heads == int(name[-1])]
        assert len(uses) == base.HAND_OVER_AFTER * T and t == uses[-1], (name, t)
        assert f"in {base.HAND_OVER_AFTER * T} steps" in message and f"T={T}" in message
    for name in opt.layers:
        now = _factors_of(opt, name)
        moved = [not torch.equal(a, b) for a, b in zip(now, initial[name], strict=True)]
        assert (not any(moved)) if name in warned_at else all(moved), (name, moved)


def _idle_warnings(model, opt, data, start: int = 0, nan_at=()) -> list[int]:
    """Steps at which the never-updated warning came; at the steps ``nan_at`` a
    non-finite batch through ``heads.1`` is stepped first (skipped by
    ``on_nonfinite="skip"``)."""
    steps = []
    for t, (x, y) in enumerate(data, start):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if t in nan_at:
                turn, model.turn = model.turn, 1
                opt.zero_grad()
                (float("nan") * nn.functional.mse_loss(model(x), y)).backward()
                opt.step()
                model.turn = turn
            run(model, opt, [(x, y)])
        steps += [t for w in caught if "between factor updates" in str(w.message)]
    return steps


def test_the_never_updated_warning_is_said_once_across_a_checkpoint() -> None:
    """Resumed after the warning, a fresh optimizer does not say it again (the count
    and the warned flag are saved); resumed before it, it warns at the same step as
    the uninterrupted run."""
    data = batches(40)
    warned = {}
    for cut in (25, 12, None):
        torch.manual_seed(0)
        model = Heads(2)
        opt = SINGD(model, lr=0.01, T=2)
        steps = _idle_warnings(model, opt, data[: cut or len(data)])
        if cut is not None:
            state = torch.load(io.BytesIO(snapshot(model, opt)), weights_only=True)
            model = Heads(2)
            model.load_state_dict(state["model"])
            model.turn = cut
            opt = SINGD(model, lr=0.01, T=2)
            opt.load_state_dict(state["opt"])
            steps += _idle_warnings(model, opt, data[cut:], start=cut)
        warned[cut] = steps
    assert warned[None] == warned[25] == warned[12] == [2 * base.HAND_OVER_AFTER * 2 - 1]


def test_skipped_steps_neither_count_nor_update_for_the_warning() -> None:
    """``on_nonfinite="skip"``: a skipped step is not counted between factor updates,
    and a skipped factor-update step through the idle head does not mark its factors
    as updated (they are not): it is still warned about, at the same step."""
    data = batches(40)
    torch.manual_seed(0)
    model = Heads(2)
    opt = SINGD(model, lr=0.01, T=2, on_nonfinite="skip")
    clean = _idle_warnings(model, opt, data)
    for nan_at in ({3, 5, 7, 9, 11}, {2}):  # idle steps of heads.1; a factor-update step
        torch.manual_seed(0)
        model = Heads(2)
        opt = SINGD(model, lr=0.01, T=2, on_nonfinite="skip")
        steps = _idle_warnings(model, opt, data, nan_at=nan_at)
        assert opt.skipped_steps == len(nan_at)
        assert steps == clean == [2 * base.HAND_OVER_AFTER * 2 - 1], (nan_at, steps)
        assert not opt.layers["heads.1"].updated


def test_a_lost_output_gradient_is_not_also_reported_as_never_updated(monkeypatch) -> None:
    """A layer already warned of a lost output gradient (its forward runs every step)
    is not warned a second time as one whose forward misses the factor updates."""
    monkeypatch.setattr(base, "_whole_view", lambda view, root: False)
    kw = dict(HYPER, T=2, structures=("dense", "dense"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(SINGD, "relu_", steps=12 * 2, **kw)
    messages = [str(w.message) for w in caught]
    assert sum("never reached the optimizer" in m for m in messages) == 1
    assert not [m for m in messages if "between factor updates" in m]


def test_a_handed_over_layer_stays_with_the_fallback_after_a_checkpoint() -> None:
    """Resume after the hand-over: a fresh optimizer takes the fallback's state for
    those parameters and goes on bit for bit as the uninterrupted one."""
    data = batches(2 * base.HAND_OVER_AFTER + 6)
    cut = 2 * base.HAND_OVER_AFTER + 1  # after the hand-over (T=2)
    torch.manual_seed(0)
    model = Functional(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = SINGD(model, lr=0.01, T=2)
        run(model, opt, data[:cut])
        assert "proj" not in opt.layers
        saved = snapshot(model, opt)
        run(model, opt, data[cut:])
        resumed, opt2, state = restore(saved, T=2)
        assert "proj" in opt2.layers
        opt2.load_state_dict(state)
        assert "proj" not in opt2.layers and "proj.weight" in opt2.fallback_parameters
        run(resumed, opt2, data[cut:])
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_checkpoint_from_before_the_hand_over_loads_into_the_same_optimizer() -> None:
    """Rolling back to an earlier snapshot in the same process precondition the layer
    again: the run then goes on bit for bit as a fresh optimizer loading that snapshot."""
    data = batches(base.HAND_OVER_AFTER + 4)
    torch.manual_seed(0)
    model = Functional(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = SINGD(model, lr=0.01, T=1)
        run(model, opt, data[:1])
        saved = snapshot(model, opt)
        run(model, opt, data[1 : base.HAND_OVER_AFTER + 1])
        assert "proj" not in opt.layers
        # loaded twice: a loaded state is used in place
        state = torch.load(io.BytesIO(saved), weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        assert list(opt.layers) == ["proj", "head"] and not opt.fallback_parameters
        fresh, opt2, state = restore(saved, T=1)
        opt2.load_state_dict(state)
        run(model, opt, data[1:])
        run(fresh, opt2, data[1:])
    assert "proj" not in opt.layers and "proj" not in opt2.layers  # handed over again
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


class Padded(nn.Conv2d):
    """Pads in its own forward, as timm's ``Conv2dSame`` does (module padding 0)."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))


class Tagged(nn.Linear):
    """A subclass that keeps ``nn.Linear.forward``."""


def test_a_subclass_that_overrides_forward_goes_to_the_fallback() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Padded(2, 3, 3), nn.Flatten(), Tagged(3 * 4 * 4, 5), nn.Linear(5, 2))
    with pytest.warns(UserWarning, match=r"'0' \(Padded overrides Conv2d.forward\)"):
        opt = SINGD(model, lr=0.01, T=1)
    assert set(opt.layers) == {"2", "3"}
    assert set(opt.fallback_parameters) == {"0.weight", "0.bias"}
    x = torch.randn(4, 2, 4, 4)
    before = model[0].weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    assert not torch.equal(before, model[0].weight)  # trained by the fallback rule
    # a subclass with its base's name is told apart by module
    Same = type("Linear", (nn.Linear,), {"forward": lambda self, x: nn.Linear.forward(self, x)})
    with pytest.warns(UserWarning, match=r"'0' \(.*test_observation_gaps\.Linear overrides "):
        SINGD(nn.Sequential(Same(2, 2)), lr=0.01)
    # registered for the subclass itself, it is preconditioned (the user vouches for it)
    from torchsingd import register_layer, unregister_layer
    from torchsingd.layers import ConvAdapter

    register_layer(Padded, ConvAdapter())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing left to the fallback, nothing said
            opt = SINGD(model, lr=0.01, T=1)
        assert set(opt.layers) == {"0", "2", "3"}
    finally:
        unregister_layer(Padded)


def test_stale_gradients_are_not_reported() -> None:
    """``step()`` again on the same gradients (no forward in that step): the module's
    forward ran before, so its weight is not used outside it; nothing is reported."""
    torch.manual_seed(0)
    model = Functional(False)
    opt = SINGD(model, lr=0.01, T=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nn.functional.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 3)).backward()
        opt.step()
        opt.step()
    assert opt.steps == 2
    assert not [w for w in caught if "has not run" in str(w.message)]


def test_a_failed_load_leaves_the_layers_as_they_were() -> None:
    torch.manual_seed(0)
    model = Functional(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = SINGD(model, lr=0.01, T=1)
        run(model, opt, batches(base.HAND_OVER_AFTER))
        assert "proj" not in opt.layers
        state = opt.state_dict()
        other = Functional(True)
        other.head = nn.Linear(6, 5)  # another model: the head's factors do not fit
        opt2 = SINGD(other, lr=0.01, T=1)
    with pytest.raises(ValueError):
        opt2.load_state_dict(state)
    assert set(opt2.layers) == {"proj", "head"} and not opt2.fallback_parameters


def test_a_lost_output_gradient_is_reported_when_zero_grad_comes_after_the_forward(
    monkeypatch,
) -> None:
    """forward -> zero_grad() -> backward -> step (a common order) loses nothing of the
    report: the forward's wait for its output gradient outlives zero_grad."""
    monkeypatch.setattr(base, "_whole_view", lambda view, root: False)
    torch.manual_seed(0)
    model = Net("relu_").double()
    opt = SINGD(model, lr=0.01, T=1)
    x = torch.randn(5, 7, 4, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            out = model(x)
            opt.zero_grad()
            out.square().mean().backward()
            opt.step()
    lost = [str(w.message) for w in caught if "never reached" in str(w.message)]
    assert len(lost) == 1 and "'fc1'" in lost[0], lost


def test_the_fallback_warning_counts_the_modules_by_type() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2), nn.LayerNorm(2))
    model.extra = nn.Parameter(torch.zeros(2))
    with pytest.warns(
        UserWarning, match=r"by type \(parameters\): Sequential \(1\), LayerNorm \(4\);"
    ):
        SINGD(model)


def test_a_checkpoint_inside_the_hand_over_window_resumes_bit_for_bit() -> None:
    """Saved after some of the HAND_OVER_AFTER steps were counted: the resumed run
    hands the layer over at the same step as the uninterrupted one."""
    data = batches(base.HAND_OVER_AFTER + 4)
    cut = base.HAND_OVER_AFTER - 2  # counted so far: HAND_OVER_AFTER - 2 (T=1)
    torch.manual_seed(0)
    model = Functional(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = SINGD(model, lr=0.01, T=1)
        run(model, opt, data[:cut])
        assert "proj" in opt.layers
        saved = snapshot(model, opt)
        run(model, opt, data[cut:])
        resumed, opt2, state = restore(saved, T=1)
        opt2.load_state_dict(state)
        run(resumed, opt2, data[cut:])
    assert "proj" not in opt.layers and "proj" not in opt2.layers
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_dormant_layer_handed_over_stays_with_the_fallback_after_a_checkpoint() -> None:
    """A layer frozen at construction, unfrozen (woken), then handed over (its weight is
    used outside its forward): a resumed optimizer in which it is frozen again takes
    the hand-over from the checkpoint (not woken anew once unfrozen) and goes on bit for
    bit as the uninterrupted one."""
    data = batches(2 * base.HAND_OVER_AFTER + 6)
    cut = 2 * base.HAND_OVER_AFTER + 1
    torch.manual_seed(0)
    model = Functional(True)
    model.proj.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = SINGD(model, params=model.parameters(), lr=0.01, T=1)
        assert set(opt._dormant) == {"proj"}
        model.proj.requires_grad_(True)
        run(model, opt, data[:cut])
        assert set(opt._demoted) == {"proj"} and "proj.weight" in opt.fallback_parameters
        saved = snapshot(model, opt)
        run(model, opt, data[cut:])

        state = torch.load(io.BytesIO(saved), weights_only=False)
        resumed = Functional(True)
        resumed.load_state_dict(state["model"])
        resumed.proj.requires_grad_(False)
        opt2 = SINGD(resumed, params=resumed.parameters(), lr=0.01, T=1)
        opt2.load_state_dict(state["opt"])
        assert set(opt2._demoted) == {"proj"} and not opt2._dormant
        resumed.proj.requires_grad_(True)
        run(resumed, opt2, data[cut:])
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
