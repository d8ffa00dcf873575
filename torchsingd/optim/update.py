"""The math of one layer's SINGD step: tensors in, tensors out (ALGORITHM.md section 3).

Nothing here touches modules, hooks or optimizer state; the optimizer gathers the
inputs, calls these functions, checks the results and commits them. Each function
names its quantities as the paper does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from torchsingd.structures import StructuredMatrix
from torchsingd.structures.base import read_scalars


@dataclass
class FactorUpdate:
    """The result of :func:`update_factors`: new ``K``, ``C`` and momenta ``m_K``, ``m_C``.

    ``m_K``/``m_C`` are ``None`` when ``alpha1 == 0`` (no momentum is kept).
    """

    K: StructuredMatrix
    C: StructuredMatrix
    m_K: StructuredMatrix | None
    m_C: StructuredMatrix | None
    beta1_K: float = 0.0  # the step sizes: lr_cov, normalised (before the bound)
    beta1_C: float = 0.0
    bounded: int = 0  # how many of the two steps the factor-step bound reduced


def riemannian_momentum_step(
    H: StructuredMatrix,
    H_coeff: float,
    XtX: StructuredMatrix,
    damping_coeff: float,
    scale: float,
    m_old: StructuredMatrix | None,
    alpha1: float,
) -> StructuredMatrix:
    """``m = scale * (H_coeff * H + damping_coeff * XtX - I) + alpha1 * m_old``."""
    m = H.mul(H_coeff)
    m.add_(XtX, alpha=damping_coeff)
    m.add_identity_(-1.0).mul_(scale)
    if m_old is not None and alpha1 != 0.0:
        m.add_(m_old, alpha=alpha1)
    return m


def update_factors(
    K: StructuredMatrix,
    C: StructuredMatrix,
    m_K: StructuredMatrix | None,
    m_C: StructuredMatrix | None,
    H_K: StructuredMatrix,
    H_C: StructuredMatrix,
    *,
    damping: float,
    alpha1: float,
    lr_cov: float,
    kfac_like: bool,
    normalize_lr_cov: bool,
    H_C_scale: float = 1.0,
    max_step: float | None = None,
) -> FactorUpdate:
    """One preconditioner update (step 1 of ALGORITHM.md section 3).

    Args:
        K, C: current factors (``[d_i, d_i]``, ``[d_o, d_o]`` structured).
        m_K, m_C: current momenta, or ``None`` when ``alpha1 == 0``.
        H_K, H_C: ``P_K(K^T a^T a K)`` and ``P_C(C^T g^T g C)``, summed over the
            backward passes of this step.
        damping: ``lambda``. alpha1: Riemannian momentum. lr_cov: ``beta1`` (a number).
        kfac_like: IKFAC's rule instead of SINGD's.
        normalize_lr_cov: divide ``beta1`` by ``max(1, max|m|)`` per factor and scale
            the step by ``1 - alpha1``.
        H_C_scale: a factor that multiplies ``H_C`` wherever it appears (used to
            divide out a gradient scale that changed after the backward pass).
        max_step: the factor-step bound (a safeguard, not in the reference): ``beta1``
            is reduced where needed so that ``||beta1 * m||_2 <= max_step`` (see
            :func:`factor_step`). ``None``: the reference's rule.

    Returns:
        New ``K``, ``C`` (``K - beta1 K m_K``, ``C - beta1 C m_C``) and new momenta;
        the inputs are not modified.
    """
    scale = 0.5 * (1.0 - alpha1) if normalize_lr_cov else 0.5
    KtK, CtC = K.inner(), C.inner()
    # Scalar coefficients are Python floats (float64): a large gradient-scale
    # correction times a small trace must not overflow the factors' dtype on the way.
    if kfac_like:
        coeff_HK, coeff_HC = 1.0, H_C_scale
        damp_K = damp_C = damping
    else:
        tr_HC, tr_HK, tr_CtC, tr_KtK = read_scalars(  # one sync, not four
            [H_C.average_trace(), H_K.average_trace(), CtC.average_trace(), KtK.average_trace()]
        )
        coeff_HK, coeff_HC = H_C_scale * tr_HC, H_C_scale * tr_HK
        damp_K, damp_C = damping * tr_CtC, damping * tr_KtK
    new_m_K = riemannian_momentum_step(H_K, coeff_HK, KtK, damp_K, scale, m_K, alpha1)
    new_m_C = riemannian_momentum_step(H_C, coeff_HC, CtC, damp_C, scale, m_C, alpha1)

    beta1_K = beta1_C = lr_cov
    if normalize_lr_cov:
        max_K, max_C = read_scalars([new_m_K.max_abs(), new_m_C.max_abs()])
        beta1_K = lr_cov / max(1.0, max_K)
        beta1_C = lr_cov / max(1.0, max_C)
    inputs_K = inputs_C = None
    if max_step is not None:  # what both bounds decide from, read in one sync
        # (none for a zero step, which bounded_step leaves alone before reading)
        tensors_K = new_m_K.bound_inputs() if beta1_K != 0.0 else []
        tensors_C = new_m_C.bound_inputs() if beta1_C != 0.0 else []
        values = read_scalars(tensors_K + tensors_C)
        inputs_K, inputs_C = values[: len(tensors_K)], values[len(tensors_K) :]
    new_K, bounded_K = factor_step(K, new_m_K, beta1_K, max_step, inputs_K)
    new_C, bounded_C = factor_step(C, new_m_C, beta1_C, max_step, inputs_C)
    keep = alpha1 != 0.0
    return FactorUpdate(
        new_K,
        new_C,
        new_m_K if keep else None,
        new_m_C if keep else None,
        beta1_K,
        beta1_C,
        bounded_K + bounded_C,
    )


@dataclass
class FactorJob:
    """The inputs of :func:`update_factors` for one block that
    :func:`update_factors_together` takes with others (the step's options shared)."""

    K: StructuredMatrix
    C: StructuredMatrix
    m_K: StructuredMatrix | None
    m_C: StructuredMatrix | None
    H_K: StructuredMatrix
    H_C: StructuredMatrix
    H_C_scale: float = 1.0


def update_factors_together(
    jobs: Sequence[FactorJob],
    *,
    damping: float,
    alpha1: float,
    lr_cov: float,
    kfac_like: bool,
    normalize_lr_cov: bool,
    max_step: float | None = None,
) -> list[FactorUpdate]:
    """:func:`update_factors` of every job, computed together: one batched operation
    per step of the update for all of them instead of one per block (a transformer's
    equal-shaped projections: a factor update of a small layer is ~100 operators of
    a few microseconds each).

    The jobs' ``K`` (and ``C``) are members of one family whose ``stacks`` is true, one size,
    dtype and device; their momenta all present or all ``None``. Their storages are
    stacked (``[m, ...]``) and the family's ``stacked_*`` methods take them; per-block
    numbers (traces, ``H_C_scale``, the normalised or bounded ``beta1``) are read in
    one synchronisation per kind and applied as columns. A block whose step the
    factor-step bound reduces (rare: :func:`factor_step`) takes that step on its own.
    The results are :func:`update_factors`' up to rounding (a product with a
    per-block column where one with a Python number was taken); each result holds
    its own tensors.
    """
    K0, C0 = jobs[0].K, jobs[0].C
    scale = 0.5 * (1.0 - alpha1) if normalize_lr_cov else 0.5
    K, C = stack_storage([j.K for j in jobs]), stack_storage([j.C for j in jobs])
    H_K, H_C = stack_storage([j.H_K for j in jobs]), stack_storage([j.H_C for j in jobs])
    KtK, CtC = K0.stacked_inner(K), C0.stacked_inner(C)
    scales = [j.H_C_scale for j in jobs]
    if kfac_like:
        coeff_HK, coeff_HC = [1.0] * len(jobs), scales
        damp_K = damp_C = [damping] * len(jobs)
    else:  # the average traces, [4, m], in one sync (as update_factors' four)
        averages = [
            C0.stacked_average_trace(H_C),
            K0.stacked_average_trace(H_K),
            C0.stacked_average_trace(CtC),
            K0.stacked_average_trace(KtK),
        ]  # (float64 holds every dtype's values exactly: one stack for K's and C's)
        tr_HC, tr_HK, tr_CtC, tr_KtK = torch.stack([t.double() for t in averages]).tolist()
        coeff_HK = [s * t for s, t in zip(scales, tr_HC, strict=True)]
        coeff_HC = [s * t for s, t in zip(scales, tr_HK, strict=True)]
        damp_K, damp_C = [damping * t for t in tr_CtC], [damping * t for t in tr_KtK]
    m_K = stack_storage([j.m_K for j in jobs]) if jobs[0].m_K is not None else None
    m_C = stack_storage([j.m_C for j in jobs]) if jobs[0].m_C is not None else None
    new_m_K = _momentum_together(K0, H_K, coeff_HK, KtK, damp_K, scale, m_K, alpha1)
    new_m_C = _momentum_together(C0, H_C, coeff_HC, CtC, damp_C, scale, m_C, alpha1)

    beta1_K = beta1_C = [lr_cov] * len(jobs)
    if normalize_lr_cov:
        max_K, max_C = torch.stack([_max_abs(new_m_K), _max_abs(new_m_C)]).tolist()
        beta1_K = [lr_cov / max(1.0, v) for v in max_K]
        beta1_C = [lr_cov / max(1.0, v) for v in max_C]
    new_K, bounded_K = _factor_steps(K0, K, new_m_K, beta1_K, max_step)
    new_C, bounded_C = _factor_steps(C0, C, new_m_C, beta1_C, max_step)
    keep = alpha1 != 0.0
    return [
        FactorUpdate(
            new_K[i],
            new_C[i],
            _member(K0, new_m_K, i) if keep else None,
            _member(C0, new_m_C, i) if keep else None,
            beta1_K[i],
            beta1_C[i],
            bounded_K[i] + bounded_C[i],
        )
        for i in range(len(jobs))
    ]


def stack_storage(members: Sequence[StructuredMatrix]) -> tuple[Tensor, ...]:
    """The storage of members of one family and sizes, each tensor stacked along a new
    first dimension (what the ``stacked_*`` methods take)."""
    return tuple(torch.stack(ts) for ts in zip(*(m._storage() for m in members), strict=True))


def _member(like: StructuredMatrix, storage: tuple[Tensor, ...], i: int) -> StructuredMatrix:
    """Member ``i`` of stacked ``storage``, holding copies (not views of the stack)."""
    return like._from_storage(tuple(t[i].clone() for t in storage))


def _column(values: Sequence[float], like: Tensor) -> Tensor:
    """``values`` (one per member) shaped to scale ``like``'s members (``[m, 1, ...]``),
    in at least float32 (a 16-bit column would round them first; the products then
    round once, as with a Python number)."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    column = torch.tensor(values, dtype=dtype, device=like.device)
    return column.view(-1, *([1] * (like.ndim - 1)))


def _momentum_together(
    X0: StructuredMatrix,
    H: tuple[Tensor, ...],
    H_coeff: list[float],
    XtX: tuple[Tensor, ...],
    damp: list[float],
    scale: float,
    m_old: tuple[Tensor, ...] | None,
    alpha1: float,
) -> tuple[Tensor, ...]:
    """:func:`riemannian_momentum_step` of stacked members (per-member coefficients)."""
    m = tuple(torch.mul(h, _column(H_coeff, h)).to(h.dtype) for h in H)
    for t, x in zip(m, XtX, strict=True):
        t.addcmul_(x, _column(damp, x))
    X0.stacked_add_identity_(m, -1.0)
    for t in m:
        t.mul_(scale)
    if m_old is not None and alpha1 != 0.0:
        for t, old in zip(m, m_old, strict=True):
            t.add_(old, alpha=alpha1)
    return m


def _max_abs(storage: tuple[Tensor, ...]) -> Tensor:
    """Each stacked member's :meth:`~StructuredMatrix.max_abs` (``[m]``)."""
    parts = [t.flatten(1).abs().amax(1) for t in storage if t[0].numel() > 0]
    if not parts:
        return storage[0].new_zeros(storage[0].shape[0])
    return torch.stack(parts).amax(0)


def _factor_steps(
    X0: StructuredMatrix,
    X: tuple[Tensor, ...],
    m: tuple[Tensor, ...],
    beta1: list[float],
    max_step: float | None,
) -> tuple[list[StructuredMatrix], list[int]]:
    """:func:`factor_step` of stacked members: ``X - beta1 X m`` for all at once, and
    for those whose quick bound (:meth:`StructuredMatrix.quick_norm_bound`, from one
    sync for all) does not settle the factor-step bound, :func:`factor_step` alone."""
    count = len(beta1)
    alone: dict[int, list[float] | None] = {}
    if max_step is not None:  # the default bound_inputs: ||m||_F^2 and avgtr(m)
        # (of m in float32 where m is 16-bit: stacked_* sum 16-bit numbers in float32)
        squares, averages = X0.stacked_frobenius_sq(m), X0.stacked_average_trace(m)
        values = torch.stack([squares.double(), averages.double()]).tolist()
        m0 = X0._from_storage(tuple(t[0] for t in m))  # (the bound of each m_i from its inputs)
        for i in range(count):
            inputs = [values[0][i], values[1][i]]
            if beta1[i] != 0.0 and beta1[i] * m0.quick_norm_bound(inputs) > max_step:
                alone[i] = inputs
    product = X0.stacked_matmul(X, m)
    if len(set(beta1)) == 1:
        stepped = [torch.add(x, p, alpha=-beta1[0]) for x, p in zip(X, product, strict=True)]
    else:
        # (a 16-bit x: products in float32 with the float32 column, rounded once)
        stepped = [
            x.addcmul(p, _column([-b for b in beta1], p)).to(x.dtype)
            for x, p in zip(X, product, strict=True)
        ]
    out, bounded = [], []
    for i in range(count):
        if i in alone:
            X_i = X0._from_storage(tuple(t[i] for t in X))
            m_i = X0._from_storage(tuple(t[i] for t in m))
            new, acted = factor_step(X_i, m_i, beta1[i], max_step, alone[i])
            out.append(new)
            bounded.append(int(acted))
        else:
            out.append(_member(X0, stepped, i))
            bounded.append(0)
    return out, bounded


def factor_step(
    X: StructuredMatrix,
    m: StructuredMatrix,
    beta1: float,
    max_step: float | None,
    inputs: list[float] | None = None,
) -> tuple[StructuredMatrix, bool]:
    """``X (I - beta1 m)`` (a new member) and whether the factor-step bound acted.

    With ``max_step`` the step ``beta1 m`` is bounded to ``||.||_2 <= max_step`` by
    :meth:`~torchsingd.structures.StructuredMatrix.bounded_step`: for a whole matrix,
    ``beta1`` is reduced; for diagonal and block-diagonal factors, each entry or block
    on its own. Where the bound holds already the result is the reference's
    ``X - beta1 X m`` bit for bit.

    Why: the factor update ``K <- K (I - beta1 m)`` is a well-behaved multiplicative
    step only while ``||beta1 m||_2 < 1``. SINGD's ``m`` is about ``-I/2`` while the
    curvature is small (the factors grow by ``1 + beta1/2`` per update), and gains
    eigenvalues of ``avgtr(H_C) * lambda(H_K) / 2`` when it rises: with ``beta1 = 0.1``
    those exceeded ``1/beta1`` on the MNIST-1D CNN within 40 steps (``||beta1 m||_2``
    1.3, then 2.6, then 37), where ``I - beta1 m`` turns indefinite and then large, so
    one update multiplies ``K`` by ~36 and the next parameter step is inf/NaN (the
    reference's divergence). Bounding ``||beta1 m||_2 <= max_step < 1`` keeps every
    update a contraction or expansion by at most ``1 +- max_step`` in any direction
    and leaves ``beta1`` alone whenever the bound holds already (with ``lr_cov=1e-2``
    it acted in at most 17 of a run's 1920 factor updates in the c8392d9 sweep, 34 in
    the 10-seed bf16-mixed one). ``||m||_2`` is
    :meth:`~torchsingd.structures.StructuredMatrix.spectral_norm_bound`, an upper
    bound, so the reduction errs on the safe side.
    """
    step = m.bounded_step(beta1, max_step, inputs) if max_step is not None else None
    if step is None:
        return X.add(X.matmul(m), alpha=-beta1), False
    return X.add(X.matmul(step), alpha=-1.0), True


def natural_gradient(
    K: StructuredMatrix,
    C: StructuredMatrix,
    grad: Tensor,
    KKt: Any = None,
    CCt: Any = None,
) -> Tensor:
    """``C C^T @ grad @ K K^T`` for ``grad: [d_o, d_i]``, in the factors' dtypes.

    ``KKt``/``CCt`` may pass cached ``K.outer_operator()``/``C.outer_operator()``.
    ``grad`` is cast to ``K``'s dtype for the ``K`` side and to ``C``'s dtype for the
    ``C`` side; the result comes back in ``grad``'s dtype.
    """
    KKt = K.outer_operator() if KKt is None else KKt
    CCt = C.outer_operator() if CCt is None else CCt
    right = KKt.mm(grad.T.to(K.dtype)).T  # grad K K^T = (K K^T grad^T)^T
    right = right.to(C.dtype)
    # right is a fresh tensor: operators with an in-place product (diagonal, the
    # sparse K K^T operators) reuse it instead of allocating another [d_o, d_i]
    in_place = getattr(CCt, "mm_", None)
    out = in_place(right) if in_place is not None and right.is_contiguous() else CCt.mm(right)
    return out.to(grad.dtype)


#: Layers whose gradient has at most this many numbers take part in the batched
#: natural gradient (:func:`natural_gradients`): their products are a few
#: microseconds each, so a step's time goes to dispatching them (a ViT of width 64:
#: 28 products per step); a larger gradient is applied alone (stacking copies it).
#: Measured for 8 layers ``[w, w + 1]`` (2 CPU threads, together / alone): w = 64:
#: block-diagonal 0.54, hierarchical 0.66, diagonal 0.39; w = 128: 0.72, 0.41, 0.89;
#: w = 256 (65792 numbers, just above): 1.40, 0.82, 1.00; w = 512: 3.0, 1.7, 3.8.
BATCH_MAX_NUMEL = 2**16


@dataclass
class NaturalGradientTask:
    """The inputs of :func:`natural_gradient` for one block, its ``result`` set by
    :func:`natural_gradients` (which computes many blocks' at once)."""

    K: StructuredMatrix
    C: StructuredMatrix
    G: Tensor
    KKt: Any
    CCt: Any
    result: Tensor | None = None
    #: tasks with one key are computed together; ``None``: alone
    key: tuple | None = field(init=False)

    def __post_init__(self) -> None:
        self.key = None
        if self.G.numel() > BATCH_MAX_NUMEL:
            return
        methods = [getattr(op, "batch_key", None) for op in (self.KKt, self.CCt)]
        if None in methods:
            return
        key_K, key_C = methods[0](), methods[1]()
        if key_K is not None and key_C is not None:
            G = self.G
            self.key = (key_K, key_C, self.K.dtype, self.C.dtype, G.shape, G.dtype, G.device)


def natural_gradients(tasks: Sequence[NaturalGradientTask]) -> None:
    """Sets every task's ``result`` to :func:`natural_gradient` of its inputs.

    Tasks of equal shapes and operator kinds (:attr:`NaturalGradientTask.key`:
    small gradients, operators with a ``stacked_mm``) are computed together: their
    gradients stacked into one ``[m, d_o, d_i]`` tensor, each side one batched
    application (:meth:`~torchsingd.structures.StructuredMatrix.stacked_mm`), the
    results views of one output. The same arithmetic as one at a time up to the
    order of the products' sums (batched products may round differently).
    """
    groups: dict[tuple, list[NaturalGradientTask]] = {}
    for task in tasks:
        key = task.key
        if key is None:
            task.result = natural_gradient(task.K, task.C, task.G, task.KKt, task.CCt)
        else:
            groups.setdefault(key, []).append(task)
    for group in groups.values():
        if len(group) == 1:
            t = group[0]
            t.result = natural_gradient(t.K, t.C, t.G, t.KKt, t.CCt)
            continue
        first = group[0]
        G = torch.stack([t.G for t in group])  # [m, d_o, d_i]
        # the K side on the rows of G^T (as natural_gradient), then the C side
        right = type(first.KKt).stacked_mm([t.KKt for t in group], G.mT.to(first.K.dtype))
        right = right.mT.to(first.C.dtype)
        out = type(first.CCt).stacked_mm([t.CCt for t in group], right).to(G.dtype)
        for t, result in zip(group, out.unbind(0), strict=True):
            t.result = result


def parameter_step(
    params: Sequence[Tensor],
    directions: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> list[Tensor | None]:
    """Step 3 of ALGORITHM.md: ``u = G_nat + gamma W``; ``b <- alpha2 b + u``; ``W -= lr b``.

    Updates ``params`` (and existing ``momentum_buffers``) in place and returns the
    momentum buffers (new ones are created when ``momentum != 0`` and none exists).
    ``directions`` are not modified. The parameters must be distinct tensors: each
    operation runs over all of them at once (``torch._foreach_*``; the same
    per-tensor arithmetic as a loop, in a few dispatches instead of four per tensor).
    """
    params, directions = list(params), list(directions)
    buffers = list(momentum_buffers)
    if not (len(params) == len(directions) == len(buffers)):
        raise ValueError(
            f"params, directions and momentum_buffers differ in length: "
            f"{len(params)}, {len(directions)}, {len(buffers)}."
        )
    if not params:
        return []
    if weight_decay != 0.0:
        directions = torch._foreach_add(directions, params, alpha=weight_decay)
    if momentum == 0.0:
        torch._foreach_add_(params, directions, alpha=-lr)
        return buffers
    old = [i for i, buf in enumerate(buffers) if buf is not None]
    if old:
        kept = [buffers[i] for i in old]
        torch._foreach_mul_(kept, momentum)
        torch._foreach_add_(kept, [directions[i] for i in old])
    for i, buf in enumerate(buffers):
        if buf is None:
            buffers[i] = torch.clone(directions[i]).detach()
    torch._foreach_add_(params, buffers, alpha=-lr)
    return buffers


def clip_by_global_norm(directions: Sequence[Tensor], max_norm: float | None) -> float:
    """Scale ``directions`` in place so their joint L2 norm is at most ``max_norm``.

    Returns the norm before clipping (``0.0`` for no directions).
    """
    if not directions:
        return 0.0
    dtype = torch.promote_types(directions[0].dtype, torch.float32)
    norms = torch.stack([torch.linalg.vector_norm(d, dtype=dtype) for d in directions])
    norm = float(torch.linalg.vector_norm(norms))
    if max_norm is not None and norm > max_norm:
        for d in directions:
            d.mul_(max_norm / norm)
    return norm


def trust_region_scale(
    directions: Sequence[Tensor], lr: float, inner: float, kl_clip: float
) -> float:
    """Scale ``directions`` in place so the step's predicted KL change is at most ``kl_clip``.

    ``inner = sum <G_nat, G>`` over the directions' layers; the quadratic model of the
    loss predicts a change of ``lr^2 * inner`` (the "KL" of Ba et al.'s K-FAC
    trust region). Returns the factor applied, ``min(1, sqrt(kl_clip / (lr^2 inner)))``.

    Why: the preconditioner ``K K^T (x) C C^T`` estimates the inverse curvature from
    statistics up to ``T`` steps old, damped towards ``1 / lambda`` when gradients are
    small (early training, or near a minimum). When the gradients then grow, the step
    ``lr * G_nat`` is far too long before the factors catch up: on the MNIST-1D CNN
    (dense, ``lr=1e-2``) ``lr^2 <G_nat, G>`` rose from ``7e-5`` to ``2e-2`` and then
    ``5e4`` in 40 steps, the loss from 1.7 to 9.4 to inf. In runs that the reference
    survives it stayed below ``6e-3``.
    """
    predicted = lr * lr * inner
    if not predicted > kl_clip:  # also when NaN: the non-finite check handles it
        return 1.0
    factor = math.sqrt(kl_clip / predicted)
    for d in directions:
        d.mul_(factor)
    return factor


def moment_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of AdamW's moments for a weight of ``dtype``: float32 for float16
    (see :func:`adamw_step`), else the weight's."""
    return torch.float32 if dtype == torch.float16 else dtype


#: AdamW's per-parameter moments (kept in :func:`moment_dtype`)
ADAMW_MOMENTS = ("exp_avg", "exp_avg_sq")


def adamw_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """AdamW (decoupled weight decay, bias-corrected moments), in place.

    Each ``states[i]`` holds ``step`` (int), ``exp_avg`` and ``exp_avg_sq`` (created on
    the first call). The tensors with the same step count are updated together
    (``torch._foreach_*``: per tensor the arithmetic of ``torch.optim.AdamW``, bit for
    bit: ``p.mul_``, ``m.lerp_``, ``v.mul_().addcmul_``, ``(v.sqrt() / c2 ** 0.5).add_``
    and ``p.addcdiv_``, in eight dispatches instead of eight per tensor).

    Float16 weights keep their moments in float32 and take the step computed there,
    rounded once: in float16 ``(1 - beta2) g^2`` underflows to 0 for ``|g| < 7.7e-3``
    and ``eps = 1e-8`` rounds to 0, so ``v`` stays 0 and the step is ``lr m / 0``
    (``torch.optim.AdamW`` on a float16 weight of 1 with ``g = 1e-4``: ``-inf`` after
    one step; with ``eps`` raised to float16's smallest ``2^-24``: -49, -100, -150;
    float32 AdamW: 0.97).
    """
    beta1, beta2 = betas
    by_step: dict[tuple[int, bool], list[int]] = {}
    for i, (p, state) in enumerate(zip(params, states, strict=True)):
        wide = moment_dtype(p.dtype)
        if "exp_avg" not in state:
            state["step"] = 0
            for key in ADAMW_MOMENTS:
                state[key] = torch.zeros_like(p, dtype=wide)
        for key in ADAMW_MOMENTS:  # (torch.optim's load_state_dict casts to the weight's)
            if state[key].dtype != wide:
                state[key] = state[key].to(wide)
        state["step"] += 1
        by_step.setdefault((state["step"], wide != p.dtype), []).append(i)
    for (t, widened), index in by_step.items():
        ps, gs = [params[i] for i in index], [grads[i] for i in index]
        if widened:
            gs = [g.float() for g in gs]
        ms = [states[i]["exp_avg"] for i in index]
        vs = [states[i]["exp_avg_sq"] for i in index]
        if weight_decay != 0.0:
            torch._foreach_mul_(ps, 1.0 - lr * weight_decay)
        torch._foreach_lerp_(ms, gs, 1.0 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
        denoms = torch._foreach_sqrt(vs)  # sqrt(v) / sqrt(c2) + eps, torch.optim's order
        torch._foreach_div_(denoms, (1.0 - beta2**t) ** 0.5)
        torch._foreach_add_(denoms, eps)
        if widened:  # the step in float32, rounded onto the float16 weight once
            steps = torch._foreach_div(ms, denoms)
            torch._foreach_mul_(steps, -lr / (1.0 - beta1**t))
            torch._foreach_add_(ps, [d.to(p.dtype) for d, p in zip(steps, ps, strict=True)])
        else:
            torch._foreach_addcdiv_(ps, ms, denoms, value=-lr / (1.0 - beta1**t))


def sgd_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """SGD with momentum and coupled weight decay (``torch.optim.SGD``'s rule), in place."""
    buffers = parameter_step(
        params,
        grads,
        [s.get("momentum_buffer") for s in states],
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
    )
    for state, buf in zip(states, buffers, strict=True):
        if buf is not None:
            state["momentum_buffer"] = buf
