"""The ``SINGD`` optimizer: hooks, parameter groups and state around :mod:`.update`.

This module is bookkeeping only. It

1. finds the supported layers of a model through the layer registry (every other
   trainable parameter goes to a fallback rule, AdamW by default, in the same object),
2. lets each layer's adapter report forward passes; on preconditioner-update steps
   (``t % T == 0``) with gradients enabled, a tensor hook on each block's output turns
   the block's input and output gradient into ``H_K = P(K^T a^T a K)`` and
   ``H_C = P(C^T g^T g C)`` (summed over the backward passes of one step),
3. in :meth:`SINGD.step` calls the pure functions of :mod:`torchsingd.optim.update`
   for every layer, checks that every result is finite, and only then writes them.

A tensor hook on the output (rather than a module backward hook) keeps working when
the output feeds an in-place activation. Captures are tagged with the step they were
made in, so statistics of a forward pass whose backward came late never leak into a
later step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from torchsingd.layers import KFAC_APPROXIMATIONS, LOSS_AVERAGES, LayerAdapter, get_adapter
from torchsingd.optim.update import (
    adamw_step,
    clip_by_global_norm,
    natural_gradient,
    parameter_step,
    sgd_step,
    update_factors,
)
from torchsingd.structures import StructuredMatrix, StructureSpec, get_structure

_CALLABLE_LR_COV = "<callable lr_cov: taken from the optimizer that loads this state>"
FALLBACK_RULES = ("adamw", "sgd")
NONFINITE_POLICIES = ("skip", "raise")


class NonFiniteError(FloatingPointError):
    """Raised by ``step`` with ``on_nonfinite="raise"`` when an update is not finite."""


@dataclass
class LayerState:
    """Everything SINGD keeps for one Kronecker-factored block of a layer.

    ``K``: ``[d_i, d_i]``, ``C``: ``[d_o, d_o]`` (structured); ``m_K``, ``m_C``: their
    momenta (``None`` when ``alpha1 == 0``); ``H_K``, ``H_C``: statistics captured in
    the backward passes of step ``capture_step`` (``None`` when nothing is pending),
    computed from output gradients divided by ``capture_scale``.
    """

    name: str
    block: str
    K: StructuredMatrix
    C: StructuredMatrix
    m_K: StructuredMatrix | None = None
    m_C: StructuredMatrix | None = None
    H_K: StructuredMatrix | None = None
    H_C: StructuredMatrix | None = None
    capture_step: int = -1
    capture_scale: float = 1.0

    def clear_captures(self) -> None:
        self.H_K = self.H_C = None
        self.capture_step = -1


@dataclass
class ModuleEntry:
    """A preconditioned module: its adapter, group and one :class:`LayerState` per block."""

    name: str
    module: nn.Module
    adapter: LayerAdapter
    group_index: int
    blocks: dict[str, LayerState] = field(default_factory=dict)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_structures(value: Any) -> tuple[StructureSpec, StructureSpec]:
    """``structures`` as two specs (``K`` then ``C``); a single name applies to both."""
    if isinstance(value, (str, StructureSpec)):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(
            f"structures must be a name or a pair of names (for K and C), got {value!r}."
        )
    return get_structure(value[0]), get_structure(value[1])


def parse_dtypes(value: Any) -> tuple[torch.dtype | None, torch.dtype | None]:
    """``preconditioner_dtype`` as a pair (``K`` then ``C``); one dtype applies to both."""
    if value is None or isinstance(value, torch.dtype):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(
            "preconditioner_dtype must be None, a torch.dtype, or a pair of them "
            f"(for K and C), got {value!r}."
        )
    for d in value:
        if d is not None and not (isinstance(d, torch.dtype) and d.is_floating_point):
            raise ValueError(f"preconditioner_dtype entries must be floating dtypes, got {d!r}.")
    return value[0], value[1]


def validate_hyperparameters(group: dict[str, Any]) -> None:
    """Raise a ``ValueError`` naming the first invalid hyper-parameter of ``group``."""

    def bad(name: str, why: str) -> None:
        raise ValueError(f"Invalid {name}={group[name]!r}: {why}.")

    for name in ("lr", "damping", "weight_decay", "fallback_eps"):
        if not _is_number(group[name]) or not group[name] >= 0.0:
            bad(name, "must be a number >= 0")
    for name in ("momentum", "alpha1"):
        if not _is_number(group[name]) or not 0.0 <= group[name] < 1.0:
            bad(name, "must be a number in [0, 1)")
    for name in ("fallback_lr", "fallback_weight_decay"):
        if group[name] is not None and (not _is_number(group[name]) or not group[name] >= 0):
            bad(name, "must be None (use the group's value) or a number >= 0")
    if group["max_update_norm"] is not None and (
        not _is_number(group["max_update_norm"]) or not group["max_update_norm"] > 0
    ):
        bad("max_update_norm", "must be None (no clipping) or a number > 0")
    betas = group["fallback_betas"]
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(_is_number(b) and 0.0 <= b < 1.0 for b in betas)
    ):
        bad("fallback_betas", "must be a pair of numbers in [0, 1)")
    if group["fallback"] not in FALLBACK_RULES:
        bad("fallback", f"must be one of {FALLBACK_RULES}")
    if not isinstance(group["T"], int) or isinstance(group["T"], bool) or group["T"] < 1:
        bad("T", "the preconditioner update interval must be an integer >= 1")
    lr_cov = group["lr_cov"]
    if not callable(lr_cov) and (not _is_number(lr_cov) or not lr_cov >= 0.0):
        bad("lr_cov", "must be a number >= 0 or a callable of the step")
    if group["loss_average"] not in LOSS_AVERAGES:
        bad("loss_average", f"must be one of {LOSS_AVERAGES}")
    if group["kfac_approx"] not in KFAC_APPROXIMATIONS:
        bad("kfac_approx", f"must be one of {KFAC_APPROXIMATIONS}")
    for name in ("kfac_like", "normalize_lr_cov"):
        if not isinstance(group[name], bool):
            bad(name, "must be True or False")
    parse_structures(group["structures"])
    get_structure(group["vocab_structure"])
    parse_dtypes(group["preconditioner_dtype"])


class SINGD(Optimizer):
    """Structured inverse-free natural gradient descent (Lin, Dangel et al., ICML 2024).

    A drop-in for the reference ``singd.optim.optimizer.SINGD``: same arguments, names,
    meanings and defaults; the numbers agree with it (see the README for the one place
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
        fallback_lr: its learning rate (``None``: the group's ``lr``).
        fallback_betas, fallback_eps: AdamW's moment coefficients and epsilon.
        fallback_weight_decay: its weight decay (``None``: the group's ``weight_decay``;
            decoupled for AdamW, coupled for SGD, which also uses ``momentum``).
        max_update_norm: if set, the preconditioned directions of a group's layers
            are scaled so that their joint L2 norm is at most this (clipping of the
            natural gradient; clip raw gradients with ``clip_grad_norm_`` as usual).
        on_nonfinite: ``"skip"`` (default: warn, leave every parameter and state
            tensor unchanged, count it in ``skipped_steps``) or ``"raise"`` when
            gradients or updates hold inf/NaN.
    """

    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale and found_inf

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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
        if not _is_number(init_grad_scale) or not init_grad_scale > 0:
            raise ValueError(f"Invalid init_grad_scale={init_grad_scale!r}: must be > 0.")
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"Invalid on_nonfinite={on_nonfinite!r}: must be one of {NONFINITE_POLICIES}."
            )
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
            vocab_structure=vocab_structure,
            fallback=fallback,
            fallback_lr=fallback_lr,
            fallback_betas=tuple(fallback_betas),
            fallback_eps=fallback_eps,
            fallback_weight_decay=fallback_weight_decay,
            max_update_norm=max_update_norm,
        )
        self._model = model
        self._warn_unsupported = warn_unsupported
        self.on_nonfinite = on_nonfinite
        self._param_names = {id(p): n for n, p in model.named_parameters()}
        self._candidates, self._tied = self._find_layers(model)
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        self.steps = 0
        self.skipped_steps = 0
        self._capture_scale = float(init_grad_scale)
        self._init_grad_scale = float(init_grad_scale)
        self._explicit_scale: float | None = None
        self._entries: dict[str, ModuleEntry] = {}
        self._fallback_params: list[tuple[int, nn.Parameter]] = []
        self._handles: list[Any] = []
        self._constructed = False
        super().__init__(params, defaults)
        self._constructed = True
        self._assign_parameters()

    # ----------------------------------------------------------------- set-up
    @staticmethod
    def _find_layers(
        model: nn.Module,
    ) -> tuple[list[tuple[str, nn.Module, LayerAdapter]], list[str]]:
        """Supported modules with trainable parameters, and names of tied ones left out."""
        found = []
        covered: set[int] = set()
        for name, module in model.named_modules():
            if id(module) in covered:
                continue
            adapter = get_adapter(module)
            if adapter is None:
                continue
            covered.update(id(m) for m in adapter.submodules(module))
            params = adapter.params(module)
            if not params or not params[0].requires_grad:
                continue
            adapter.check(module, name)
            found.append((name, module, adapter))
        uses: dict[int, int] = {}
        for _, module, adapter in found:
            for p in adapter.params(module):
                uses[id(p)] = uses.get(id(p), 0) + 1
        tied = [n for n, m, a in found if any(uses[id(p)] > 1 for p in a.params(m))]
        found = [(n, m, a) for n, m, a in found if n not in tied]
        return found, tied

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated); its layers are hooked when added after construction."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        validate_hyperparameters(group)
        if group["kfac_like"] and group["alpha1"] != 0.0:
            warnings.warn(
                f"Parameter group {len(self.param_groups) - 1} has kfac_like=True; setting "
                f"alpha1={group['alpha1']} to 0 (IKFAC uses no Riemannian momentum).",
                stacklevel=2,
            )
            group["alpha1"] = 0.0
        if self._constructed:
            self._assign_parameters()

    def _name(self, p: nn.Parameter) -> str:
        return self._param_names.get(id(p), f"<parameter of shape {tuple(p.shape)}>")

    def _assign_parameters(self) -> None:
        """Give every parameter of every group to a preconditioned layer or the fallback."""
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        claimed: set[int] = {
            id(p) for e in self._entries.values() for p in e.adapter.params(e.module)
        }
        new_entries = []
        for name, module, adapter in self._candidates:
            if name in self._entries:
                continue
            params = adapter.params(module)
            groups = {group_of.get(id(p)) for p in params}
            if groups == {None}:
                continue
            if len(groups) != 1 or None in groups:
                raise ValueError(
                    f"The parameters of layer {name!r} must all be in one parameter group "
                    f"(found groups {sorted(g for g in groups if g is not None)}"
                    f"{' and some not in the optimizer' if None in groups else ''})."
                )
            entry = self._new_entry(name, module, adapter, groups.pop())
            self._entries[name] = entry
            new_entries.append(entry)
            claimed.update(id(p) for p in params)
        known = {id(p) for _, p in self._fallback_params}
        new_fallback = [
            (i, p)
            for i, g in enumerate(self.param_groups)
            for p in g["params"]
            if id(p) not in claimed and id(p) not in known
        ]
        self._fallback_params += new_fallback
        if self._warn_unsupported and new_fallback:
            by_rule: dict[str, list[str]] = {}
            for i, p in new_fallback:
                by_rule.setdefault(self.param_groups[i]["fallback"], []).append(self._name(p))
            rules = "; ".join(f"{rule}: {names}" for rule, names in by_rule.items())
            tied = f" Tied (shared) layers left to it: {self._tied}." if self._tied else ""
            warnings.warn(
                f"SINGD preconditions {len(self._entries)} layer(s); these parameters are "
                f"trained by the fallback rule instead — {rules}.{tied} Pass "
                "warn_unsupported=False to silence this.",
                stacklevel=3,
            )

    def _new_entry(
        self, name: str, module: nn.Module, adapter: LayerAdapter, group_index: int
    ) -> ModuleEntry:
        group = self.param_groups[group_index]
        spec_K, spec_C = parse_structures(group["structures"])
        if adapter.k_structure_option is not None:
            spec_K = get_structure(group[adapter.k_structure_option])
        dtype_K, dtype_C = parse_dtypes(group["preconditioner_dtype"])
        w = adapter.params(module)[0]
        dtype_K, dtype_C = dtype_K or w.dtype, dtype_C or w.dtype
        entry = ModuleEntry(name, module, adapter, group_index)
        for block in adapter.blocks(module):
            d_i, d_o = adapter.dims(module, block=block)
            state = LayerState(
                name=f"{name}.{block}" if block else name,
                block=block,
                K=spec_K.eye(d_i, dtype=dtype_K, device=w.device),
                C=spec_C.eye(d_o, dtype=dtype_C, device=w.device),
            )
            if group["alpha1"] != 0.0:
                state.m_K = spec_K.zeros(d_i, dtype=dtype_K, device=w.device)
                state.m_C = spec_C.zeros(d_o, dtype=dtype_C, device=w.device)
            entry.blocks[block] = state
        self._handles += adapter.install(module, partial(self._on_forward, entry))
        return entry

    @property
    def layers(self) -> dict[str, LayerState]:
        """The preconditioned blocks by name (``module`` or ``module.block``)."""
        return {s.name: s for e in self._entries.values() for s in e.blocks.values()}

    @property
    def fallback_parameters(self) -> dict[str, str]:
        """Parameter name -> the fallback rule that trains it."""
        return {self._name(p): self.param_groups[i]["fallback"] for i, p in self._fallback_params}

    def state_bytes(self) -> int:
        """Bytes of every tensor the optimizer keeps between steps.

        Counts ``K``, ``C``, ``m_K``, ``m_C`` of every layer and per-parameter state
        (momentum buffers, fallback moments); pending ``H`` statistics are transient.
        """
        total = 0
        for layer in self.layers.values():
            for x in (layer.K, layer.C, layer.m_K, layer.m_C):
                total += 0 if x is None else x.nbytes()
        for state in self.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    total += value.numel() * value.element_size()
        return total

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (no further statistics are captured)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ hooks
    def _on_forward(self, entry: ModuleEntry, block: str, x: Tensor, output: Tensor) -> None:
        """Called by adapters in every forward pass of a block."""
        if not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return
        if not output.requires_grad:
            return
        if self.steps % self.param_groups[entry.group_index]["T"] != 0:
            return
        output.register_hook(partial(self._capture, entry, entry.blocks[block], x.detach()))

    def _capture(
        self, entry: ModuleEntry, layer: LayerState, x: Tensor, grad_output: Tensor
    ) -> None:
        """Backward tensor hook: add this pass's ``H_K``, ``H_C`` to the block's state."""
        group = self.param_groups[entry.group_index]
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            H_K = entry.adapter.input_statistic(
                entry.module, x, layer.K, group["kfac_approx"], block=layer.block
            )
            g = entry.adapter.grad_rows(
                entry.module,
                grad_output.detach().to(layer.C.dtype),
                group["loss_average"],
                group["kfac_approx"],
                block=layer.block,
            )
            if self._capture_scale != 1.0:
                g = g / self._capture_scale
            H_C = layer.C.inner_of(g.T)
        if layer.capture_step == self.steps and layer.H_K is not None:
            layer.H_K.add_(H_K)
            layer.H_C.add_(H_C)
        else:
            layer.H_K, layer.H_C = H_K, H_C
            layer.capture_step = self.steps
            layer.capture_scale = self._capture_scale

    # ------------------------------------------------------------------- step
    def set_current_grad_scale(self, grad_scale: float) -> None:
        """Tell the optimizer the loss scale of this step's backward pass.

        Needed only when gradients were unscaled before ``step`` (e.g. after
        ``scaler.unscale_(optimizer)`` for clipping): then ``.grad`` is unscaled but
        the captured output gradients are not.
        """
        self._explicit_scale = float(grad_scale)

    def _read_scales(self) -> tuple[float, float, bool]:
        """``(scale of .grad, scale of captured g, found_inf)`` for this step."""
        grad_scale = getattr(self, "grad_scale", None)
        grad_scale = 1.0 if grad_scale is None else float(grad_scale)
        found_inf = getattr(self, "found_inf", None)
        found_inf = bool(found_inf) if found_inf is not None else False
        g_scale = self._explicit_scale if self._explicit_scale is not None else grad_scale
        if self.steps == 0 and self._init_grad_scale == 1.0 and g_scale != 1.0:
            warnings.warn(
                f"A gradient scale of {g_scale} is used at step 0; pass "
                f"init_grad_scale={g_scale} to SINGD for better numerics in the first "
                "backward pass.",
                stacklevel=4,
            )
        return grad_scale, g_scale, found_inf

    def _skip(self, why: str, g_scale: float) -> None:
        """Leave parameters and factors untouched, drop this step's captures; warn or raise."""
        for layer in self.layers.values():
            layer.clear_captures()
        if self.on_nonfinite == "raise":
            self._end_step(g_scale)
            raise NonFiniteError(f"SINGD step {self.steps - 1}: {why}.")
        self.skipped_steps += 1
        warnings.warn(
            f"SINGD skipped a step: {why}; parameters and state are unchanged "
            "(see SINGD.skipped_steps).",
            stacklevel=4,
        )
        self._end_step(g_scale)

    def _end_step(self, g_scale: float) -> None:
        self.steps += 1
        self._capture_scale = g_scale
        self._explicit_scale = None

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update the preconditioners (every ``T`` steps) and the parameters.

        Args:
            closure: optional; re-evaluates the model and returns the loss (its
                backward pass is captured like any other).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._step()
        return loss

    def _precondition(self, entry: ModuleEntry, g_scale: float, grad_scale: float):
        """New factors and natural gradients of one module (nothing is written)."""
        group = self.param_groups[entry.group_index]
        new_states, nats = {}, {}
        for block, layer in entry.blocks.items():
            G = entry.adapter.grad_matrix(entry.module, block=block)
            if G is None:
                return None
            K, C, m_K, m_C = layer.K, layer.C, layer.m_K, layer.m_C
            update_now = self.steps % group["T"] == 0
            if update_now and layer.H_K is not None and layer.capture_step == self.steps:
                lr_cov = group["lr_cov"]
                lr_cov = float(lr_cov(self.steps)) if callable(lr_cov) else float(lr_cov)
                new = update_factors(
                    K,
                    C,
                    m_K,
                    m_C,
                    layer.H_K,
                    layer.H_C,
                    damping=group["damping"],
                    alpha1=group["alpha1"],
                    lr_cov=lr_cov,
                    kfac_like=group["kfac_like"],
                    normalize_lr_cov=group["normalize_lr_cov"],
                    H_C_scale=(layer.capture_scale / g_scale) ** 2,
                )
                K, C, m_K, m_C = new.K, new.C, new.m_K, new.m_C
            if grad_scale != 1.0:
                G = G / grad_scale
            new_states[block] = (K, C, m_K, m_C)
            nats[block] = natural_gradient(K, C, G)
        return new_states, entry.adapter.directions(entry.module, nats)

    def _step(self) -> None:
        grad_scale, g_scale, found_inf = self._read_scales()
        if found_inf:
            self._skip("the gradient scaler found inf/NaN gradients", g_scale)
            return

        pending = []
        for entry in self._entries.values():
            result = self._precondition(entry, g_scale, grad_scale)
            if result is not None:
                pending.append((entry, *result))
        fallback = [(i, p, p.grad) for i, p in self._fallback_params if p.grad is not None]
        checks = [torch.isfinite(d).all() for _, _, dirs in pending for d in dirs]
        checks += [torch.isfinite(g).all() for _, _, g in fallback]
        if checks and not bool(torch.stack(checks).all()):
            self._skip("non-finite gradients or natural gradients", g_scale)
            return

        for i, group in enumerate(self.param_groups):
            if group["max_update_norm"] is not None:
                dirs = [d for e, _, ds in pending if e.group_index == i for d in ds]
                clip_by_global_norm(dirs, group["max_update_norm"])

        for entry, new_states, directions in pending:
            group = self.param_groups[entry.group_index]
            for block, (K, C, m_K, m_C) in new_states.items():
                layer = entry.blocks[block]
                layer.K, layer.C, layer.m_K, layer.m_C = K, C, m_K, m_C
            params = entry.adapter.params(entry.module)
            saved = [(p, idx, p[idx].clone()) for p, idx in entry.adapter.protected(entry.module)]
            buffers = [self.state[p].get("momentum_buffer") for p in params]
            buffers = parameter_step(
                params,
                directions,
                buffers,
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
            )
            for p, buf in zip(params, buffers, strict=True):
                if buf is not None:
                    self.state[p]["momentum_buffer"] = buf
            for p, idx, value in saved:
                p[idx] = value
                buf = self.state[p].get("momentum_buffer")
                if buf is not None:
                    buf[idx] = 0

        self._fallback_step(fallback, grad_scale)
        for layer in self.layers.values():
            layer.clear_captures()
        self._end_step(g_scale)

    def _fallback_step(self, items: list[tuple[int, nn.Parameter, Tensor]], grad_scale: float):
        by_group: dict[int, list[tuple[nn.Parameter, Tensor]]] = {}
        for i, p, g in items:
            by_group.setdefault(i, []).append((p, g if grad_scale == 1.0 else g / grad_scale))
        for i, pairs in by_group.items():
            group = self.param_groups[i]
            params = [p for p, _ in pairs]
            grads = [g for _, g in pairs]
            states = [self.state[p] for p in params]
            lr = group["lr"] if group["fallback_lr"] is None else group["fallback_lr"]
            wd = group["fallback_weight_decay"]
            wd = group["weight_decay"] if wd is None else wd
            if group["fallback"] == "adamw":
                adamw_step(
                    params,
                    grads,
                    states,
                    lr=lr,
                    betas=group["fallback_betas"],
                    eps=group["fallback_eps"],
                    weight_decay=wd,
                )
            else:
                sgd_step(params, grads, states, lr=lr, momentum=group["momentum"], weight_decay=wd)

    # -------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The ``torch.optim`` state plus SINGD's factors, momenta and step counter.

        A callable ``lr_cov`` is not saved (it may not pickle); the loading
        optimizer's own callable is used.
        """
        sd = super().state_dict()
        for group in sd["param_groups"]:
            if callable(group["lr_cov"]):
                group["lr_cov"] = _CALLABLE_LR_COV

        def tensors(x: StructuredMatrix | None) -> list[Tensor] | None:
            return None if x is None else list(x.tensors())

        sd["singd"] = {
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "capture_scale": self._capture_scale,
            "layers": {
                name: {
                    "structures": (type(s.K).family, type(s.C).family),
                    "K": tensors(s.K),
                    "C": tensors(s.C),
                    "m_K": tensors(s.m_K),
                    "m_C": tensors(s.m_C),
                    "H_K": tensors(s.H_K),
                    "H_C": tensors(s.H_C),
                    "capture_step": s.capture_step,
                    "capture_scale": s.capture_scale,
                }
                for name, s in self.layers.items()
            },
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict`; the layers must match by name and shape."""
        state_dict = dict(state_dict)
        if "singd" not in state_dict:
            raise ValueError("This state dict was not produced by torchsingd.SINGD.")
        extra = state_dict.pop("singd")
        callables = [g["lr_cov"] for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, current in zip(self.param_groups, callables, strict=True):
            if group["lr_cov"] == _CALLABLE_LR_COV:
                if not callable(current):
                    raise ValueError(
                        "The saved state used a callable lr_cov; construct the loading "
                        "optimizer with the same callable."
                    )
                group["lr_cov"] = current
        layers = self.layers
        missing = set(layers) ^ set(extra["layers"])
        if missing:
            raise ValueError(f"Saved and current preconditioned layers differ: {sorted(missing)}.")
        for name, saved in extra["layers"].items():
            layer = layers[name]
            current = (type(layer.K).family, type(layer.C).family)
            if tuple(saved["structures"]) != current:
                raise ValueError(
                    f"Layer {name!r} was saved with structures {saved['structures']}, but "
                    f"this optimizer uses {current}."
                )
            layer.K = _restore(layer.K, saved["K"], f"{name}.K")
            layer.C = _restore(layer.C, saved["C"], f"{name}.C")
            layer.m_K = _restore_optional(layer.K, saved["m_K"], f"{name}.m_K")
            layer.m_C = _restore_optional(layer.C, saved["m_C"], f"{name}.m_C")
            layer.H_K = _restore_optional(layer.K, saved["H_K"], f"{name}.H_K")
            layer.H_C = _restore_optional(layer.C, saved["H_C"], f"{name}.H_C")
            layer.capture_step = saved["capture_step"]
            layer.capture_scale = saved["capture_scale"]
        self.steps = extra["steps"]
        self.skipped_steps = extra.get("skipped_steps", 0)
        self._capture_scale = extra["capture_scale"]


def _restore(like: StructuredMatrix, tensors: list[Tensor], what: str) -> StructuredMatrix:
    """A copy of ``like`` holding ``tensors`` (in ``like``'s dtype and device)."""
    current = like.tensors()
    if len(tensors) != len(current) or any(
        t.shape != c.shape for t, c in zip(tensors, current, strict=True)
    ):
        raise ValueError(f"Saved {what} does not match the current layer's shapes.")
    return like._with_tensors(
        tuple(
            t.detach().to(dtype=c.dtype, device=c.device).clone()
            for t, c in zip(tensors, current, strict=True)
        )
    )


def _restore_optional(
    like: StructuredMatrix, tensors: list[Tensor] | None, what: str
) -> StructuredMatrix | None:
    return None if tensors is None else _restore(like, tensors, what)
