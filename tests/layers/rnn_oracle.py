"""Independent reference forward pass for torch.nn.RNN / LSTM / GRU.

Written from PyTorch's documented equations; it reads only the module's
parameters (by name) and uses basic tensor ops with a Python loop over time.
It never calls torch's RNN modules or torch._VF.

Equations (gi = x W_ih^T + b_ih, gh = h_{t-1} W_hh^T + b_hh):
  RNN : h = tanh(gi + gh)  or relu(gi + gh)
  LSTM: i, f, g, o = chunk(gi + gh, 4)      (gate order i, f, g, o)
        c = sig(f) * c + sig(i) * tanh(g);  h = sig(o) * tanh(c)
        proj_size > 0: h = h W_hr^T  (the projected h is the output and the
        recurrent state; W_hh is [4H, proj_size]; c stays of size H)
  GRU : (gate order r, z, n)  r = sig(gi_r + gh_r), z = sig(gi_z + gh_z)
        n = tanh(gi_n + r * gh_n);  h = (1 - z) * n + z * h
"""

from collections import namedtuple

import torch
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

# One linear block of the computation, as batch-first [N, L, F] tensors in the
# original time order (also for the reverse direction).  Padded positions
# (PackedSequence input) hold zeros in `rows` and `values`.
#   rows   : the inputs of the block (x, h_{t-1}, or unprojected h_t), detached
#   values : the block outputs (gi, gh, or r), detached
#   wrt    : the tensor in the graph to differentiate against:
#            torch.autograd.grad(loss, piece.wrt) is dloss/dvalues for every
#            (n, t).  For 'ih' it is gi itself; for 'hh' and 'hr' it is a zero
#            "sink" leaf (requires_grad=True) that is added to each step's
#            block output, so its gradient is the gradient w.r.t. gh (or r).
Piece = namedtuple("Piece", "rows values wrt")


def _cell(mode, gi, gh, h, c):
    if mode == "RNN_TANH":
        return torch.tanh(gi + gh), None
    if mode == "RNN_RELU":
        return torch.relu(gi + gh), None
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        i_r, i_z, i_n = gi.chunk(3, -1)
        h_r, h_z, h_n = gh.chunk(3, -1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h, None
    raise ValueError(mode)


def reference_forward(module, input, hx=None, dtype=None):
    """Returns (output, hidden, pieces).

    output, hidden: as the module returns them (hidden is (h_n, c_n) for LSTM;
    output is a PackedSequence with the input's batch_sizes / sorted_indices /
    unsorted_indices when the input is packed).  dtype: compute in this dtype
    (e.g. torch.float64) instead of the parameters' dtype.

    pieces: dict of Piece(rows, values, wrt) (see above), keys
      'ih_l{k}{sfx}': rows = layer input x,    values = gi = x W_ih^T + b_ih
      'hh_l{k}{sfx}': rows = h_{t-1},          values = gh = h_{t-1} W_hh^T + b_hh
      'hr_l{k}{sfx}': rows = unprojected h_t,  values = r = h_t W_hr^T
                      (LSTM with proj_size > 0 only)
    with sfx '' or '_reverse'.  Unbatched input gives N = 1.  Packed input gives
    padded tensors in the original batch order, and pieces['lengths'] holds the
    sequence lengths ([N], all L for unpacked input).
    """
    mode = module.mode
    assert module.dropout == 0 or not module.training or module.num_layers == 1
    P = getattr(module, "proj_size", 0)
    H = module.hidden_size
    H_out = P if P > 0 else H
    D = 2 if module.bidirectional else 1
    params = dict(module.named_parameters())
    dtype = dtype or params["weight_ih_l0"].dtype
    params = {k: v.to(dtype) for k, v in params.items()}

    packed = isinstance(input, PackedSequence)
    unbatched = not packed and input.dim() == 2
    if packed:
        x, lengths = pad_packed_sequence(input, batch_first=True)  # original order
    elif unbatched:
        x = input.unsqueeze(0)
    else:
        x = input if module.batch_first else input.transpose(0, 1)
    x = x.to(dtype)
    N, L = x.shape[:2]
    if not packed:
        lengths = torch.full((N,), L)
    lengths = lengths.to(x.device)
    mask = (torch.arange(L, device=x.device)[None, :] < lengths[:, None]).unsqueeze(-1)
    mask_f = mask.to(dtype)  # [N, L, 1]

    if hx is None:
        h0 = x.new_zeros(module.num_layers * D, N, H_out)
        c0 = x.new_zeros(module.num_layers * D, N, H) if mode == "LSTM" else None
    else:
        h0, c0 = hx if mode == "LSTM" else (hx, None)
        if unbatched:
            h0 = h0.unsqueeze(1)
            c0 = c0.unsqueeze(1) if c0 is not None else None
        h0 = h0.to(dtype)
        c0 = c0.to(dtype) if c0 is not None else None

    pieces, h_n, c_n = {}, [], []
    layer_in = x
    for k in range(module.num_layers):
        outs = []
        for d in range(D):
            sfx = "_reverse" if d else ""
            W_ih, W_hh = params[f"weight_ih_l{k}{sfx}"], params[f"weight_hh_l{k}{sfx}"]
            b_ih = params.get(f"bias_ih_l{k}{sfx}")
            b_hh = params.get(f"bias_hh_l{k}{sfx}")
            W_hr = params.get(f"weight_hr_l{k}{sfx}")

            gi = layer_in @ W_ih.T
            if b_ih is not None:
                gi = gi + b_ih
            gi = gi * mask_f  # zeros at padded positions
            sink_hh = x.new_zeros(N, L, W_hh.shape[0], requires_grad=True)
            sink_hr = x.new_zeros(N, L, P, requires_grad=True) if W_hr is not None else None

            h = h0[k * D + d]
            c = c0[k * D + d] if c0 is not None else None
            out, h_prev_rows, gh_rows, hraw_rows, r_rows = ([None] * L for _ in range(5))
            for t in reversed(range(L)) if d else range(L):
                m = mask[:, t]
                gh = h @ W_hh.T + sink_hh[:, t]
                if b_hh is not None:
                    gh = gh + b_hh
                h_new, c_new = _cell(mode, gi[:, t], gh, h, c)
                h_prev_rows[t], gh_rows[t] = h * m, gh * m
                if W_hr is not None:
                    hraw_rows[t] = h_new * m
                    h_new = h_new @ W_hr.T + sink_hr[:, t]
                    r_rows[t] = h_new * m
                # padded steps (packed input) leave the state unchanged, so the
                # reverse direction starts at each sequence's own last element
                h = torch.where(m, h_new, h)
                c = torch.where(m, c_new, c) if c is not None else None
                out[t] = h * m
            outs.append(torch.stack(out, 1))
            h_n.append(h)
            c_n.append(c)

            pieces[f"ih_l{k}{sfx}"] = Piece(layer_in.detach(), gi.detach(), gi)
            pieces[f"hh_l{k}{sfx}"] = Piece(
                torch.stack(h_prev_rows, 1).detach(), torch.stack(gh_rows, 1).detach(), sink_hh
            )
            if W_hr is not None:
                pieces[f"hr_l{k}{sfx}"] = Piece(
                    torch.stack(hraw_rows, 1).detach(), torch.stack(r_rows, 1).detach(), sink_hr
                )
        layer_in = torch.cat(outs, -1)
    pieces["lengths"] = lengths

    output, h_n = layer_in, torch.stack(h_n)
    c_n = torch.stack(c_n) if mode == "LSTM" else None
    if packed:
        idx = input.sorted_indices
        if idx is None:
            idx = torch.arange(N, device=x.device)
        data = torch.cat([output[idx[:bs], t] for t, bs in enumerate(input.batch_sizes.tolist())])
        output = PackedSequence(
            data, input.batch_sizes, input.sorted_indices, input.unsorted_indices
        )
    elif unbatched:
        output, h_n = output[0], h_n[:, 0]
        c_n = c_n[:, 0] if c_n is not None else None
    elif not module.batch_first:
        output = output.transpose(0, 1)
    return output, ((h_n, c_n) if mode == "LSTM" else h_n), pieces
