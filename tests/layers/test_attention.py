"""``nn.MultiheadAttention`` (and ``nn.TransformerEncoderLayer``) through ``SINGD``.

Two oracles, both independent of torchsingd:

1. PyTorch's own module: while SINGD is attached, the module's forward is replaced; an
   un-hooked deep copy must give the same outputs, attention weights and gradients.
2. A re-implementation of multi-head attention in float64 with explicit per-head
   softmax attention (Python loops over samples and heads). Autograd through it gives
   the projection-output gradients, hence the rows ``a``, ``g`` of every block and the
   expected ``H_K``, ``H_C``, ``grad_matrix`` and SINGD update.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from torchsingd import SINGD
from torchsingd.layers import MultiheadAttentionAdapter, get_adapter
from torchsingd.structures import DenseMatrix

DTYPE = torch.float64
E, H = 6, 2
BLOCKS = ("q", "k", "v", "out")


class Holder(nn.Module):
    """Gives the attention module the name ``"attn"`` (layer names ``"attn.q"`` ...)."""

    def __init__(self, attn: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attn = attn


def make_attn(seed: int = 0, **kwargs) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    attn = nn.MultiheadAttention(E, H, **kwargs).to(DTYPE)
    with torch.no_grad():  # non-zero biases (PyTorch initialises them to zero)
        for name, p in attn.named_parameters():
            if "bias" in name:
                p.normal_()
    return attn


def attached(attn: nn.MultiheadAttention, **kwargs) -> tuple[Holder, SINGD]:
    """``attn`` in a holder with SINGD (safeguards off: these tests check exact steps)."""
    holder = Holder(attn)
    kwargs.setdefault("safeguards", False)
    opt = SINGD(holder, T=1, warn_unsupported=False, **kwargs)
    return holder, opt


def labelled(label: str):
    """An ``assert_close`` message that keeps the details and names what failed."""
    return lambda message: f"{label}: {message}"


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# --------------------------------------------------- equality with PyTorch
CASES = {
    "packed_self": dict(module=dict(), kind="self"),
    "packed_nobias_cross_kpm": dict(module=dict(bias=False), kind="cross", kpm=True),
    "separate_cross_boolmask2d": dict(
        module=dict(kdim=3, vdim=5), kind="cross", attn_mask="bool2d"
    ),
    "separate_nobias_floatmask3d_perhead": dict(
        module=dict(kdim=4, vdim=4, bias=False),
        kind="cross",
        attn_mask="float3d",
        call=dict(average_attn_weights=False),
    ),
    "separate_vdim_only_boolmask3d": dict(
        module=dict(vdim=3), kind="cross", attn_mask="bool3d", kpm=True
    ),
    "unbatched_self_floatmask2d_kpm": dict(
        module=dict(), kind="self", batched=False, attn_mask="float2d", kpm=True
    ),
    "unbatched_separate_cross": dict(module=dict(kdim=4, vdim=5), kind="cross", batched=False),
    "causal_need_weights_false": dict(
        module=dict(),
        kind="self",
        attn_mask="causal",
        call=dict(is_causal=True, need_weights=False),
    ),
    "causal_need_weights_true": dict(
        module=dict(), kind="self", attn_mask="causal", call=dict(is_causal=True)
    ),
    "causal_kpm": dict(
        module=dict(),
        kind="self",
        attn_mask="causal",
        kpm=True,
        call=dict(is_causal=True, need_weights=False),
    ),
    "bias_kv_zero_attn_kpm": dict(
        module=dict(add_bias_kv=True, add_zero_attn=True), kind="cross", kpm=True
    ),
    "bias_kv_separate": dict(module=dict(add_bias_kv=True, kdim=3, vdim=4), kind="cross"),
    "zero_attn_unbatched_cross": dict(module=dict(add_zero_attn=True), kind="cross", batched=False),
    "need_weights_false_cross": dict(module=dict(), kind="cross", call=dict(need_weights=False)),
    "per_head_weights": dict(
        module=dict(), kind="cross", kpm=True, call=dict(average_attn_weights=False)
    ),
    "dropout_eval": dict(module=dict(dropout=0.5), kind="cross", eval=True),
}
B, SQ, SK = 3, 4, 5


def case_inputs(case: dict, attn: nn.MultiheadAttention, seed: int = 10):
    """``(query, key, value, call kwargs)`` in the module's layout."""
    batched = case.get("batched", True)
    batch_first = attn.batch_first
    sq = SQ
    sk = SQ if case["kind"] == "self" else SK
    kdim, vdim = attn.kdim, attn.vdim

    def shape(s, d):
        if not batched:
            return (s, d)
        return (B, s, d) if batch_first else (s, B, d)

    query = randn(*shape(sq, E), seed=seed)
    if case["kind"] == "self":
        key = value = query
    else:
        key = randn(*shape(sk, kdim), seed=seed + 1)
        value = randn(*shape(sk, vdim), seed=seed + 2)
    kwargs = dict(case.get("call", {}))
    nb = B if batched else None
    if case.get("kpm"):
        kpm = torch.zeros(sk, dtype=torch.bool)
        kpm[-1] = True
        if batched:
            kpm = kpm.repeat(B, 1)
            kpm[0, -2] = True
        kwargs["key_padding_mask"] = kpm
    mask = case.get("attn_mask")
    if mask == "bool2d":
        m = torch.zeros(sq, sk, dtype=torch.bool)
        m[0, 1] = m[2, 0] = m[3, 4] = True
        kwargs["attn_mask"] = m
    elif mask == "bool3d":
        m = torch.rand(nb * H, sq, sk, generator=torch.Generator().manual_seed(3)) < 0.3
        m[..., 0] = False  # keep one key visible for every query
        kwargs["attn_mask"] = m
    elif mask == "float2d":
        kwargs["attn_mask"] = randn(sq, sk, seed=4)
    elif mask == "float3d":
        kwargs["attn_mask"] = randn(nb * H, sq, sk, seed=5)
    elif mask == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(sq, dtype=DTYPE)
    mask = kwargs.get("attn_mask")
    if "key_padding_mask" in kwargs and mask is not None and mask.is_floating_point():
        # the same mask types (PyTorch deprecates mixing bool and float masks)
        kpm = kwargs["key_padding_mask"]
        kwargs["key_padding_mask"] = torch.zeros(kpm.shape, dtype=DTYPE).masked_fill(
            kpm, float("-inf")
        )
    return query, key, value, kwargs


def run_and_backward(attn, query, key, value, kwargs, seed: int = 20):
    """Forward, then backward of ``sum(R * out) + sum(R2 * weights)``; returns results."""
    query, key, value = (t.detach().clone().requires_grad_(True) for t in (query, key, value))
    if kwargs.get("_self"):
        key = value = query
    call = {k: v for k, v in kwargs.items() if not k.startswith("_")}
    out, weights = attn(query, key, value, **call)
    loss = (randn(*out.shape, seed=seed) * out).sum()
    if weights is not None:
        loss = loss + (randn(*weights.shape, seed=seed + 1) * weights).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in attn.named_parameters()}
    in_grads = [t.grad for t in {id(t): t for t in (query, key, value)}.values()]
    return out.detach(), None if weights is None else weights.detach(), grads, in_grads


def assert_same_results(got, exp, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    """Two :func:`run_and_backward` results agree: output, attention weights (or both
    ``None``), every parameter's gradient and the inputs' gradients."""
    tol = dict(rtol=rtol, atol=atol)
    torch.testing.assert_close(got[0], exp[0], **tol)
    if exp[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], exp[1], **tol)
    assert got[2].keys() == exp[2].keys()
    for n in exp[2]:
        torch.testing.assert_close(got[2][n], exp[2][n], **tol, msg=labelled(n))
    for g_got, g_exp in zip(got[3], exp[3], strict=True):
        torch.testing.assert_close(g_got, g_exp, **tol)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("batch_first", [True, False], ids=["bfirst", "seqfirst"])
def test_attached_module_matches_plain_module(name, batch_first):
    case = CASES[name]
    attn = make_attn(**case["module"], batch_first=batch_first)
    plain = copy.deepcopy(attn)
    holder, opt = attached(attn)
    assert "forward" in attn.__dict__  # the adapter's forward is installed
    if case.get("eval"):
        attn.eval()
        plain.eval()
    query, key, value, kwargs = case_inputs(case, attn)
    if case["kind"] == "self":
        kwargs["_self"] = True

    got = run_and_backward(attn, query, key, value, kwargs)
    exp = run_and_backward(plain, query, key, value, kwargs)
    assert_same_results(got, exp)
    # the backward pass was observed: every block captured statistics
    for block in BLOCKS:
        assert opt.layers[f"attn.{block}"].H_K is not None
    expected_fallback = {f"attn.{n}" for n in ("bias_k", "bias_v") if getattr(attn, n) is not None}
    assert set(opt.fallback_parameters) == expected_fallback


@pytest.mark.parametrize("need_weights", [True, False])
def test_attached_module_matches_plain_module_with_training_dropout(need_weights):
    """Same RNG stream: dropout masks (train mode) are the same as the plain module's."""
    attn = make_attn(dropout=0.3, batch_first=True)
    plain = copy.deepcopy(attn)
    attached(attn)
    query, key, value, kwargs = case_inputs({"kind": "cross", "kpm": True}, attn)
    kwargs["need_weights"] = need_weights
    torch.manual_seed(123)
    got = run_and_backward(attn, query, key, value, kwargs)
    torch.manual_seed(123)
    exp = run_and_backward(plain, query, key, value, kwargs)
    torch.testing.assert_close(got[0], exp[0], rtol=1e-10, atol=1e-12)
    for n in exp[2]:
        torch.testing.assert_close(got[2][n], exp[2][n], rtol=1e-10, atol=1e-12, msg=labelled(n))


FAST_CASES = {
    "self": dict(module=dict(), kind="self", call=dict(need_weights=False)),
    "cross_kv_dims": dict(module=dict(kdim=3, vdim=5), kind="cross", call=dict(need_weights=False)),
    "causal": CASES["causal_need_weights_false"],
    "dropout_train": dict(module=dict(dropout=0.4), kind="cross", call=dict(need_weights=False)),
}


@pytest.mark.parametrize("name", list(FAST_CASES))
@pytest.mark.parametrize("batch_first", [True, False], ids=["bfirst", "seqfirst"])
def test_calls_without_masks_or_weights_skip_the_identity_projections(
    name, batch_first, monkeypatch
):
    """No weights returned, no padding mask, no mask or a causal one: one
    ``scaled_dot_product_attention`` of the projections, PyTorch's numbers (and its
    dropout draw in train mode)."""
    import torchsingd.layers.attention as attention_module

    def general(*args, **kwargs):
        raise AssertionError("the general path (identity projections) was taken")

    monkeypatch.setattr(attention_module, "_attend_general", general)
    case = FAST_CASES[name]
    attn = make_attn(**case["module"], batch_first=batch_first)
    plain = copy.deepcopy(attn)
    _, opt = attached(attn)
    query, key, value, kwargs = case_inputs(case, attn)
    if case["kind"] == "self":
        kwargs["_self"] = True
    torch.manual_seed(5)
    got = run_and_backward(attn, query, key, value, kwargs)
    torch.manual_seed(5)
    exp = run_and_backward(plain, query, key, value, kwargs)
    assert got[1] is None and exp[1] is None
    assert_same_results(got, exp)
    for block in BLOCKS:
        assert opt.layers[f"attn.{block}"].H_K is not None
    if name == "dropout_train":  # the draw matters: another seed gives other numbers
        torch.manual_seed(6)
        other = run_and_backward(plain, query, key, value, kwargs)
        assert not torch.allclose(other[0], exp[0])


def test_no_grad_forward_uses_the_module_and_remove_hooks_restores_forward():
    attn = make_attn(batch_first=True)
    plain = copy.deepcopy(attn)
    holder, opt = attached(attn)
    query, key, value, _ = case_inputs({"kind": "cross"}, attn)
    with torch.no_grad():
        out, w = attn(query, key, value)
        out_p, w_p = plain(query, key, value)
    torch.testing.assert_close(out, out_p, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(w, w_p, rtol=1e-12, atol=1e-14)
    assert all(s.H_K is None for s in opt.layers.values())  # nothing was captured

    assert getattr(attn.forward, "__func__", None) is not nn.MultiheadAttention.forward
    opt.remove_hooks()
    assert "forward" not in attn.__dict__
    assert attn.forward.__func__ is nn.MultiheadAttention.forward
    out, _ = attn(query, key, value)
    out.sum().backward()
    assert all(s.H_K is None for s in opt.layers.values())  # no longer observed


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_deepcopy_of_attached_module_uses_its_own_weights(grad):
    """E.g. an EMA / evaluation copy made with ``copy.deepcopy(model)`` while attached."""
    attn = make_attn(batch_first=True)
    holder, opt = attached(attn)
    snapshot = copy.deepcopy(holder).attn
    plain = make_attn(batch_first=True)  # same seed: same weights
    with torch.no_grad():
        for p, q in zip(snapshot.parameters(), plain.parameters(), strict=True):
            p.mul_(2.0)
            q.mul_(2.0)
    query, key, value, _ = case_inputs({"kind": "cross"}, attn)
    with torch.set_grad_enabled(grad):
        out, _ = snapshot(query, key, value)
        out_plain, _ = plain(query, key, value)
    torch.testing.assert_close(out, out_plain, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------ the oracle
def reference_params(attn: nn.MultiheadAttention) -> dict[str, torch.Tensor | None]:
    """Leaf float64 copies of the projection parameters, by block."""
    E_ = attn.embed_dim
    out = {}
    for i, b in enumerate("qkv"):
        if attn._qkv_same_embed_dim:
            w = attn.in_proj_weight[i * E_ : (i + 1) * E_]
        else:
            w = getattr(attn, f"{b}_proj_weight")
        bias = None if attn.in_proj_bias is None else attn.in_proj_bias[i * E_ : (i + 1) * E_]
        out[f"W{b}"] = w.detach().clone().requires_grad_(True)
        out[f"b{b}"] = None if bias is None else bias.detach().clone().requires_grad_(True)
    out["Wout"] = attn.out_proj.weight.detach().clone().requires_grad_(True)
    bo = attn.out_proj.bias
    out["bout"] = None if bo is None else bo.detach().clone().requires_grad_(True)
    return out


def reference_forward(P, query, key, value, num_heads, key_padding_mask=None):
    """Batch-first ``[B, S, *]`` inputs; returns ``(inputs, outputs)`` of every block.

    Explicit per-sample, per-head softmax attention; masked keys get ``-inf``.
    """

    def lin(x, b):
        y = x @ P[f"W{b}"].T
        return y if P[f"b{b}"] is None else y + P[f"b{b}"]

    q, k, v = lin(query, "q"), lin(key, "k"), lin(value, "v")
    E_ = q.shape[-1]
    dh = E_ // num_heads
    samples = []
    for s in range(q.shape[0]):
        heads = []
        for h in range(num_heads):
            cols = slice(h * dh, (h + 1) * dh)
            scores = q[s, :, cols] @ k[s, :, cols].T / math.sqrt(dh)
            if key_padding_mask is not None:
                scores = scores.masked_fill(key_padding_mask[s][None, :], float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ v[s, :, cols])
        samples.append(torch.cat(heads, dim=-1))
    z = torch.stack(samples)
    out = lin(z, "out")
    return {"q": query, "k": key, "v": value, "out": z}, {"q": q, "k": k, "v": v, "out": out}


def expected_rows(x, g, bias: bool, approx: str, loss_average):
    """``a``, ``g`` of ALGORITHM.md section 2 for batch-first ``[B, S, d]`` tensors."""
    Bn, S = x.shape[:2]
    if approx == "expand":
        a = x.reshape(Bn * S, -1)
        gr = g.reshape(Bn * S, -1)
    else:
        a = x.mean(1)
        gr = g.sum(1)
    if bias:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
    a = a / math.sqrt(a.shape[0])
    n = {None: 1, "batch": Bn, "batch+sequence": Bn * S}[loss_average]
    return a, gr * math.sqrt(n)


CAPTURE_CASES = {
    "packed_bfirst_self": dict(module=dict(batch_first=True), kind="self"),
    "packed_seqfirst_cross_kpm": dict(module=dict(batch_first=False), kind="cross", kpm=True),
    "packed_nobias_bfirst_cross": dict(module=dict(batch_first=True, bias=False), kind="cross"),
    "separate_bfirst_cross": dict(module=dict(batch_first=True, kdim=3, vdim=5), kind="cross"),
    "separate_nobias_seqfirst_cross_kpm": dict(
        module=dict(batch_first=False, kdim=4, vdim=3, bias=False), kind="cross", kpm=True
    ),
}


def random_factor(d: int, seed: int) -> DenseMatrix:
    return DenseMatrix(torch.eye(d, dtype=DTYPE) + 0.2 * randn(d, d, seed=seed))


def set_random_factors(opt, prefix: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random dense ``K``, ``C`` (seeded by the block's position) in every block of
    ``opt``; returns them by block name less ``prefix``."""
    factors = {}
    for i, (name, layer) in enumerate(opt.layers.items()):
        layer.K = random_factor(layer.K.dim, seed=100 + i)
        layer.C = random_factor(layer.C.dim, seed=200 + i)
        factors[name.removeprefix(prefix)] = (layer.K.mat.clone(), layer.C.mat.clone())
    return factors


def capture_setup(name, approx="expand", loss_average="batch", batched=True):
    """Attach SINGD, set random dense ``K``, ``C``, run one forward/backward at step 0.

    Returns the module, optimizer, the random factors and the reference quantities:
    block inputs, block output gradients (autograd through the re-implementation) and
    parameter gradients, all batch first.
    """
    case = CAPTURE_CASES[name]
    attn = make_attn(**case["module"])
    holder, opt = attached(
        attn,
        structures="dense",
        kfac_approx=approx,
        loss_average=loss_average,
        lr=1.0,
        momentum=0.0,
        lr_cov=0.0,
        alpha1=0.0,
    )
    factors = set_random_factors(opt, "attn.")
    assert tuple(factors) == BLOCKS

    query, key, value, kwargs = case_inputs({**case, "batched": batched}, attn)
    if case["kind"] == "self":
        key = value = query
    out, _ = attn(query, key, value, **kwargs)
    R = randn(*out.shape, seed=30)
    (R * out).sum().backward()

    # the same computation, re-implemented, batch first
    bf = attn.batch_first or not batched

    def to_bf(t):
        if not batched:
            return t[None]
        return t if bf else t.transpose(0, 1)

    P = reference_params(attn)
    kpm = kwargs.get("key_padding_mask")
    if kpm is not None and not batched:
        kpm = kpm[None]
    ins, outs = reference_forward(P, to_bf(query), to_bf(key), to_bf(value), H, kpm)
    ref_out = outs["out"] if batched else outs["out"][0]
    if not bf:
        ref_out = ref_out.transpose(0, 1)
    torch.testing.assert_close(ref_out, out.detach(), rtol=1e-10, atol=1e-12)  # oracle check
    ref_loss = (R * ref_out).sum()
    blocks_out = [outs[b] for b in BLOCKS]
    leaves = [t for t in P.values() if t is not None]
    grads = torch.autograd.grad(ref_loss, blocks_out + leaves)
    g_out = dict(zip(BLOCKS, grads[:4], strict=True))
    leaf_grads = dict(zip([k for k, t in P.items() if t is not None], grads[4:], strict=True))
    return attn, opt, factors, ins, g_out, leaf_grads


@pytest.mark.parametrize("name", list(CAPTURE_CASES))
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("loss_average", [None, "batch", "batch+sequence"], ids=str)
def test_captured_statistics_equal_reference(name, approx, loss_average):
    attn, opt, factors, ins, g_out, _ = capture_setup(name, approx, loss_average)
    adapter = get_adapter(attn)
    assert isinstance(adapter, MultiheadAttentionAdapter)
    for block in BLOCKS:
        layer = opt.layers[f"attn.{block}"]
        K, C = factors[block]
        bias = attn.in_proj_bias is not None if block != "out" else attn.out_proj.bias is not None
        a, g = expected_rows(ins[block].detach(), g_out[block], bias, approx, loss_average)
        assert adapter.dims(attn, block=block) == (a.shape[1], g.shape[1])
        assert layer.capture_step == 0
        torch.testing.assert_close(
            layer.H_K.to_dense(), K.T @ a.T @ a @ K, rtol=1e-10, atol=1e-12, msg=labelled(block)
        )
        torch.testing.assert_close(
            layer.H_C.to_dense(), C.T @ g.T @ g @ C, rtol=1e-10, atol=1e-12, msg=labelled(block)
        )


@pytest.mark.parametrize("name", ["packed_bfirst_self", "separate_nobias_seqfirst_cross_kpm"])
@pytest.mark.parametrize(
    "approx, loss_average",
    [
        ("expand", None),
        ("expand", "batch+sequence"),
        ("expand", "batch"),
        ("reduce", "batch+sequence"),
    ],
    ids=str,
)
def test_unbatched_captures_are_one_sample(name, approx, loss_average):
    """An unbatched ``[L, E]`` input is one sequence (``B = 1``, ``S = L``)."""
    attn, opt, factors, ins, g_out, _ = capture_setup(name, approx, loss_average, batched=False)
    for block in BLOCKS:
        layer = opt.layers[f"attn.{block}"]
        K, C = factors[block]
        bias = attn.in_proj_bias is not None if block != "out" else attn.out_proj.bias is not None
        a, g = expected_rows(ins[block].detach(), g_out[block], bias, approx, loss_average)
        torch.testing.assert_close(
            layer.H_K.to_dense(), K.T @ a.T @ a @ K, rtol=1e-10, atol=1e-12, msg=labelled(block)
        )
        torch.testing.assert_close(
            layer.H_C.to_dense(), C.T @ g.T @ g @ C, rtol=1e-10, atol=1e-12, msg=labelled(block)
        )


@pytest.mark.parametrize("name", list(CAPTURE_CASES))
def test_grad_matrix_and_singd_update_assembly(name):
    """``grad_matrix`` slices, and a step (lr=1, no momentum, lr_cov=0) of
    ``C C^T G K K^T`` per block, written into the right rows of the parameters."""
    attn, opt, factors, _, _, leaf_grads = capture_setup(name)
    adapter = get_adapter(attn)
    expected_G = {}
    for block in BLOCKS:
        G = leaf_grads[f"W{block}"]
        if f"b{block}" in leaf_grads:
            G = torch.cat([G, leaf_grads[f"b{block}"][:, None]], dim=1)
        expected_G[block] = G
        torch.testing.assert_close(
            adapter.grad_matrix(attn, block=block), G, rtol=1e-10, atol=1e-12, msg=labelled(block)
        )

    before = {n: p.detach().clone() for n, p in attn.named_parameters()}
    opt.step()
    delta = {n: before[n] - p.detach() for n, p in attn.named_parameters()}
    upd = {}
    for block in BLOCKS:
        K, C = factors[block]
        upd[block] = C @ C.T @ expected_G[block] @ K @ K.T
        # lr_cov = 0: the factors are unchanged by the step
        torch.testing.assert_close(opt.layers[f"attn.{block}"].K.to_dense(), K, rtol=0, atol=0)

    has_bias = attn.in_proj_bias is not None

    def w(block):
        return upd[block][:, :-1] if has_bias else upd[block]

    tol = dict(rtol=1e-10, atol=1e-12)
    if attn._qkv_same_embed_dim:
        torch.testing.assert_close(
            delta["in_proj_weight"], torch.cat([w("q"), w("k"), w("v")]), **tol
        )
    else:
        for b in "qkv":
            torch.testing.assert_close(delta[f"{b}_proj_weight"], w(b), **tol)
    torch.testing.assert_close(delta["out_proj.weight"], w("out"), **tol)
    if has_bias:
        torch.testing.assert_close(
            delta["in_proj_bias"], torch.cat([upd[b][:, -1] for b in "qkv"]), **tol
        )
        torch.testing.assert_close(delta["out_proj.bias"], upd["out"][:, -1], **tol)
    else:
        assert attn.in_proj_bias is None and attn.out_proj.bias is None


def test_bias_kv_are_trained_by_fallback():
    attn = make_attn(add_bias_kv=True, batch_first=True)
    holder, opt = attached(attn, lr=0.1)
    assert set(opt.fallback_parameters) == {"attn.bias_k", "attn.bias_v"}
    assert set(opt.layers) == {f"attn.{b}" for b in BLOCKS}
    bk, bv = attn.bias_k.detach().clone(), attn.bias_v.detach().clone()
    query, key, value, _ = case_inputs({"kind": "cross"}, attn)
    out, _ = attn(query, key, value)
    out.square().sum().backward()
    assert attn.bias_k.grad is not None and attn.bias_k.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(attn.bias_k, bk) and not torch.equal(attn.bias_v, bv)


# ------------------------------------------------------ TransformerEncoderLayer
def make_encoder(seed, batch_first, norm_first):
    torch.manual_seed(seed)
    return nn.TransformerEncoderLayer(
        d_model=8,
        nhead=2,
        dim_feedforward=16,
        dropout=0.0,
        batch_first=batch_first,
        norm_first=norm_first,
    )


@pytest.mark.parametrize("batch_first", [True, False], ids=["bfirst", "seqfirst"])
@pytest.mark.parametrize("norm_first", [True, False], ids=["prenorm", "postnorm"])
def test_transformer_encoder_layer_trains_with_one_optimizer(batch_first, norm_first):
    model = make_encoder(0, batch_first, norm_first)
    teacher = make_encoder(1, batch_first, norm_first)
    plain = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(16, 5, 8, generator=gen)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        y = teacher(x, src_mask=mask, is_causal=True)

    opt = SINGD(model, lr=0.05, momentum=0.9, T=1, lr_cov=1e-2, warn_unsupported=False)
    assert set(opt.layers) == {
        "self_attn.q",
        "self_attn.k",
        "self_attn.v",
        "self_attn.out",
        "linear1",
        "linear2",
    }
    assert set(opt.fallback_parameters) == {
        "norm1.weight",
        "norm1.bias",
        "norm2.weight",
        "norm2.bias",
    }
    q0 = opt.layers["self_attn.q"].K.to_dense().clone()
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = ((model(x, src_mask=mask, is_causal=True) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert not torch.allclose(opt.layers["self_attn.q"].K.to_dense(), q0)
    assert not torch.equal(model.norm1.weight, plain.norm1.weight)  # fallback trained it

    # same forward as the plain module with the trained weights: train mode with grad,
    # no_grad, and eval mode (which may take PyTorch's fast path)
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x, src_mask=mask), plain(x, src_mask=mask))
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(model(x, src_mask=mask), plain(x, src_mask=mask))

    opt.remove_hooks()
    assert model.self_attn.forward.__func__ is nn.MultiheadAttention.forward


class Pointer(nn.Module):
    """Pointer-network style: only the attention weights feed the loss, so ``out_proj``
    is outside the backward pass (its gradient stays ``None``) while q and k train.
    ``touch_output`` adds ``0 * output``: ``out_proj`` then gets a zero gradient."""

    def __init__(self, touch_output: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.touch_output = touch_output
        self.enc = nn.Linear(4, E)
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.to(DTYPE)

    def forward(self, x):
        h = self.enc(x)
        out, w = self.attn(h[:, :1], h, h)
        logits = torch.log(w[:, 0] + 1e-9)
        return logits + 0 * out.sum() if self.touch_output else logits


@pytest.mark.parametrize("cls_name", ["SINGD", "KFAC"])
def test_attention_used_only_for_its_weights_trains_q_and_k(cls_name):
    """The q/k projections have gradients; the module used to be skipped whole (every
    block needed a gradient), so they never trained, silently. The blocks outside the
    backward pass now count as zero gradients: q, k and the parameters update exactly
    as when ``out_proj`` has a zero gradient of its own."""
    import torchsingd

    cls = getattr(torchsingd, cls_name)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, 4, generator=gen, dtype=DTYPE)
    y = torch.randint(0, 5, (8,), generator=gen)
    params = []
    for touch in (False, True):
        model = Pointer(touch)
        start = model.attn.in_proj_weight.detach().clone()
        opt = cls(model, lr=0.1, T=1)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.nll_loss(model(x), y).backward()
            assert (model.attn.out_proj.weight.grad is None) is not touch
            opt.step()
        assert not torch.equal(model.attn.in_proj_weight, start)
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in params[0]:
        assert torch.equal(params[0][name], params[1][name]), name


def test_a_backward_restricted_to_some_projections_captures_exactly_those():
    """Each block's statistics belong to its own weight: ``backward(inputs=...)`` with
    the output projection only captures ``out`` (it captured nothing: every block was
    judged by ``in_proj_weight``), with the separate query weight only ``q``."""
    for kwargs, inputs, expected in (
        ({}, lambda a: [a.out_proj.weight, a.out_proj.bias], {"attn.out"}),
        (dict(kdim=3, vdim=5), lambda a: [a.q_proj_weight], {"attn.q"}),
    ):
        attn = make_attn(batch_first=True, **kwargs)
        holder, opt = attached(attn)
        query = randn(2, 4, E, seed=1)
        key = randn(2, 3, kwargs.get("kdim", E), seed=2)
        value = randn(2, 3, kwargs.get("vdim", E), seed=3)
        attn(query, key, value)[0].square().sum().backward(inputs=inputs(attn))
        captured = {n for n, layer in opt.layers.items() if layer.pending is not None}
        assert captured == expected
