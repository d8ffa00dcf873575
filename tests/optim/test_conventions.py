"""``torch.optim`` conventions around the optimizer's life cycle: hooks of a deleted
optimizer, ``add_param_group`` (failed, and with layers added to the model later),
parameters frozen after construction, ``zero_grad`` and captured statistics, gradient
scalers (``unscale_``, overflows under ``on_nonfinite="raise"``), pickling a model
with an optimizer attached, ``torch.compile`` wrappers and parametrized modules.

Oracles: the same training written another way (an optimizer built with the final
groups from the start, a run without the discarded backward pass), compared bit for
bit.
"""

from __future__ import annotations

import contextlib
import copy
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


def _through_bytes(obj):
    """``obj`` after ``torch.save`` and ``torch.load`` (a checkpoint on disk)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _train_both_equal(pair, pair_ref, start: int, stop: int) -> None:
    """Train two ``(model, optimizer)`` pairs over the same steps: bit-identical states."""
    for model, opt in (pair, pair_ref):
        train(model, opt, start, stop)
    assert_states_equal(full_state(*pair_ref), full_state(*pair))


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
    model_ref = make_mlp(0)
    _train_both_equal((model, opt), (model_ref, SINGD(model_ref, **HP1)), 0, 4)


def test_failed_add_param_group_leaves_the_optimizer_unchanged():
    model = make_mlp(0)
    opt = SINGD(model, params=list(model[0].parameters()), **HP1)
    with pytest.raises(ValueError, match=r"Invalid lr=-1"):
        opt.add_param_group({"params": list(model[2].parameters()), "lr": -1.0})
    assert len(opt.param_groups) == 1
    assert list(opt.layers) == ["0"] and opt.fallback_parameters == {}

    opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.01})
    assert list(opt.layers) == ["0", "2"]
    # equal to an optimizer built with both groups from the start
    model_ref = make_mlp(0)
    groups = [
        {"params": list(model_ref[0].parameters())},
        {"params": list(model_ref[2].parameters()), "lr": 0.01},
    ]
    _train_both_equal((model, opt), (model_ref, SINGD(model_ref, params=groups, **HP1)), 0, 4)


def test_a_layer_added_in_two_add_param_group_calls():
    """A layer's weight and bias added by two calls in groups that differ in
    weight_decay (decay / no-decay of a new head): the weight waits for the bias
    (``step()`` refuses meanwhile, changing nothing); a bias group differing in a
    factor option is refused and the weight still waits. Oracle: the optimizer built
    with the three groups from the start, bit for bit."""
    model = make_mlp(0)
    opt = SINGD(model, params=list(model[0].parameters()), **HP1)
    opt.add_param_group({"params": [model[2].weight], "weight_decay": 0.01})
    assert list(opt.layers) == ["0"] and opt.fallback_parameters == {}
    before = full_state(model, opt)
    x, y = batch(0)
    mse(model(x), y).backward()
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(0.0)  # (GradScaler's)
    with pytest.raises(ValueError, match=r"in part by add_param_group .*'2' lacks \['2.bias'\]"):
        opt.step()
    assert_states_equal(before, full_state(model, opt))
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    with pytest.raises(ValueError, match=r"'2' \(groups \[1, 2\]: lr differ\)"):
        opt.add_param_group({"params": [model[2].bias], "weight_decay": 0.0, "lr": 0.5})
    assert len(opt.param_groups) == 2 and list(opt.layers) == ["0"]
    with pytest.raises(ValueError, match=r"'2' lacks \['2.bias'\]"):
        opt.step()
    # (torch.optim's load_state_dict adds "differentiable" to the defaults, so to the
    # next group only: no option the layer's groups may differ in)
    opt.load_state_dict(_through_bytes(opt.state_dict()))
    opt.add_param_group({"params": [model[2].bias], "weight_decay": 0.0})
    assert list(opt.layers) == ["0", "2"] and opt.fallback_parameters == {}

    model_ref = make_mlp(0)
    groups = [
        {"params": list(model_ref[0].parameters())},
        {"params": [model_ref[2].weight], "weight_decay": 0.01},
        {"params": [model_ref[2].bias], "weight_decay": 0.0},
    ]
    _train_both_equal((model, opt), (model_ref, SINGD(model_ref, params=groups, **HP1)), 0, 4)


def test_a_layer_added_in_parts_to_groups_that_differ_is_refused_naming_the_option():
    """An attention layer (four parameters) added in parts: a part in a group that
    differs in a factor option is refused with the option named, though the layer is
    still incomplete; the rest then comes in."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"lin": nn.Linear(4, 4), "att": nn.MultiheadAttention(4, 2)})
    opt = SINGD(model, params=list(model["lin"].parameters()), **HP1)
    att = model["att"]
    opt.add_param_group({"params": [att.in_proj_weight]})
    refused = r"'att' \(groups \[1, 2\] and not in the optimizer: lr_cov differ\)"
    with pytest.raises(ValueError, match=refused):
        opt.add_param_group({"params": [att.in_proj_bias], "lr_cov": 0.5})
    opt.add_param_group({"params": [att.in_proj_bias], "weight_decay": 0.0})
    opt.add_param_group({"params": list(att.out_proj.parameters())})
    assert list(opt.layers) == ["lin", "att.q", "att.k", "att.v", "att.out"]
    assert opt.fallback_parameters == {}


def test_a_frozen_layer_added_in_two_calls_waits_to_be_preconditioned():
    """Frozen whole and added in two calls: dormant once complete (not the fallback's
    for good), preconditioned after it is unfrozen."""
    model = make_mlp(0)
    model[2].requires_grad_(False)
    opt = SINGD(model, params=list(model[0].parameters()), **HP1)
    opt.add_param_group({"params": [model[2].weight]})
    with pytest.raises(ValueError, match=r"'2' lacks \['2.bias'\]"):
        opt.step()
    opt.add_param_group({"params": [model[2].bias], "weight_decay": 0.0})
    assert opt.dormant_layers == {"2": ["2.weight", "2.bias"]}
    model[2].requires_grad_(True)
    train(model, opt, 0, 2)
    assert list(opt.layers) == ["0", "2"] and opt.dormant_layers == {}


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


class _Lookup(nn.Module):
    """An embedding of a type no adapter knows (trained by the fallback rule), with
    dense gradients."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())

    def forward(self, x):
        return nn.functional.embedding(x, self.weight)


@pytest.mark.parametrize("fallback", ["adamw", "sgd"])
def test_the_fallback_trains_a_sparse_embedding_as_its_dense_twin(fallback):
    """A sparse embedding frozen at construction cannot be preconditioned once
    unfrozen, so the fallback trains it: the sparse gradient (rows repeated in the
    batch) is taken as the dense one. Oracle: the same weights under a layer type with
    dense gradients that the fallback trains too (float64, the same steps)."""
    torch.manual_seed(0)
    emb = nn.Embedding(12, 4, sparse=True).double()
    models = [
        nn.Sequential(e, nn.Flatten(), nn.Linear(12, 3).double())
        for e in (emb, _Lookup(emb.weight))
    ]
    models[1][2].load_state_dict(models[0][2].state_dict())
    start, opts = emb.weight.detach().clone(), []
    for model in models:
        model[0].weight.requires_grad_(False)
        opts.append(SINGD(model, params=model.parameters(), fallback=fallback, **HP1))
        model[0].weight.requires_grad_(True)
    for t in range(3):
        x = torch.randint(0, 12, (5, 3), generator=torch.Generator().manual_seed(t))
        for model, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    assert models[0][0].weight.grad.is_sparse
    assert opts[0].fallback_parameters == opts[1].fallback_parameters == {"0.weight": fallback}
    assert not torch.equal(models[0][0].weight, start)
    got, want = full_state(models[0], opts[0]), full_state(models[1], opts[1])
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-15)
    state = opts[0].state[models[0][0].weight]
    for key, value in state.items():  # the fallback's moments are dense, like the weight
        if isinstance(value, torch.Tensor) and value.dim():
            assert value.layout == torch.strided and value.shape == (12, 4), key


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_a_learning_rate_given_in_place_of_params_is_named(cls):
    """``cls(model, 1e-3)`` (``torch.optim``'s ``SGD(params, 0.1)`` habit): the number
    lands in ``params``; the error says so instead of "'float' is not iterable"."""
    with pytest.raises(TypeError, match=rf"got 0.001: .* {cls.__name__}\(model, lr=0.001\)"):
        cls(make_mlp(0), 1e-3)


class _SparseLinear(nn.Module):
    """A sparse COO weight (its gradient is sparse too): trained by the fallback rule."""

    def __init__(self):
        super().__init__()
        index = torch.tensor([[0, 1, 2, 2, 4], [0, 3, 1, 2, 4]])
        values = torch.randn(5, dtype=torch.float64)
        self.W = nn.Parameter(torch.sparse_coo_tensor(index, values, (5, 5)).coalesce())

    def forward(self, x):
        return torch.sparse.mm(self.W, x.T).T


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_the_sgd_fallback_keeps_a_sparse_parameter_sparse(cls):
    """A sparse parameter's sparse gradient is not made dense (adding a dense step to a
    sparse parameter fails): the fallback's SGD step equals torch.optim.SGD's."""
    torch.manual_seed(0)
    model = nn.Sequential(_SparseLinear(), nn.Linear(5, 2).double())
    W = model[0].W
    shadow = nn.Parameter(W.detach().clone())
    opt = cls(model, lr=0.01, fallback="sgd", momentum=0.9, weight_decay=0.0, T=1)
    ref = torch.optim.SGD([shadow], lr=0.01, momentum=0.9)
    for t in range(3):
        x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        assert W.grad.layout == torch.sparse_coo
        shadow.grad = W.grad.clone()
        opt.step()
        ref.step()
    assert W.layout == torch.sparse_coo
    buffer = opt.state[W]["momentum_buffer"]  # counted by its indices and values
    assert opt.state_bytes() >= buffer._indices().nbytes + buffer._values().nbytes
    # a NaN gradient elsewhere skips the step (the finiteness check reads sparse values)
    opt.zero_grad()
    model(torch.randn(3, 5, dtype=torch.float64)).pow(2).sum().backward()
    model[1].bias.grad[0] = float("nan")
    before = W.detach().clone()
    with pytest.warns(UserWarning, match="skipped a step"):
        opt.step()
    assert opt.skipped_steps == 1 and torch.equal(W.detach().to_dense(), before.to_dense())
    torch.testing.assert_close(
        W.detach().to_dense(), shadow.detach().to_dense(), rtol=1e-14, atol=0
    )


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_a_sparse_parameter_with_the_adamw_fallback_is_refused(cls):
    """AdamW cannot train a sparse tensor: said at construction (and at a step, if the
    group's fallback is changed to it), naming the parameter and the way out."""
    model = nn.Sequential(_SparseLinear(), nn.Linear(5, 2).double())
    with pytest.raises(ValueError, match=r"'0.W' is sparse .* fallback='sgd'"):
        cls(model, lr=0.01)
    opt = cls(model, lr=0.01, fallback="sgd")
    opt.param_groups[0]["fallback"] = "adamw"
    model(torch.randn(3, 5, dtype=torch.float64)).pow(2).sum().backward()
    before = model[1].weight.detach().clone()
    with pytest.raises(ValueError, match=r"'0.W' is sparse"):
        opt.step()
    assert torch.equal(before, model[1].weight)  # (nothing written)


@pytest.mark.parametrize("frozen", ["bias", "weight"])
def test_freezing_part_of_a_layer_after_construction_is_refused(frozen):
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


@pytest.mark.parametrize("bias", [True, False])
def test_a_layer_frozen_whole_after_construction_pauses(bias):
    """Frozen: neither captured nor updated (weights and factors bit-identical);
    unfrozen: trained again; the other layer trains throughout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=bias), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = SINGD(model, **HP1)
    train(model, opt, 0, 2)
    model[0].requires_grad_(False)
    frozen = full_state(model, opt)
    train(model, opt, 2, 4)
    now = full_state(model, opt)
    for key in frozen:
        same = torch.equal(frozen[key], now[key])
        assert same == (key.startswith(("param.0.", "0.", "buffer.0.")) or ".0." in key), key
    assert opt.layers["0"].pending is None
    model[0].requires_grad_(True)
    train(model, opt, 4, 5)
    assert not torch.equal(now["param.0.weight"], model[0].weight)
    assert not torch.equal(now["0.K.0"], opt.layers["0"].K.tensors()[0])


def _frozen_hp(cls, **options):
    hp = dict(HP1, damping=0.1, **options)
    if cls is KFAC:
        hp = {k: v for k, v in hp.items() if k not in ("alpha1", "weight_decay")}
    return hp


def _frozen_mlp(cls, T: int = 2):
    """``make_mlp(0)`` frozen whole, with an optimizer given all of its parameters."""
    model = make_mlp(0)
    model.requires_grad_(False)
    return model, cls(model, params=model.parameters(), **_frozen_hp(cls, T=T))


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_a_layer_frozen_at_construction_is_preconditioned_once_unfrozen(cls):
    """Layers given in params while frozen whole get no factors; unfrozen, they wait
    (unchanged: no fallback step at the preconditioned lr) for the next factor-update
    step, from which they are preconditioned exactly as by an optimizer constructed at
    that point (oracle: such an optimizer on a copy of the model, bit for bit)."""
    model, opt = _frozen_mlp(cls, T=2)
    assert opt.layers == {} and opt.state_bytes() == 0
    assert opt.dormant_layers == {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}
    for _ in range(2):
        opt.step()  # nothing to train: no gradient, so it does not count
    assert opt.steps == 0
    model.requires_grad_(True)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 2, 3)  # step 0: the next one (1) updates no factors
    assert opt.layers == {} and len(opt.fallback_parameters) == 4
    train(model, opt, 3, 4)  # step 2 updates factors: preconditioned from there
    assert list(opt.layers) == ["0", "2"] and opt.fallback_parameters == {}
    assert opt.dormant_layers == {}
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert opt.state_dict()["state"] == {} and opt.steps == 2

    copy_ = copy.deepcopy(model)
    fresh = cls(copy_, **_frozen_hp(cls, T=2))
    train(model, opt, 4, 9)
    train(copy_, fresh, 4, 9)
    assert_states_equal(_weights_and_state(copy_, fresh), _weights_and_state(model, opt))


def test_a_layer_unfrozen_in_part_stays_with_the_fallback_until_whole():
    """Unfreezing only a bias (BitFit) leaves the layer with the fallback rule (said
    once); once its weight follows, it is preconditioned from the next factor-update
    step on."""
    model, opt = _frozen_mlp(SINGD, T=1)
    model[0].bias.requires_grad_(True)
    model[2].requires_grad_(True)
    with pytest.warns(
        UserWarning, match=r"\['0'\].* in part: until their weights \['0.weight'\] require"
    ):
        train(model, opt, 0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, opt, 1, 3)
    assert list(opt.layers) == ["2"]
    assert set(opt.fallback_parameters) == {"0.weight", "0.bias"}
    assert "step" in opt.state[model[0].bias] and model[0].weight not in opt.state
    model[0].weight.requires_grad_(True)
    train(model, opt, 3, 4)  # trained by the fallback; woken at the end
    assert list(opt.layers) == ["0", "2"] and opt.fallback_parameters == {}
    K = opt.layers["0"].K.tensors()[0].clone()
    train(model, opt, 4, 5)
    assert opt.layers["0"].K.tensors()[0].shape == (7, 7)  # the bias column included
    assert not torch.equal(K, opt.layers["0"].K.tensors()[0])


def test_a_layer_that_cannot_be_preconditioned_stays_with_the_fallback():
    """KFAC refuses half-precision factors: a bfloat16 layer given frozen is not made to
    wait (the construction warning says it is never preconditioned) and the fallback
    trains it as soon as it is unfrozen. A layer that can no longer be preconditioned
    when it wakes (its groups' T made to differ since) goes to the fallback rule then,
    with one warning; it was left unchanged until then."""
    model = make_mlp(0).to(torch.bfloat16)
    model.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"could not precondition once unfrozen: \['0', '2'\]"):
        opt = KFAC(model, params=model.parameters(), T=1, lr=0.01)
    assert opt._dormant == {}
    model.requires_grad_(True)
    before = model[0].weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, opt, 0, 1, dtype=torch.bfloat16)
    assert not torch.equal(before, model[0].weight)  # (trained by the fallback)

    model = make_mlp(0)
    model.requires_grad_(False)
    weights = [model[0].weight, model[2].weight]
    biases = [model[0].bias, model[2].bias]
    opt = SINGD(model, params=[{"params": weights}, {"params": biases}], **_frozen_hp(SINGD, T=2))
    assert set(opt._dormant) == {"0", "2"}
    opt.param_groups[1]["T"] = 4
    model.requires_grad_(True)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 0, 1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    with pytest.warns(UserWarning, match=r"trains them from now on: '0' \(.*T differ"):
        train(model, opt, 1, 2)
    assert opt.layers == {} and len(opt.fallback_parameters) == 4 and not opt._dormant
    train(model, opt, 2, 3)
    assert not any(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_a_layer_unfrozen_without_its_bias_is_preconditioned_without_it():
    """Unfreezing only the weight: preconditioned from the next factor-update step on
    its weight alone, exactly as an optimizer constructed then with the bias frozen
    (bit for bit); the bias stays with the fallback rule (frozen)."""
    model, opt = _frozen_mlp(SINGD, T=2)
    for layer in (model[0], model[2]):
        layer.weight.requires_grad_(True)
    train(model, opt, 0, 2)
    assert list(opt.layers) == ["0", "2"] and opt.layers["0"].K.dim == 6  # (no bias column)
    assert set(opt.fallback_parameters) == {"0.bias", "2.bias"}
    copy_ = copy.deepcopy(model)
    fresh = SINGD(copy_, params=copy_.parameters(), **_frozen_hp(SINGD, T=2))
    train(model, opt, 2, 7)
    train(copy_, fresh, 2, 7)
    assert_states_equal(_weights_and_state(copy_, fresh), _weights_and_state(model, opt))
    assert torch.equal(model[0].bias, copy.deepcopy(make_mlp(0))[0].bias)

    resumed_model = copy.deepcopy(model)  # resuming with the model frozen whole again
    resumed_model.requires_grad_(False)
    resumed = SINGD(resumed_model, params=resumed_model.parameters(), **_frozen_hp(SINGD, T=2))
    resumed.load_state_dict(_through_bytes(opt.state_dict()))
    assert resumed.layers["0"].K.dim == 6  # (made for what the saved factors covered)
    for layer in (resumed_model[0], resumed_model[2]):
        layer.weight.requires_grad_(True)
    train(model, opt, 7, 9)
    train(resumed_model, resumed, 7, 9)
    assert_states_equal(full_state(model, opt), full_state(resumed_model, resumed))


def test_which_frozen_layers_wait_to_be_preconditioned():
    """Only a layer that could be preconditioned once unfrozen waits for it: not one
    whose bias is not in the optimizer, not one whose weight is tied to a module frozen
    only in part (GPT-style head sharing the embedding, with its own trainable bias),
    not a BitFit layer (frozen weight, trainable bias) frozen whole later, while
    a MultiheadAttention waits for its projections only (bias_k, bias_v are the
    fallback's)."""
    model = make_mlp(0)
    model.requires_grad_(False)
    given = [p for n, p in model.named_parameters() if n != "0.bias"]
    assert set(SINGD(model, params=given, **HP1)._dormant) == {"2"}

    tied = nn.ModuleDict({"emb": nn.Embedding(10, 4), "head": nn.Linear(4, 10)}).double()
    tied["head"].weight = tied["emb"].weight
    tied["emb"].requires_grad_(False)  # (freezes the shared weight; the head's bias trains)
    opt = SINGD(tied, params=tied.parameters(), **HP1)
    assert opt._dormant == {} and opt.layers == {}

    model = make_mlp(0)
    model[0].weight.requires_grad_(False)
    opt = SINGD(model, **HP1)  # (params=None: the frozen weight is left out)
    train(model, opt, 0, 1)
    model[0].requires_grad_(False)
    model[0].weight.requires_grad_(True)
    opt.add_param_group({"params": [model[0].weight]})
    assert opt._dormant == {}
    model[0].requires_grad_(False)
    extra = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt.add_param_group({"params": [extra]})
    assert opt._dormant == {}  # (trained by the fallback before: its state stays there)

    attention = nn.MultiheadAttention(8, 2, add_bias_kv=True).double()
    attention.requires_grad_(False)
    opt = SINGD(attention, params=attention.parameters(), **HP1)
    assert set(opt._dormant) == {""}
    for name, p in attention.named_parameters():
        p.requires_grad_(name not in ("bias_k", "bias_v"))
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    for _ in range(2):
        opt.zero_grad()
        attention(x, x, x)[0].square().sum().backward()
        opt.step()
    built_trainable = SINGD(copy.deepcopy(attention), **HP1)
    assert opt._dormant == {} and set(opt.layers) == set(built_trainable.layers)
    assert set(opt.fallback_parameters) == {"bias_k", "bias_v"}


def test_an_attention_layer_unfrozen_in_part_waits_unchanged():
    """MultiheadAttention (as the recurrent layers) is preconditioned with all of its
    weights or none: with only in_proj unfrozen it waits, unchanged, said once; with
    all unfrozen it wakes."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2).double()
    attention.requires_grad_(False)
    opt = SINGD(attention, params=attention.parameters(), **HP1)
    attention.in_proj_weight.requires_grad_(True)
    before = attention.in_proj_weight.detach().clone()
    x = torch.randn(5, 3, 8, dtype=torch.float64)

    def steps(n):
        for _ in range(n):
            opt.zero_grad()
            attention(x, x, x)[0].square().sum().backward()
            opt.step()

    with pytest.warns(UserWarning, match=r"stay unchanged until that is unfrozen too: ''"):
        steps(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steps(2)
    assert set(opt._dormant) == {""} and torch.equal(before, attention.in_proj_weight)
    attention.requires_grad_(True)
    steps(2)
    assert opt._dormant == {} and set(opt.layers) == set(SINGD(attention, **HP1).layers)
    assert not torch.equal(before, attention.in_proj_weight)


def test_a_layer_made_to_wait_by_add_param_group_is_held_back_too():
    """One layer wakes, another comes in frozen through add_param_group (as many
    waiting as before): unfrozen, the newcomer is left unchanged until its wake too."""
    model = make_mlp(0, widths=(6, 8, 8, 3))
    model.requires_grad_(False)
    first = [p for i in (0, 2) for p in model[i].parameters()]
    opt = SINGD(model, params=first, **_frozen_hp(SINGD, T=2))
    assert set(opt._dormant) == {"0", "2"}
    model[0].requires_grad_(True)
    train(model, opt, 0, 2)
    assert set(opt.layers) == {"0"}
    model[2].bias.requires_grad_(True)  # (BitFit: the fallback trains it)
    with pytest.warns(UserWarning, match="unfrozen in part"):
        train(model, opt, 2, 4)
    opt.add_param_group({"params": list(model[4].parameters())})
    assert set(opt._dormant) == {"2", "4"}
    model[4].requires_grad_(True)
    before = model[4].weight.detach().clone()
    train(model, opt, 4, 5)
    assert torch.equal(before, model[4].weight)  # (held back, not the fallback's)
    train(model, opt, 5, 7)
    assert set(opt.layers) == {"0", "4"} and not torch.equal(before, model[4].weight)


def test_a_checkpoint_wakes_a_layer_frozen_in_the_loading_optimizer():
    """Resuming: the model frozen as at the start, a new optimizer, the checkpoint of a
    run that had unfrozen it: the layer is preconditioned with the saved factors and
    pauses until unfrozen; then the two runs go on bit for bit. A checkpoint that does
    not fit leaves the loading optimizer as it was (no layer woken, no hook left)."""
    model, opt = _frozen_mlp(SINGD, T=1)
    model.requires_grad_(True)
    train(model, opt, 0, 3)
    assert list(opt.layers) == ["0", "2"]
    saved = _through_bytes(opt.state_dict())

    copy_ = copy.deepcopy(model)
    copy_.requires_grad_(False)
    wrong = SINGD(copy_, params=copy_.parameters(), **dict(HP1, structures="diagonal"))
    hooks = _forward_hooks(copy_)
    with pytest.raises(ValueError):
        wrong.load_state_dict(saved)
    assert wrong.layers == {} and _forward_hooks(copy_) == hooks
    assert set(wrong._dormant) == {"0", "2"}
    wrong.remove_hooks()

    resumed = SINGD(copy_, params=copy_.parameters(), **_frozen_hp(SINGD))
    resumed.load_state_dict(saved)
    assert list(resumed.layers) == ["0", "2"] and resumed.fallback_parameters == {}
    resumed.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))]})
    assert list(resumed.fallback_parameters) == ["<parameter of shape (2,)>"]  # (no bias)
    copy_.requires_grad_(True)
    train(model, opt, 3, 6)
    train(copy_, resumed, 3, 6)
    assert_states_equal(full_state(model, opt), full_state(copy_, resumed))


def test_add_param_group_after_a_bias_only_start():
    """BitFit-like: weights frozen at construction (biases to the fallback rule), then
    unfrozen and added: the layers stay with the fallback rule, whose state they have."""
    model = make_mlp(0)
    for m in (model[0], model[2]):
        m.weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="fallback"):
        opt = SINGD(model, **dict(HP1, warn_unsupported=True))
    train(model, opt, 0, 2)
    for m in (model[0], model[2]):
        m.weight.requires_grad_(True)
    with pytest.warns(UserWarning, match="0.weight"):
        opt.add_param_group({"params": [model[0].weight, model[2].weight]})
    assert opt.layers == {} and set(opt.fallback_parameters) == {
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
    }
    train(model, opt, 2, 3)
    assert opt.state[model[0].weight]["step"] == 1


def test_add_param_group_rolled_back_when_its_warning_is_an_error():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)).double()
    opt = SINGD(model, params=model[0].parameters(), **dict(HP1, warn_unsupported=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="fallback"):
            opt.add_param_group({"params": model[1].parameters()})
    assert len(opt.param_groups) == 1 and opt.fallback_parameters == {}
    x, _ = batch(0, shape=(8, 4))
    model(x).pow(3).sum().backward()
    opt.step()  # the group that was not added is not referenced
    assert opt.steps == 1


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
    opt.set_current_grad_scale(torch.tensor(1024.0))  # what a scaler's scale may be
    assert opt._explicit_scale == 1024.0


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
    assert (opt.steps, opt.skipped_steps) == (0, 1)  # a skipped step does not count
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
    loaded = _through_bytes(model)
    x, y = batch(0)
    mse(loaded(x), y).backward()  # the loaded model is not observed
    assert all(layer.pending is None for layer in opt.layers.values())
    for a, b in zip(loaded.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    # the original is still observed and trains as without the pickling
    model_ref = make_mlp(0)
    _train_both_equal((model, opt), (model_ref, SINGD(model_ref, **HP1)), 0, 3)


def test_compiled_model_is_unwrapped():
    model = make_mlp(0)
    compiled = torch.compile(model)  # nothing is compiled before a forward pass
    opt = SINGD(compiled, **HP1)
    assert list(opt.layers) == ["0", "2"]
    assert opt.state_dict()["kronecker"]["layers"].keys() == {"0", "2"}


def test_compiled_and_data_parallel_wrappers_are_unwrapped_in_any_order():
    for wrap in (
        lambda m: torch.compile(nn.DataParallel(m)),
        lambda m: nn.DataParallel(torch.compile(m)),
    ):
        opt = SINGD(wrap(make_mlp(0)), **HP1)
        assert list(opt.layers) == ["0", "2"]


def test_state_saved_with_compiled_layer_names_loads():
    """States saved before the unwrapping named layers ``_orig_mod.<name>``."""
    model = make_mlp(0)
    opt = SINGD(model, **HP1)
    train(model, opt, 0, 2)
    sd = _through_bytes(opt.state_dict())
    sd["kronecker"]["layers"] = {"_orig_mod." + k: v for k, v in sd["kronecker"]["layers"].items()}
    model2 = make_mlp(0)
    model2.load_state_dict(model.state_dict())
    opt2 = SINGD(model2, **HP1)
    opt2.load_state_dict(sd)
    _train_both_equal((model2, opt2), (model, opt), 2, 4)


def test_hooks_left_on_a_deep_copy_keep_nothing_alive():
    import copy

    model = make_mlp(0)
    opt = SINGD(model, **HP1)
    ema = copy.deepcopy(model)
    factor = weakref.ref(opt.layers["0"].K.tensors()[0])
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None and factor() is None
    assert _forward_hooks(model) == 0 and _forward_hooks(ema) == 2  # inert there
    x, y = batch(0)
    mse(ema(x), y).backward()


def test_parametrized_layers_go_to_the_fallback_rule():
    from torch.nn.utils import parametrize

    class Symmetric(nn.Module):
        def forward(self, X):
            return X.triu() + X.triu(1).T

    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    with pytest.warns(UserWarning, match="parametrizations.weight.original"):
        opt = SINGD(model, **dict(HP1, warn_unsupported=True))
    assert list(opt.layers) == ["2"]
    before = model[0].parametrizations.weight.original.detach().clone()
    x, _ = batch(0, shape=(8, 4))
    model(x).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(before, model[0].parametrizations.weight.original)


@pytest.mark.parametrize("first", [0.0, 0.5])
def test_checkpoint_after_alpha1_changed_loads_into_a_fresh_optimizer(first):
    """Momenta appear (or vanish) when a group's alpha1 changes after construction; a
    fresh optimizer built with the original alpha1 resumes from the checkpoint."""
    second = 0.5 - first
    model = make_mlp(0)
    opt = SINGD(model, **dict(HP1, alpha1=first))
    train(model, opt, 0, 2)
    for group in opt.param_groups:
        group["alpha1"] = second
    train(model, opt, 2, 4)
    assert (opt.layers["0"].m_K is None) == (second == 0.0)
    model2 = make_mlp(0)
    model2.load_state_dict(model.state_dict())
    opt2 = SINGD(model2, **dict(HP1, alpha1=first))
    opt2.load_state_dict(_through_bytes(opt.state_dict()))
    assert opt2.param_groups[0]["alpha1"] == second
    _train_both_equal((model2, opt2), (model, opt), 4, 6)


def _checkpoint(structure: str = "dense", widths=(6, 8, 3), **hp):
    model = make_mlp(1, widths=widths)
    opt = SINGD(model, **dict(HP1, lr=0.01, T=2, structures=structure, **hp))
    train(model, opt, 0, 3)
    return _through_bytes(opt.state_dict())


@pytest.mark.parametrize(
    "saved, match",
    [
        (lambda: _checkpoint(widths=(6, 5, 3)), "does not match"),  # another width
        (lambda: _checkpoint(structure="diagonal"), "was saved with factors"),
        (lambda: _checkpoint(lr_cov=lambda t: 0.01), "callable lr_cov"),
    ],
    ids=["shapes", "structures", "callable"],
)
@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_failed_load_leaves_the_optimizer_as_it_was(saved, match, cls):
    """A state that does not fit raises and changes nothing (hyper-parameters,
    momentum buffers, factors, counters): training goes on exactly as without the
    attempt. (torch.optim checks before it changes anything.)"""
    state = saved()
    if cls is KFAC:  # a KFAC checkpoint of the same kind
        model = make_mlp(1, widths=(6, 5, 3) if match == "does not match" else (6, 8, 3))
        hp = dict(lr=0.01, T=2, warn_unsupported=False)
        if match == "callable lr_cov":
            hp["lr_cov"] = lambda t: 0.01
        if match == "was saved with factors":
            pytest.skip("KFAC has one structure")
        other = KFAC(model, **hp)
        train(model, other, 0, 3)
        state = _through_bytes(other.state_dict())
    pairs = []
    for _ in range(2):
        model = make_mlp(0)
        opt = cls(model, **dict(HP1, T=3)) if cls is SINGD else cls(model, T=3, lr=0.05)
        train(model, opt, 0, 2)
        pairs.append((model, opt))
    (model, opt), reference = pairs
    groups = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)
    assert [dict(g) for g in opt.param_groups] == groups
    assert opt.steps == reference[1].steps
    assert_states_equal(_everything(*reference), _everything(model, opt))
    for pair in ((model, opt), reference):
        train(*pair, 2, 6)
    assert_states_equal(_everything(*reference), _everything(model, opt))


def _weights_and_state(model: nn.Module, opt) -> dict[str, torch.Tensor]:
    """Parameters, per-parameter state and every factor tensor of any optimizer (cloned;
    without step counters, which count from each optimizer's construction)."""
    out = {f"param.{n}": p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        for key, value in opt.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                out[f"state.{n}.{key}"] = value.clone()
    for name, layer in opt.layers.items():
        for key, factor in layer.factors().items():
            for i, t in enumerate(() if factor is None else factor.tensors()):
                out[f"factor.{name}.{key}.{i}"] = t.clone()
    return out


def test_warnings_point_at_the_callers_line():
    """Construction and step warnings are attributed to the user's code (as
    ``torch.optim``'s are), not to a line inside torchsingd."""
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)).double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = SINGD(model, kfac_like=True)  # the fallback and the alpha1 warnings
        model(torch.full((2, 3), float("nan"), dtype=torch.float64)).sum().backward()
        opt.step()  # skipped: non-finite gradients
    assert len(caught) == 3, [str(w.message) for w in caught]
    assert {w.filename for w in caught} == {__file__}
    # through torch's GradScaler too (its step calls ours)
    model = nn.Sequential(nn.Linear(3, 3))
    opt = SINGD(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scaler.scale(model(torch.ones(2, 3)).sum()).backward()
        scaler.step(opt)  # "a gradient scale of 1024 is used at step 0"
    assert [w.filename for w in caught if "init_grad_scale" in str(w.message)] == [__file__]


def test_parameters_unfrozen_after_construction_are_not_dropped_silently():
    """params=None leaves frozen parameters out (as the reference does); one that is
    unfrozen later and gets a gradient is named in a warning (once), and trains after
    add_param_group."""
    model = make_mlp(0)
    model[0].requires_grad_(False)
    opt = SINGD(model, **HP1)
    assert set(opt.layers) == {"2"}
    model[0].requires_grad_(True)
    with pytest.warns(UserWarning, match="does not train them"):
        train(model, opt, 0, 1)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, opt, 1, 2)
    assert not caught  # said once
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), frozen, strict=True))
    opt.add_param_group({"params": list(model[0].parameters())})
    assert set(opt.layers) == {"0", "2"}
    train(model, opt, 2, 3)
    assert not any(torch.equal(p, q) for p, q in zip(model[0].parameters(), frozen, strict=True))


def test_unfrozen_parameter_warning_names_them():
    """Named at once in the first steps, later within LEFT_OUT_CHECK_EVERY steps (the
    scan is rate-limited: a frozen backbone may have thousands of parameters)."""
    model = make_mlp(0)
    model[0].requires_grad_(False)
    opt = SINGD(model, **HP1)
    model[0].requires_grad_(True)
    with pytest.warns(UserWarning, match=r"\['0.weight', '0.bias'\] have gradients but"):
        train(model, opt, 0, 1)
    model = make_mlp(0)
    model[0].requires_grad_(False)
    opt = SINGD(model, **HP1)
    train(model, opt, 0, 5)
    model[0].requires_grad_(True)
    every = opt.LEFT_OUT_CHECK_EVERY
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, opt, 5, every)  # steps 5 .. every-1: not looked at
    assert not caught
    with pytest.warns(UserWarning, match="does not train them"):
        train(model, opt, every, every + 1)


def test_messages_say_why():
    """The split-layer error says why a layer needs one group; the fallback warning
    names parameters passed in while frozen (never preconditioned later)."""
    model = make_mlp(0)
    with pytest.raises(ValueError, match="share the layer's Kronecker factors"):
        SINGD(
            model,
            params=[{"params": [model[0].weight]}, {"params": [model[0].bias], "T": 3}],
        )
    model[0].requires_grad_(False)
    model[2].weight.requires_grad_(False)
    with pytest.warns(UserWarning) as caught:
        SINGD(model, params=list(model.parameters()))
    (message,) = [str(w.message) for w in caught]
    assert "(unchanged until then): ['0.weight', '0.bias']" in message
    assert "not preconditioned even once unfrozen: ['2.weight']" in message
    # a layer frozen whole that cannot wait says why (the warning gave no reason)
    model = make_mlp(0).requires_grad_(False)
    groups = [{"params": [model[0].weight, model[2].weight]}]
    groups += [{"params": [model[0].bias], "lr_cov": 0.5}]  # [2].bias not in the optimizer
    with pytest.warns(UserWarning) as caught:
        SINGD(model, params=groups)
    (message,) = [str(w.message) for w in caught]
    assert (
        "not preconditioned even once unfrozen (its layer's parameters are in groups whose "
        "lr_cov differ): ['0.weight', '0.bias']" in message
    )
    assert (
        "not preconditioned even once unfrozen (part of its layer is not in the optimizer): "
        "['2.weight']" in message
    )
    # layers refused for one reason: it is said once (repeated per layer), and their
    # parameters are not listed again as frozen
    model = make_mlp(0).to(torch.bfloat16).requires_grad_(False)
    with pytest.warns(UserWarning) as caught:
        KFAC(model, params=model.parameters())
    (message,) = [str(w.message) for w in caught]
    assert message.count("KFAC cannot keep the factors") == 1
    assert (
        "could not precondition once unfrozen: ['0', '2'] (KFAC cannot keep the factors of "
        "these layers in torch.bfloat16" in message
    )
    assert "even once unfrozen" not in message


# ------------------------------------------------- hyper-parameters per step
def _everything(model, opt) -> dict[str, torch.Tensor]:
    """Parameters and every tensor of the optimizer's state_dict (factors included)."""
    out = {f"param.{n}": p.detach().clone() for n, p in model.named_parameters()}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj.detach().clone()
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, (list, tuple)):
            for k, v in enumerate(obj):
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, (int, float)):
            out[prefix] = torch.tensor(float(obj), dtype=torch.float64)

    walk("opt", opt.state_dict())
    return out


def _hp(cls, **changes):
    hp = dict(HP1, **changes)
    if cls is KFAC:
        hp = {k: v for k, v in hp.items() if k != "alpha1"}
    return hp


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_numpy_scalar_hyperparameters_train_as_their_python_values(cls):
    """NumPy scalars (what ``np.logspace``/``np.arange`` sweeps give; ``torch.optim``
    takes them) were refused as "must be a finite number" (``np.float32``, ``np.int64``
    T). Now accepted at construction and between steps, stored as Python numbers, and
    the training equals the one with their ``float()``/``int()`` values bit for bit."""
    np = pytest.importorskip("numpy")
    given = dict(lr=np.float32(0.05), damping=np.float32(1e-3), T=np.int64(2))
    given.update(lr_cov=np.float32(0.05), momentum=np.float32(0.9))
    given.update(weight_decay=np.float32(1e-3))
    plain = {k: int(v) if k == "T" else float(v) for k, v in given.items()}
    states = []
    for values in (given, plain):
        model = make_mlp(0)
        opt = cls(model, **_hp(cls, **values))
        train(model, opt, 0, 3)
        opt.param_groups[0]["lr"] = np.float32(0.02) if values is given else float(np.float32(0.02))
        opt.param_groups[0]["T"] = np.int64(1) if values is given else 1
        train(model, opt, 3, 5)
        group = opt.param_groups[0]
        assert all(type(group[k]) in (int, float) for k in [*given, "lr"]), group
        states.append(_everything(model, opt))
    assert_states_equal(*states)


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_state_dict_of_numpy_options_loads_with_weights_only(cls):
    """``np.float64`` is a subclass of ``float`` and was kept as it came (so were
    ``StructureSpec`` objects given as ``structures``): ``torch.load(weights_only=True)``
    of the state_dict then refused the NumPy global. Every option is now stored as a
    Python number or a name; the reloaded state resumes bit for bit like the original."""
    np = pytest.importorskip("numpy")
    from torchsingd.structures import get_structure

    given = dict(lr=np.logspace(-2, -1, 3)[1], damping=np.float64(1e-3), T=np.int64(2))
    given.update(momentum=np.float64(0.9), weight_decay=np.float64(1e-3))
    if cls is SINGD:
        given["structures"] = [get_structure("blockdiagonal:3"), "diagonal"]
    model = make_mlp(0)
    opt = cls(model, **_hp(cls, **given))
    train(model, opt, 0, 3)
    group = opt.param_groups[0]
    for key, value in group.items():
        if key == "params":
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        assert all(
            type(v) in (int, float, str, bool, type(None)) or isinstance(v, torch.dtype)
            for v in values
        ), (key, value)
    if cls is SINGD:
        assert group["structures"] == ["blockdiagonal:3", "diagonal"]
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = copy.deepcopy(model)
    resumed = cls(resumed_model, **_hp(cls, **given))
    resumed.load_state_dict(saved)
    train(model, opt, 3, 5)
    train(resumed_model, resumed, 3, 5)
    assert_states_equal(_everything(model, opt), _everything(resumed_model, resumed))


def test_state_dict_after_a_numpy_schedule_loads_with_weights_only():
    """A schedule computed with NumPy puts an ``np.float64`` lr back into the group
    after the step; ``state_dict()`` right after ``scheduler.step()`` (the usual order)
    now stores it as a float, as it does ``np.str_`` structure names. A spec of an
    unregistered subclass keeps its class (its name would mean the registered one)."""
    np = pytest.importorskip("numpy")
    from torchsingd.structures import StructureSpec, get_structure
    from torchsingd.structures.dense import DenseMatrix

    model = make_mlp(0)
    opt = SINGD(model, lr=0.01, T=1, structures=(np.str_("diagonal"), "dense"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * s / 100)))
    train(model, opt, 0, 2)
    sched.step()
    assert type(opt.param_groups[0]["lr"]) is np.float64  # (put there by the scheduler)
    saved = opt.state_dict()
    assert type(saved["param_groups"][0]["lr"]) is float
    assert [type(s) for s in saved["param_groups"][0]["structures"]] == [str, str]
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)

    class Mine(DenseMatrix):
        pass

    mine = StructureSpec(Mine, ())
    opt = SINGD(make_mlp(0), structures=(mine, get_structure("dense")))
    assert opt.param_groups[0]["structures"] == (mine, "dense")


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_tensor_lr_and_scheduler_match_float_lr(cls):
    """``lr`` as a one-element tensor (``torch.optim`` allows it; schedulers then fill
    it in place) trains bit for bit like the same float schedule."""
    runs = []
    for lr in (0.05, torch.tensor(0.05, dtype=torch.float64)):
        model = make_mlp(0)
        opt = cls(model, **_hp(cls, lr=lr))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for t in range(5):
            train(model, opt, t, t + 1)
            sched.step()
        assert float(opt.param_groups[0]["lr"]) == 0.05 * 0.5**2
        runs.append(_everything(model, opt))
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert_states_equal(runs[0], runs[1])


_INVALID_LATER = [
    ("lr", float("nan")),
    ("lr", float("inf")),
    ("lr", 1e300),  # finite, but not a float32 number: raised part-way before
    ("lr", -0.1),
    ("lr", torch.tensor([0.1, 0.2])),
    ("momentum", 1.0),
    ("weight_decay", float("nan")),
    ("damping", float("inf")),
    ("lr_cov", float("nan")),
    ("T", 0),
    ("T", 2.5),
    ("max_update_norm", 0.0),
    ("kfac_approx", "expnd"),  # these were not checked again: a misspelt approximation
    ("loss_average", "mean"),  # was taken as "reduce", a misspelt loss average raised
    ("fallback", "adam"),  # in the backward pass, fallback_eps=0 divided by zero
    ("fallback_eps", 0.0),
    ("fallback_betas", (0.9, 1.0)),
    ("fallback_lr", -1.0),
    ("fallback_weight_decay", float("nan")),
]
_SINGD_ONLY = [
    ("kl_clip", -1.0),  # a math domain error
    ("alpha1", 1.5),  # accepted
    ("max_factor_step", 0.0),
    ("safeguards", "yes"),
    ("normalize_lr_cov", 1),
    ("kfac_like", "no"),  # read at every factor update: "no" was taken as True
]
_KFAC_ONLY = [("lr_cov", 1.5)]  # KFAC's running-average weight: made S_K indefinite


@pytest.mark.parametrize(
    ("cls", "name", "value"),
    [(cls, *case) for cls in (SINGD, KFAC) for case in _INVALID_LATER]
    + [(SINGD, *case) for case in _SINGD_ONLY]
    + [(KFAC, *case) for case in _KFAC_ONLY],
)
def test_hyperparameter_changed_to_an_invalid_value_raises_before_writing(cls, name, value):
    """A schedule that produces NaN (or the user setting a bad value between steps)
    raises a ValueError naming it; the weights, factors and step counter are untouched
    (torch.optim would write NaN into every weight). T=0 raised a ZeroDivisionError in
    the next forward pass; that forward now raises the same ValueError."""
    model = make_mlp(0)
    opt = cls(model, **_hp(cls))
    train(model, opt, 0, 2)
    x, y = batch(2)
    opt.zero_grad()
    mse(model(x), y).backward()
    before, steps = _everything(model, opt), opt.steps
    original = opt.param_groups[0][name]
    opt.param_groups[0][name] = value
    if name == "T" and value == 0:
        with pytest.raises(ValueError, match=r"Invalid T=0 in param group 0"):
            model(x)
    with pytest.raises(ValueError, match=rf"Invalid {name}=.* in param group 0 .*must be"):
        opt.step()
    opt.param_groups[0][name] = original
    after = _everything(model, opt)
    assert len(after) > 10 and any(k.startswith("opt.state") for k in after)
    assert_states_equal(before, after)
    assert opt.steps == steps


@pytest.mark.parametrize("via", ["step", "add_param_group"])
@pytest.mark.parametrize(
    ("cls", "name", "value"),
    [
        (SINGD, "structures", "diagonal"),
        (SINGD, "preconditioner_dtype", torch.float32),  # (the model is float64)
        (SINGD, "vocab_structure", "dense"),
        (KFAC, "factor_dtype", torch.float32),
        (KFAC, "vocab_structure", "dense"),
    ],
)
def test_options_the_factors_are_made_with_cannot_change_silently(cls, name, value, via):
    """Options read only when the factors are made (their structure, dtype): a change
    after construction was ignored without a word. A step now refuses it before
    writing anything, also after an ``add_param_group`` in between (which recorded the
    changed value as the new truth); set back, training goes on."""
    model = make_mlp(0)
    opt = cls(model, list(model[0].parameters()), **_hp(cls))
    if via == "step":
        opt.add_param_group({"params": list(model[2].parameters())})
    train(model, opt, 0, 2)
    x, y = batch(2)
    original = opt.param_groups[0][name]
    opt.param_groups[0][name] = value
    if via == "add_param_group":
        opt.add_param_group({"params": list(model[2].parameters())})
    opt.zero_grad()
    mse(model(x), y).backward()
    before, steps = _everything(model, opt), opt.steps
    with pytest.raises(ValueError, match=rf"{name} of param group 0 was changed from .* after"):
        opt.step()
    opt.param_groups[0][name] = original
    assert_states_equal(before, _everything(model, opt))
    assert opt.steps == steps
    opt.step()
    assert opt.steps == steps + 1


@pytest.mark.parametrize(
    ("name", "given", "respelt"),
    [
        ("structures", "hierarchical15_15", ("hierarchical:15,15", "hierarchical:15,15")),
        ("structures", ("diagonal", "diagonal"), ["diagonal", "diagonal"]),
        ("vocab_structure", "diagonal", "Diagonal"),
        ("preconditioner_dtype", torch.float64, (torch.float64, torch.float64)),
        ("preconditioner_dtype", None, torch.float64),  # None: the weights' (float64)
    ],
)
def test_another_spelling_of_the_same_option_is_no_change(name, given, respelt):
    """Frozen options compare by meaning: a step, a checkpoint spelling them otherwise
    loaded (the group keeps the loading optimizer's value, which its factors follow),
    and the respelt value set back all train."""
    model = make_mlp(0)
    opt = SINGD(model, **_hp(SINGD, **{name: given}))
    train(model, opt, 0, 1)
    opt.param_groups[0][name] = respelt
    train(model, opt, 1, 2)
    other = SINGD(make_mlp(0), **_hp(SINGD, **{name: respelt}))
    opt.load_state_dict(other.state_dict())
    assert opt.param_groups[0][name] == given
    opt.param_groups[0][name] = respelt
    train(model, opt, 2, 3)


def test_a_checkpoint_keeps_the_options_the_loading_factors_are_made_with():
    """A checkpoint saved after an (illegal) structures change, or made with another
    factor dtype, loaded: the group says what the loading optimizer's factors are
    (it adopted the checkpoint's value: 'diagonal' beside dense factors, float32 beside
    float64 ones, and setting the true value back was refused)."""
    model = make_mlp(0)
    source = SINGD(make_mlp(0), **_hp(SINGD), preconditioner_dtype=torch.float32)
    source.param_groups[0]["structures"] = "diagonal"  # illegal, then saved
    opt = SINGD(model, **_hp(SINGD))
    opt.load_state_dict(source.state_dict())
    group = opt.param_groups[0]
    assert group["structures"] == ("dense", "dense")
    assert group["preconditioner_dtype"] == (None, None)
    assert all(layer.K.dtype == torch.float64 for layer in opt.layers.values())
    train(model, opt, 0, 2)


def test_kfac_like_switched_on_later_needs_alpha1_zero():
    model = make_mlp(0)
    opt = SINGD(model, **_hp(SINGD))
    train(model, opt, 0, 1)
    opt.param_groups[0]["kfac_like"] = True  # read at every factor update: allowed
    with pytest.raises(ValueError, match=r"Invalid alpha1=.* with kfac_like=True"):
        train(model, opt, 1, 2)
    opt.param_groups[0]["alpha1"] = 0.0
    train(model, opt, 1, 2)


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_a_misspelt_kfac_approx_raises_in_the_backward_pass(cls):
    """It raised only at the step, keeping the statistics captured under it (taken as
    "reduce"), which a retried step with the value fixed then used."""
    model = make_mlp(0)
    opt = cls(model, **_hp(cls))
    opt.param_groups[0]["kfac_approx"] = "expnad"
    x, y = batch(0)
    with pytest.raises(ValueError, match=r"Invalid kfac_approx='expnad' in param group 0"):
        mse(model(x), y).backward()


@pytest.mark.parametrize("lr", [1e300, float("nan"), torch.tensor([0.1, 0.2]), "0.1"])
def test_invalid_lr_at_construction_says_the_range(lr):
    with pytest.raises(ValueError, match=r"Invalid lr=.*finite number in \[0, 3.403e\+38\]"):
        SINGD(make_mlp(0), lr=lr)


# ------------------------------------------------------ state-dict hooks, copies
@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_state_dict_hooks_see_the_whole_state_and_load_hooks_run_after_it(cls):
    """torch.optim's hooks: a state_dict post-hook and a load pre-hook see the factors
    (a hook that casts the checkpoint cast everything but them); a load post-hook runs
    once the factors and counters are restored (it saw the old ones, and what it set
    was overwritten) and not at all after a load that fails."""
    model = make_mlp(0)
    opt = cls(model, **_hp(cls))
    train(model, opt, 0, 3)
    seen = []

    def cast(optimizer, sd):  # a post-hook that rewrites the saved state
        seen.append(sorted(sd))
        for layer in sd["kronecker"]["layers"].values():
            for name, tensors in layer["factors"].items():
                if tensors is not None:
                    layer["factors"][name] = [t.float() for t in tensors]
        return sd

    opt.register_state_dict_post_hook(cast)
    sd = opt.state_dict()
    assert seen == [["kronecker", "param_groups", "state"]]
    assert all(
        t.dtype == torch.float32
        for layer in sd["kronecker"]["layers"].values()
        for tensors in layer["factors"].values()
        if tensors is not None
        for t in tensors
    )

    fresh_model = make_mlp(1)
    fresh = cls(fresh_model, **_hp(cls))
    pre_seen, post_seen = [], []
    fresh.register_load_state_dict_pre_hook(lambda o, sd: pre_seen.append(sorted(sd)))

    def post(optimizer):
        post_seen.append(optimizer.steps)
        optimizer.steps = 100  # what a post-hook sets stays

    fresh.register_load_state_dict_post_hook(post)
    fresh.load_state_dict(sd)
    assert pre_seen == [["kronecker", "param_groups", "state"]]
    assert post_seen == [3] and fresh.steps == 100
    loaded = _everything(fresh_model, fresh)
    source = _everything(model, opt)
    factors = [k for k in source if k.startswith("opt.kronecker.layers") and "factors" in k]
    assert factors
    for key in factors:  # restored from the cast copy: the hook's float32, same values
        assert loaded[key].dtype == torch.float64
        torch.testing.assert_close(loaded[key], source[key].float().double(), rtol=0, atol=0)

    bad = _through_bytes(sd)
    del bad["kronecker"]["layers"]["2"]
    with pytest.raises(ValueError, match="layers differ"):
        fresh.load_state_dict(bad)
    assert post_seen == [3] and fresh.steps == 100  # no post-hook for a failed load


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_copying_or_pickling_the_optimizer_raises_a_clear_error(cls):
    """torch.optim's __getstate__ kept only the groups and state: the copy raised an
    AttributeError at its first state_dict/zero_grad/step."""
    import copy
    import pickle

    opt = cls(make_mlp(0), **_hp(cls))
    for copier in (copy.deepcopy, copy.copy, pickle.dumps, _through_bytes):
        with pytest.raises(TypeError, match="cannot be pickled or copied.*state_dict"):
            copier(opt)


# ------------------------------------------------ model cast or moved afterwards
def _with_norm(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).float()


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_model_cast_after_construction_warns_and_keeps_stepping(cls):
    """``model.double()`` after some steps: the fallback's AdamW moments stayed float32
    and its step raised after the preconditioned layers had been written (a half step);
    the factors silently stayed float32. Now a warning says so, once, and the
    per-parameter state is cast to the parameters' dtype as torch.optim's
    load_state_dict casts it; the next steps run."""
    model = _with_norm()
    opt = cls(model, **_hp(cls, warn_unsupported=False))
    train(model, opt, 0, 2, dtype=torch.float32)
    model.double()
    with pytest.warns(UserWarning, match=r"layers \['0', '3'\] changed dtype from torch.float32"):
        train(model, opt, 2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, opt, 3, 5)
    assert opt.steps == 5
    for p in model.parameters():
        tensors = [v for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.ndim]
        assert tensors and all(v.dtype == torch.float64 for v in tensors), p.shape
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _layer_tensors(opt) -> list[torch.Tensor]:
    """Every tensor the optimizer keeps per layer: factors and pending statistics."""
    out = []
    for layer in opt.layers.values():
        for x in [*layer.factors().values(), *(layer.pending or [])]:
            out += list(x.tensors()) if x is not None else []
    return out


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_factors_follow_a_model_moved_after_construction(cls):
    """A model moved after construction (``Accelerator.prepare`` moves the model of an
    optimizer built before it; "meta" stands in for a GPU here): its layers' factors,
    pending statistics and per-parameter state follow it in the next observed forward
    pass (it raised a ValueError; the backward would have mixed devices)."""
    model = _with_norm()
    opt = cls(model, **_hp(cls, warn_unsupported=False, momentum=0.9))
    train(model, opt, 0, 2, dtype=torch.float32)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:  # the same Parameter objects afterwards, as model.cuda() keeps them
        model.to("meta")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert opt.param_groups[0]["params"][0].device.type == "meta"
    assert {t.device.type for t in _layer_tensors(opt)} == {"cpu"}
    x = torch.zeros(4, 6, device="meta")
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # observed (its backward cannot run on "meta": autocast refuses it)
    tensors = _layer_tensors(opt)
    assert len(tensors) > 4 and {t.device.type for t in tensors} == {"meta"}
    buffers = [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
    assert buffers and {v.device.type for v in buffers} == {"meta"}


def test_fallback_state_follows_a_move_without_preconditioned_layers():
    """An optimizer whose supported layers are all frozen (dormant) has no layer whose
    move ``_check_placement`` sees: its fallback's AdamW moments stayed behind. The
    step's fallback check moves them (the rest of a step cannot run on "meta")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6))
    model[0].requires_grad_(False)
    opt = SINGD(model, params=model.parameters(), warn_unsupported=False)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().sum().backward()
        opt.step()
    assert opt.layers == {} and opt.dormant_layers == {"0": ["0.weight", "0.bias"]}
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to("meta")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    for p in model[1].parameters():
        p.grad = torch.zeros_like(p)
    with contextlib.suppress(NotImplementedError, RuntimeError):
        opt.step()  # (reading a "meta" value fails after the check)
    moments = [v for p in model[1].parameters() for v in opt.state[p].values()]
    assert {v.device.type for v in moments if torch.is_tensor(v)} == {"meta"}


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_following_a_move_keeps_the_numbers(cls):
    """The move itself changes nothing: an optimizer that believes its layers moved
    (their recorded device differs from the weights') moves everything to the
    weights' device, drops its cached operators, and trains on bit-identically."""
    model, twin = _with_norm(), _with_norm()
    opt = cls(model, **_hp(cls, warn_unsupported=False, momentum=0.9, T=2))
    ref = cls(twin, **_hp(cls, warn_unsupported=False, momentum=0.9, T=2))
    train(model, opt, 0, 3, dtype=torch.float32)
    train(twin, ref, 0, 3, dtype=torch.float32)
    for entry in opt._entries.values():
        entry.placement = (entry.placement[0], torch.device("meta"))
    train(model, opt, 3, 7, dtype=torch.float32)
    train(twin, ref, 3, 7, dtype=torch.float32)
    assert all(e.placement[1].type == "cpu" for e in opt._entries.values())
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    mine, theirs = _layer_tensors(opt), _layer_tensors(ref)
    assert len(mine) == len(theirs) > 4
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert opt.state[p].keys() == ref.state[q].keys()
        for key, value in opt.state[p].items():  # (the fallback's step count is an int)
            assert (
                torch.equal(value, ref.state[q][key])
                if torch.is_tensor(value)
                else (value == ref.state[q][key])
            )


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_a_parameter_resized_after_construction_is_named(cls):
    """``resize_token_embeddings`` swaps an embedding's weight for a larger one in the
    same Parameter: the backward failed with "The size of tensor a (20) must match the
    size of tensor b (23)" from inside the statistics; a fallback parameter's AdamW
    moments failed in the step. Now a ValueError names the layer or parameter and
    what to do, before anything is written."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    opt = cls(model, **_hp(cls, warn_unsupported=False))
    tokens = torch.randint(0, 20, (8,))
    for _ in range(2):
        opt.zero_grad()
        model(tokens).square().sum().backward()
        opt.step()
    emb = model[0]
    emb.weight.data = torch.cat([emb.weight.data, torch.zeros(3, 6)])  # as HF resizes
    emb.num_embeddings = 23
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"layers \['0'\] changed shape.*\(20, 6\).*\(23, 6\)"):
        model(tokens)  # the observed forward pass
    with pytest.raises(ValueError, match=r"Construct a new optimizer after changing"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    # a parameter of the fallback rule (the LayerNorm's) with moments of another shape
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6))
    opt = cls(model, **_hp(cls, warn_unsupported=False))
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().sum().backward()
        opt.step()
    model[1].weight.data = torch.ones(7)
    model[1].weight.grad = torch.ones(7)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"Parameter '1.weight' changed shape from \(6,\)"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_a_resized_parameter_other_than_the_first_is_named(cls):
    """An attention layer's output projection resized alone (its forward still runs):
    only the module's first parameter was compared, and the step failed with
    "Expected a matrix with 8 rows, got shape (10, 9)". Every parameter is compared."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))
    model.forward = lambda x: model[0](x, x, x, need_weights=False)[0]
    opt = cls(model, **_hp(cls, warn_unsupported=False, T=1))
    x = torch.randn(4, 5, 8)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    model[0].out_proj.weight.data = torch.randn(10, 8)
    model[0].out_proj.bias.data = torch.zeros(10)
    message = r"layers \['0'\] changed shape.*\(8, 8\), \(8,\)\].*\(10, 8\), \(10,\)\]"
    with pytest.raises(ValueError, match=message):
        model(x)  # the observed forward pass of a factor-update step
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("cls", [SINGD, KFAC])
@pytest.mark.parametrize("how", ["assigned", "load_state_dict_assign", "other_shape"])
def test_a_parameter_replaced_after_construction_is_named(cls, how):
    """A new ``nn.Parameter`` in a layer after construction (assigned, or by
    ``load_state_dict(assign=True)``): the optimizer trained the new one, outside its
    param groups, and ``state_dict()`` then failed with ``KeyError: 1397...``; one of
    another shape failed in the backward pass with "Expected a matrix with 3 rows".
    Now a ValueError names the layer before anything is written (another shape: in
    the observed forward pass). ``torch.func.functional_call``, which swaps
    parameters in for one forward pass, still trains as before."""
    model = make_mlp(0)
    opt = cls(model, **_hp(cls, T=1))
    train(model, opt, 0, 2)
    layer = model[2]
    if how == "assigned":
        layer.weight = nn.Parameter(layer.weight.detach().clone())
    elif how == "load_state_dict_assign":
        fresh = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(fresh, assign=True)
    else:
        layer.weight = nn.Parameter(torch.randn(5, layer.in_features, dtype=layer.weight.dtype))
        layer.bias = nn.Parameter(torch.zeros(5, dtype=layer.bias.dtype))
    before = [p.detach().clone() for p in model.parameters()]
    message = "changed shape" if how == "other_shape" else r"layer '\w+' were replaced after"
    with pytest.raises(ValueError, match=message):
        train(model, opt, 2, 3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    opt.state_dict()  # (what failed before)


@pytest.mark.parametrize("cls", [SINGD, KFAC])
@pytest.mark.parametrize("how", ["assigned", "load_state_dict_assign", "pruned"])
def test_a_frozen_layers_parameter_replaced_is_named_once_it_would_train(cls, how):
    """A layer frozen at construction (dormant: no factors yet) whose parameter is
    replaced while frozen: nothing is said while what replaced it is frozen (it trains
    nothing, as with ``torch.optim``); once unfrozen, the step raises the replaced-
    parameter ValueError before anything is written. Before, the layer stayed
    dormant and its new weight untrained, with a warning that it was "unfrozen in
    part" (its old, frozen weight was the one watched)."""
    model = make_mlp(0)
    layer = model[2]
    layer.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = cls(model, params=list(model.parameters()), **_hp(cls, T=1))
    assert "2" in opt.dormant_layers
    train(model, opt, 0, 2)
    if how == "assigned":
        layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    elif how == "load_state_dict_assign":
        fresh = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.load_state_dict(fresh, assign=True)  # (keeps each parameter's flag)
        assert not layer.weight.requires_grad
    else:
        from torch.nn.utils import prune

        prune.l1_unstructured(layer, "weight", amount=0.5)
    train(model, opt, 2, 4)  # frozen still: no error
    layer.requires_grad_(True)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"layer '2' were replaced after"):
        train(model, opt, 4, 6)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    opt.state_dict()


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_functional_call_in_a_factor_update_step_is_not_a_replacement(cls):
    """``torch.func.functional_call`` puts other tensors in the parameters' places for
    one forward pass (a gradient with respect to them, say): nothing is refused, and
    the run equals one without that extra pass (it accumulates no weight gradient)."""
    from torch.func import functional_call

    def run(extra: bool):
        model = make_mlp(0)
        opt = cls(model, **_hp(cls, T=1))
        x = torch.randn(6, model[0].in_features, dtype=model[0].weight.dtype)
        for _ in range(3):
            opt.zero_grad()
            if extra:
                params = {
                    k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()
                }
                out = functional_call(model, params, (x,))
                torch.autograd.grad(out.square().sum(), list(params.values()))
            model(x).square().sum().backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(False), run(True), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [SINGD, KFAC])
@pytest.mark.parametrize("change", ["prune", "spectral_norm", "weight_norm"])
def test_a_weight_made_computed_after_construction_is_named(cls, change):
    """``torch.nn.utils.prune`` or a parametrization applied after construction makes
    ``weight`` a computed tensor: the layer stopped training silently, bias included
    (torch.optim trains ``weight_orig`` on). Now the step raises before any write;
    applied before construction, nothing is said here."""
    from torch.nn.utils import parametrizations, prune

    apply = {
        "prune": lambda m: prune.l1_unstructured(m, "weight", 0.3),
        "spectral_norm": nn.utils.spectral_norm,
        "weight_norm": parametrizations.weight_norm,
    }[change]
    model = make_mlp(0)
    opt = cls(model, **_hp(cls))
    train(model, opt, 0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch: .grad of a non-leaf tensor)
        apply(model[0])
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(
            ValueError, match=r"layer '0' were replaced after .* Apply such changes"
        ):
            train(model, opt, 1, 2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    model = make_mlp(0)
    apply(model[0])
    opt = cls(model, **_hp(cls, warn_unsupported=False))
    train(model, opt, 0, 2)  # (layer '0' goes to the fallback rule: nothing raised)
    assert "2" in opt.layers


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_a_step_without_any_gradient_does_not_count(cls):
    """Lightning calls ``step(closure)`` when ``training_step`` returns ``None`` (no
    backward): the step counted, so the factor update due in it was lost (factors
    updated at steps 0, 4, 6 instead of 0, 2, 4, 6 with T=2). Now it changes nothing
    and does not count: the training equals one without it, bit for bit."""
    model, twin = make_mlp(0), make_mlp(0)
    opt = cls(model, **_hp(cls, T=2, momentum=0.9))
    ref = cls(twin, **_hp(cls, T=2, momentum=0.9))
    train(model, opt, 0, 2)
    train(twin, ref, 0, 2)
    opt.zero_grad()
    assert opt.step(lambda: model(batch(2)[0]).sum() and None) is None  # a forward only
    opt.step()
    assert opt.steps == 2 and opt.skipped_steps == 0
    train(model, opt, 2, 7)
    train(twin, ref, 2, 7)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    mine, theirs = _layer_tensors(opt), _layer_tensors(ref)
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_parameters_instead_of_the_model_says_what_to_pass(cls):
    """``SINGD(model.parameters())``, the torch.optim habit: the error says to pass the
    model itself (and how to pass parameters or groups)."""
    model = make_mlp(0)
    for wrong in (model.parameters(), list(model.parameters()), [{"params": model[0].weight}]):
        with pytest.raises(TypeError, match=rf"not its parameters.*{cls.__name__}\(model\)"):
            cls(wrong)


@pytest.mark.parametrize("cls", [SINGD, KFAC])
@pytest.mark.parametrize("x_scale", [1.0, 1e21])
def test_trust_region_of_a_float64_model_is_float64_exact(cls, x_scale):
    """With ``lr_cov=0`` the preconditioner stays the identity, so ``G_nat = G`` and the
    clipped step is ``-lr s G``, ``s = sqrt(kl_clip / (lr^2 <G, G>))``. The inner product
    was rounded to float32: ``s`` off by ~1e-8 relatively, and for ``<G, G>`` beyond
    float32's range (inputs ~1e21) inf, so the step was exactly zero."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    x = torch.randn(4, 3, dtype=torch.float64) * x_scale
    hp = dict(lr=1.0, momentum=0.0, weight_decay=0.0, damping=1e-3, lr_cov=0.0, T=1)
    if cls is SINGD:
        hp.update(alpha1=0.0, kl_clip=1e-2, max_factor_step=None)
    opt = cls(model, kl_clip=1e-2, **{k: v for k, v in hp.items() if k != "kl_clip"})
    start = model.weight.detach().clone()
    model(x).square().mean().backward()
    G = model.weight.grad.detach().clone()
    opt.step()
    s = (1e-2 / (G * G).sum()).sqrt()
    assert s < 1
    torch.testing.assert_close(model.weight - start, -s * G, rtol=1e-14, atol=0)


def test_a_reduction_mark_of_an_earlier_step_does_not_reach_new_statistics():
    """``reduced`` says the pending statistics were combined across ranks already (a
    step that raised after the reduction, then retried). It stayed set on statistics
    captured in a later step or loaded from a checkpoint, which a distributed step
    then averaged with equal weights (1.5e-3 off one process, found by review)."""
    model = make_mlp(0)
    opt = SINGD(model, **_hp(SINGD))
    x, y = batch(0)
    mse(model(x), y).backward()
    saved = opt.state_dict()
    for layer in opt.layers.values():
        layer.reduced = True  # as a step that raised after the reduction leaves it
    opt.load_state_dict(saved)
    assert not any(layer.reduced for layer in opt.layers.values())
    for layer in opt.layers.values():
        layer.reduced = True
    model.zero_grad()  # (not opt.zero_grad: the statistics stay until the step)
    opt.steps += 1  # a later step's capture
    mse(model(x), y).backward()
    assert all(layer.pending is not None for layer in opt.layers.values())
    assert not any(layer.reduced for layer in opt.layers.values())


def _nanogpt_groups(model, **bias_options):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, **bias_options}]


def _decay_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(20, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4)
    ).double()


def _decay_step(model, opt, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, 20, (6,), generator=g), torch.randn(6, 4, generator=g).double()
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_nanogpt_decay_split_steps_each_parameter_with_its_groups_options(cls):
    """nanoGPT's groups (decay 2-D parameters, not 1-D ones) split every layer with a
    bias: accepted, the factors are the layer's, and each parameter takes lr,
    momentum and weight decay from its own group. One step from the same start: the
    directions are those of an optimizer without decay, so the weights equal one
    decaying everything and the biases one decaying nothing."""
    lr, wd = 0.1, 0.05
    models = [_decay_model() for _ in range(3)]
    split = cls(
        models[0], params=_nanogpt_groups(models[0]), lr=lr, weight_decay=wd, warn_unsupported=False
    )
    assert set(split.layers) == {"0", "1", "3"}
    everything = cls(models[1], lr=lr, weight_decay=wd, warn_unsupported=False)
    nothing = cls(models[2], lr=lr, weight_decay=0.0, warn_unsupported=False)
    for model, opt in zip(models, (split, everything, nothing), strict=True):
        _decay_step(model, opt)
    for name in ("0.weight", "1.weight", "3.weight"):
        torch.testing.assert_close(
            models[0].get_parameter(name), models[1].get_parameter(name), rtol=0, atol=1e-15
        )
    for name in ("1.bias", "3.bias"):
        torch.testing.assert_close(
            models[0].get_parameter(name), models[2].get_parameter(name), rtol=0, atol=1e-15
        )
    assert not torch.equal(models[1].get_parameter("1.bias"), models[2].get_parameter("1.bias"))


def test_split_layer_momentum_per_group_schedule_and_checkpoint():
    """A bias group without momentum keeps no buffer for the biases while the weights'
    buffers run; one LR schedule over both groups works; a checkpoint resumes the
    split optimizer bit for bit."""
    model = _decay_model()
    groups = _nanogpt_groups(model, momentum=0.0)
    opt = SINGD(model, params=groups, lr=0.1, weight_decay=0.01, T=2, warn_unsupported=False)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for step in range(3):
        _decay_step(model, opt, step)
        sched.step()
    assert "momentum_buffer" in opt.state[model[1].weight]
    assert "momentum_buffer" not in opt.state[model[1].bias]
    assert opt.param_groups[0]["lr"] == opt.param_groups[1]["lr"] < 0.1

    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    clone = _decay_model()
    clone.load_state_dict(saved_model)
    groups = _nanogpt_groups(clone, momentum=0.0)
    resumed = SINGD(clone, params=groups, lr=0.1, weight_decay=0.01, T=2, warn_unsupported=False)
    resumed.load_state_dict(saved_opt)
    for step in (3, 4, 5):
        _decay_step(model, opt, step)
        _decay_step(clone, resumed, step)
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


def test_split_groups_must_agree_on_the_factors_options():
    model = _decay_model()
    with pytest.raises(
        ValueError, match=r"2 layer\(s\) are split .*'1' \(groups \[0, 1\]: damping differ\), '3'"
    ):
        SINGD(model, params=_nanogpt_groups(model, damping=0.5))
    with pytest.raises(ValueError, match=r"'1' \(groups \[0\] and not in the optimizer\)"):
        SINGD(model, params=[model[1].weight])
    opt = SINGD(model, params=_nanogpt_groups(model), warn_unsupported=False)
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[1]["T"] = 3
    with pytest.raises(
        ValueError,
        match=r"Layer '1' has parameters in param groups \[0, 1\], which now differ in T",
    ):
        _decay_step(model, opt)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    opt.param_groups[1]["T"] = opt.param_groups[0]["T"]
    # lr too must agree: the layer's trust region bounds its step for one lr (a
    # schedule with another factor per group raises at the step where they part)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda t: 1.0, lambda t: 0.5**t])
    _decay_step(model, opt)
    sched.step()
    with pytest.raises(ValueError, match=r"which now differ in lr: .* but momentum, weight_decay"):
        _decay_step(model, opt)
    opt.param_groups[1]["lr"] = opt.param_groups[0]["lr"]
    opt.param_groups[1]["momentum"] = 0.0  # momentum and weight_decay may differ
    opt.param_groups[1]["weight_decay"] = 0.3
    _decay_step(model, opt)


def test_construction_warning_counts_layers_and_blocks():
    model = nn.Sequential(nn.Linear(8, 8), nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))
    with pytest.warns(
        UserWarning, match=r"preconditions 4 layer\(s\) \(7 Kronecker-factored blocks\)"
    ):
        opt = SINGD(model)
    assert len(opt.layers) == 7
    with pytest.warns(UserWarning, match=r"preconditions 1 layer\(s\); these"):
        SINGD(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)))


def test_a_recurrent_layer_unfrozen_weight_by_weight_waits_and_is_told():
    """An LSTM frozen at construction: its biases unfrozen alone are the fallback's (one
    warning); a weight unfrozen too makes it wait, unchanged (another warning, not
    swallowed by the first); all unfrozen, it wakes."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4).double()
    lstm.requires_grad_(False)
    opt = SINGD(lstm, params=lstm.parameters(), **_frozen_hp(SINGD, T=1))
    x = torch.randn(5, 2, 3, dtype=torch.float64)

    def steps(n):
        for _ in range(n):
            opt.zero_grad()
            lstm(x)[0].square().sum().backward()
            opt.step()

    lstm.bias_ih_l0.requires_grad_(True)
    before = lstm.bias_ih_l0.detach().clone()
    with pytest.warns(UserWarning, match=r"unfrozen in part: until their weights \['weight_ih"):
        steps(1)
    assert not torch.equal(before, lstm.bias_ih_l0)  # (BitFit: the fallback's)
    lstm.weight_hh_l0.requires_grad_(True)
    held = [p.detach().clone() for p in (lstm.bias_ih_l0, lstm.weight_hh_l0)]
    with pytest.warns(UserWarning, match=r"stay unchanged .*'' \(until weight_ih_l0 is unfrozen"):
        steps(2)
    now = (lstm.bias_ih_l0, lstm.weight_hh_l0)
    assert all(torch.equal(a, b) for a, b in zip(held, now, strict=True))
    lstm.requires_grad_(True)
    steps(2)
    assert opt._dormant == {} and set(opt.layers) == set(SINGD(lstm, **HP1).layers)
