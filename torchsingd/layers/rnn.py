"""``nn.RNN`` (tanh, relu), ``nn.LSTM`` (also with ``proj_size``) and ``nn.GRU``.

Each layer ``k`` and direction (suffix ``""`` or ``"_reverse"``) has two blocks, each
preconditioned like an ``nn.Linear`` applied at every time step (its weight shared
over time, as a transformer's projections are shared over positions):

- ``"ih_l{k}{sfx}"``: ``weight_ih`` (+ ``bias_ih`` as the bias column), input rows the
  layer's input ``x_t``, output gradients those of ``gi_t = W_ih x_t + b_ih``;
- ``"hh_l{k}{sfx}"``: ``weight_hh`` (+ ``bias_hh``), input rows the previous hidden state
  ``h_{t-1}`` (``h_0`` at the first step), output gradients those of
  ``gh_t = W_hh h_{t-1} + b_hh`` (for the GRU, whose ``n`` gate multiplies ``W_hn h +
  b_hn`` by ``r``, these differ from ``gi_t``'s);
- with ``proj_size > 0`` also ``"hr_l{k}{sfx}"``: ``weight_hr`` (no bias), input rows the
  unprojected ``o_t * tanh(c_t)``, outputs the projected hidden state ``h_t``.

The time steps of a sequence are positions of a shared dimension: ``kfac_approx=
"expand"`` makes every ``(sample, step)`` a row, ``"reduce"`` averages the inputs and
sums the output gradients over the steps, and ``loss_average="batch+sequence"`` counts
``batch x steps`` loss terms, as for an ``nn.Linear`` on ``[batch, steps, features]``.

PyTorch's RNN kernels apply the gates internally, where no hook can see them, so
while the optimizer is attached a forward pass whose backward is observed (grad
enabled, a preconditioner-update step) runs the recurrence step by step here (the same
equations, in ``float64`` equal to PyTorch's to rounding); every other forward pass
runs PyTorch's own (fused) implementation. Dropout between layers draws the masks
PyTorch's CPU kernel draws from the same random state. A ``PackedSequence`` is run as
its padded batch: padded positions neither update the state nor give output, and
their rows of the statistics hold zeros (and the bias column's one), as a padded
batch's positions do for an ``nn.Linear``.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from torchsingd.layers.base import (
    LayerAdapter,
    Observer,
    StepGradients,
    install_forward,
    linear_grad_rows,
    linear_input_count,
    linear_input_rows,
)

#: number of gates (rows of ``weight_ih`` per hidden unit) per mode
GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}


def _suffixes(module: nn.RNNBase) -> tuple[str, ...]:
    return ("", "_reverse") if module.bidirectional else ("",)


def _layer_blocks(module: nn.RNNBase, k: int, sfx: str) -> tuple[str, ...]:
    names = (f"ih_l{k}{sfx}", f"hh_l{k}{sfx}")
    return names + ((f"hr_l{k}{sfx}",) if module.proj_size > 0 else ())


def _weight(module: nn.RNNBase, block: str) -> Tensor:
    return getattr(module, f"weight_{block}")


def _bias(module: nn.RNNBase, block: str) -> Tensor | None:
    """The block's bias (``None`` for ``hr`` blocks and ``bias=False``)."""
    return getattr(module, f"bias_{block}", None) if module.bias else None


def _pair_params(module: nn.Module, ih: str, hh: str) -> list[nn.Parameter]:
    """The parameters of an ``ih``/``hh`` pair in PyTorch's order: weights, then biases."""
    out = [_weight(module, ih), _weight(module, hh)]
    return out + ([_bias(module, ih), _bias(module, hh)] if module.bias else [])


def _pair_directions(module: nn.Module, mats: dict[str, Tensor], ih: str, hh: str) -> list[Tensor]:
    """The pair's blocks' updates aligned with :func:`_pair_params`."""
    if module.bias:
        return [mats[ih][:, :-1], mats[hh][:, :-1], mats[ih][:, -1], mats[hh][:, -1]]
    return [mats[ih], mats[hh]]


class RNNAdapter(LayerAdapter):
    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, nn.RNNBase) and module.mode in GATES

    def blocks(self, module: nn.RNNBase) -> tuple[str, ...]:
        return tuple(
            b
            for k in range(module.num_layers)
            for sfx in _suffixes(module)
            for b in _layer_blocks(module, k, sfx)
        )

    def params(self, module: nn.RNNBase) -> list[nn.Parameter]:
        out = []
        for k in range(module.num_layers):
            for sfx in _suffixes(module):
                out += _pair_params(module, f"ih_l{k}{sfx}", f"hh_l{k}{sfx}")
                if module.proj_size > 0:
                    out.append(_weight(module, f"hr_l{k}{sfx}"))
        return out

    def check(self, module: nn.RNNBase, name: str) -> None:
        super().check(module, name)
        if any(not p.requires_grad for p in self.params(module)):
            raise ValueError(
                f"{type(module).__name__} {name!r} has frozen parameters; freeze all of "
                "them or none (a partially frozen recurrent layer is not supported)."
            )

    def _has_bias(self, module: nn.RNNBase, block: str) -> bool:
        return _bias(module, block) is not None

    def dims(self, module: nn.RNNBase, *, block: str = "") -> tuple[int, int]:
        d_o, d_i = _weight(module, block).shape
        return d_i + int(self._has_bias(module, block)), d_o

    def has_gradient(self, module: nn.RNNBase, *, block: str = "") -> bool:
        return _weight(module, block).grad is not None

    def grad_matrix(self, module: nn.RNNBase, *, block: str = "") -> Tensor | None:
        grad = _weight(module, block).grad
        bias = _bias(module, block)
        if grad is None or bias is None:
            return grad
        bias_grad = torch.zeros_like(bias) if bias.grad is None else bias.grad
        return torch.cat([grad, bias_grad.unsqueeze(1)], dim=1)

    def directions(self, module: nn.RNNBase, mats: dict[str, Tensor]) -> list[Tensor]:
        out = []
        for k in range(module.num_layers):
            for sfx in _suffixes(module):
                out += _pair_directions(module, mats, f"ih_l{k}{sfx}", f"hh_l{k}{sfx}")
                if module.proj_size > 0:
                    out.append(mats[f"hr_l{k}{sfx}"])
        return out

    def is_batched(self, module: nn.Module, x: Tensor) -> bool:
        return True  # the observed pass reports [N, L, features]

    def input_rows(self, module, x: Tensor, kfac_approx: str, *, block: str = ""):
        return linear_input_rows(x, kfac_approx, self._has_bias(module, block))

    def input_count(self, module, x: Tensor, kfac_approx: str, *, block: str = ""):
        return linear_input_count(x, kfac_approx)

    def grad_rows(self, module, g: Tensor, loss_average, kfac_approx: str, *, block: str = ""):
        return linear_grad_rows(g, loss_average, kfac_approx)

    def block_parameter(self, module: nn.RNNBase, *, block: str = "") -> nn.Parameter:
        return _weight(module, block)

    def install(self, module: nn.RNNBase, observer: Observer) -> list[Any]:
        return install_forward(module, observer, lambda *a, **k: _observed_forward(*a, **k))


def _observed_forward(module: nn.RNNBase, observer: Observer, input, hx=None):
    """The module's forward, step by step, reporting every block to ``observer``."""
    packed = isinstance(input, PackedSequence)
    active = keep = None  # (packed input only)
    if packed:
        batched = True
        x, lengths = pad_packed_sequence(input, batch_first=True)  # original order
        # [N, L] positions inside each sequence; as [L, N] in the packed order, the
        # positions of the packed data
        active = (torch.arange(x.shape[1])[None, :] < lengths[:, None]).to(x.device)
        keep = _sorted_time_major(active, input)
    else:
        batched = input.dim() == 3
        if not batched:
            x = input.unsqueeze(0)
        elif not module.batch_first:
            x = input.transpose(0, 1)
        else:
            x = input
    lstm = module.mode == "LSTM"
    if hx is not None and not batched:  # PyTorch's checks take batched states
        hx = tuple(t.unsqueeze(1) for t in hx) if lstm else hx.unsqueeze(1)
    _check_arguments(module, input, x, hx, batched)
    out_dtype, *state_dtypes = _kernel_dtypes(module, x, hx, lstm, input if packed else None)
    N, L = x.shape[:2]
    dirs = _suffixes(module)
    H = module.hidden_size
    H_out = module.proj_size if module.proj_size > 0 else H
    if hx is None:
        h0 = x.new_zeros(module.num_layers * len(dirs), N, H_out)
        c0 = x.new_zeros(module.num_layers * len(dirs), N, H) if lstm else None
    else:
        h0, c0 = hx if lstm else (hx, None)

    h_n, c_n = [], []
    for k in range(module.num_layers):
        if k > 0 and module.dropout > 0 and module.training:
            x = _dropout(x, module.dropout, input if packed else None, keep)
        outs = []
        for d, sfx in enumerate(dirs):
            i = k * len(dirs) + d
            out, h, c = _direction(
                module, observer, k, sfx, x, h0[i], None if c0 is None else c0[i], active
            )
            outs.append(out)
            h_n.append(h)
            if c is not None:
                c_n.append(c)
        with _unpromoted(x.device.type):
            x = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    # the dtypes PyTorch's kernel returns (under autocast they may differ from the
    # input's): a state fed back as hx, or the output, is the same on every step
    x = x.to(out_dtype)
    with _unpromoted(x.device.type):
        h_n = torch.stack(h_n).to(state_dtypes[0])
        hidden: Any = (h_n, torch.stack(c_n).to(state_dtypes[1])) if lstm else h_n
    if packed:
        data = _sorted_time_major(x, input).contiguous()[keep]
        output = PackedSequence(
            data, input.batch_sizes, input.sorted_indices, input.unsorted_indices
        )
        return output, hidden
    if not batched:
        output = x[0]
        hidden = tuple(t[:, 0] for t in hidden) if lstm else hidden[:, 0]
    elif not module.batch_first:
        output = x.transpose(0, 1).contiguous()
    else:
        output = x
    return output, hidden


#: per module, the dtypes its PyTorch forward returns for a kind of call (see
#: :func:`_kernel_dtypes`)
_KERNEL_DTYPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _kernel_dtypes(
    module: nn.RNNBase, x: Tensor, hx, lstm: bool, packed: PackedSequence | None
) -> tuple[torch.dtype, ...]:
    """The dtypes of the output, ``h_n`` (and ``c_n``) PyTorch's own forward returns
    for a call like this one (``packed``: its ``PackedSequence`` input): ``x``'s dtype
    and device, packed or not (sequences of one length or not), empty or not, the
    states' dtypes, the weights' dtype, grad mode, the oneDNN and cuDNN switches and
    the autocast state. Found by calling it on one or two steps of one or two samples,
    once per such kind of call and module, in eval mode (no dropout draws from the
    random state); where that call fails, ``x``'s dtype (the recurrence's). Under
    autocast they depend on the kernel PyTorch picks: on the CPU with torch 2.13,
    bfloat16 autocast gives bfloat16 for ``nn.LSTM`` (its ``c_n`` float32 with
    ``proj_size``; float32 for packed sequences of several lengths, an empty batch or
    oneDNN off) and ``nn.RNN``, float32 for ``nn.GRU``."""
    kind = x.device.type
    autocast = torch.is_autocast_enabled(kind)
    states = () if hx is None else (hx if lstm else (hx,))
    # a packed input: whether its sequences have one length (PyTorch's CPU LSTM
    # takes another kernel, of another dtype under autocast, where they do not)
    uneven = packed is not None and bool((packed.batch_sizes != packed.batch_sizes[0]).any())
    empty = x.shape[0] == 0  # (an empty batch: PyTorch's CPU LSTM takes another kernel)
    key = (
        packed is None,
        uneven,
        empty,
        torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled,
        torch.backends.cudnn.enabled,  # (the same on a GPU)
        x.dtype,
        x.device,
        tuple(t.dtype for t in states),
        module.weight_ih_l0.dtype,
        torch.is_grad_enabled(),
        torch.get_autocast_dtype(kind) if autocast else None,
    )
    known = _KERNEL_DTYPES.setdefault(module, {})
    if key not in known:
        n = 2 if uneven else 1  # [n, n, F]: batch-first or not alike
        probe = x.new_zeros(n, n, x.shape[-1])
        if packed is not None:  # lengths [1] or [2, 1]
            with _unpromoted(kind):
                probe = pack_padded_sequence(probe, torch.arange(n, 0, -1), batch_first=True)
        elif empty:
            n = 0
            probe = x.new_zeros(*((0, 1) if module.batch_first else (1, 0)), x.shape[-1])
        state = None
        if hx is not None:
            state = tuple(t[:, :n] for t in hx) if lstm else hx[:, :n]
        training = module.training
        module.training = False
        try:
            # no tensor of the probe is saved for a backward pass: inside a
            # non-reentrant checkpoint, whose recomputation finds the dtypes known,
            # the saved tensors' count would differ (grad mode stays as it is: it
            # can change the kernel)
            with _saved_nothing():
                out, hidden = type(module).forward(module, probe, state)
            hidden = hidden if lstm else (hidden,)
            out = out.data if packed is not None else out
            known[key] = (out.dtype, *(t.dtype for t in hidden))
        except Exception:  # (a kernel that fails here: the recurrence's own dtype)
            known[key] = (x.dtype,) * (3 if lstm else 2)
        finally:
            module.training = training
    return known[key]


@contextlib.contextmanager
def _saved_nothing():
    """Autograd keeps nothing of the tensors an operation saves for its backward (for a
    graph never backpropagated), bypassing saved-tensor hooks around this context (a
    non-reentrant checkpoint's); where such hooks cannot be set (``torch.func``
    transforms disable them), as usual. (Keeping the tensors themselves would hold
    the graph's output in its own node through C++, a cycle no collection frees.)"""
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: None, lambda t: None)
    try:
        hooks.__enter__()
    except RuntimeError:
        yield
        return
    try:
        yield
    finally:
        hooks.__exit__(None, None, None)


def _check_arguments(module: nn.RNNBase, input, x: Tensor, hx, batched: bool) -> None:
    """PyTorch's own checks of the input and states (sizes, dtypes), which its forward
    makes before its kernels: the step-by-step pass must refuse what they refuse."""
    if x.dim() != 3:
        raise ValueError(
            f"{type(module).__name__}: Expected input to be 2D or 3D, got {input.dim()}D "
            "tensor instead"
        )
    if x.shape[1] == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    if isinstance(input, PackedSequence):
        layout, batch_sizes = input.data, input.batch_sizes
    else:
        layout, batch_sizes = (x if module.batch_first else x.transpose(0, 1)), None
    if hx is None:
        module.check_input(layout, batch_sizes)
    else:
        module.check_forward_args(layout, hx, batch_sizes)


def _sorted_time_major(x: Tensor, packed: PackedSequence) -> Tensor:
    """``x: [N, L, ...]`` in the original batch order as ``[L, N, ...]`` in the packed
    (sorted) order."""
    if packed.sorted_indices is not None:
        x = x.index_select(0, packed.sorted_indices)
    return x.transpose(0, 1)


def _dropout(x: Tensor, p: float, packed: PackedSequence | None, keep: Tensor | None) -> Tensor:
    """Dropout between layers drawing the masks PyTorch's CPU kernel draws from the same
    random state (tested): on the time-major layer output, or on the packed data. So
    an observed pass equals PyTorch's for the same seed, and a reentrant checkpoint's
    recomputation (grad enabled: observed) keeps the first pass's masks."""
    if packed is None:
        return F.dropout(x.transpose(0, 1).contiguous(), p, training=True).transpose(0, 1)
    seq = _sorted_time_major(x, packed)
    data = F.dropout(seq.contiguous()[keep], p, training=True)
    with _unpromoted(seq.device.type):
        out = seq.new_zeros(seq.shape).index_put((keep,), data)
    out = out.transpose(0, 1)
    if packed.unsorted_indices is not None:
        out = out.index_select(0, packed.unsorted_indices)
    return out


def _unpromoted(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off (where it is on) for the joins and fused updates of the recurrence
    (``stack``, ``cat``, ``addcmul``, ``index_put``; the dtype probe's packing, a
    ``cat``): autocast's "promote" rule (on the CPU for ``stack`` and ``cat``, on CUDA
    also for ``addcmul`` and ``index_put``) accepts only float32, float64 and its own
    dtype, so a half-precision model under the other half-precision autocast (a
    bfloat16 model under float16 autocast, or the reverse) failed there with
    "Unexpected floating ScalarType in at::autocast::prioritize", where PyTorch's
    fused kernel runs. Their inputs share one dtype (the recurrence's), so without
    autocast they give the same tensors; inputs of mixed dtypes are promoted as
    autocast would (to the wider)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _recurrence_dtype(x: Tensor) -> torch.dtype:
    """The dtype the observed pass carries its recurrence in: ``x``'s, but float32 for a
    16-bit ``x`` under autocast of the other 16-bit dtype (a bfloat16 model under
    float16 autocast, or the reverse). There PyTorch's kernel carries more than ``x``'s
    precision: for a bfloat16 GRU and RNN under float16 autocast the bfloat16
    recurrence was 2.5-18x further from float64 than the kernel's output (a review's
    measurement); in float32 it is as close or closer."""
    kind, half = x.device.type, (torch.float16, torch.bfloat16)
    if x.dtype not in half or not torch.is_autocast_enabled(kind):
        return x.dtype
    other = torch.get_autocast_dtype(kind)
    return torch.float32 if other in half and other != x.dtype else x.dtype


def _cell(
    mode: str, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """One step of the recurrence from the two products ``gi = W_ih x + b_ih`` and
    ``gh = W_hh h + b_hh`` (PyTorch's equations and gate order); returns the new ``h``
    (unprojected) and ``c`` (``None`` but for the LSTM)."""
    if mode == "GRU":
        r_i, z_i, n_i = gi.chunk(3, dim=-1)
        r_h, z_h, n_h = gh.chunk(3, dim=-1)
        r = torch.sigmoid(r_i + r_h)
        z = torch.sigmoid(z_i + z_h)
        n = torch.tanh(n_i + r * n_h)
        return (1 - z) * n + z * h, None
    return _gated(mode, gi + gh, c)


def _gated(mode: str, pre: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The LSTM's and the plain RNN's step from ``pre = gi + gh`` (which is all they
    use of the two products: its gradient is each product's)."""
    if mode == "LSTM":
        size = pre.shape[-1] // 4
        i, f, _, o = torch.sigmoid(pre).chunk(4, dim=-1)  # (one pass for the three gates)
        g = torch.tanh(pre[..., 2 * size : 3 * size])
        with _unpromoted(pre.device.type):
            c = torch.addcmul(f * c, i, g)
        return o * torch.tanh(c), c
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None


def _direction(
    module: nn.RNNBase,
    observer: Observer,
    k: int,
    sfx: str,
    x: Tensor,
    h: Tensor,
    c: Tensor | None,
    active: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer's one direction over the batch-first ``x: [N, L, features]``; returns
    its output ``[N, L, H_out]`` (zero at padded positions) and final ``h`` (and ``c``).

    The recurrent products of the steps are separate tensors; :class:`StepGradients`
    stacks their output gradients into one ``[N, L, F]`` gradient, one capture of
    ``N x L`` rows as for ``gi``."""
    ih, hh, hr = f"ih_l{k}{sfx}", f"hh_l{k}{sfx}", f"hr_l{k}{sfx}"
    mode = module.mode
    L = x.shape[1]
    gi = F.linear(x, _weight(module, ih), _bias(module, ih))
    observer(module, ih, x, gi)
    # the recurrence in x's dtype, products as autocast makes them (the results are
    # returned in the kernel's dtypes: see _kernel_dtypes); a 16-bit x under the other
    # 16-bit autocast in float32
    dtype = _recurrence_dtype(x)
    gi = gi.to(dtype)
    h = h.to(dtype)
    c = None if c is None else c.to(dtype)
    w_hh, b_hh = _weight(module, hh), _bias(module, hh)
    projected = module.proj_size > 0
    w_hr = _weight(module, hr) if projected else None
    taps_hh, taps_hr = StepGradients(L), StepGradients(L)
    prev, full = [None] * L, [None] * L
    outputs: list[Tensor | None] = [None] * L
    order = range(L - 1, -1, -1) if sfx else range(L)
    # LSTM and RNN use gi + gh only: one product per step adds it (its gradient is
    # gh's), except under autocast, where the sum stays in x's dtype
    summed = mode != "GRU" and not torch.is_autocast_enabled(x.device.type)
    if summed:
        w_hh_t = w_hh.t()
        gi = gi if b_hh is None else gi + b_hh
    # one view per step, with one backward node for all (indexing gi[:, t] would add
    # a full-size zero gradient per step: quadratic in the length)
    steps = gi.unbind(1)
    for t in order:
        prev[t] = h.detach()
        if summed:
            pre = taps_hh.tap(t, torch.addmm(steps[t], h, w_hh_t))
            h_new, c_new = _gated(mode, pre, c)
        else:
            gh = taps_hh.tap(t, F.linear(h, w_hh, b_hh).to(dtype))
            h_new, c_new = _cell(mode, steps[t], gh, h, c)
        if projected:
            full[t] = h_new.detach()
            h_new = taps_hr.tap(t, F.linear(h_new, w_hr).to(dtype))
        if active is not None:
            on = active[:, t, None]
            h_new = torch.where(on, h_new, h)
            if c_new is not None:
                c_new = torch.where(on, c_new, c)
            outputs[t] = h_new * on
        else:
            outputs[t] = h_new
        h, c = h_new, c_new
    with _unpromoted(x.device.type):
        out = torch.stack(outputs, dim=1)
        rows = torch.stack(prev, dim=1)
    if active is not None:
        rows = rows * active[..., None]
    observer(module, hh, rows, taps_hh)
    if projected:
        with _unpromoted(x.device.type):
            rows = torch.stack(full, dim=1)
        if active is not None:
            rows = rows * active[..., None]
        observer(module, hr, rows, taps_hr)
    return out, h, c


def _cell_mode(module: nn.RNNCellBase) -> str:
    if isinstance(module, nn.LSTMCell):
        return "LSTM"
    if isinstance(module, nn.GRUCell):
        return "GRU"
    return "RNN_RELU" if getattr(module, "nonlinearity", "tanh") == "relu" else "RNN_TANH"


class RNNCellAdapter(RNNAdapter):
    """``nn.RNNCell``, ``nn.LSTMCell``, ``nn.GRUCell``: blocks ``"ih"`` and ``"hh"``.

    A cell is one time step; applied in a loop it is a layer applied several times per
    forward, whose statistics add (each application normalised by its own rows), as
    for an ``nn.Linear`` applied several times."""

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, (nn.RNNCell, nn.LSTMCell, nn.GRUCell))

    def blocks(self, module: nn.RNNCellBase) -> tuple[str, ...]:
        return ("ih", "hh")

    def params(self, module: nn.RNNCellBase) -> list[nn.Parameter]:
        return _pair_params(module, "ih", "hh")

    def directions(self, module: nn.RNNCellBase, mats: dict[str, Tensor]) -> list[Tensor]:
        return _pair_directions(module, mats, "ih", "hh")

    def is_batched(self, module: nn.Module, x: Tensor) -> bool:
        return x.ndim == 2

    def install(self, module: nn.RNNCellBase, observer: Observer) -> list[Any]:
        return install_forward(module, observer, lambda *a, **k: _observed_cell(*a, **k))


def _observed_cell(module: nn.RNNCellBase, observer: Observer, input: Tensor, hx=None):
    """The cell's forward from its two observed products."""
    mode = _cell_mode(module)
    name = type(module).__name__
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    batched = input.dim() == 2
    x = input if batched else input.unsqueeze(0)
    if hx is None:
        h = x.new_zeros(x.shape[0], module.hidden_size)
        c = h if mode == "LSTM" else None
    else:
        h, c = hx if mode == "LSTM" else (hx, None)
        if not batched:
            h, c = h.unsqueeze(0), None if c is None else c.unsqueeze(0)
        # PyTorch's kernel checks (the products below would broadcast a batch of 1)
        for i, state in enumerate((h, c) if mode == "LSTM" else (h,)):
            if state.dim() != 2:
                raise ValueError(f"{name}: Expected hx[{i}] to be 1D or 2D, got {state.dim()}D")
            if state.shape[0] != x.shape[0]:
                raise RuntimeError(
                    f"Input batch size {x.shape[0]} doesn't match hidden{i} batch size "
                    f"{state.shape[0]}"
                )
            if state.shape[1] != module.hidden_size:
                raise RuntimeError(
                    f"hidden{i} has inconsistent hidden_size: got {state.shape[1]}, expected "
                    f"{module.hidden_size}"
                )
    gi = F.linear(x, module.weight_ih, _bias(module, "ih"))
    observer(module, "ih", x, gi)
    gh = F.linear(h, module.weight_hh, _bias(module, "hh"))
    observer(module, "hh", h, gh)
    h, c = _cell(mode, gi.to(x.dtype), gh.to(x.dtype), h, c)
    if not batched:
        h, c = h[0], None if c is None else c[0]
    return (h, c) if mode == "LSTM" else h
