"""``SINGD``: structured inverse-free natural gradient descent (ALGORITHM.md section 3).

The method-specific part: the state of a block (``K``, ``C``, momenta ``m_K``, ``m_C``
in their structures), what a backward pass contributes (``H_K = P(K^T a^T a K)``,
``H_C = P(C^T g^T g C)``) and one block's update (the pure functions of
:mod:`torchsingd.optim.update`). Hooks, groups, fallback, scaling and checkpoints are
in :mod:`torchsingd.optim.base`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torchsingd.layers.base import inner_of_rows
from torchsingd.optim.base import (
    STEP_CHECKS,
    BlockState,
    KroneckerOptimizer,
    ModuleEntry,
    NonFiniteError,
    common_defaults,
    parse_dtypes,
    scheduled_lr_cov,
    validate_common,
    warn,
)
from torchsingd.optim.update import (
    BATCH_MAX_NUMEL,
    FactorJob,
    FactorUpdate,
    NaturalGradientTask,
    natural_gradient,
    stack_storage,
    update_factors,
    update_factors_together,
)
from torchsingd.structures import StructuredMatrix, StructureSpec, get_structure
from torchsingd.structures.base import OuterOperator, read_scalars

__all__ = ["SINGD", "LayerState", "NonFiniteError", "parse_structures"]


@dataclass
class LayerState(BlockState):
    """SINGD's state of one block.

    ``K``: ``[d_i, d_i]``, ``C``: ``[d_o, d_o]`` (structured); ``m_K``, ``m_C``: their
    momenta (``None`` when ``alpha1 == 0``). ``H_K``, ``H_C``: statistics pending for
    this step (``None`` when nothing is pending).
    """

    K: StructuredMatrix | None = None
    C: StructuredMatrix | None = None
    m_K: StructuredMatrix | None = None
    m_C: StructuredMatrix | None = None
    #: Cached ``K K^T`` and ``C C^T`` operators (derived from ``K``, ``C``; not saved).
    KKt: Any = None
    CCt: Any = None

    @property
    def H_K(self) -> StructuredMatrix | None:
        return None if self.pending is None else self.pending[0]

    @property
    def H_C(self) -> StructuredMatrix | None:
        return None if self.pending is None else self.pending[1]

    def factors(self) -> dict[str, StructuredMatrix | None]:
        return {"K": self.K, "C": self.C, "m_K": self.m_K, "m_C": self.m_C}

    def pending_like(self) -> tuple[StructuredMatrix, StructuredMatrix]:
        return self.K, self.C

    def cached(self) -> dict[str, Any]:
        return {"KKt": self.KKt, "CCt": self.CCt}


@dataclass
class _Prepared:
    """A block's factor update computed with its group's (:meth:`SINGD._prepare_updates`),
    with what was formed for the group from the new factors: their
    :meth:`~torchsingd.structures.StructuredMatrix.finite_sum` values (``None``: not
    read) and ``K K^T`` / ``C C^T`` operators (``None``: formed by the block).

    The group's operators are views of one stacked tensor: a member's part that its
    block does not take (a factor the safeguard replaced; a block whose ``_outer`` rule
    says forming does not pay) stays allocated until the group's next update, held by
    the other blocks' operators and not counted by ``state_bytes`` (at most what the
    group's operators hold together)."""

    update: FactorUpdate
    totals: tuple[float, float] | None = None
    KKt: Any = None
    CCt: Any = None


def _outer(X: StructuredMatrix, columns: int, uses: int, formed: Any = None) -> Any:
    """``X X^T`` as a cached member where forming it pays over ``uses`` steps
    (``formed``: the one formed already, with other blocks', if any)."""
    if not X.outer_operator_pays(columns, uses):
        return OuterOperator(X)
    return X.outer_operator() if formed is None else formed


def _like(X: StructuredMatrix, kind: str) -> StructuredMatrix:
    """The identity or zero member of ``X``'s structure, shape, dtype and device."""
    make = type(X).eye if kind == "eye" else type(X).zeros
    return make(X.dim, *X.options(), dtype=X.dtype, device=X.device)


def parse_structures(value: Any) -> tuple[StructureSpec, StructureSpec]:
    """``structures`` as two specs (``K`` then ``C``); a single name applies to both."""
    given = value
    if isinstance(value, (str, StructureSpec)):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(
            f"structures must be a name or a pair of names (for K and C), got {value!r}."
        )
    try:
        return get_structure(value[0]), get_structure(value[1])
    except ValueError as err:
        raise ValueError(f"Invalid structures={given!r}: {err}") from None


def validate_hyperparameters(group: dict[str, Any]) -> None:
    """Raise a ``ValueError`` naming the first invalid hyper-parameter of ``group``."""
    validate_common(group)
    if not STEP_CHECKS["alpha1"][0](group["alpha1"]):
        raise ValueError(f"Invalid alpha1={group['alpha1']!r}: must be a number in [0, 1).")
    for name in ("kfac_like", "normalize_lr_cov", "safeguards"):
        if not isinstance(group[name], bool):
            raise ValueError(f"Invalid {name}={group[name]!r}: must be True or False.")
    step = group["max_factor_step"]
    if not STEP_CHECKS["max_factor_step"][0](step):
        raise ValueError(
            f"Invalid max_factor_step={step!r}: must be None (no bound) or a number > 0 "
            "(values below 1 keep every factor update invertible; 0.5 is the default)."
        )
    parse_structures(group["structures"])
    parse_dtypes(group["preconditioner_dtype"], "preconditioner_dtype")


class SINGD(KroneckerOptimizer):
    """Structured inverse-free natural gradient descent (Lin, Dangel et al., ICML 2024).

    A drop-in for the reference ``singd.optim.optimizer.SINGD``: same arguments, names,
    meanings and defaults, plus the safeguards (``safeguards=True`` by default, which
    change the numbers only where they act; ``safeguards=False`` gives the reference's
    exact rule). The numbers agree with the reference (see the README for the one place
    where the reference deviates from the paper and we follow the paper). Every
    hyper-parameter, ``structures`` included, can be set per parameter group.

    Args:
        model: The network. Its supported layers (see :mod:`torchsingd.layers`) are
            preconditioned with Kronecker factors ``K`` (input side) and ``C``
            (output side); its other trainable parameters follow the fallback rule.
        params: ``None`` (every trainable parameter of ``model``), an iterable of
            parameters, or a list of parameter-group dicts. A layer's parameters must
            be in one group.
        lr: ``beta2``, the parameter learning rate.
        momentum: ``alpha2``, momentum on parameter updates.
        damping: ``lambda``.
        alpha1: Riemannian momentum on the factor updates (forced to 0 by ``kfac_like``).
        weight_decay: ``gamma``, added to the natural gradient (coupled decay).
        T: update the preconditioner every ``T`` steps (statistics are only captured
            in the backward passes of those steps).
        loss_average: ``"batch"``, ``"batch+sequence"`` or ``None`` (sum loss): how
            the loss is normalised, so that ``g`` is scaled consistently.
        lr_cov: ``beta1``: a number or a callable of the step returning one.
        structures: names of the structures of ``K`` and ``C`` (a single name for
            both), e.g. ``("blockdiagonal:32", "diagonal")``; see
            :func:`torchsingd.structures.get_structure`.
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight-sharing dimensions.
        warn_unsupported: warn (once, at construction) which parameters the fallback
            rule trains instead of SINGD.
        kfac_like: use the IKFAC rule.
        preconditioner_dtype: dtype of ``K, m_K`` and ``C, m_C`` (a pair, or one
            dtype for both; ``None`` means the weight's dtype). May be bfloat16.
        init_grad_scale: the initial scale of a ``GradScaler`` used with this
            optimizer (only for numerical range of the first captures).
        normalize_lr_cov: normalised gradient descent on the factors.
        vocab_structure: structure of ``K`` for embeddings (their vocabulary side);
            ``"diagonal"`` by default, since one-hot inputs have diagonal statistics.
        fallback: ``"adamw"`` or ``"sgd"``: the rule for parameters outside supported
            layers (norm layers, free parameters, unsupported or tied layers).
        fallback_lr: its learning rate (``None``: the group's ``lr``, so that an LR
            scheduler drives it too; a number is a fixed rate).
        fallback_betas, fallback_eps: AdamW's moment coefficients and epsilon.
        fallback_weight_decay: its weight decay (``None``: the group's ``weight_decay``;
            decoupled for AdamW, coupled for SGD, which also uses ``momentum``).
        max_update_norm: if set, the preconditioned directions of a group's layers
            are scaled so that their joint L2 norm is at most this (clipping of the
            natural gradient; clip raw gradients with ``clip_grad_norm_`` as usual).
        on_nonfinite: ``"skip"`` (default: warn, leave every parameter and state
            tensor unchanged, count it in ``skipped_steps``) or ``"raise"`` when
            gradients or updates hold inf/NaN. An overflow a ``GradScaler`` found is
            always skipped (the scaler then lowers its scale).
        distributed_strategy: under ``torch.distributed``: ``"replicate"`` (every rank
            updates every factor from statistics averaged across ranks) or ``"shard"``
            (each rank updates the factors of its share of the layers); see
            :mod:`torchsingd.distributed`. The model may be wrapped in
            ``DistributedDataParallel`` before or after constructing the optimizer.
        process_group: the process group to reduce over (default: the world).
        safeguards: ``True`` (default) applies the three safeguards below, which the
            reference does not have; ``False`` restores the reference's exact rule
            (``max_factor_step`` and ``kl_clip`` are then ignored). See the README's
            "Robustness" section for the divergences they prevent.
        max_factor_step: bound on ``||beta1 * m||_2`` in each factor update: where it
            would be exceeded, ``lr_cov`` is reduced for that factor and update, or for
            diagonal and block-diagonal factors only the entries or blocks that exceed
            it are (:func:`torchsingd.optim.update.factor_step`). ``None``: no bound.
        kl_clip: trust region on the parameter step: a group's preconditioned
            directions are scaled by ``s = min(1, sqrt(kl_clip / (lr^2 sum <G_nat,
            G>)))``, so that the step's predicted KL ``s^2 lr^2 sum <G_nat, G>`` is at
            most ``kl_clip`` (:func:`torchsingd.optim.update.trust_region_scale`).
            ``None``: off.
            The third safeguard has no setting: a factor update that comes out
            non-finite is undone (previous factor kept, its momentum reset) instead of
            skipping the whole step. ``safeguard_events`` counts what acted.
    """

    FROZEN_OPTIONS = ("vocab_structure", "structures", "preconditioner_dtype")

    def _meaning(self, key: str, value: Any, group: dict[str, Any]) -> Any:
        if key != "structures":
            return super()._meaning(key, value, group)
        try:
            return tuple(spec.name for spec in parse_structures(value))
        except ValueError:
            return value

    def _check_step_options(self) -> None:
        super()._check_step_options()
        for i, group in enumerate(self.param_groups):
            if group["kfac_like"] and group["alpha1"] != 0.0:
                raise ValueError(
                    f"Invalid alpha1={group['alpha1']!r} in param group {i} with "
                    "kfac_like=True (changed since construction): IKFAC has no Riemannian "
                    "momentum; set alpha1 to 0 (as construction does). Nothing was updated."
                )

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]] | None = None,
        lr: float = 1e-3,
        momentum: float = 0.9,
        damping: float = 1e-3,
        alpha1: float = 0.5,
        weight_decay: float = 0.0,
        T: int = 10,
        loss_average: str | None = "batch",
        lr_cov: float | Callable[[int], float] = 1e-2,
        structures: tuple[str, str] | str = ("dense", "dense"),
        kfac_approx: str = "expand",
        warn_unsupported: bool = True,
        kfac_like: bool = False,
        preconditioner_dtype: Any = (None, None),
        init_grad_scale: float = 1.0,
        normalize_lr_cov: bool = False,
        *,
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
        safeguards: bool = True,
        max_factor_step: float | None = 0.5,
        kl_clip: float | None = 1e-2,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            damping=damping,
            alpha1=alpha1,
            weight_decay=weight_decay,
            T=T,
            loss_average=loss_average,
            lr_cov=lr_cov,
            structures=structures,
            kfac_approx=kfac_approx,
            kfac_like=kfac_like,
            preconditioner_dtype=preconditioner_dtype,
            normalize_lr_cov=normalize_lr_cov,
            safeguards=safeguards,
            max_factor_step=max_factor_step,
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
        #: this step's factor updates computed together, by block (id of its state)
        self._together: dict[int, _Prepared] = {}
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
        "mostly the dense Kronecker factors of {blocks} block(s). A structured family "
        "keeps it near AdamW's at a fraction of the time, e.g. structures='diagonal', "
        "'blockdiagonal:32' or 'hierarchical:16,16' (see the README's Structures section)."
    )

    def _validate(self, group: dict[str, Any]) -> None:
        validate_hyperparameters(group)
        if group["kfac_like"] and group["alpha1"] != 0.0:
            warn(
                f"A parameter group has kfac_like=True; setting alpha1={group['alpha1']} to "
                "0 (IKFAC uses no Riemannian momentum)."
            )
            group["alpha1"] = 0.0

    def _kl_clip(self, group: dict[str, Any]) -> float | None:
        return group.get("kl_clip") if group.get("safeguards", False) else None

    def _new_block(
        self,
        name: str,
        block: str,
        dims: tuple[int, int],
        group: dict[str, Any],
        k_structure: str | None,
        weight: Tensor,
    ) -> LayerState:
        spec_K, spec_C = parse_structures(group["structures"])
        if k_structure is not None:
            spec_K = get_structure(k_structure)
        dtype_K, dtype_C = parse_dtypes(
            group["preconditioner_dtype"], "preconditioner_dtype", weight.dtype
        )
        d_i, d_o = dims
        state = LayerState(
            name=name,
            block=block,
            K=spec_K.eye(d_i, dtype=dtype_K, device=weight.device),
            C=spec_C.eye(d_o, dtype=dtype_C, device=weight.device),
        )
        if group["alpha1"] != 0.0:
            state.m_K = spec_K.zeros(d_i, dtype=dtype_K, device=weight.device)
            state.m_C = spec_C.zeros(d_o, dtype=dtype_C, device=weight.device)
        return state

    def _output_dtype(self, layer: LayerState) -> torch.dtype:
        return layer.C.dtype

    def _statistics(
        self, entry: ModuleEntry, layer: LayerState, x: Tensor, g: Tensor, shared=None
    ) -> tuple[StructuredMatrix, StructuredMatrix]:
        group = self.param_groups[entry.group_index]
        kfac_approx = group["kfac_approx"]
        H_K = self._input_statistic(entry, layer.K, x, kfac_approx, layer.block, shared)
        return H_K, self._output_statistic(entry, layer, g)

    def _output_statistic(self, entry: ModuleEntry, layer: LayerState, g: Tensor):
        return inner_of_rows(layer.C, g)

    def _update_block(
        self,
        layer: LayerState,
        G: Tensor,
        group: dict[str, Any],
        stats: list[StructuredMatrix] | None,
        output_scale: float,
    ) -> tuple[dict[str, Any], Tensor]:
        K, C, m_K, m_C = layer.K, layer.C, layer.m_K, layer.m_C
        if stats is not None:
            safe = group.get("safeguards", False)
            # computed with equal-shaped blocks' (_prepare_updates), else now
            prepared = self._together.pop(id(layer), None)
            if prepared is not None:
                new = prepared.update
            else:
                new = update_factors(
                    K,
                    C,
                    m_K,
                    m_C,
                    stats[0],
                    stats[1],
                    **self._update_options(group),
                    H_C_scale=output_scale,
                )
            made = (new.K, new.C)
            if safe:
                totals = None if prepared is None else prepared.totals
                new = self._checked(layer, new, G, totals)
            K, C, m_K, m_C = new.K, new.C, new.m_K, new.m_C
            # (operators formed with the group's, for factors kept as they were made)
            formed = (None, None) if prepared is None else (prepared.KKt, prepared.CCt)
            KKt = _outer(K, G.shape[0], group["T"], formed[0] if K is made[0] else None)
            CCt = _outer(C, G.shape[1], group["T"], formed[1] if C is made[1] else None)
        else:
            KKt = layer.KKt if layer.KKt is not None else _outer(K, G.shape[0], group["T"])
            CCt = layer.CCt if layer.CCt is not None else _outer(C, G.shape[1], group["T"])
        factors = {"K": K, "C": C, "m_K": m_K, "m_C": m_C, "KKt": KKt, "CCt": CCt}
        task = NaturalGradientTask(K, C, G, KKt, CCt)
        if task.key is None:  # computed now (G is not kept: the step's peak stays)
            return factors, natural_gradient(K, C, G, KKt, CCt)
        return factors, task  # computed with the other layers' (natural_gradients)

    def _update_options(self, group: dict[str, Any]) -> dict[str, Any]:
        """The keyword options of :func:`update_factors` in this step."""
        safe = group.get("safeguards", False)
        return dict(
            damping=group["damping"],
            alpha1=group["alpha1"],
            lr_cov=scheduled_lr_cov(group, self.steps),
            kfac_like=group["kfac_like"],
            normalize_lr_cov=group["normalize_lr_cov"],
            max_step=group.get("max_factor_step") if safe else None,
        )

    def _prepare_updates(self, entries: list[ModuleEntry], g_scale: float) -> None:
        """Compute the factor updates due in this step of equal-shaped small blocks
        together (:func:`~torchsingd.optim.update.update_factors_together`: members
        that ``stack``, one size, dtype and device on each side, equal options, at most
        ``BATCH_MAX_NUMEL`` numbers in the gradient, as for the natural gradients:
        stacking two 513 x 512 block-diagonal layers made the MLP's step 0.2-0.5 ms
        longer), kept for :meth:`_update_block` by block; a block of no such group is
        updated there. What :meth:`_update_block` then needs of the new factors is
        formed for the group too: their finite sums (the safeguard's check, read in one
        synchronisation) and ``K K^T`` / ``C C^T`` operators (families with
        ``stacked_outer_operators``)."""
        self._together = {}
        groups: dict[tuple, list[tuple[LayerState, FactorJob, dict]]] = {}
        for entry in entries:
            group = self.param_groups[entry.group_index]
            if self.steps % group["T"] != 0 or not self._active(entry):
                continue
            options = None
            for layer in entry.blocks.values():
                K, C = layer.K, layer.C
                if not (layer.has_statistics(self.steps) and K.stacks and C.stacks):
                    continue
                if K.dim * C.dim > BATCH_MAX_NUMEL:  # (a large layer's update: alone)
                    continue
                H_K, H_C = layer.pending
                if options is None:
                    options = self._update_options(group)
                key = tuple(
                    (type(X), X.options(), X.dim, X.dtype, X.device, type(H), H.dtype, m is None)
                    for X, H, m in ((K, H_K, layer.m_K), (C, H_C, layer.m_C))
                ) + (tuple(options.items()),)
                scale = (layer.capture_scale / g_scale) ** 2
                job = FactorJob(K, C, layer.m_K, layer.m_C, H_K, H_C, scale)
                groups.setdefault(key, []).append((layer, job, group))
        for key, members in groups.items():
            if len(members) > 1:
                results = update_factors_together([job for _, job, _ in members], **dict(key[-1]))
                formed = self._formed_together(results, [group for _, _, group in members])
                for (layer, _, _), prepared in zip(members, formed, strict=True):
                    self._together[id(layer)] = prepared

    def _formed_together(
        self, results: list[FactorUpdate], groups: list[dict[str, Any]]
    ) -> list[_Prepared]:
        """Each result of one group with what is formed for it (:class:`_Prepared`):
        the finite sums where a member's group checks them (:meth:`_checked`), the
        operators where forming them pays for a member (:func:`_outer`) and the
        family forms them together."""
        count = len(results)
        K0, C0 = results[0].K, results[0].C
        K, C = stack_storage([r.K for r in results]), stack_storage([r.C for r in results])
        totals: list[Any] = [None] * count
        if self.on_nonfinite != "raise" and any(g.get("safeguards", False) for g in groups):
            sums = [K0.stacked_finite_sum(K).double(), C0.stacked_finite_sum(C).double()]
            totals = list(zip(*torch.stack(sums).tolist(), strict=True))
        KKt = CCt = None
        if any(K0.outer_operator_pays(C0.dim, g["T"]) for g in groups):
            KKt = K0.stacked_outer_operators(K)
        if any(C0.outer_operator_pays(K0.dim, g["T"]) for g in groups):
            CCt = C0.stacked_outer_operators(C)
        KKt, CCt = KKt or [None] * count, CCt or [None] * count
        return [_Prepared(*parts) for parts in zip(results, totals, KKt, CCt, strict=True)]

    def _checked(
        self,
        layer: LayerState,
        new: FactorUpdate,
        G: Tensor,
        totals: tuple[float, float] | None = None,
    ) -> FactorUpdate:
        """Note bounded steps; undo a factor update that came out non-finite.

        A non-finite ``K`` (or ``C``) keeps the previous factor (identity if that is
        not finite either) and resets its momentum to zero, so the parameter step
        still happens with a finite preconditioner. The reference rule writes the
        inf/NaN factor (and every later update is NaN); with ``safeguards=False`` this
        optimizer instead skips the whole step, as for any non-finite update (nothing
        written, ``skipped_steps`` counts it). With
        ``on_nonfinite="raise"`` nothing is repaired: the step raises; nor when the
        gradient ``G`` itself is not finite (then the whole step is skipped).
        """
        for _ in range(new.bounded):
            self._note("factor_step_bounded")
        if self.on_nonfinite == "raise":
            return new
        if totals is None:  # (else read with the block's group: _prepare_updates)
            totals = read_scalars([new.K.finite_sum(), new.C.finite_sum()])  # one sync
        for name, total in zip(("K", "C"), totals, strict=True):
            factor = getattr(new, name)
            if factor.finite_given(total):
                continue
            if not bool(torch.isfinite(G).all()):  # a full pass over G: only checked here
                return new
            self._note(
                "factor_repaired",
                f"SINGD: the update of factor {name} of {layer.name!r} was not finite; "
                "kept the previous factor and reset its momentum (see safeguard_events).",
            )
            old = getattr(layer, name)
            if not old.is_finite():
                old = _like(old, "eye")
            setattr(new, name, old)
            momentum = getattr(new, f"m_{name}")
            if momentum is not None:  # zeros, not 0 * m: the momentum may hold NaN
                setattr(new, f"m_{name}", _like(momentum, "zeros"))
        return new

    def _factors_replaced(self, layer: LayerState) -> None:
        layer.KKt = layer.CCt = None
