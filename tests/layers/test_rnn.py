"""``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` and their cells through ``SINGD`` / ``KFAC``.

Two oracles, both independent of torchsingd:

1. PyTorch's own module: while an optimizer is attached, a forward pass whose
   backward is observed runs the recurrence step by step; a plain module with the same
   weights must give the same outputs and gradients (float64).
2. ``rnn_oracle.reference_forward``: the documented equations in float64 with a Python
   loop, exposing every block's input rows and (through autograd) its output
   gradients, hence the expected ``H_K``, ``H_C`` and SINGD step.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
import weakref

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from tests.layers.rnn_oracle import reference_forward
from tests.layers.test_attention import (
    expected_rows,
    labelled,
    random_factor,
    set_random_factors,
)
from torchsingd import KFAC, SINGD
from torchsingd.layers import RNNAdapter, RNNCellAdapter, get_adapter

DTYPE = torch.float64
I_SIZE, HIDDEN, N, L = 3, 4, 3, 5
LENGTHS = [5, 2, 4]  # packed inputs (unsorted)
MODELS = {
    "rnn_tanh": (nn.RNN, {}),
    "rnn_relu": (nn.RNN, dict(nonlinearity="relu")),
    "lstm": (nn.LSTM, {}),
    "lstm_proj": (nn.LSTM, dict(proj_size=2)),
    "gru": (nn.GRU, {}),
}


class Holder(nn.Module):
    """Gives the recurrent module the name ``"rnn"`` (layer names ``"rnn.ih_l0"`` ...)."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn


def make(model: str, seed: int = 0, **kwargs) -> nn.Module:
    cls, extra = MODELS[model]
    torch.manual_seed(seed)
    rnn = cls(I_SIZE, HIDDEN, dtype=DTYPE, **extra, **kwargs)
    with torch.no_grad():  # gates away from their linear range, non-zero biases
        for p in rnn.parameters():
            p.uniform_(-0.7, 0.7)
    return rnn


def attached(rnn: nn.Module, cls=SINGD, **kwargs):
    holder = Holder(rnn)
    if cls is SINGD:
        kwargs.setdefault("safeguards", False)
    kwargs.setdefault("T", 1)
    return holder, cls(holder, warn_unsupported=False, **kwargs)


def inputs(rnn: nn.Module, kind: str, hx: bool, seed: int = 1):
    """``(input, hx)``: ``kind`` is ``"batched"``, ``"unbatched"`` or ``"packed"``."""
    gen = torch.Generator().manual_seed(seed)
    D = 2 if rnn.bidirectional else 1
    H_out = getattr(rnn, "proj_size", 0) or HIDDEN
    x = torch.randn(N, L, I_SIZE, generator=gen, dtype=DTYPE)
    h = torch.randn(rnn.num_layers * D, N, H_out, generator=gen, dtype=DTYPE)
    c = torch.randn(rnn.num_layers * D, N, HIDDEN, generator=gen, dtype=DTYPE)
    if kind == "unbatched":
        x, h, c = x[0], h[:, 0], c[:, 0]
    elif not rnn.batch_first:
        x = x.transpose(0, 1)
    if kind == "packed":
        x = pack_padded_sequence(
            x, torch.tensor(LENGTHS), batch_first=rnn.batch_first, enforce_sorted=False
        )
    if not hx:
        return x, None
    return x, ((h, c) if isinstance(rnn, nn.LSTM) else h)


def tensors(out) -> list[torch.Tensor]:
    """The tensors of an RNN's return value (a PackedSequence's data)."""
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, tuple):
        return [t for o in out for t in tensors(o)]
    return [out]


def loss_of(out, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return sum((torch.randn(t.shape, generator=gen, dtype=DTYPE) * t).sum() for t in tensors(out))


CONFIGS = [
    dict(model=m, num_layers=k, bidirectional=b, batch_first=bf, bias=bias)
    for m, k, b, bf, bias in itertools.product(
        MODELS, [1, 2], [False, True], [False, True], [True, False]
    )
]


def config_id(c: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in c.items())


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("kind", ["batched", "unbatched", "packed"])
def test_observed_forward_equals_pytorch(config, kind):
    """Outputs, final states and every gradient (parameters, input, ``hx``) equal the
    plain module's on a preconditioner-update step (the observed, step-by-step pass)."""
    config = dict(config)
    model = config.pop("model")
    rnn, plain = make(model, **config), make(model, **config)
    holder, opt = attached(rnn)
    for hx in (False, True):
        x, h = inputs(rnn, kind, hx)
        got, exp = rnn(x, h), plain(x, h)
        assert rnn.forward.__func__ is not type(rnn).forward  # the optimizer's forward
        assert opt.layers["rnn.ih_l0"].hooked_step == 0  # observed
        if kind == "packed":
            for a, b in zip(got[0][1:], exp[0][1:], strict=True):
                assert (a is None and b is None) or torch.equal(a, b)
        for a, b in zip(tensors(got), tensors(exp), strict=True):
            assert a.shape == b.shape
            assert a.is_contiguous() or not b.is_contiguous()  # a .view() that works works
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        rnn.zero_grad(), plain.zero_grad()
        loss_of(got).backward()
        loss_of(exp).backward()
        for (name, a), b in zip(rnn.named_parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=labelled(name))


def capture(model: str, kind: str, approx="expand", loss_average="batch", **config):
    """Attach SINGD (lr 1, no momentum, factors frozen), set random dense ``K``, ``C``
    per block, run one observed forward and backward. Returns the module, optimizer,
    factors, the oracle's pieces with their output gradients, and the parameters'
    gradients through the oracle."""
    rnn = make(model, **config)
    holder, opt = attached(
        rnn,
        structures="dense",
        kfac_approx=approx,
        loss_average=loss_average,
        lr=1.0,
        momentum=0.0,
        lr_cov=0.0,
        alpha1=0.0,
        kl_clip=None,
    )
    factors = set_random_factors(opt, "rnn.")
    x, h = inputs(rnn, kind, hx=True)
    loss_of(rnn(x, h)).backward()
    ref_out, ref_hidden, pieces = reference_forward(rnn, x, h)
    pieces.pop("lengths")
    ref_loss = loss_of((ref_out, ref_hidden))
    params = dict(rnn.named_parameters())
    blocks = list(pieces)
    grads = torch.autograd.grad(ref_loss, [pieces[b].wrt for b in blocks] + list(params.values()))
    dvalues = dict(zip(blocks, grads[: len(blocks)], strict=True))
    leaf_grads = dict(zip(params, grads[len(blocks) :], strict=True))
    for name, p in params.items():  # the oracle agrees with the module
        torch.testing.assert_close(p.grad, leaf_grads[name], rtol=1e-10, atol=1e-12)
    return rnn, opt, factors, pieces, dvalues, leaf_grads


CAPTURE_CASES = {
    "lstm_2layers_bidirectional": dict(model="lstm", num_layers=2, bidirectional=True),
    "lstm_proj_seqfirst": dict(model="lstm_proj", batch_first=False),
    "gru_nobias": dict(model="gru", bias=False, batch_first=True),
    "rnn_relu_bidirectional": dict(model="rnn_relu", bidirectional=True, batch_first=True),
    "gru_2layers_bidirectional": dict(model="gru", num_layers=2, bidirectional=True),
}


@pytest.mark.parametrize("case", list(CAPTURE_CASES))
@pytest.mark.parametrize("kind", ["batched", "unbatched", "packed"])
@pytest.mark.parametrize(
    "approx, loss_average",
    [("expand", "batch"), ("expand", "batch+sequence"), ("expand", None), ("reduce", "batch")],
    ids=str,
)
def test_captured_statistics_equal_the_oracles(case, kind, approx, loss_average):
    rnn, opt, factors, pieces, dvalues, _ = capture(
        kind=kind, approx=approx, loss_average=loss_average, **CAPTURE_CASES[case]
    )
    adapter = get_adapter(rnn)
    assert isinstance(adapter, RNNAdapter)
    assert set(adapter.blocks(rnn)) == set(pieces)
    for block, piece in pieces.items():
        layer = opt.layers[f"rnn.{block}"]
        K, C = factors[block]
        bias = rnn.bias and not block.startswith("hr")
        a, g = expected_rows(piece.rows, dvalues[block], bias, approx, loss_average)
        assert adapter.dims(rnn, block=block) == (a.shape[1], g.shape[1])
        tol = dict(rtol=1e-10, atol=1e-12, msg=labelled(block))
        torch.testing.assert_close(layer.H_K.to_dense(), K.T @ a.T @ a @ K, **tol)
        torch.testing.assert_close(layer.H_C.to_dense(), C.T @ g.T @ g @ C, **tol)


@pytest.mark.parametrize("case", list(CAPTURE_CASES))
def test_singd_step_writes_each_blocks_natural_gradient(case):
    """A step (lr 1, no momentum, lr_cov 0) moves each parameter by its block's
    ``C C^T G K K^T`` (``G`` with the bias column), from the oracle's gradients."""
    rnn, opt, factors, pieces, _, leaf_grads = capture(kind="batched", **CAPTURE_CASES[case])
    adapter = get_adapter(rnn)
    before = {n: p.detach().clone() for n, p in rnn.named_parameters()}
    expected = {}
    for block in pieces:
        G = leaf_grads[f"weight_{block}"]
        if rnn.bias and not block.startswith("hr"):
            G = torch.cat([G, leaf_grads[f"bias_{block}"][:, None]], dim=1)
        torch.testing.assert_close(adapter.grad_matrix(rnn, block=block), G, rtol=1e-10, atol=1e-12)
        K, C = factors[block]
        update = C @ C.T @ G @ K @ K.T
        if rnn.bias and not block.startswith("hr"):
            expected[f"weight_{block}"], expected[f"bias_{block}"] = update[:, :-1], update[:, -1]
        else:
            expected[f"weight_{block}"] = update
    opt.step()
    assert expected.keys() == before.keys()
    for name, p in rnn.named_parameters():
        torch.testing.assert_close(
            before[name] - p.detach(), expected[name], rtol=1e-10, atol=1e-12, msg=labelled(name)
        )


CELLS = {
    "lstm": (nn.LSTMCell, nn.LSTM, {}),
    "gru": (nn.GRUCell, nn.GRU, {}),
    "rnn_relu": (nn.RNNCell, nn.RNN, dict(nonlinearity="relu")),
}


def cell_and_module(name: str, bias: bool) -> tuple[nn.Module, nn.Module]:
    """A cell and the one-layer module with the same weights."""
    cell_cls, cls, extra = CELLS[name]
    torch.manual_seed(0)
    cell = cell_cls(I_SIZE, HIDDEN, bias=bias, dtype=DTYPE, **extra)
    rnn = cls(I_SIZE, HIDDEN, bias=bias, batch_first=True, dtype=DTYPE, **extra)
    with torch.no_grad():
        for p in cell.parameters():
            p.uniform_(-0.7, 0.7)
        for name_, p in cell.named_parameters():
            getattr(rnn, f"{name_}_l0").copy_(p)
    return cell, rnn


@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("unbatched", [False, True])
def test_a_cell_in_a_loop_adds_each_steps_statistics(name, bias, unbatched):
    """A cell applied at every step of a sequence: its forward equals PyTorch's cell,
    and its ``H_K``, ``H_C`` are the sums over the steps of the statistics of the
    oracle's rows of that step (each step one application, ``N`` rows)."""
    cell, rnn = cell_and_module(name, bias)
    plain = copy.deepcopy(cell)
    holder, opt = attached(cell, structures="dense", kl_clip=None)
    factors = {}
    for i, block in enumerate(("ih", "hh")):
        layer = opt.layers[f"rnn.{block}"]
        layer.K = random_factor(layer.K.dim, seed=10 + i)
        layer.C = random_factor(layer.C.dim, seed=20 + i)
        factors[block] = (layer.K.mat.clone(), layer.C.mat.clone())
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, L, I_SIZE, generator=gen, dtype=DTYPE)
    if unbatched:
        x = x[:1]

    def run(module):
        state, outs = None, []
        for t in range(L):
            xt = x[0, t] if unbatched else x[:, t]
            state = module(xt, state)
            h = state[0] if isinstance(state, tuple) else state
            outs.append(h if not unbatched else h[None])
        return torch.stack(outs, dim=1)

    out = run(cell)
    torch.testing.assert_close(out, run(plain), rtol=1e-10, atol=1e-12)
    loss_of(out).backward()
    ref_output, _, pieces = reference_forward(rnn, x)
    torch.testing.assert_close(ref_output, out.detach(), rtol=1e-10, atol=1e-12)
    dvalues = torch.autograd.grad(loss_of(ref_output), [pieces["ih_l0"].wrt, pieces["hh_l0"].wrt])
    for block, dv in zip(("ih", "hh"), dvalues, strict=True):
        K, C = factors[block]
        rows = pieces[f"{block}_l0"].rows
        steps = [
            expected_rows(rows[:, t : t + 1], dv[:, t : t + 1], bias, "expand", "batch")
            for t in range(L)
        ]
        layer = opt.layers[f"rnn.{block}"]
        tol = dict(rtol=1e-10, atol=1e-12, msg=labelled(block))
        H_K = sum(K.T @ a.T @ a @ K for a, _ in steps)
        H_C = sum(C.T @ g.T @ g @ C for _, g in steps)
        torch.testing.assert_close(layer.H_K.to_dense(), H_K, **tol)
        torch.testing.assert_close(layer.H_C.to_dense(), H_C, **tol)
    assert isinstance(get_adapter(cell), RNNCellAdapter)


def test_only_update_steps_run_the_step_by_step_pass(monkeypatch):
    """With ``T = 3`` the recurrence runs step by step in the forward passes of steps 0
    and 3 only (grad enabled); others, ``no_grad`` passes and passes after
    ``remove_hooks`` run PyTorch's kernels."""
    import torchsingd.layers.rnn as rnn_module

    calls = []
    original = rnn_module._observed_forward
    monkeypatch.setattr(rnn_module, "_observed_forward", lambda *a: calls.append(1) or original(*a))
    rnn = make("lstm", batch_first=True)
    holder, opt = attached(rnn, T=3, structures="diagonal")
    x, _ = inputs(rnn, "batched", hx=False)
    per_step = []
    for _ in range(5):
        opt.zero_grad()
        with torch.no_grad():
            rnn(x)
        before = len(calls)
        loss_of(rnn(x)).backward()
        opt.step()
        per_step.append(len(calls) - before)
    assert per_step == [1, 0, 0, 1, 0]
    opt.remove_hooks()
    assert "forward" not in rnn.__dict__
    loss_of(rnn(x)).backward()
    assert len(calls) == 2


def _train(model, opt, steps, seed=5):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(N, L, I_SIZE, generator=gen, dtype=DTYPE)
        opt.zero_grad()
        loss_of(model.rnn(x)).backward()
        opt.step()


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_checkpoint_resumes_bit_for_bit(cls, tmp_path):
    def fresh():
        rnn = make("gru", num_layers=2, bidirectional=True, batch_first=True)
        return attached(rnn, cls=cls, T=2, lr=0.05)

    model, opt = fresh()
    _train(model, opt, 3, seed=5)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "c.pt")
    _train(model, opt, 3, seed=6)
    ckpt = torch.load(tmp_path / "c.pt")
    model2, opt2 = fresh()
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    _train(model2, opt2, 3, seed=6)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_construction_lists_the_blocks_and_refuses_partial_freezing():
    rnn = make("lstm_proj", num_layers=2, bidirectional=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing for the fallback rule to train
        opt = SINGD(Holder(rnn))
    assert not opt.fallback_parameters
    assert list(opt.layers) == [
        f"rnn.{kind}_l{k}{sfx}"
        for k in range(2)
        for sfx in ("", "_reverse")
        for kind in ("ih", "hh", "hr")
    ]
    rnn.bias_hh_l1.requires_grad_(False)
    with pytest.raises(ValueError, match="partly left out"):
        SINGD(Holder(rnn))
    for p in rnn.parameters():
        p.requires_grad_(False)
    holder = Holder(rnn)
    holder.head = nn.Linear(2, 2)
    assert list(SINGD(holder).layers) == ["head"]  # a frozen layer is skipped


@pytest.mark.parametrize("kind", ["batched", "unbatched", "packed", "packed_even"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_observed_passes_return_the_kernels_dtypes_under_autocast(model, kind):
    """Under bfloat16 autocast PyTorch's CPU kernels return bfloat16 for ``nn.LSTM``
    (``c_n`` float32 with ``proj_size``) and ``nn.RNN``, float32 for ``nn.GRU``; the
    step-by-step pass returned float32 (the input's dtype) for all, so output and state
    switched dtype between factor-update steps and the others. Now every pass returns
    the kernel's dtypes, also with a state fed back, and the kernel's one-sample probe
    draws nothing from the random state (dropout masks equal a plain module's). A
    packed LSTM input takes another kernel where its sequences differ in length."""
    rnn = make(model, num_layers=2, dropout=0.5, batch_first=True).float()
    plain = copy.deepcopy(rnn)
    holder, opt = attached(rnn, T=1)
    x, hx = inputs(rnn, kind.removesuffix("_even"), hx=True)
    if kind == "packed_even":
        x = pack_padded_sequence(torch.randn(N, L, I_SIZE), [L] * N, batch_first=True)
    x = x.float() if not kind.startswith("packed") else x._replace(data=x.data.float())
    hx = tuple(t.float() for t in hx) if isinstance(hx, tuple) else hx.float()

    def dtypes(module, state):
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, hidden = module(x, state)
        out = out.data if kind.startswith("packed") else out
        hidden = hidden if isinstance(hidden, tuple) else (hidden,)
        return [out.dtype] + [t.dtype for t in hidden], out, hidden

    try:
        expected, out_plain, _ = dtypes(plain, hx)
    except RuntimeError as error:  # PyTorch's kernel itself (oneDNN on some CPUs)
        pytest.skip(f"PyTorch's kernel fails under bfloat16 autocast here: {error}")
    observed, out, hidden = dtypes(rnn, hx)  # grad enabled, T=1: the observed pass
    assert observed == expected
    torch.testing.assert_close(out.float(), out_plain.float(), rtol=0.05, atol=0.02)
    state = hidden if model.startswith("lstm") else hidden[0]
    assert dtypes(rnn, state)[0] == expected  # the state fed back, observed
    with torch.no_grad():
        assert dtypes(rnn, state)[0] == expected  # PyTorch's kernel
    assert opt.layers  # (observed: the layers have factors)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_a_non_reentrant_checkpoint_runs_the_first_observed_pass(model):
    """The kernel's one-step dtype probe of the first observed pass saved tensors for
    backward, so a non-reentrant checkpoint's recomputation (the dtypes known by then)
    saved fewer: "A different number of tensors was saved during the original forward
    and recomputation" on the first step. The probe saves nothing now; the gradients
    and statistics equal those of the same pass without a checkpoint."""
    from torch.utils.checkpoint import checkpoint

    results = []
    for wrapped in (False, True):
        rnn = make(model, num_layers=2, batch_first=True)
        holder, opt = attached(rnn, structures="diagonal")
        x, h = inputs(rnn, "batched", hx=True)

        def call(data, rnn=rnn, h=h):
            return rnn(data, h)[0]

        out = checkpoint(call, x, use_reentrant=False) if wrapped else call(x)
        loss_of(out).backward()
        stats = [t for layer in opt.layers.values() for f in layer.pending for t in f.tensors()]
        results.append([p.grad.clone() for p in rnn.parameters()] + stats)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_the_dtype_probe_keeps_nothing_alive():
    """The probe's graph is never backpropagated: kept tensors would hold its output
    in its own node through C++ (a cycle no collection frees), and with it the
    module's weights. After the model and optimizer are gone, so are the weights."""
    import gc

    rnn = make("lstm", num_layers=2, batch_first=True).float()
    holder, opt = attached(rnn, structures="diagonal")
    x = torch.randn(N, L, I_SIZE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rnn(x)[0]
    loss_of(out.float()).backward()
    opt.step()
    weight = weakref.ref(rnn.weight_hh_l1)
    del rnn, holder, opt, out
    gc.collect()
    assert weight() is None


@pytest.mark.parametrize("case", ["mkldnn_off", "empty_batch"])
def test_the_kernels_dtypes_follow_mkldnn_and_empty_batches(case):
    """PyTorch's CPU LSTM returns float32 under bfloat16 autocast where oneDNN is off or
    the batch is empty (bfloat16 otherwise): the probe's cache tells these apart."""
    rnn = nn.LSTM(I_SIZE, HIDDEN, batch_first=True)
    plain = copy.deepcopy(rnn)
    holder, opt = attached(rnn, T=1)
    x = torch.randn(N, L, I_SIZE)

    def dtypes(module, data):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, (h, c) = module(data)
        return out.dtype, h.dtype, c.dtype

    assert dtypes(rnn, x) == dtypes(plain, x)  # (the cache filled for the plain case)
    if case == "mkldnn_off":
        with torch.backends.mkldnn.flags(enabled=False):
            assert dtypes(rnn, x) == dtypes(plain, x)
    else:
        assert dtypes(rnn, x[:0]) == dtypes(plain, x[:0])


@pytest.mark.parametrize("kind", ["batched", "packed"])
@pytest.mark.parametrize(
    "weights, autocast", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)]
)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_a_half_precision_model_under_the_other_half_precision_autocast(
    model, weights, autocast, kind
):
    """A bfloat16 model under float16 autocast (or the reverse): the observed pass's
    joins (``stack``, ``cat``, ``addcmul``) failed in autocast's promote rule ("Unexpected
    floating ScalarType in at::autocast::prioritize") where PyTorch's kernel runs. Now
    it returns the kernel's dtypes and values (two layers, both directions, dropout,
    a state fed back), no further from float64 than the kernel's (without dropout;
    the recurrence of a bfloat16 model under float16 autocast was carried in bfloat16
    and 2.5-18x further, now in float32), and a step trains finite weights."""
    rnn = make(model, num_layers=2, bidirectional=True, dropout=0.5).to(weights)
    plain = copy.deepcopy(rnn)
    holder, opt = attached(rnn, T=1, lr=0.05)
    x, hx = inputs(rnn, kind, hx=True)
    x = x._replace(data=x.data.to(weights)) if kind == "packed" else x.to(weights)
    hx = tuple(t.to(weights) for t in hx) if isinstance(hx, tuple) else hx.to(weights)

    def run(module, state):
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=autocast):
            out, hidden = module(x, state)
        return tensors(out), tensors(hidden)

    try:
        expected = run(plain, hx)
    except RuntimeError as error:  # PyTorch's kernel itself (oneDNN's LSTM)
        pytest.skip(f"PyTorch's kernel fails here: {error}")
    observed = run(rnn, hx)  # grad enabled, T=1: the observed pass
    for a, b in zip(observed[0] + observed[1], expected[0] + expected[1], strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.double(), b.double(), rtol=0.05, atol=0.05)
    state = observed[1][0] if len(observed[1]) == 1 else tuple(observed[1])
    run(rnn, state)  # the state fed back, observed
    rnn.dropout = plain.dropout = 0.0  # the float64 pass draws no masks to match
    exact = copy.deepcopy(plain).double()
    with torch.no_grad():
        data = x._replace(data=x.data.double()) if kind == "packed" else x.double()
        state = tuple(t.double() for t in hx) if isinstance(hx, tuple) else hx.double()
        exact = tensors(exact(data, state)[0])[0]
    kernel_error = (run(plain, hx)[0][0].double() - exact).abs().max()
    observed_error = (run(rnn, hx)[0][0].double() - exact).abs().max()
    assert observed_error <= 2 * kernel_error + 1e-3, (observed_error, kernel_error)
    opt.zero_grad()
    out = run(rnn, hx)[0][0]
    loss_of(out.double()).backward()
    before = [p.detach().clone() for p in rnn.parameters()]
    opt.step()
    assert all(torch.isfinite(p).all() for p in rnn.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(rnn.parameters(), before, strict=True))
    assert len(opt.layers) == 4 * (3 if model == "lstm_proj" else 2)


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_bfloat16_autocast_and_float32_training_stay_finite(cls):
    """A character-level model in float32 and under bfloat16 autocast (a GRU: PyTorch's
    CPU LSTM kernel fails under autocast on some CPUs), observed and fused passes in both:
    finite loss and weights, the loss lower after 30 steps, and every pass returns the
    dtype PyTorch's kernel does (so a state fed back as ``hx`` keeps working)."""
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "emb": nn.Embedding(12, 8),
            "rnn": nn.GRU(8, 16, batch_first=True),
            "head": nn.Linear(16, 12),
        }
    )
    opt = cls(model, lr=0.1, T=2, warn_unsupported=False, loss_average="batch+sequence")
    gen = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 12, (16, 9), generator=gen)
    x, y = seq[:, :-1], seq[:, 1:]
    losses = []
    for step in range(30):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(step // 2) % 2 == 1):
            h, h_n = model["rnn"](model["emb"](x))
            assert h.dtype == h_n.dtype == torch.float32
            model["rnn"](model["emb"](x), h_n)  # the state fed back
            out = model["head"](h)
            loss = nn.functional.cross_entropy(out.float().flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.92 * losses[0], losses


def test_a_recurrent_layer_frozen_after_construction_runs_pytorchs_kernel(monkeypatch):
    """Frozen whole after construction: its forward passes are PyTorch's (not the
    slow step-by-step pass), nothing changes; unfrozen: observed and trained again."""
    import torchsingd.layers.rnn as rnn_module

    calls = []
    original = rnn_module._observed_forward
    monkeypatch.setattr(rnn_module, "_observed_forward", lambda *a: calls.append(1) or original(*a))
    rnn = make("gru", batch_first=True)
    holder, opt = attached(rnn, T=1, structures="diagonal")
    holder.head = nn.Linear(HIDDEN, 2, dtype=DTYPE)
    x, _ = inputs(rnn, "batched", hx=False)

    def step():
        opt.zero_grad()
        out = rnn(x)[0]
        holder.head(out).square().sum().backward()
        opt.step()
        return out

    step()
    rnn.requires_grad_(False)
    frozen = [p.clone() for p in rnn.parameters()]
    K = opt.layers["rnn.hh_l0"].K.tensors()[0].clone()
    step()
    assert len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(frozen, rnn.parameters(), strict=True))
    assert torch.equal(K, opt.layers["rnn.hh_l0"].K.tensors()[0])
    rnn.requires_grad_(True)
    step()
    assert len(calls) == 2
    assert not torch.equal(K, opt.layers["rnn.hh_l0"].K.tensors()[0])


def _statistics(opt) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (s.H_K.to_dense(), s.H_C.to_dense()) for n, s in opt.layers.items()}


@pytest.mark.parametrize("how", ["inputs", "autograd_grad"])
@pytest.mark.parametrize("model", ["lstm_proj", "gru", "cell"])
def test_backward_restricted_to_the_parameters_captures_every_block(model, how):
    """``loss.backward(inputs=params)`` and ``autograd.grad(loss, params)`` compute only
    what leads to the parameters: every block's statistics are still captured, equal
    to a plain ``backward()``'s (the recurrent blocks were missed with a statistics
    sink outside that path)."""

    def run(variant: str):
        if model == "cell":
            rnn = cell_and_module("lstm", bias=True)[0]
        else:
            rnn = make(model, num_layers=2, bidirectional=True, batch_first=True)
        holder, opt = attached(rnn, structures="dense")
        if model == "cell":
            out = rnn(torch.randn(N, I_SIZE, dtype=DTYPE, generator=torch.manual_seed(1)))
        else:
            out = rnn(inputs(rnn, "batched", hx=False)[0])
        loss = loss_of(out)
        params = list(rnn.parameters())
        if variant == "inputs":
            loss.backward(inputs=params)
        elif variant == "autograd_grad":
            for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):
                p.grad = g
        else:
            loss.backward()
        return _statistics(opt)

    got, expected = run(how), run("plain")
    assert got.keys() == expected.keys() and len(got) >= 2
    for name in expected:
        for a, b in zip(got[name], expected[name], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=labelled(name))


@pytest.mark.parametrize("module", ["lstm", "attention"])
def test_an_optimizer_built_again_on_the_model_keeps_observing_it(module):
    """``opt = SINGD(model)`` run twice (a re-run notebook cell): collecting the first
    optimizer must not remove the forward the second one installed."""
    import gc

    if module == "lstm":
        layer = make("lstm", batch_first=True)
        x, _ = inputs(layer, "batched", hx=False)

        def forward():
            return layer(x)[0]

        name = "rnn.hh_l0"
    else:
        layer = nn.MultiheadAttention(4, 2, batch_first=True, dtype=DTYPE)
        q = torch.randn(2, 3, 4, dtype=DTYPE)

        def forward():
            return layer(q, q, q)[0]

        name = "rnn.q"
    holder = Holder(layer)
    opt = SINGD(holder, T=1)
    opt = SINGD(holder, T=1)
    gc.collect()
    assert "forward" in layer.__dict__
    loss_of(forward()).backward()
    assert opt.layers[name].H_C is not None
    opt.remove_hooks()
    assert "forward" not in layer.__dict__


DROPOUT_CASES = {
    "batch_first": dict(batch_first=True, bidirectional=False, kind="batched"),
    "seq_first_bidirectional": dict(batch_first=False, bidirectional=True, kind="batched"),
    "packed_bidirectional": dict(batch_first=True, bidirectional=True, kind="packed"),
}


@pytest.mark.parametrize("case", list(DROPOUT_CASES))
@pytest.mark.parametrize("model", ["lstm", "gru"])
def test_dropout_between_layers_draws_pytorchs_masks(model, case):
    """In training with ``dropout > 0`` the observed pass equals PyTorch's kernel for
    the same random state (outputs, states, gradients), and so does a reentrant
    ``checkpoint``, whose first pass (no grad) runs PyTorch's kernel and whose
    recomputation (grad enabled, observed) must draw the same masks."""
    from torch.utils.checkpoint import checkpoint

    config = dict(DROPOUT_CASES[case])
    kind = config.pop("kind")
    rnn = make(model, num_layers=3, dropout=0.4, **config)
    plain = copy.deepcopy(rnn)
    holder, opt = attached(rnn, structures="diagonal")
    x, h = inputs(rnn, kind, hx=True)
    packed = isinstance(x, PackedSequence)

    def call(module, data):  # the outputs as a tuple of tensors (checkpoint's rule)
        return tuple(tensors(module(PackedSequence(data, *x[1:]) if packed else data, h)))

    data = (x.data if packed else x).detach().requires_grad_()
    for reentrant in (False, True):
        results = []
        for module in (rnn, plain):
            module.zero_grad()
            torch.manual_seed(11)
            if reentrant:
                out = checkpoint(call, module, data, use_reentrant=True)
            else:
                out = call(module, data)
            loss_of(out).backward()
            results.append(list(out) + [p.grad.clone() for p in module.parameters()])
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert opt.layers["rnn.ih_l2"].H_K is not None  # observed


@pytest.mark.parametrize(
    "model, call",
    [
        ("gru", lambda m, x: m(x, torch.zeros(3, N, HIDDEN, dtype=DTYPE))),  # 3 layers of hx
        ("lstm", lambda m, x: m(x, (torch.zeros(1, 1, HIDDEN, dtype=DTYPE),) * 2)),  # batch 1
        ("lstm", lambda m, x: m(x[..., :2])),  # input size
        ("rnn_tanh", lambda m, x: m(x[:, :0])),  # no time steps
        ("gru", lambda m, x: m(x[None])),  # 4-D input
        ("lstm_cell", lambda m, x: m(x[:, 0], (torch.zeros(1, HIDDEN, dtype=DTYPE),) * 2)),
        ("gru_cell", lambda m, x: m(x[:, 0], torch.zeros(N, HIDDEN + 1, dtype=DTYPE))),
        ("gru_cell", lambda m, x: m(x)),  # 3-D input
    ],
)
def test_invalid_calls_raise_as_pytorchs_module_does(model, call, monkeypatch):
    """The step-by-step pass refuses what PyTorch's forward refuses (its checks run
    first; without them a state of batch 1 broadcast silently), with the same type."""
    import torchsingd.layers.rnn as rnn_module

    calls = []
    for name in ("_observed_forward", "_observed_cell"):
        original = getattr(rnn_module, name)
        monkeypatch.setattr(
            rnn_module, name, lambda *a, f=original, **k: calls.append(1) or f(*a, **k)
        )
    if model.endswith("_cell"):
        module = cell_and_module(model.removesuffix("_cell"), bias=True)[0]
    else:
        module = make(model, batch_first=True)
    plain = copy.deepcopy(module)
    holder, opt = attached(module)
    x = torch.randn(N, L, I_SIZE, dtype=DTYPE)
    with pytest.raises(Exception) as expected:
        call(plain, x)
    with pytest.raises(expected.type):
        call(module, x)
    assert calls == [1]  # the refusal came from the step-by-step pass


@pytest.mark.parametrize("model", ["gru", "lstm", "lstm_autocast"])
def test_a_backward_that_does_not_reach_a_block_adds_nothing_to_it(model):
    """``autograd.grad(loss, x)`` (an adversarial example's gradient) adds no
    statistics, and a restricted ``backward(inputs=...)`` adds them to exactly the
    blocks whose weight it accumulates; a full backward afterwards captures what it
    would alone (nothing left over from the restricted passes). The GRU's first
    recurrent product (of ``h_0``) is not on the path to ``x``: the steps' hook must
    not wait for it."""
    name = model.removesuffix("_autocast")

    def forward(rnn, x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=model.endswith("autocast")):
            return rnn(x)[0].float()

    def fresh():
        rnn = make(name, num_layers=2, batch_first=True).float()
        holder, opt = attached(rnn, structures="diagonal")
        return rnn, opt

    x = torch.randn(N, L, I_SIZE, generator=torch.manual_seed(4)).requires_grad_()
    rnn, opt = fresh()
    torch.autograd.grad(loss_of(forward(rnn, x)).float(), x)
    assert all(layer.pending is None for layer in opt.layers.values())
    loss_of(forward(rnn, x)).backward(inputs=[rnn.weight_ih_l0, rnn.bias_ih_l0])
    captured = {n for n, layer in opt.layers.items() if layer.pending is not None}
    assert captured == {"rnn.ih_l0"}
    params_l1 = [p for n, p in rnn.named_parameters() if n.endswith("_l1")]
    loss_of(forward(rnn, x)).backward(inputs=params_l1)
    captured = {n for n, layer in opt.layers.items() if layer.pending is not None}
    assert captured == {"rnn.ih_l0", "rnn.ih_l1", "rnn.hh_l1"}
    opt.zero_grad()  # drops the statistics of the discarded passes
    loss_of(forward(rnn, x)).backward()
    alone, opt_alone = fresh()
    loss_of(forward(alone, x)).backward()
    for n, layer in opt.layers.items():
        for a, b in zip(layer.pending, opt_alone.layers[n].pending, strict=True):
            torch.testing.assert_close(a.tensors()[0], b.tensors()[0], rtol=0, atol=0)


def test_observed_graphs_are_freed_after_their_backward():
    """Nothing of an observed pass outlives its graph: the steps' gradient hooks (and
    what they hold) are gone once the backward pass ran and the output is dropped.
    (``register_multi_grad_hook``'s hooks held the graph's nodes they hang on: a cycle
    through C++ that kept every observed graph alive, ~2 MB per step of an LSTM.)"""
    import gc

    rnn = make("lstm", num_layers=2, bidirectional=True, batch_first=True)
    holder, opt = attached(rnn, structures="diagonal")
    x, _ = inputs(rnn, "batched", hx=False)
    for _ in range(3):
        opt.zero_grad()
        loss_of(rnn(x)).backward()
        opt.step()
    gc.collect()
    alive = [
        f
        for f in gc.get_objects()
        if callable(f) and "StepGradients.register_hook.<locals>" in getattr(f, "__qualname__", "")
    ]
    assert alive == []


def _hh_statistics(run) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The statistics after ``run(rnn, x)`` (a fresh LSTM with SINGD, dense factors)."""
    rnn = make("lstm", batch_first=True)
    holder, opt = attached(rnn, structures="dense")
    x = inputs(rnn, "batched", hx=False)[0].clone().requires_grad_()
    run(rnn, opt, x)
    return _statistics(opt)


def _assert_same_statistics(got, expected) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        for a, b in zip(got[name], expected[name], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=labelled(name))


def test_a_backward_after_one_that_failed_captures_the_steps_again():
    """A backward pass that raises (another hook) ends without its end-of-pass
    callbacks; a retry of the same graph must still deliver the steps' gradients (the
    first version kept the failed pass's list and never queued its delivery again)."""

    def failed_then_retried(rnn, opt, x):
        loss = loss_of(rnn(x))
        failing = [True]

        def hook(grad):
            if failing[0]:
                raise RuntimeError("boom")

        x.register_hook(hook)
        with pytest.raises(RuntimeError, match="boom"):
            loss.backward(retain_graph=True)
        opt.zero_grad()  # drops what the failed pass captured
        failing[0] = False
        loss.backward()

    _assert_same_statistics(
        _hh_statistics(failed_then_retried),
        _hh_statistics(lambda rnn, opt, x: loss_of(rnn(x)).backward()),
    )


def test_a_backward_nested_in_another_ones_hook_delivers_its_own_steps():
    """A backward of the same graph started from a hook of a running one (after the
    steps' gradients arrived) is a pass of its own: both add their statistics."""

    def nested(rnn, opt, x):
        out = rnn(x)
        inner = loss_of(out, seed=3)
        done = []

        def hook(grad):
            if not done:
                done.append(1)
                inner.backward(retain_graph=True)

        x.register_hook(hook)
        loss_of(out, seed=2).backward(retain_graph=True)
        assert done

    def one_after_the_other(rnn, opt, x):
        out = rnn(x)
        loss_of(out, seed=2).backward(retain_graph=True)
        loss_of(out, seed=3).backward()

    _assert_same_statistics(_hh_statistics(nested), _hh_statistics(one_after_the_other))
