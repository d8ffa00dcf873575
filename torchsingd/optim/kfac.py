"""``KFAC``: the baseline SINGD is measured against (ALGORITHM.md section 5).

Same layers, same captured rows ``a``, ``g``, same parameter step as SINGD; the
preconditioner is the classic one: running averages of the Kronecker factors,

    S_K <- (1 - beta1) S_K + beta1 a^T a,    S_C <- (1 - beta1) S_C + beta1 g^T g

every ``T`` steps, and ``G_nat = (S_C + lambda I)^-1 grad(W) (S_K + lambda I)^-1`` with
the damped inverses recomputed at each factor update (a damping changed between
steps reaches the inverses there, up to ``T - 1`` steps later, as in K-FAC's usual
schedule). The factors start at ``S = (1 - lambda) I`` so that ``S + lambda I = I``,
the preconditioner SINGD starts from (``K = C = I``); then IKFAC
(``SINGD(kfac_like=True)``) tracks KFAC to first order in ``beta1``. For a damping
above 1 they start at ``S = 0`` (inverse ``I / lambda``) instead: a negative start
would make ``S + lambda I`` indefinite once the damping is lowered.

Factors are dense, except an embedding's vocabulary side, whose statistic is
diagonal (``vocab_structure``, ``"diagonal"`` by default, inverted element-wise).

Precision: KFAC needs matrix inverses. PyTorch has no bfloat16/float16 kernels for
them, and half precision cannot keep ``S + lambda I`` safely positive definite, so
KFAC refuses half-precision factors with a ``ValueError`` (never upcasting behind the
user's back): keep the factors in float32 (``factor_dtype=torch.float32``, also for a
bfloat16 model) or use SINGD, which needs no inverse.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torchsingd.layers.base import LayerAdapter, inner_of_rows
from torchsingd.optim.base import (
    BlockState,
    KroneckerOptimizer,
    ModuleEntry,
    common_defaults,
    parse_dtypes,
    scheduled_lr_cov,
    validate_common,
)
from torchsingd.structures import DenseMatrix, DiagonalMatrix, StructuredMatrix, get_structure
from torchsingd.structures.base import check_rows, read_scalars

HALF_PRECISION = (torch.bfloat16, torch.float16)
INVERTIBLE = (DenseMatrix, DiagonalMatrix)


@dataclass
class KFACLayerState(BlockState):
    """KFAC's state of one block: running factors and their damped inverses.

    ``S_K``: ``[d_i, d_i]``, ``S_C``: ``[d_o, d_o]``; ``inv_K = (S_K + lambda I)^-1``,
    ``inv_C = (S_C + lambda I)^-1`` as of the last factor update.
    """

    S_K: StructuredMatrix | None = None
    S_C: StructuredMatrix | None = None
    inv_K: StructuredMatrix | None = None
    inv_C: StructuredMatrix | None = None

    def factors(self) -> dict[str, StructuredMatrix | None]:
        return {"S_K": self.S_K, "S_C": self.S_C, "inv_K": self.inv_K, "inv_C": self.inv_C}

    def pending_like(self) -> tuple[StructuredMatrix, StructuredMatrix]:
        return self.S_K, self.S_C


def damped_inverse(S: StructuredMatrix, damping: float) -> StructuredMatrix:
    """``(S + damping I)^-1`` for a dense or diagonal ``S``.

    A singular matrix gives an all-inf result (so the step is skipped, not corrupted).
    """
    if isinstance(S, DiagonalMatrix):
        return DiagonalMatrix(1.0 / (S.diag + damping))
    M = S.mat + damping * torch.eye(S.dim, dtype=S.dtype, device=S.device)
    inverse, info = torch.linalg.inv_ex(M)
    if bool(info != 0):
        inverse = torch.full_like(M, float("inf"))
    return DenseMatrix(inverse)


def identity_like(X: StructuredMatrix) -> StructuredMatrix:
    """The identity in ``X``'s family, through which the adapters' ``K``-weighted
    statistics ``P(K^T a^T a K)`` give KFAC's ``P(a^T a)`` (dense: see
    :class:`_DenseIdentity`)."""
    if type(X) is DenseMatrix:
        return _DenseIdentity(X.dim, X.dtype, X.device)
    return type(X).eye(X.dim, *X.options(), dtype=X.dtype, device=X.device)


class _DenseIdentity(DenseMatrix):
    """The dense identity as a statistic's ``K``: ``P(I Z Z^T I) = Z Z^T``, one product
    instead of ``I^T Z`` and then its square; always by the (summed, chunked) Gram
    route, which applies no ``K`` and so has no rounding to amplify, in any dtype.
    Results are plain :class:`DenseMatrix` members.

    It stores no ``d x d`` tensor (``torch.eye`` of the CNN's 3137-wide linear layer
    was 39 MB per captured statistic), only an empty one for ``dtype`` and ``device``;
    reading the entries (``mat``) raises; products with dense matrices (``mm``,
    ``tmm``) are copies, so an adapter's ``input_statistic`` may use them.
    """

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        StructuredMatrix.__init__(self, dim)
        self._like = torch.empty(0, dtype=dtype, device=device)

    def tensors(self) -> tuple[Tensor, ...]:
        return (self._like,)

    @property
    def mat(self) -> Tensor:
        raise NotImplementedError(
            "KFAC's statistic identity stores no entries; only the Gram route "
            "(gram_of, inner_of_gram, inner_of) is defined."
        )

    def mm(self, X: Tensor) -> Tensor:
        """``I X`` (a copy): what a user adapter's ``input_statistic`` may apply."""
        check_rows(X, self.dim)
        return X.clone()

    def tmm(self, X: Tensor) -> Tensor:
        return self.mm(X)

    def inner_of(self, Z: Tensor) -> DenseMatrix:
        return self.gram_of(Z)

    def gram_pays(self, columns: int) -> bool:
        return True

    def inner_of_gram(self, G: StructuredMatrix) -> DenseMatrix:
        if not isinstance(G, DenseMatrix) or G.dim != self.dim:
            raise ValueError(f"Incompatible Gram {G!r} for {self!r}.")
        return G


class KFAC(KroneckerOptimizer):
    """Kronecker-factored approximate curvature with damped inverses (the baseline).

    Args:
        model, params, lr, momentum, damping, weight_decay, T, loss_average,
        kfac_approx, warn_unsupported, init_grad_scale: as for :class:`~torchsingd.SINGD`
        (from ``weight_decay`` on keyword only: SINGD's ``alpha1`` comes first there).
        lr_cov: ``beta1``, the weight of the new statistic in the running average (a
            number or a callable of the step).
        factor_dtype: dtype of the factors (a pair for input and output side, or
            one dtype; ``None``: the weight's dtype). Half precision is refused.
        vocab_structure: ``"diagonal"`` (default) or ``"dense"`` for embeddings.
        fallback, fallback_lr, fallback_betas, fallback_eps, fallback_weight_decay,
        max_update_norm, on_nonfinite, distributed_strategy, process_group: as for
        :class:`~torchsingd.SINGD`.
        kl_clip: the trust region ("KL clipping" of distributed K-FAC): a group's
            preconditioned directions are scaled by ``min(1, sqrt(kl_clip / (lr^2 sum
            <G_nat, G>)))`` (:func:`torchsingd.optim.update.trust_region_scale`). ``None``
            (default): off, the plain K-FAC step.
    """

    LR_COV_UPPER = 1.0
    FROZEN_OPTIONS = ("vocab_structure", "factor_dtype")

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]] | None = None,
        lr: float = 1e-3,
        momentum: float = 0.9,
        damping: float = 1e-3,
        *,  # (SINGD has alpha1 next: keywords only, so no value lands in the wrong slot)
        weight_decay: float = 0.0,
        T: int = 10,
        loss_average: str | None = "batch",
        lr_cov: float | Callable[[int], float] = 1e-2,
        kfac_approx: str = "expand",
        warn_unsupported: bool = True,
        factor_dtype: Any = (None, None),
        init_grad_scale: float = 1.0,
        vocab_structure: str = "diagonal",
        fallback: str = "adamw",
        fallback_lr: float | None = None,
        fallback_betas: tuple[float, float] = (0.9, 0.999),
        fallback_eps: float = 1e-8,
        fallback_weight_decay: float | None = None,
        max_update_norm: float | None = None,
        on_nonfinite: str = "skip",
        distributed_strategy: str = "replicate",
        process_group: Any = None,
        kl_clip: float | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            damping=damping,
            weight_decay=weight_decay,
            T=T,
            loss_average=loss_average,
            lr_cov=lr_cov,
            kfac_approx=kfac_approx,
            factor_dtype=factor_dtype,
            **common_defaults(
                vocab_structure=vocab_structure,
                fallback=fallback,
                fallback_lr=fallback_lr,
                fallback_betas=fallback_betas,
                fallback_eps=fallback_eps,
                fallback_weight_decay=fallback_weight_decay,
                max_update_norm=max_update_norm,
                kl_clip=kl_clip,
            ),
        )
        super().__init__(
            model,
            params,
            defaults,
            warn_unsupported=warn_unsupported,
            init_grad_scale=init_grad_scale,
            on_nonfinite=on_nonfinite,
            distributed_strategy=distributed_strategy,
            process_group=process_group,
        )
        self._advise_on_size()

    #: what the state-size warning suggests (see ``_advise_on_size``)
    SIZE_ADVICE = (
        "mostly the dense Kronecker factors (and their inverses) of {blocks} block(s). "
        "SINGD with a structured family keeps it near AdamW's, e.g. "
        "SINGD(model, structures='diagonal') (see the README's Structures section)."
    )

    def _validate(self, group: dict[str, Any]) -> None:
        validate_common(group)
        lr_cov = group["lr_cov"]
        if not callable(lr_cov) and not lr_cov <= self.LR_COV_UPPER:
            raise ValueError(
                f"Invalid lr_cov={lr_cov!r}: KFAC's lr_cov is the weight of the new "
                "statistic in a running average, a number in [0, 1]."
            )
        parse_dtypes(group["factor_dtype"], "factor_dtype")
        if get_structure(group["vocab_structure"]).cls not in INVERTIBLE:
            raise ValueError(
                f"Invalid vocab_structure={group['vocab_structure']!r} for KFAC: its "
                "factors are inverted, so only 'dense' or 'diagonal' are supported."
            )

    def _refuse(
        self, name: str, module: nn.Module, adapter: LayerAdapter, group: dict[str, Any]
    ) -> None:
        super()._refuse(name, module, adapter, group)
        _factor_dtypes(name, group, adapter.params(module)[0])

    def _new_block(
        self,
        name: str,
        block: str,
        dims: tuple[int, int],
        group: dict[str, Any],
        k_structure: str | None,
        weight: Tensor,
    ) -> KFACLayerState:
        dtype_K, dtype_C = _factor_dtypes(name, group, weight)
        spec_K = get_structure(k_structure or "dense")
        spec_C = get_structure("dense")
        d_i, d_o = dims
        damping = group["damping"]
        # S = (1 - lambda) I, so (S + lambda I)^-1 = I (SINGD's start), where that is
        # not negative; for lambda > 1, S = 0 and the inverse is I / lambda: a negative
        # S would make S + lambda I indefinite once the damping is lowered (a schedule
        # from K-FAC's usual lambda = 150 took uphill steps for dozens of updates)
        start, inverse = (1.0 - damping, 1.0) if damping <= 1.0 else (0.0, 1.0 / damping)
        S_K = spec_K.eye(d_i, dtype=dtype_K, device=weight.device).mul_(start)
        S_C = spec_C.eye(d_o, dtype=dtype_C, device=weight.device).mul_(start)
        return KFACLayerState(
            name=name,
            block=block,
            S_K=S_K,
            S_C=S_C,
            # not computed: (1 - lambda) + lambda need not round to 1
            inv_K=spec_K.eye(d_i, dtype=dtype_K, device=weight.device).mul_(inverse),
            inv_C=spec_C.eye(d_o, dtype=dtype_C, device=weight.device).mul_(inverse),
        )

    def _output_dtype(self, layer: KFACLayerState) -> torch.dtype:
        return layer.S_C.dtype

    def _statistics(
        self, entry: ModuleEntry, layer: KFACLayerState, x: Tensor, g: Tensor, shared=None
    ) -> tuple[StructuredMatrix, StructuredMatrix]:
        group = self.param_groups[entry.group_index]
        identity = identity_like(layer.S_K)
        U = self._input_statistic(entry, identity, x, group["kfac_approx"], layer.block, shared)
        return U, self._output_statistic(entry, layer, g)

    def _output_statistic(self, entry: ModuleEntry, layer: KFACLayerState, g: Tensor):
        return inner_of_rows(identity_like(layer.S_C), g)

    def _update_block(
        self,
        layer: KFACLayerState,
        G: Tensor,
        group: dict[str, Any],
        stats: list[StructuredMatrix] | None,
        output_scale: float,
    ) -> tuple[dict[str, Any], Tensor]:
        S_K, S_C, inv_K, inv_C = layer.S_K, layer.S_C, layer.inv_K, layer.inv_C
        if stats is not None:
            beta1 = scheduled_lr_cov(group, self.steps, upper=self.LR_COV_UPPER)
            new_K = S_K.clone().mul_(1.0 - beta1).add_(stats[0], alpha=beta1)
            new_C = S_C.clone().mul_(1.0 - beta1).add_(stats[1], alpha=beta1 * output_scale)
            totals = read_scalars([new_K.finite_sum(), new_C.finite_sum()])  # one sync
            finite = [S.finite_given(t) for S, t in zip((new_K, new_C), totals, strict=True)]
            # An overflowed statistic (an input whose square is inf) would give an
            # inverse with zero rows: those inputs' weights would never move again.
            # Repaired (the previous factor and inverse kept), unless the step raises.
            raising = self.on_nonfinite == "raise"
            for name, ok in zip(("S_K", "S_C"), finite, strict=True):
                if not ok and not raising:
                    self._note(
                        "factor_repaired",
                        f"KFAC: the update of factor {name} of {layer.name!r} was not "
                        "finite; kept the previous factor (see safeguard_events).",
                    )
            if finite[0] or raising:
                S_K, inv_K = new_K, damped_inverse(new_K, group["damping"])
            if finite[1] or raising:
                S_C, inv_C = new_C, damped_inverse(new_C, group["damping"])
            if raising and not all(finite):  # the step raises (its directions are NaN)
                inv_K = inv_K.mul(math.nan)
        right = inv_K.mm(G.T.to(inv_K.dtype)).T  # G (S_K + lambda I)^-1, symmetric inverse
        nat = inv_C.mm(right.to(inv_C.dtype)).to(G.dtype)
        factors = {"S_K": S_K, "S_C": S_C, "inv_K": inv_K, "inv_C": inv_C}
        return factors, nat


def _factor_dtypes(name: str, group: dict[str, Any], weight: Tensor) -> tuple[Any, Any]:
    """The dtypes of a layer's ``S_K`` and ``S_C``; a ``ValueError`` for half precision."""
    dtype_K, dtype_C = parse_dtypes(group["factor_dtype"], "factor_dtype", weight.dtype)
    for dtype in (dtype_K, dtype_C):
        if dtype in HALF_PRECISION:
            raise ValueError(
                f"KFAC cannot keep the factors of layer {name!r} in {dtype}: it inverts "
                "S + lambda*I, which PyTorch's linear algebra does not support in half "
                "precision and which loses positive definiteness there. Use "
                "factor_dtype=torch.float32 (also for a bfloat16 model), or SINGD, "
                "which needs no inverse."
            )
    return dtype_K, dtype_C
