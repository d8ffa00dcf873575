"""``torch.optim`` conventions around the optimizer's life cycle: hooks of a deleted
optimizer, ``add_param_group`` (failed, and with layers added to the model later),
parameters frozen after construction, ``zero_grad`` and captured statistics, gradient
scalers (``unscale_``, overflows under ``on_nonfinite="raise"``), pickling a model
with an optimizer attached, ``torch.compile`` wrappers and the fallback rule's
learning rate under an LR scheduler.

Oracles: the same training written another way (an optimizer built with the final
groups from the start, a run without the discarded backward pass, ``torch.optim.AdamW``
with the scheduled rate), compared bit for bit or to float64 rounding.
"""

from __future__ import annotations

import gc
import io
import warnings
import weakref

import pytest
import torch
from torch import nn

from tests.optim.test_singd_behaviour import (
    HP,
    assert_states_equal,
    batch,
    full_state,
    make_mlp,
    mse,
    train,
)
from torchsingd import KFAC, SINGD
from torchsingd.optim import NonFiniteError

HP1 = dict(HP, T=1, lr_cov=0.05, warn_unsupported=False)


def _forward_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# --------------------------------------------------------------- life cycle
@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_deleted_optimizer_is_collected_and_its_hooks_removed(cls):
    model = make_mlp(0)
    old = cls(model, warn_unsupported=False)
    assert _forward_hooks(model) == 2
    ref = weakref.ref(old)
    del old
    gc.collect()
    assert ref() is None
    assert _forward_hooks(model) == 0

    # a second optimizer on the same model ends where one on a fresh model ends
    opt = SINGD(model, **HP1)
    train(model, opt, 0, 4)
    model_ref = make_mlp(0)
    opt_ref = SINGD(model_ref, **HP1)
    train(model_ref, opt_ref, 0, 4)
    assert_states_equal(full_state(model_ref, opt_ref), full_state(model, opt))


def test_failed_add_param_group_leaves_the_optimizer_unchanged():
    model = make_mlp(0)
    opt = SINGD(model, params=list(model[0].parameters()), **HP1)
    with pytest.raises(ValueError, match=r"Invalid lr=-1"):
        opt.add_param_group({"params": list(model[2].parameters()), "lr": -1.0})
    assert len(opt.param_groups) == 1
    assert list(opt.layers) == ["0"] and opt.fallback_parameters == {}
    with pytest.raises(ValueError, match="one parameter group"):  # a layer split in two
        opt.add_param_group({"params": [model[2].weight]})
    assert len(opt.param_groups) == 1 and list(opt.layers) == ["0"]

    opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.01})
    assert list(opt.layers) == ["0", "2"]
    # equal to an optimizer built with both groups from the start
    model_ref = make_mlp(0)
    groups = [
        {"params": list(model_ref[0].parameters())},
        {"params": list(model_ref[2].parameters()), "lr": 0.01},
    ]
    opt_ref = SINGD(model_ref, params=groups, **HP1)
    train(model, opt, 0, 4)
    train(model_ref, opt_ref, 0, 4)
    assert_states_equal(full_state(model_ref, opt_ref), full_state(model, opt))


def test_layer_added_to_the_model_after_construction_is_preconditioned():
    model = make_mlp(0)
    opt = SINGD(model, **HP1)
    torch.manual_seed(5)
    model.append(nn.Tanh())
    model.append(nn.Linear(3, 2).double())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing falls back to AdamW
        opt.add_param_group({"params": list(model[4].parameters()), "lr": 0.02})
    assert list(opt.layers) == ["0", "2", "4"] and opt.fallback_parameters == {}

    model_ref = make_mlp(0)
    torch.manual_seed(5)
    model_ref.append(nn.Tanh())
    model_ref.append(nn.Linear(3, 2).double())
    groups = [
        {"params": [p for m in model_ref[:3] for p in m.parameters()]},
        {"params": list(model_ref[4].parameters()), "lr": 0.02},
    ]
    opt_ref = SINGD(model_ref, params=groups, **HP1)
    for t in range(4):
        for m, o in ((model, opt), (model_ref, opt_ref)):
            x, _ = batch(t)
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    assert_states_equal(full_state(model_ref, opt_ref), full_state(model, opt))


def test_layers_outside_the_optimizer_are_not_checked():
    """A sparse embedding trained by SparseAdam next to SINGD on the rest."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(10, 4, sparse=True), "head": nn.Linear(4, 3)})
    with pytest.raises(ValueError, match="sparse=True"):
        SINGD(model)  # the embedding is in the optimizer: refused with the reason
    opt = SINGD(model, params=model["head"].parameters(), **HP1)
    sparse = torch.optim.SparseAdam(model["emb"].parameters(), lr=0.1)
    assert list(opt.layers) == ["head"]
    emb, head = model["emb"].weight.detach().clone(), model["head"].weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        sparse.zero_grad()
        model["head"](model["emb"](torch.tensor([1, 2, 3]))).pow(2).sum().backward()
        opt.step()
        sparse.step()
    assert not torch.equal(emb[1], model["emb"].weight[1])
    assert torch.equal(emb[5], model["emb"].weight[5])
    assert not torch.equal(head, model["head"].weight)


@pytest.mark.parametrize("frozen", ["bias", "weight"])
def test_freezing_after_construction_is_refused_with_the_layer_named(frozen):
    model = make_mlp(0)
    opt = SINGD(model, **HP1)
    train(model, opt, 0, 2)
    getattr(model[2], frozen).requires_grad_(False)
    before = full_state(model, opt)
    x, y = batch(2)
    opt.zero_grad()
    with pytest.raises(ValueError, match=r"layer '2' changed after SINGD was constructed"):
        mse(model(x), y).backward()  # refused in the forward pass of a capture step
    assert_states_equal(before, full_state(model, opt))

    model = make_mlp(0)
    opt = SINGD(model, **dict(HP1, T=3))
    train(model, opt, 0, 1)
    getattr(model[2], frozen).requires_grad_(False)
    x, y = batch(1)
    mse(model(x), y).backward()  # step 1: nothing captured
    with pytest.raises(ValueError, match=r"now \[.*\] require gradients"):
        opt.step()


def test_zero_grad_drops_the_statistics_of_discarded_backward_passes():
    model_ref = make_mlp(0)
    opt_ref = SINGD(model_ref, **HP1)
    train(model_ref, opt_ref, 0, 3)

    model = make_mlp(0)
    opt = SINGD(model, **HP1)
    for t in range(3):
        x, y = batch(t)
        mse(model(2.0 * x), y).backward()  # a probe whose gradients are thrown away
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    assert_states_equal(full_state(model_ref, opt_ref), full_state(model, opt))


# ------------------------------------------------------------- grad scalers
def test_unscale_without_set_current_grad_scale_is_refused():
    model = make_mlp(0)
    opt = SINGD(model, init_grad_scale=2.0**6, **HP1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    x, y = batch(0)
    before = full_state(model, opt)
    scaler.scale(mse(model(x), y)).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="set_current_grad_scale"):
        scaler.step(opt)
    assert_states_equal(before, full_state(model, opt))
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    opt.step()  # no stale scaler attributes: a plain step works
    assert opt.steps == 1


@pytest.mark.parametrize("value", [0.0, -4.0, float("nan"), float("inf"), True, "2"])
def test_set_current_grad_scale_validates(value):
    opt = SINGD(make_mlp(0), **HP1)
    with pytest.raises(ValueError, match="grad_scale"):
        opt.set_current_grad_scale(value)


def test_scaler_overflow_is_skipped_even_with_on_nonfinite_raise():
    model = make_mlp(0, torch.float32)
    opt = SINGD(model, init_grad_scale=2.0**127, on_nonfinite="raise", **HP1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    before = full_state(model, opt)
    x, y = batch(0, dtype=torch.float32)
    scaler.scale(1e6 * mse(model(x), y)).backward()
    with pytest.warns(UserWarning, match="skipped"):
        scaler.step(opt)
    scaler.update()
    assert_states_equal(before, full_state(model, opt))
    assert (opt.steps, opt.skipped_steps) == (1, 1)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    # a non-finite gradient the scaler did not report still raises
    opt.zero_grad()
    mse(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        opt.step()


# --------------------------------------------------------------- the model
def test_model_with_an_attached_optimizer_pickles():
    model = make_mlp(0)
    opt = SINGD(model, **HP1)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x, y = batch(0)
    mse(loaded(x), y).backward()  # the loaded model is not observed
    assert all(layer.pending is None for layer in opt.layers.values())
    for a, b in zip(loaded.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    # the original is still observed and trains as without the pickling
    model_ref = make_mlp(0)
    opt_ref = SINGD(model_ref, **HP1)
    train(model, opt, 0, 3)
    train(model_ref, opt_ref, 0, 3)
    assert_states_equal(full_state(model_ref, opt_ref), full_state(model, opt))


def test_compiled_model_is_unwrapped():
    model = make_mlp(0)
    compiled = torch.compile(model)  # nothing is compiled before a forward pass
    opt = SINGD(compiled, **HP1)
    assert list(opt.layers) == ["0", "2"]
    assert opt.state_dict()["kronecker"]["layers"].keys() == {"0", "2"}


def test_fixed_fallback_lr_follows_an_lr_scheduler():
    """``fallback_lr`` times the scheduler's factor ``lr / initial_lr``: AdamW's steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)).double()
    ln = model[1]
    ref_ln = nn.LayerNorm(3).double()
    ref_ln.load_state_dict(ln.state_dict())
    opt = SINGD(model, fallback_lr=0.03, **dict(HP1, lr=0.1, weight_decay=0.01))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
    ref = torch.optim.AdamW(ref_ln.parameters(), lr=0.03, weight_decay=0.01, eps=1e-8)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda t: 0.5**t)
    for t in range(4):
        x, _ = batch(t, shape=(8, 4))
        opt.zero_grad()
        ref.zero_grad()
        h = model[0](x)
        model[1](h).pow(3).sum().backward()
        ref_ln(h.detach()).pow(3).sum().backward()
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
    for a, b in zip(ln.parameters(), ref_ln.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
