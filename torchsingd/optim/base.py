"""Bookkeeping shared by the Kronecker-factored optimizers (SINGD and the KFAC baseline).

:class:`KroneckerOptimizer` is a ``torch.optim.Optimizer`` that

1. finds the supported layers of a model through the layer registry (every other
   trainable parameter goes to a fallback rule, AdamW by default, in the same object),
2. lets each layer's adapter report forward passes; on preconditioner-update steps
   (``t % T == 0``) with gradients enabled, a tensor hook on each block's output turns
   the block's input and output gradient into the two Kronecker statistics (summed
   over the backward passes of one step),
3. in :meth:`KroneckerOptimizer.step` asks the subclass for each block's new factors
   and natural gradient, checks that everything is finite, and only then writes them,
4. handles gradient scalers, non-finite steps, clipping, the fallback rule and
   checkpoints.

Subclasses supply the method itself: :meth:`~KroneckerOptimizer._new_block` (state of
one block), :meth:`~KroneckerOptimizer._statistics` (what a backward pass contributes)
and :meth:`~KroneckerOptimizer._update_block` (new factors and the natural gradient).

A tensor hook on the output (rather than a module backward hook) keeps working when
the output feeds an in-place activation. Captures are tagged with the step they were
made in, so statistics of a forward pass whose backward came late never leak into a
later step.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import numbers
import operator
import os
import sys
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.optim import Optimizer

from torchsingd import distributed as tdist
from torchsingd.layers import (
    KFAC_APPROXIMATIONS,
    LOSS_AVERAGES,
    LayerAdapter,
    StepGradients,
    find_adapter,
    overrides_forward,
)
from torchsingd.optim.update import (
    ADAMW_MOMENTS,
    NaturalGradientTask,
    adamw_step,
    clip_by_global_norm,
    moment_dtype,
    natural_gradients,
    parameter_step,
    sgd_step,
    trust_region_scale,
)
from torchsingd.structures import StructuredMatrix, StructureSpec, get_structure
from torchsingd.structures.base import read_scalars

_INTERNAL = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,  # torchsingd/
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,  # optim wrappers, GradScaler
)


def warn(message: str) -> None:
    """``warnings.warn`` attributed to the user's line (the first frame outside
    torchsingd and torch: ``opt.step()`` or ``scaler.step(opt)``), however deep in the
    optimizer it is raised."""
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


_CALLABLE = "<callable: taken from the optimizer that loads this state>"
FALLBACK_RULES = ("adamw", "sgd")
NONFINITE_POLICIES = ("skip", "raise")


class NonFiniteError(FloatingPointError):
    """Raised by ``step`` with ``on_nonfinite="raise"`` when an update is not finite."""


@dataclass
class BlockState:
    """State of one Kronecker-factored block; subclasses add the factors.

    ``pending`` holds the two statistics (input side, output side) summed over the
    backward passes of step ``capture_step``, computed from output gradients divided
    by ``capture_scale``; ``None`` when nothing is pending.
    """

    name: str
    block: str
    pending: list[StructuredMatrix] | None = None
    capture_step: int = -1
    capture_scale: float = 1.0
    #: input rows ``N_a`` and loss terms ``n`` (ALGORITHM.md section 2) summed over
    #: the backward passes behind ``pending``: how ranks' statistics are combined
    #: (NaN: not known, in a single process or from an old checkpoint)
    rows: float = 0.0
    terms: float = 0.0
    #: whether ``pending`` was reduced across ranks already (by a step that then raised)
    reduced: bool = False
    #: how many times ``pending`` was started afresh: an :class:`_Application` whose
    #: backward pass went into the current one holds this number
    started: int = 0
    #: the sum of :meth:`LayerAdapter.own_gradient` over the passes behind ``pending``
    #: (kept only until the first factor update checks ``grad(W)`` against it, see
    #: :meth:`KroneckerOptimizer._check_own_gradient`)
    own: Tensor | None = None
    own_checked: bool = False
    #: the step of the last forward pass whose output gradient this block waits for
    hooked_step: int = -1
    #: whether a forward pass with gradients ran since construction (any step)
    seen: bool = False
    #: the step of the last forward pass with gradients (any step)
    forward_step: int = -1
    #: factor-update steps with a gradient, other layers' statistics and no forward
    #: of this one ever (see ``KroneckerOptimizer._missing_statistics``)
    unseen_updates: int = 0
    #: whether a statistic ever reached the factors (at a factor-update step)
    updated: bool = False
    #: steps between factor updates with a forward and a gradient while no statistic
    #: ever reached the factors (see ``KroneckerOptimizer._never_updated``)
    idle_steps: int = 0
    #: whether that was warned about
    idle_warned: bool = False

    def clear_captures(self) -> None:
        self.pending = None
        self.capture_step = -1
        self.rows = self.terms = 0.0
        self.reduced = False
        self.own = None

    def has_statistics(self, step: int) -> bool:
        """Whether statistics captured in ``step`` are pending."""
        return self.pending is not None and self.capture_step == step

    def factors(self) -> dict[str, StructuredMatrix | None]:
        """The persistent structured tensors, by name (checkpointed and counted)."""
        raise NotImplementedError

    def pending_like(self) -> tuple[StructuredMatrix, StructuredMatrix]:
        """Members with the structure and dtype of the two pending statistics."""
        raise NotImplementedError

    def cached(self) -> dict[str, Any]:
        """Tensors derived from the factors and kept between steps (not checkpointed,
        counted by ``state_bytes``): objects with ``nbytes()``, or ``None``."""
        return {}


_REQUIRES_GRAD = operator.attrgetter("requires_grad")


class _Application:
    """One forward application of a block whose backward pass is observed: its input
    (kept until the step, then released: a graph kept alive by the caller's ``loss``
    does not keep it) and which pending statistics a backward pass through it went
    into (:attr:`BlockState.started`), so that a second pass through the same forward
    (``retain_graph=True``, one ``backward`` per loss) does not count its input again."""

    __slots__ = ("x", "into", "shared", "__weakref__")

    def __init__(self, x: Tensor, shared: _SharedInput | None = None) -> None:
        self.x: Tensor | None = x
        self.into: int | None = None
        #: what it shares with the other applications that read the same input (until
        #: its statistics are captured)
        self.shared = shared


class _SharedInput:
    """The input Grams of the blocks that read one input tensor in one step with equal
    :meth:`~torchsingd.layers.LayerAdapter.rows_key` (an attention's query, key and
    value projections): computed by the first of them to be captured, applied to
    each block's own ``K`` (:meth:`KroneckerOptimizer._input_statistic`), dropped
    once every application that joined has been captured (or at the step, where one
    of them is never captured). A Gram is reused only while the input's version is
    the one it was computed at (an in-place change between two blocks' backward
    passes computes another; a change through ``.data``, which autograd does not
    see either, is not seen).

    Held by those applications only (the optimizer finds it through a weak
    dictionary), so it never outlives them; they keep the input (and so its memory,
    part of the lookup key) alive until the step, when the dictionary is emptied."""

    __slots__ = ("grams", "waiting", "__weakref__")

    def __init__(self) -> None:
        self.grams: dict[tuple, StructuredMatrix] = {}
        self.waiting = 0  # applications that joined and are not captured yet

    def captured(self) -> None:
        self.waiting -= 1
        if self.waiting <= 0:
            self.grams.clear()


class _RefusedError(ValueError):
    """What :meth:`KroneckerOptimizer._refuse` raised when a dormant layer woke."""


@dataclass
class Dormant:
    """A supported layer frozen whole when it came in: no factors; preconditioned from
    a factor-update step after its weight is unfrozen, left unchanged from the step
    any of its weights is unfrozen until then; with only biases unfrozen (BitFit) the
    fallback rule trains them (see :meth:`KroneckerOptimizer._wake_dormant`)."""

    module: nn.Module
    adapter: LayerAdapter
    group_index: int  # the weight's group (its T decides when the layer wakes)
    #: the parameters it can cover (:func:`_covered`), its weight first: it wakes once
    #: the weight requires grad, covering what requires grad then (as a new optimizer)
    covers: tuple[nn.Parameter, ...]

    #: where each of ``covers`` sits: its owner's ``_parameters`` dict and name
    slots: tuple[tuple[dict, str], ...] = ()

    def unfrozen(self) -> bool:
        """Whether its weight requires gradients."""
        return self.covers[0].requires_grad

    def replaced(self) -> bool:
        """Whether one of ``covers`` is no longer in its place (a new ``nn.Parameter``
        assigned, ``load_state_dict(assign=True)``, prune or a parametrization) while
        what trains there now requires gradients: the new parameter, or the moved one
        (prune keeps it as ``weight_orig``). A frozen replacement trains nothing, as
        with ``torch.optim``: no error until it is unfrozen."""
        return any(
            now is not p and (p if now is None else now).requires_grad
            for p, now in _occupants(self.slots, self.covers)
        )

    def waiting(self) -> bool:
        """Whether it waits for its wake, unchanged: its weight, or another of its
        weights (an attention or recurrent layer's), requires gradients."""
        return self.unfrozen() or any(p.requires_grad and p.dim() >= 2 for p in self.covers)


@dataclass
class ModuleEntry:
    """A preconditioned module: its adapter, group and one block state per block."""

    name: str
    module: nn.Module
    adapter: LayerAdapter
    group_index: int
    blocks: dict[str, BlockState] = field(default_factory=dict)
    #: the group of each of the adapter's parameters where they are in several groups
    #: (``group_index`` is the weight's: the factors' options; each parameter's own
    #: group gives its momentum and weight decay); ``()`` where all are in one
    param_groups: tuple[int, ...] = ()
    #: ``(id, requires_grad)`` of the adapter's parameters at construction: the
    #: factors are sized for them, so a later change is refused with a clear error.
    layout: tuple[tuple[int, bool], ...] = ()
    #: the module's parameters and their ``requires_grad`` at construction (a cheap
    #: first test of :meth:`KroneckerOptimizer._active`)
    watched: tuple[nn.Parameter, ...] = ()
    watched_flags: tuple[bool, ...] = ()
    #: whether the adapter's directions were seen to have the parameters' shapes
    #: (a rank that does not own the module under "shard" checks once, see
    #: :meth:`KroneckerOptimizer._zero_directions`)
    shapes_checked: bool = False
    #: ``watched[0]``'s dtype and device at construction (the factors were made for them)
    placement: tuple[torch.dtype, torch.device] | None = None
    #: the shapes of ``watched`` at construction (the factors are sized for them)
    watched_shapes: tuple[torch.Size, ...] = ()
    #: where each of ``watched`` sits: its owning module's ``_parameters`` and the name
    slots: tuple[tuple[dict, str], ...] = ()
    #: the adapter's parameters when the entry was made (those its factors are sized
    #: for; the adapter leaves out a bias frozen now, e.g. while a woken layer pauses)
    covered: tuple[nn.Parameter, ...] = ()

    def groups(self, count: int) -> tuple[int, ...]:
        """The param group of each of the adapter's ``count`` parameters."""
        return self.param_groups or (self.group_index,) * count

    def current(self) -> list[Tensor]:
        """The tensors in the slots of ``watched`` now: each its parameter where that
        is still in place, else what replaced it (where nothing did, the former one)."""
        return [p if now is None else now for p, now in _occupants(self.slots, self.watched)]

    def changes(self) -> tuple[bool, bool]:
        """``(resized, replaced)``: whether a parameter changed shape since construction,
        in place (``resize_token_embeddings``) or replaced by one of another shape
        (every one is compared: an attention layer's output projection may change
        alone), and whether any of ``watched`` is no longer the parameter in its place
        (a new ``nn.Parameter`` assigned, ``load_state_dict(assign=True)``, or prune or
        a parametrization applied, which move the weight elsewhere)."""
        resized = replaced = False
        pairs = zip(_occupants(self.slots, self.watched), self.watched_shapes, strict=True)
        for (p, now), shape in pairs:
            if now is not p:
                replaced = True
                p = p if now is None else now
            if p.shape != shape:
                resized = True
        return resized, replaced


#: The options a parameter of a layer split across param groups takes from its own
#: group (the rest, lr included, must agree: the layer's trust region bounds its step
#: for one lr; a review found the bound broken by a bias group with a larger lr).
PARAMETER_OPTIONS = ("momentum", "weight_decay")


def _slots_of(module: nn.Module, params: tuple[Tensor, ...]) -> tuple[tuple[dict, str], ...]:
    """Where each of ``params`` (parameters of ``module``) sits: its owner's
    ``_parameters`` dict and its name there (the first place, for a shared one)."""
    where: dict[int, tuple[dict, str]] = {}
    for full, p in module.named_parameters():
        prefix, _, attr = full.rpartition(".")
        owner = module.get_submodule(prefix) if prefix else module
        where.setdefault(id(p), (owner._parameters, attr))
    return tuple(where[id(p)] for p in params)


def _occupants(
    slots: tuple[tuple[dict, str], ...], params: tuple[Tensor, ...]
) -> list[tuple[Tensor, Tensor | None]]:
    """``(p, what is in p's slot now)`` for each of ``params`` and its slot (``None``
    where the slot is empty: prune or a parametrization moved the parameter)."""
    return [(p, owner.get(name)) for (owner, name), p in zip(slots, params, strict=True)]


def _same(a: Any, b: Any) -> bool:
    """Whether two option values are equal (identical objects, or equal of one type)."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):  # e.g. tensors of several entries
        return False


def _layer_count(entries: dict[str, ModuleEntry]) -> str:
    """``"8 layer(s) (14 Kronecker-factored blocks)"``; the blocks only where they differ
    (attention has four, ``opt.layers`` lists blocks)."""
    blocks = sum(len(e.blocks) for e in entries.values())
    text = f"{len(entries)} layer(s)"
    return text if blocks == len(entries) else f"{text} ({blocks} Kronecker-factored blocks)"


def is_number(x: Any) -> bool:
    """A real number: Python's, or NumPy's (``np.float32(0.1)``, as ``np.logspace``
    gives), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _plain(value: Any) -> Any:
    """A NumPy scalar as the Python number or string it holds (``np.float64`` too,
    though it is a ``float``); a :class:`StructureSpec` as its name, where the name
    means it (not a subclass that is not registered); anything else as it is."""
    if isinstance(value, StructureSpec):
        try:
            return value.name if get_structure(value.name) == value else value
        except ValueError:
            return value
    if is_number(value) and type(value) not in (int, float):
        return int(value) if _is_int(value) else float(value)
    if isinstance(value, str) and type(value) is not str:
        return str(value)
    return value


def plain_numbers(group: dict[str, Any]) -> None:
    """Replace NumPy scalars among ``group``'s options (and in its tuples and lists, such
    as ``fallback_betas`` or ``structures``) by Python numbers, and structure specs by
    their names, in place: the arithmetic of a step is Python's (float64) whatever the
    caller passed, and ``state_dict()`` holds only what ``torch.load(weights_only=True)``
    reads back."""
    for key, value in group.items():
        if isinstance(value, (tuple, list)) and key != "params":
            plain = list(map(_plain, value))
            if any(a is not b for a, b in zip(plain, value, strict=True)):
                group[key] = plain if isinstance(value, list) else tuple(plain)
        else:
            plain = _plain(value)
            if plain is not value:
                group[key] = plain


#: The largest learning rate: the parameter updates pass ``-lr`` to float32 arithmetic
#: (a larger value cannot be converted, and would make every weight inf anyway).
LR_MAX = float(torch.finfo(torch.float32).max)


def lr_value(lr: Any) -> float | None:
    """``lr`` as a float: a Python number or, as ``torch.optim`` allows, a tensor of one
    real element (``None`` for anything else)."""
    if is_number(lr):
        return float(lr)
    if (
        isinstance(lr, Tensor)
        and lr.numel() == 1
        and not lr.requires_grad
        and not (lr.is_complex() or lr.dtype == torch.bool)
    ):
        return float(lr)
    return None


def valid_lr(lr: Any) -> bool:
    """``lr`` is a number (or one-element tensor) in ``[0, LR_MAX]``."""
    value = lr_value(lr)
    return value is not None and 0.0 <= value <= LR_MAX


def _positive_or_none(x: Any) -> bool:
    return x is None or (is_number(x) and x > 0)


def _rate(x: Any) -> bool:
    return is_number(x) and 0.0 <= x < math.inf


#: What a step checks again (a scheduler or the user may have changed it since
#: construction): name -> (test, what is valid). ``lr`` is checked on its own (it may
#: be a tensor).
STEP_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "momentum": (lambda x: is_number(x) and 0.0 <= x < 1.0, "a number in [0, 1)"),
    "weight_decay": (_rate, "a finite number >= 0"),
    "damping": (_rate, "a finite number >= 0"),
    "lr_cov": (lambda x: callable(x) or _rate(x), "a finite number >= 0 or a callable"),
    "T": (lambda x: _is_int(x) and x >= 1, "an int >= 1"),
    "max_update_norm": (_positive_or_none, "None or a number > 0"),
    "kl_clip": (_positive_or_none, "None or a number > 0"),
    "alpha1": (lambda x: is_number(x) and 0.0 <= x < 1.0, "a number in [0, 1)"),
    "max_factor_step": (_positive_or_none, "None or a number > 0"),
    "normalize_lr_cov": (lambda x: isinstance(x, bool), "True or False"),
    "kfac_like": (lambda x: isinstance(x, bool), "True or False"),
    "safeguards": (lambda x: isinstance(x, bool), "True or False"),
    "kfac_approx": (lambda x: x in KFAC_APPROXIMATIONS, f"one of {KFAC_APPROXIMATIONS}"),
    "loss_average": (lambda x: x in LOSS_AVERAGES, f"one of {LOSS_AVERAGES}"),
    "fallback": (lambda x: x in FALLBACK_RULES, f"one of {FALLBACK_RULES}"),
    "fallback_lr": (
        lambda x: x is None or (_rate(x) and x <= LR_MAX),
        f"None or a finite number in [0, {LR_MAX:.4g}]",
    ),
    "fallback_betas": (
        lambda x: (
            isinstance(x, (tuple, list))
            and len(x) == 2
            and all(is_number(b) and 0.0 <= b < 1.0 for b in x)
        ),
        "a pair of numbers in [0, 1)",
    ),
    "fallback_eps": (lambda x: is_number(x) and 0.0 < x < math.inf, "a finite number > 0"),
    "fallback_weight_decay": (lambda x: x is None or _rate(x), "None or a finite number >= 0"),
}


def check_step_hyperparameters(
    groups: list[dict[str, Any]], lr_cov_upper: float = math.inf
) -> None:
    """The values a scheduler or the user may change between steps (``lr``,
    ``momentum``, ``weight_decay``, ``T``, ...: :data:`STEP_CHECKS`), checked before a
    step writes anything (a NaN learning rate from a schedule would make every weight
    NaN). Raises a ``ValueError`` naming the group, the value and the valid range; a
    callable ``lr_cov``'s values are checked where it is called."""
    for i, group in enumerate(groups):
        problem = None
        if not valid_lr(group["lr"]):
            problem = ("lr", f"a finite number in [0, {LR_MAX:.4g}]")
        else:
            for name, (test, valid) in STEP_CHECKS.items():
                if name in group and not test(group[name]):
                    problem = (name, valid)
                    break
            lr_cov = group["lr_cov"]
            if problem is None and not callable(lr_cov) and lr_cov > lr_cov_upper:
                problem = ("lr_cov", f"a number in [0, {lr_cov_upper:g}] (or a callable)")
        if problem is not None:
            name, valid = problem
            raise ValueError(
                f"Invalid {name}={group[name]!r} in param group {i} (changed since "
                f"construction, e.g. by a scheduler): must be {valid}. Nothing was updated."
            )
        plain_numbers(group)


def parse_dtypes(
    value: Any, name: str, default: torch.dtype | None = None
) -> tuple[torch.dtype | None, torch.dtype | None]:
    """A dtype option as a pair (input side, output side); one dtype applies to both.

    ``None`` entries become ``default`` (e.g. the weight's dtype).
    """
    if value is None or isinstance(value, torch.dtype):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(
            f"{name} must be None, a torch.dtype, or a pair of them (input side, output "
            f"side), got {value!r}."
        )
    for d in value:
        if d is not None and not (isinstance(d, torch.dtype) and d.is_floating_point):
            raise ValueError(f"{name} entries must be floating dtypes, got {d!r}.")
    return value[0] or default, value[1] or default


def validate_common(group: dict[str, Any]) -> None:
    """Raise a ``ValueError`` naming the first invalid shared hyper-parameter."""

    def bad(name: str, why: str) -> None:
        raise ValueError(f"Invalid {name}={group[name]!r}: {why}.")

    def passes(name: str) -> bool:  # the test a step repeats (STEP_CHECKS)
        return STEP_CHECKS[name][0](group[name])

    if not valid_lr(group["lr"]):
        bad("lr", f"must be a finite number in [0, {LR_MAX:.4g}] (or a tensor of one)")
    for name in ("damping", "weight_decay"):
        if not passes(name):
            bad(name, "must be a finite number >= 0")
    if not passes("fallback_eps"):
        bad("fallback_eps", "must be a finite number > 0 (AdamW divides by sqrt(v) + eps)")
    if not passes("momentum"):
        bad("momentum", "must be a number in [0, 1)")
    for name in ("fallback_lr", "fallback_weight_decay"):
        if not passes(name):
            bad(name, "must be None (use the group's value) or a finite number >= 0")
    if not passes("max_update_norm"):
        bad("max_update_norm", "must be None (no clipping) or a number > 0")
    if "kl_clip" in group and not passes("kl_clip"):
        bad("kl_clip", "must be None (no trust region) or a number > 0")
    if not passes("fallback_betas"):
        bad("fallback_betas", "must be a pair of numbers in [0, 1)")
    if not passes("fallback"):
        bad("fallback", f"must be one of {FALLBACK_RULES}")
    if not passes("T"):
        bad("T", "the preconditioner update interval must be an integer >= 1")
    if not passes("lr_cov"):
        bad("lr_cov", "must be a finite number >= 0 or a callable of the step")
    if not passes("loss_average"):
        bad("loss_average", f"must be one of {LOSS_AVERAGES}")
    if not passes("kfac_approx"):
        bad("kfac_approx", f"must be one of {KFAC_APPROXIMATIONS}")
    try:
        get_structure(group["vocab_structure"])
    except ValueError as err:
        bad("vocab_structure", str(err).rstrip("."))
    plain_numbers(group)


def scheduled_lr_cov(group: dict[str, Any], step: int, upper: float = math.inf) -> float:
    """The group's ``lr_cov`` at ``step`` as a float: a callable's value is checked like
    a constant (finite, ``>= 0``, below ``upper`` where the method needs it)."""
    lr_cov = group["lr_cov"]
    if not callable(lr_cov):
        return float(lr_cov)
    raw = lr_cov(step)
    try:  # a Python or NumPy number, or a one-element tensor
        value = math.nan if isinstance(raw, (bool, str)) else float(raw)
    except (TypeError, ValueError, RuntimeError):
        value = math.nan
    if not 0.0 <= value < math.inf or value > upper:
        limit = "a finite number >= 0" if upper == math.inf else f"a number in [0, {upper:g}]"
        raise ValueError(f"lr_cov({step}) returned {raw!r}: it must return {limit}.")
    return value


def common_defaults(
    *,
    vocab_structure: str,
    fallback: str,
    fallback_lr: float | None,
    fallback_betas: tuple[float, float],
    fallback_eps: float,
    fallback_weight_decay: float | None,
    max_update_norm: float | None,
    kl_clip: float | None = None,
) -> dict[str, Any]:
    """Group defaults every Kronecker-factored optimizer has (beyond the method's own)."""
    return dict(
        vocab_structure=vocab_structure,
        fallback=fallback,
        fallback_lr=fallback_lr,
        fallback_betas=tuple(fallback_betas),
        fallback_eps=fallback_eps,
        fallback_weight_decay=fallback_weight_decay,
        max_update_norm=max_update_norm,
        kl_clip=kl_clip,
    )


class KroneckerOptimizer(Optimizer):
    """Shared machinery; see the module docstring. Not used directly."""

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Whether ``step()`` unscales: torch's ``GradScaler.step`` then hands it
        ``grad_scale`` and ``found_inf`` instead of unscaling ``.grad`` itself (the
        captured output gradients need the scale too), so ``GradScaler`` is always told
        yes. Other code asks this to refuse gradient clipping before ``step()``
        (Lightning's mixed-precision plugin refuses it even in bfloat16, where no scaler
        exists), so it is told yes only once a ``GradScaler`` has stepped this
        optimizer or an observed layer's output was float16 (the precision that needs
        loss scaling)."""
        override = self.__dict__.get("_amp_scaling_override")
        if override is not None:  # (set by the user: said to every reader)
            return override
        reader = sys._getframe(1).f_globals.get("__name__", "")
        if reader == "torch" or reader.startswith("torch."):
            return True
        return getattr(self, "_scaled_steps", False) or getattr(self, "_float16_outputs", False)

    @_step_supports_amp_scaling.setter
    def _step_supports_amp_scaling(self, value: bool) -> None:
        self.__dict__["_amp_scaling_override"] = bool(value)

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]] | None,
        defaults: dict[str, Any],
        *,
        warn_unsupported: bool,
        init_grad_scale: float,
        on_nonfinite: str,
        distributed_strategy: str = "replicate",
        process_group: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            name = type(self).__name__
            raise TypeError(
                f"model must be an nn.Module, got {type(model).__name__}: {name} takes the "
                "model itself, not its parameters (it observes the layers' inputs and "
                f"output gradients): {name}(model), or {name}(model, params=...) to "
                "train only some parameters or to give parameter groups."
            )
        if is_number(params) or isinstance(params, Tensor) and params.dim() == 0:
            raise TypeError(
                f"params must be parameters or parameter groups (or None), got "
                f"{params!r}: pass the learning rate by name, "
                f"{type(self).__name__}(model, lr={params!r})."
            )
        model = self._unwrap(model)
        if distributed_strategy not in tdist.STRATEGIES:
            raise ValueError(
                f"Invalid distributed_strategy={distributed_strategy!r}: must be one of "
                f"{tdist.STRATEGIES}."
            )
        self.distributed_strategy = distributed_strategy
        self._group = process_group
        if not is_number(init_grad_scale) or not init_grad_scale > 0:
            raise ValueError(f"Invalid init_grad_scale={init_grad_scale!r}: must be > 0.")
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"Invalid on_nonfinite={on_nonfinite!r}: must be one of {NONFINITE_POLICIES}."
            )
        if not isinstance(warn_unsupported, bool):
            raise ValueError(
                f"Invalid warn_unsupported={warn_unsupported!r}: must be True or False."
            )
        self._model = model
        self._warn_unsupported = warn_unsupported
        self.on_nonfinite = on_nonfinite
        self._param_names = {id(p): n for n, p in model.named_parameters()}
        self._candidates, self._tied, self._overridden, self._asleep = self._find_layers(model)
        #: supported layers frozen whole when they came in (their parameters are in
        #: the fallback's list), by name (:class:`Dormant`): each is preconditioned once
        #: its weight requires gradients again (see :meth:`_wake_dormant`); none gets
        #: factors before.
        self._dormant: dict[str, Dormant] = {}
        self._told: set[str] = set()  # dormant layers said to be unfrozen in part
        self._told_apart: set[str] = set()  # said to be unfrozen on some ranks only
        self._told_waiting: set[str] = set()  # said to wait for more to be unfrozen
        #: parameter id -> its dormant layer (a cache, reset where ``_dormant`` changes)
        self._dormant_of: dict[int, Dormant] | None = None
        #: parameters left out as frozen (``params=None``): a step that finds one with a
        #: gradient (unfrozen since) says once that it is not trained
        self._left_out: list[Tensor] = []
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
            self._left_out = [p for p in model.parameters() if not p.requires_grad]
        self.steps = 0
        self.skipped_steps = 0
        #: How often each safeguard acted (counted since construction, not saved):
        #: ``"kl_clipped"`` (step, group) pairs whose directions the trust region scaled,
        #: ``"factor_step_bounded"`` factor updates with a reduced ``lr_cov``,
        #: ``"factor_repaired"`` factor updates that came out non-finite and were undone.
        self.safeguard_events = {"kl_clipped": 0, "factor_step_bounded": 0, "factor_repaired": 0}
        self._notes: list[tuple[str | None, str | None]] = []
        #: per group: (steps with a trust region, of them scaled) in the current window
        self._kl_window: dict[int, tuple[int, int]] = {}
        self._kl_warned: set[int] = set()
        self._lost: set[str] = set()  # blocks warned of a lost output gradient
        #: changes of the blocks' counts that wait for the step to commit
        self._marks: list[Callable[[], None]] = []
        #: layers whose weight is used outside their forward: trained by the fallback
        self._demoted: dict[str, ModuleEntry] = {}
        self._handed_over: list[ModuleEntry] = []  # (in this step, to be told)
        self._capture_scale = float(init_grad_scale)
        self._init_grad_scale = float(init_grad_scale)
        self._scale_warned = False
        self._explicit_scale: float | None = None
        #: a GradScaler has stepped this optimizer; an observed output was float16
        #: (see ``_step_supports_amp_scaling``)
        self._scaled_steps = False
        self._float16_outputs = False
        self._entries: dict[str, ModuleEntry] = {}
        self._owners: dict[str, int] = {}  # layer name -> rank ("shard")
        self._fallback_params: list[tuple[int, nn.Parameter]] = []
        self._sparse_fallback = False  # whether a fallback parameter may be sparse
        #: layers added in part by add_param_group (name -> their parameters not in the
        #: optimizer yet): the part added waits for the rest (a next add_param_group,
        #: e.g. a new head's weight and bias in groups differing in weight_decay);
        #: step() refuses to run while one waits
        self._incomplete: dict[str, list[str]] = {}
        self._handles: list[Any] = []
        #: forward applications of this step whose backward is observed (their inputs
        #: are released when the step is taken)
        self._applications: weakref.WeakSet[_Application] = weakref.WeakSet()
        #: the inputs of this step's applications that blocks may share, by the input's
        #: memory (address, shape, strides, dtype, device, version) and rows key
        self._inputs: weakref.WeakValueDictionary[tuple, _SharedInput] = (
            weakref.WeakValueDictionary()
        )
        # Hooks see the optimizer only through a weak reference; once it is collected,
        # its hooks are removed (a deleted optimizer neither stays alive nor captures).
        weakref.finalize(self, _remove_handles, self._handles)
        self._constructed = False
        super().__init__(params, defaults)
        self._constructed = True
        self._assign_parameters()
        self._frozen = [self._frozen_of(g) for g in self.param_groups]

    @staticmethod
    def _unwrap(model: nn.Module) -> nn.Module:
        """The model inside a (Distributed)DataParallel wrapper; refuse FSDP."""
        from torch.nn.parallel import DataParallel, DistributedDataParallel

        while True:  # in any order: (Distributed)DataParallel, torch.compile's wrapper
            if isinstance(model, (DataParallel, DistributedDataParallel)):
                model = model.module
            elif type(model).__name__ == "OptimizedModule" and isinstance(
                getattr(model, "_orig_mod", None), nn.Module
            ):
                model = model._orig_mod
            else:
                break
        fsdp1 = type(model).__name__ == "FullyShardedDataParallel"
        if fsdp1 or tdist.is_sharded_by_fsdp(list(model.parameters())):
            raise ValueError(
                "FSDP-sharded models are not supported: each rank holds only a shard of a "
                "weight, while a Kronecker-factored preconditioner needs whole weight "
                "matrices (their full gradients and layer inputs). Use "
                "DistributedDataParallel (every rank holds the model) with "
                "distributed_strategy='shard' to spread the preconditioner work instead."
            )
        return model

    def _owner(self, entry: ModuleEntry) -> int:
        """The rank that updates ``entry``'s factors (always this rank when replicating)."""
        rank, size = tdist.world(self._group)
        if self.distributed_strategy == "replicate" or size == 1:
            return rank
        if len(self._owners) != len(self._entries):  # assigned once all layers are known
            costs = [
                sum(
                    sum(f.numel() for f in (s.factors().values()) if f is not None)
                    * sum(e.adapter.dims(e.module, block=b))
                    for b, s in e.blocks.items()
                )
                for e in self._entries.values()
            ]
            owners = tdist.assign(costs, size)
            self._owners = dict(zip(self._entries, owners, strict=True))
        return self._owners[entry.name]

    # ------------------------------------------------------- the method itself
    def _validate(self, group: dict[str, Any]) -> None:
        """Validate a group (raise ``ValueError`` naming the argument); may normalise it."""
        validate_common(group)

    def _new_block(
        self,
        name: str,
        block: str,
        dims: tuple[int, int],
        group: dict[str, Any],
        k_structure: str | None,
        weight: Tensor,
    ) -> BlockState:
        """Initial state of one block (``dims = (d_i, d_o)``)."""
        raise NotImplementedError

    def _refuse(
        self, name: str, module: nn.Module, adapter: LayerAdapter, group: dict[str, Any]
    ) -> None:
        """Raise the ``ValueError`` that making ``module``'s entry would raise, if any,
        without making it (what the adapter refuses; subclasses add their own)."""
        adapter.check(module, name)

    def _statistics(
        self,
        entry: ModuleEntry,
        layer: BlockState,
        x: Tensor,
        g: Tensor,
        shared: _SharedInput | None = None,
    ) -> tuple[StructuredMatrix, StructuredMatrix]:
        """The (input side, output side) statistics of one backward pass.

        ``x`` is the block's raw input, ``g`` the output-gradient rows ``[N_g, d_o]``
        (already unscaled by the capture scale); ``shared``: what the input side may
        share with other blocks (see :meth:`_input_statistic`).
        """
        raise NotImplementedError

    def _output_statistic(self, entry: ModuleEntry, layer: BlockState, g: Tensor):
        """The output side of :meth:`_statistics` alone."""
        raise NotImplementedError

    def _output_dtype(self, layer: BlockState) -> torch.dtype:
        """The dtype in which output-gradient rows are formed."""
        raise NotImplementedError

    def _update_block(
        self,
        layer: BlockState,
        G: Tensor,
        group: dict[str, Any],
        stats: list[StructuredMatrix] | None,
        output_scale: float,
    ) -> tuple[dict[str, Any], Tensor | NaturalGradientTask]:
        """New factors (by attribute name) and the natural gradient of one block (or
        the task that computes it with other blocks', see :meth:`_precondition`).

        ``G``: ``grad(W)`` as ``[d_o, d_i]``, unscaled. ``stats``: this step's pending
        statistics when the preconditioner is updated now, else ``None``;
        ``output_scale`` multiplies the output-side statistic (loss-scale correction).
        Must not modify ``layer``.
        """
        raise NotImplementedError

    # ----------------------------------------------------------------- set-up
    @staticmethod
    def _find_layers(
        model: nn.Module,
    ) -> tuple[
        list[tuple[str, nn.Module, LayerAdapter]],
        list[str],
        list[str],
        list[tuple[str, nn.Module, LayerAdapter, tuple[nn.Parameter, ...]]],
    ]:
        """Supported modules with trainable parameters, names of tied ones left out,
        descriptions of those left out because their class overrides the forward of
        the supported class it derives from, and untied supported modules frozen whole
        (none of the parameters they would cover requires gradients), with those
        parameters (:func:`_covered`)."""
        found, overridden, frozen = [], [], []
        covered: set[int] = set()
        for name, module in model.named_modules():
            if id(module) in covered:
                continue
            adapter, registered = find_adapter(module)
            if adapter is None:
                continue
            covered.update(id(m) for m in adapter.submodules(module))
            if overrides_forward(module, registered):
                if any(p.requires_grad for p in module.parameters()):
                    sub, base = type(module).__qualname__, registered.__qualname__
                    if sub == base:  # (timm's Linear derives from nn.Linear)
                        sub = f"{type(module).__module__}.{sub}"
                        base = f"{registered.__module__}.{base}"
                    overridden.append(f"{name!r} ({sub} overrides {base}.forward)")
                continue
            if not adapter.supports(module):
                continue  # e.g. EmbeddingBag(mode="max"): not a linear map of its weight
            if parametrize.is_parametrized(module):
                continue  # its weight is computed: the fallback trains the originals
            params = adapter.params(module)
            if not all(isinstance(p, nn.Parameter) for p in params):
                continue  # computed weights (legacy weight_norm): the fallback trains theirs
            if not params or params[0].numel() == 0:
                continue  # an empty weight (nn.Linear(0, n)): the fallback trains the rest
            ids = [id(p) for p in params]
            if params[0].requires_grad:
                found.append((name, module, adapter, ids))
                continue
            covers = _covered(adapter, module)  # (a frozen weight: ties count all of them)
            frozen.append((name, module, adapter, [id(p) for p in covers], covers))
        uses: dict[int, int] = {}
        for *_, ids in found + [f[:4] for f in frozen]:
            for i in set(ids):
                uses[i] = uses.get(i, 0) + 1
        tied = [n for n, _, _, ids in found if any(uses[i] > 1 for i in ids)]
        asleep = [
            (n, m, a, covers)
            for n, m, a, ids, covers in frozen
            if all(uses[i] == 1 for i in ids) and not any(p.requires_grad for p in covers)
        ]  # (a frozen weight with a trainable bias stays with the fallback rule)
        return [(n, m, a) for n, m, a, _ in found if n not in tied], tied, overridden, asleep

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated; on an error nothing is added).

        After construction, the model's supported layers are looked up again, so a
        layer appended to the model since then is preconditioned too.
        """
        super().add_param_group(param_group)
        if not self._constructed:
            self._validate(self.param_groups[-1])
            return
        saved = (
            dict(self._entries),
            dict(self._dormant),
            len(self._handles),
            len(self._fallback_params),
            self._candidates,
            self._tied,
            self._overridden,
            self._asleep,
            self._param_names,
            self._incomplete,
        )
        try:
            self._validate(self.param_groups[-1])
            self._param_names = {id(p): n for n, p in self._model.named_parameters()}
            found = self._find_layers(self._model)
            self._candidates, self._tied, self._overridden, self._asleep = found
            self._assign_parameters(adding=True)
        except BaseException:
            entries, self._dormant, n_handles, n_fallback, *lists, names, incomplete = saved
            self._param_names, self._incomplete = names, incomplete
            self._dormant_of = None
            self._candidates, self._tied, self._overridden, self._asleep = lists
            self._entries = entries
            _remove_handles(self._handles[n_handles:])
            del self._handles[n_handles:]
            del self._fallback_params[n_fallback:]
            self._owners = {}
            self.param_groups.pop()
            raise
        self._frozen.append(self._frozen_of(self.param_groups[-1]))

    def _group_of(self) -> dict[int, int]:
        """Parameter id -> the index of its param group."""
        return {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}

    def _name(self, p: nn.Parameter) -> str:
        return self._param_names.get(id(p), f"<parameter of shape {tuple(p.shape)}>")

    def _assign_parameters(self, adding: bool = False) -> None:
        """Give every parameter of every group to a preconditioned layer or the fallback.

        ``adding`` (from :meth:`add_param_group`): a layer new to the optimizer with only
        some of its parameters in the groups waits for the rest (:attr:`_incomplete`)
        instead of being refused.
        """
        group_of = self._group_of()
        claimed: set[int] = {id(p) for e in self._entries.values() for p in e.covered}
        known = {id(p) for _, p in self._fallback_params}
        known_before = frozenset(known)
        refused: dict[str, list[str]] = {}  # frozen layers that could not be preconditioned
        # either, by the reason (the same one for many layers: KFAC in bfloat16)
        # Check everything before changing anything (a failed add_param_group is undone).
        new_layers, split = [], []
        incomplete: dict[str, list[str]] = {}
        waiting: set[int] = set()  # parameters of incomplete layers: nobody's yet

        def wait_for_rest(name: str, params: Sequence[nn.Parameter], indices) -> bool:
            """Whether the layer (part in the groups ``indices``, part in none) is
            left to wait for the rest: only while adding, where the part added agrees
            on the factors' options."""
            present = tuple(i for i in indices if i is not None)
            if not adding or self._layer_options_differ(present):
                return False
            pairs = list(zip(params, indices, strict=True))
            incomplete[name] = [self._name(p) for p, i in pairs if i is None]
            waiting.update(id(p) for p, i in pairs if i is not None)
            return True

        for name, module, adapter in self._candidates:
            if name in self._entries:
                continue
            params = adapter.params(module)
            indices = tuple(group_of.get(id(p)) for p in params)
            groups = set(indices)
            if groups == {None}:
                continue  # not ours to train: not checked either (e.g. a sparse embedding)
            if any(id(p) in known for p in params):
                continue  # already trained by the fallback rule (its state lives there)
            if len(groups) != 1:
                if None in groups and wait_for_rest(name, params, indices):
                    continue
                differ = self._layer_options_differ(tuple(i for i in indices if i is not None))
                if None in groups or differ:
                    where = [f"groups {sorted(g for g in groups if g is not None)}"]
                    where.append("not in the optimizer" if None in groups else "")
                    differ_text = f": {', '.join(differ)} differ" if differ else ""
                    split.append(f"{name!r} ({' and '.join(w for w in where if w)}{differ_text})")
                    continue
            adapter.check(module, name)
            new_layers.append((name, module, adapter, indices))
        if split:
            shown = ", ".join(split[:5]) + (f" and {len(split) - 5} more" if len(split) > 5 else "")
            raise ValueError(
                f"{len(split)} layer(s) are split across parameter groups that differ in "
                f"options of their factors, or partly left out: {shown}. A layer's "
                "parameters may be in several groups only where those agree on every "
                f"option but {' and '.join(PARAMETER_OPTIONS)} (nanoGPT's split of 2-D "
                "and 1-D parameters by weight_decay works): the weight and bias share "
                "the layer's Kronecker factors and step. (add_param_group may add a "
                "layer's parameters in several calls, in groups that agree on those "
                "options.)"
            )
        for name, _, _, covers in self._asleep:  # (a frozen layer added in part, too)
            if name in self._entries or name in self._dormant:
                continue
            indices = tuple(group_of.get(id(p)) for p in covers)
            added_in_part = None in indices and set(indices) != {None}
            if added_in_part and not any(id(p) in known for p in covers):
                wait_for_rest(name, covers, indices)
        self._incomplete = incomplete
        for name, module, adapter, indices in new_layers:
            self._entries[name] = self._new_entry(name, module, adapter, indices)
            claimed.update(id(p) for p in adapter.params(module))
        new_fallback = []
        for i, g in enumerate(self.param_groups):
            for p in g["params"]:
                if id(p) not in claimed and id(p) not in known and id(p) not in waiting:
                    new_fallback.append((i, p))
                    known.add(id(p))  # a parameter listed twice is updated once
        self._fallback_params += new_fallback
        self._sparse_fallback = any(p.layout != torch.strided for _, p in self._fallback_params)
        self._check_sparse_fallback()
        why_not: dict[int, str] = {}  # a frozen layer's parameter -> why it is not dormant
        named: set[int] = set()  # parameters of frozen layers named with ``refused``
        for name, module, adapter, covers in self._asleep:
            if name in self._entries or name in self._dormant:
                continue
            if id(covers[0]) in known_before:
                continue  # trained by the fallback rule before (BitFit, a hand-over): stays
            indices = tuple(group_of.get(id(p)) for p in covers)
            if None in indices:  # not all of it is ours: it could never be preconditioned
                why_not.update((id(p), "part of its layer is not in the optimizer") for p in covers)
                continue
            differ = self._layer_options_differ(indices) if len(set(indices)) > 1 else []
            if differ:  # (as a layer trainable at construction would be refused)
                why = f"its layer's parameters are in groups whose {', '.join(differ)} differ"
                why_not.update((id(p), why) for p in covers)
                continue
            try:
                with _trainable(module):
                    self._refuse(name, module, adapter, self.param_groups[indices[0]])
            except ValueError as err:  # (e.g. a sparse embedding; KFAC in half precision)
                why = str(err).replace(f"layer {name!r}", "these layers")  # (said once)
                refused.setdefault(why, []).append(name)
                named.update(id(p) for p in covers)
                continue
            self._dormant[name] = Dormant(
                module, adapter, indices[0], covers, _slots_of(module, covers)
            )
            self._dormant_of = None
        if self._warn_unsupported and new_fallback:
            by_rule: dict[str, list[str]] = {}
            for i, p in new_fallback:
                by_rule.setdefault(self.param_groups[i]["fallback"], []).append(self._name(p))
            rules = "; ".join(f"{rule}: {names}" for rule, names in by_rule.items())
            tied = f" Tied (shared) layers left to it: {self._tied}." if self._tied else ""
            if self._overridden:
                tied += (
                    " Layers whose class overrides the forward of the supported class "
                    "it derives from (what they compute is not known) left to it: "
                    f"{', '.join(self._overridden)}; register_layer(that class, an "
                    "adapter) preconditions them."
                )
            asleep = {id(p) for d in self._dormant.values() for p in d.covers}
            new = [p for _, p in new_fallback]
            waiting = [self._name(p) for p in new if id(p) in asleep]
            frozen: dict[str | None, list[str]] = {}  # why (None: not said) -> names
            for p in new:
                if not p.requires_grad and id(p) not in asleep and id(p) not in named:
                    frozen.setdefault(why_not.get(id(p)), []).append(self._name(p))
            if waiting:
                tied += (
                    " Of supported layers frozen whole now (requires_grad=False), "
                    "preconditioned once their weight is unfrozen, from a factor-update "
                    f"step on (unchanged until then): {waiting}."
                )
            if refused:
                tied += (
                    " Frozen layers it could not precondition once unfrozen: "
                    + "; ".join(f"{names} ({why})" for why, names in refused.items())
                    + "."
                )
            for why, names in frozen.items():  # (part of a supported layer frozen now, or
                # one that could not be made to wait, stays with the fallback)
                tied += (
                    f" Frozen now (requires_grad=False), so not preconditioned even once "
                    f"unfrozen{f' ({why})' if why else ''}: {names}."
                )
            owners: dict[int, str] = {}
            for module in self._model.modules():
                for q in module.parameters(recurse=False):
                    owners.setdefault(id(q), type(module).__name__)
            counts: dict[str, int] = {}
            for _, p in new_fallback:
                kind = owners.get(id(p), "outside the model")
                counts[kind] = counts.get(kind, 0) + 1
            kinds = ", ".join(f"{kind} ({n})" for kind, n in counts.items())
            warn(
                f"{type(self).__name__} preconditions {_layer_count(self._entries)}; these "
                f"parameters are trained by the fallback rule instead — {rules}.{tied} "
                f"Their modules, by type (parameters): {kinds}; register_layer(type, "
                "adapter) preconditions another layer type. Pass warn_unsupported=False "
                "to silence this.",
            )

    def _new_entry(
        self, name: str, module: nn.Module, adapter: LayerAdapter, indices: tuple[int, ...]
    ) -> ModuleEntry:
        """A preconditioned layer; ``indices``: the param group of each of the adapter's
        parameters (the weight's gives the factors' options)."""
        group_index = indices[0]
        group = self.param_groups[group_index]
        k_structure = None
        if adapter.k_structure_option is not None:
            k_structure = group[adapter.k_structure_option]
        weight = adapter.params(module)[0]
        watched = tuple(module.parameters())
        slots = _slots_of(module, watched)
        entry = ModuleEntry(
            name,
            module,
            adapter,
            group_index,
            param_groups=indices if len(set(indices)) > 1 else (),
            layout=_layout(adapter, module),
            watched=watched,
            watched_flags=tuple(p.requires_grad for p in watched),
            placement=(watched[0].dtype, watched[0].device),
            watched_shapes=tuple(p.shape for p in watched),
            slots=slots,
            covered=tuple(adapter.params(module)),
        )
        for block in adapter.blocks(module):
            block_name = ".".join(part for part in (name, block) if part)
            dims = adapter.dims(module, block=block)
            entry.blocks[block] = self._new_block(
                block_name, block, dims, group, k_structure, weight
            )
        self._handles += adapter.install(module, _Observer(self, entry))
        return entry

    def _active(self, entry: ModuleEntry) -> bool:
        """Whether ``entry``'s layer trains: ``False`` while all its parameters are
        frozen (nothing is captured or updated); an error if only some of the
        parameters it trained at construction changed (its factors are sized for
        them; e.g. a bias frozen later)."""
        if tuple(p.requires_grad for p in entry.watched) == entry.watched_flags:
            return True
        now = _layout(entry.adapter, entry.module)
        if now == entry.layout:
            return True
        if not any(requires_grad for _, requires_grad in now):
            return False

        def trained(layout: tuple[tuple[int, bool], ...]) -> list[str]:
            return [self._param_names.get(i, "?") for i, requires_grad in layout if requires_grad]

        raise ValueError(
            f"The trainable parameters of layer {entry.name!r} changed after "
            f"{type(self).__name__} was constructed: it trained {trained(entry.layout)}, "
            f"now {trained(now)} require gradients. Its Kronecker factors are sized for "
            "the former: set requires_grad before constructing the optimizer (or "
            "construct a new one); for a layer frozen whole at construction, they were "
            "sized when its weight was unfrozen: unfreeze its weight and bias together. "
            "Freezing all of a layer's parameters is fine."
        )

    @property
    def layers(self) -> dict[str, BlockState]:
        """The preconditioned blocks by name (``module`` or ``module.block``)."""
        return {s.name: s for e in self._entries.values() for s in e.blocks.values()}

    @property
    def dormant_layers(self) -> dict[str, list[str]]:
        """Supported layers frozen whole when they came in, not preconditioned yet:
        layer name -> the names of the parameters it will cover. Each is preconditioned
        from a factor-update step after its weight is unfrozen (left unchanged until
        then); meanwhile its parameters are listed in :attr:`fallback_parameters`, whose
        rule trains them only if just biases are unfrozen."""
        return {n: [self._name(p) for p in d.covers] for n, d in self._dormant.items()}

    @property
    def fallback_parameters(self) -> dict[str, str]:
        """Parameter name -> the fallback rule that trains it (or would: see
        :attr:`dormant_layers` for frozen layers waiting to be preconditioned)."""
        return {self._name(p): self.param_groups[i]["fallback"] for i, p in self._fallback_params}

    def state_bytes(self) -> int:
        """Bytes of every tensor the optimizer keeps between steps.

        Counts every block's factors, what is cached from them between steps (SINGD's
        ``K K^T``, ``C C^T`` operators) and per-parameter state (momentum buffers,
        fallback moments); pending statistics are transient and not counted.
        """
        total = 0
        for layer in self.layers.values():
            for x in (*layer.factors().values(), *layer.cached().values()):
                total += 0 if x is None else x.nbytes()
        for state in self.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    total += tensor_bytes(value)
        return total

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (no further statistics are captured;
        also done when the optimizer is garbage-collected)."""
        _remove_handles(self._handles)

    # ------------------------------------------------------------------ hooks
    def _wants(self, entry: ModuleEntry) -> bool:
        """Whether a forward pass of ``entry``'s module now has its backward observed."""
        try:
            return self.steps % self.param_groups[entry.group_index]["T"] == 0
        except (ZeroDivisionError, TypeError):  # T changed since construction
            check_step_hyperparameters(self.param_groups, self.LR_COV_UPPER)  # raises
            raise

    def _on_forward(self, entry: ModuleEntry, block: str, x: Tensor, output: Tensor) -> None:
        """Called (through the observer) in every forward pass of a block."""
        if not torch.is_grad_enabled() or not isinstance(output, (Tensor, StepGradients)):
            return
        if output.numel() == 0 or not output.requires_grad:  # empty: an MoE expert without tokens
            return
        entry.blocks[block].seen = True
        entry.blocks[block].forward_step = self.steps
        if not self._wants(entry) or not self._active(entry):
            return
        if not self._float16_outputs and _float16_forward(output, x):
            # (checked on captured forwards only, off the every-step path: step 0
            # captures every active layer, so a float16 run is seen at once)
            self._float16_outputs = True
        if entry.watched[0].device != entry.placement[1] or entry.changes()[0]:
            self._check_placement()  # the factors follow it there; a new shape raises
        layer = entry.blocks[block]
        application = _Application(x.detach(), self._shared_input(entry, block, x))
        self._applications.add(application)
        hook = partial(self._capture, entry, layer, application, self.steps)
        base = output._base if isinstance(output, Tensor) else None
        if base is not None and _whole_view(output, base):
            # ``Linear`` with a bias on a 3-D input returns ``addmm(...).view(...)``.
            # An in-place operation on such a view (``ReLU(inplace=True)``,
            # ``Dropout(inplace=True)``, ``y += r``) rebases its history, and a hook on
            # the view itself would never fire: the layer would silently keep its
            # factors. The base's node still receives the output's gradient.
            shape = output.shape
            base.register_hook(lambda grad: hook(grad.reshape(shape)))
        else:
            output.register_hook(hook)
        layer.hooked_step = self.steps

    def _shared_input(self, entry: ModuleEntry, block: str, x: Tensor) -> _SharedInput | None:
        """The record a forward application of ``block`` with input ``x`` shares with
        this step's other applications of the same input and rows key (see
        :class:`_SharedInput`), or ``None`` where the adapter's statistic is its own."""
        adapter = entry.adapter
        if type(x) is not Tensor or x.layout != torch.strided or not _rows_keyed(type(adapter)):
            return None
        rows_key = adapter.rows_key(entry.module, x, block=block)
        if rows_key is None:
            return None
        # (applications keep x alive until the step: no other tensor takes its memory
        # while its record can be found)
        key = (x.data_ptr(), x.shape, x.stride(), x.dtype, x.device, x._version, rows_key)
        shared = self._inputs.get(key)
        if shared is None:
            shared = self._inputs[key] = _SharedInput()
        shared.waiting += 1
        return shared

    def _input_statistic(
        self,
        entry: ModuleEntry,
        K: StructuredMatrix,
        x: Tensor,
        kfac_approx: str,
        block: str,
        shared: _SharedInput | None,
    ) -> StructuredMatrix:
        """``adapter.input_statistic``, by way of the Gram that blocks reading the same
        input share (computed once, ``K`` applied per block) where ``shared``."""
        adapter, module = entry.adapter, entry.module
        if shared is not None and (shared.waiting > 1 or shared.grams):  # (else: alone)
            # (x's version now, too: an input changed in place after the forward, where
            # autograd does not see it, between two blocks' backward passes)
            key = (kfac_approx, type(K), K.options(), K.dim, K.dtype, K.device, x._version)
            G = shared.grams.get(key)
            if G is None:
                G = adapter.input_gram(module, x, K, kfac_approx, block=block)
                if G is not None:
                    shared.grams[key] = G
            if G is not None:
                H = K.inner_of_gram(G)
                # (a new member for each block: KFAC's identity returns G itself)
                return H.clone() if H is G else H
        return adapter.input_statistic(module, x, K, kfac_approx, block=block)

    def _capture(
        self,
        entry: ModuleEntry,
        layer: BlockState,
        application: _Application,
        forward_step: int,
        grad_output: Tensor,
    ) -> None:
        """Backward tensor hook: add this pass's statistics to the block's state.

        A backward pass that arrives after ``step()`` (its forward belonged to an
        earlier step) is ignored: statistics never leak into a later step. So is one
        that does not accumulate the layer's weight gradient (``autograd.grad`` with
        respect to the inputs, an adversarial example's or a gradient penalty's probe;
        ``backward(inputs=...)`` without the weight): the statistics belong to ``.grad``.

        A second backward pass through the same forward application (one
        ``backward(retain_graph=True)`` per loss of a shared forward) adds its output
        side only: the input rows are the same (counting them again doubled the input
        statistic). Its output side is the sum of the passes' (``g1^T g1 + g2^T
        g2``, the curvature of a sum of losses as the sum of theirs), not ``(g1 +
        g2)^T (g1 + g2)`` of a single ``(l1 + l2).backward()``: that would need every
        pass's output gradient kept until the step.
        """
        x = application.x
        if (
            forward_step != self.steps
            or x is None
            or not _accumulates_into(entry.adapter.block_parameter(entry.module, block=layer.block))
        ):
            return
        shared, application.shared = application.shared, None  # (its first capture only)
        again = layer.has_statistics(self.steps) and application.into == layer.started
        group = self.param_groups[entry.group_index]
        if group["kfac_approx"] not in KFAC_APPROXIMATIONS:  # changed since construction:
            # raise here, not keep statistics captured under an unknown approximation
            check_step_hyperparameters(self.param_groups, self.LR_COV_UPPER)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            dtype = self._output_dtype(layer)
            scaled = self._capture_scale != 1.0
            # A loss-scaled gradient is unscaled before it is rounded to narrower factors
            # (float32 gradients at scale 2^20 times sqrt(batch) overflow float16)
            work = torch.promote_types(grad_output.dtype, dtype) if scaled else dtype
            g = entry.adapter.grad_rows(
                entry.module,
                grad_output.detach().to(work),
                group["loss_average"],
                group["kfac_approx"],
                block=layer.block,
            )
            if scaled:
                g = (g / self._capture_scale).to(dtype)
            x = entry.adapter.capture_input(entry.module, x, grad_output.shape, block=layer.block)
            if again:
                stats = (None, self._output_statistic(entry, layer, g))
            else:
                stats = self._statistics(entry, layer, x, g, shared)
            if shared is not None:
                shared.captured()
            own = None
            several = tdist.world(self._group)[1] > 1
            if not layer.own_checked and not several:
                own = entry.adapter.own_gradient(
                    entry.module, x, grad_output.detach(), block=layer.block
                )
                layer.own_checked = own is None  # (an adapter without the answer)
            rows = terms = math.nan  # (counted only where ranks are combined)
            if several and again:  # (the same rows and loss terms as the first pass)
                rows = terms = 0.0
            elif several:
                rows = entry.adapter.input_count(
                    entry.module, x, group["kfac_approx"], block=layer.block
                )
                terms = entry.adapter.loss_terms(
                    entry.module, grad_output, group["loss_average"], block=layer.block
                )
        if layer.has_statistics(self.steps):
            for acc, new in zip(layer.pending, stats, strict=True):
                if new is not None:
                    acc.add_(new)
            if own is not None and layer.own is not None:
                own = own.add_(layer.own)
        else:
            layer.pending = list(stats)
            layer.started += 1
            layer.capture_step = self.steps
            layer.capture_scale = self._capture_scale
            layer.rows = layer.terms = 0.0
            layer.reduced = False  # (a reduction of an earlier step's statistics)
        application.into = layer.started
        layer.own = own
        layer.rows += rows
        layer.terms += terms

    # ------------------------------------------------------------------- step
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients and drop the statistics captured since the last step.

        The statistics belong to the backward passes whose gradients are discarded
        (a gradient-norm probe, a retried batch): they do not reach the next update.
        """
        super().zero_grad(set_to_none=set_to_none)
        self._clear_captures()

    def _clear_captures(self) -> None:
        for layer in self.layers.values():
            layer.clear_captures()

    def set_current_grad_scale(self, grad_scale: float) -> None:
        """Tell the optimizer the loss scale of this step's backward pass.

        Needed only when gradients were unscaled before ``step`` (e.g. after
        ``scaler.unscale_(optimizer)`` for clipping): then ``.grad`` is unscaled but
        the captured output gradients are not. ``scaler.step`` refuses an unscaled
        step without it.
        """
        try:
            value = None if isinstance(grad_scale, (bool, str)) else float(grad_scale)
        except (TypeError, ValueError, RuntimeError):
            value = None
        if value is None or not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"Invalid grad_scale={grad_scale!r}: must be a finite number > 0 (the "
                "loss scale of this step, e.g. scaler.get_scale())."
            )
        self._explicit_scale = value

    def _read_scales(self) -> tuple[float, float, bool]:
        """``(scale of .grad, scale of captured g, found_inf)`` for this step."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        unscaled = grad_scale is None and found_inf is not None
        if unscaled and self._explicit_scale is None and self._captured_now():
            # GradScaler.step passes grad_scale=None exactly when unscale_ was called
            # (a step that captured nothing needs no scale: .grad is unscaled)
            raise RuntimeError(
                f"scaler.unscale_({type(self).__name__}) was called before scaler.step, "
                "so .grad is unscaled but the captured output gradients are not: call "
                "optimizer.set_current_grad_scale(scaler.get_scale()) after unscale_ "
                "(the factors would otherwise see the loss scale squared)."
            )
        self._scaled_steps = self._scaled_steps or found_inf is not None
        grad_scale = 1.0 if grad_scale is None else float(grad_scale)
        found_inf = bool(found_inf) if found_inf is not None else False
        g_scale = self._explicit_scale if self._explicit_scale is not None else grad_scale
        if unscaled and self._explicit_scale is None:
            g_scale = self._capture_scale  # (not known: the next backward keeps it)
        if (
            self.steps == 0
            and self._init_grad_scale == 1.0
            and g_scale != 1.0
            and not self._scale_warned  # (once: overflowing steps 0 are retried)
        ):
            self._scale_warned = True
            warn(
                f"A gradient scale of {g_scale} is used at step 0; pass "
                f"init_grad_scale={g_scale} to {type(self).__name__} for better numerics "
                "in the first backward pass.",
            )
        return grad_scale, g_scale, found_inf

    #: steps per window of :meth:`_trust_region_advice`, and the share that warns
    KL_WINDOW, KL_WARN_SHARE = 50, 0.9

    def _trust_region_advice(self, index: int, kl_clip: float, clipped: bool) -> str | None:
        """Counts group ``index``'s steps under a trust region in windows of
        ``KL_WINDOW``; the message (once per group) where it scaled at least
        ``KL_WARN_SHARE`` of a window's steps: the step length is then set by
        ``kl_clip``, not by ``lr``, and an LR schedule does nothing (silently so
        before: a review trained at ``lr=10`` with 59 of 60 steps scaled, unwarned).
        At the robustness sweep's best points it acts in 2-40 of a run's steps."""
        if index in self._kl_warned:
            return None
        seen, hits = self._kl_window.get(index, (0, 0))
        seen, hits = seen + 1, hits + clipped
        if seen < self.KL_WINDOW:
            self._kl_window[index] = (seen, hits)
            return None
        self._kl_window[index] = (0, 0)
        if hits < self.KL_WARN_SHARE * seen:
            return None
        self._kl_warned.add(index)
        fallback = any(i == index for i, _ in self._fallback_params)
        return (
            f"The trust region (kl_clip={kl_clip}) scaled {hits} of the last {seen} steps "
            f"of param group {index}: while it acts, the step's length is set by kl_clip, "
            "not lr, and an LR schedule has no effect. Lower lr if that is not intended "
            "(or raise kl_clip; None turns it off)."
            + (
                " The group's parameters outside preconditioned layers are not in the "
                "trust region: the fallback rule steps them with the full lr."
                if fallback
                else ""
            )
            + " Said once per group; safeguard_events['kl_clipped'] counts."
        )

    def _note(self, event: str | None, message: str | None = None) -> None:
        """A safeguard acted in this step: counted (and warned) only if the step commits
        (``event=None``: only the message)."""
        self._notes.append((event, message))

    def _commit_notes(self) -> None:
        for event, message in self._notes:
            if event is not None:
                self.safeguard_events[event] += 1
            if message is not None:
                warn(message)
        self._notes = []

    def _skip(self, why: str, g_scale: float, may_raise: bool = True) -> None:
        """Leave parameters and factors untouched, drop this step's captures; warn or
        (with ``on_nonfinite="raise"`` and ``may_raise``) raise.

        The step does not count (``steps`` stays, as a ``torch.optim`` optimizer's
        counters stay when a ``GradScaler`` skips its step): a skipped factor-update
        step is retried by the next one instead of leaving the factors as they are
        for another ``T`` steps (an fp16 loss scale that overflows at first would
        otherwise delay the first factor update by ``T``)."""
        self._notes = []
        self._clear_captures()
        self._end_step(g_scale, count=False)
        if self.on_nonfinite == "raise" and may_raise:
            raise NonFiniteError(f"{type(self).__name__} step {self.steps}: {why}.")
        self.skipped_steps += 1
        warn(
            f"{type(self).__name__} skipped a step: {why}; parameters and state are "
            f"unchanged (see {type(self).__name__}.skipped_steps).",
        )

    def _end_step(self, g_scale: float, count: bool = True) -> None:
        if count:
            self.steps += 1
            for application in self._applications:  # (their passes are ignored now)
                application.x = application.shared = None
            self._applications = weakref.WeakSet()
            self._inputs = weakref.WeakValueDictionary()
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
        try:
            if self._incomplete:
                shown = "; ".join(f"{n!r} lacks {m}" for n, m in self._incomplete.items())
                raise ValueError(
                    f"Layers added in part by add_param_group wait for the rest of their "
                    f"parameters: {shown}. Add those with add_param_group before step() "
                    "(a layer's weight and bias share its Kronecker factors)."
                )
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            with torch.no_grad(), _autocast_off():
                self._step()
        except BaseException:
            # GradScaler.step deletes the attributes it set only when step returns
            for attr in ("grad_scale", "found_inf"):
                self.__dict__.pop(attr, None)
            self._notes = []  # safeguards of a step that did not commit
            raise
        return loss

    def _kl_clip(self, group: dict[str, Any]) -> float | None:
        """The group's trust-region bound ``kl_clip`` (``None``: off)."""
        return group.get("kl_clip")

    def _prepare_updates(self, entries: list[ModuleEntry], g_scale: float) -> None:
        """Work on this step's factor updates of ``entries`` (the modules this rank
        preconditions) done before :meth:`_precondition` takes them one module at a
        time, e.g. equal-shaped blocks' updates computed together; called again with
        no entries after them, to drop what was not taken. Default: nothing."""

    def _precondition(self, entry: ModuleEntry, g_scale: float, grad_scale: float):
        """New factors and natural gradients of one module's blocks, and their inner
        products ``<G_nat, G>`` with the gradients: ``(new_factors, nats, inners)``, or
        ``None`` for a module that is not preconditioned in this step. Nothing is
        written. A natural gradient may be a
        :class:`~torchsingd.optim.update.NaturalGradientTask` still to be computed
        (its inner product then ``None``): :meth:`_step` computes those of all modules
        together (:func:`~torchsingd.optim.update.natural_gradients`), then
        :meth:`_directions`. Inner products are only computed for groups with a trust
        region (``kl_clip``); a block computed now keeps no gradient (a fresh copy for
        a layer with a bias or under a gradient scale).
        """
        group = self.param_groups[entry.group_index]
        update_now = self.steps % group["T"] == 0
        trust_region = self._kl_clip(group) is not None
        new_factors, nats, inners = {}, {}, {}
        if not self._active(entry):
            return None
        grads = self._grad_matrices(entry)
        if grads is None:
            return None
        for block, layer in entry.blocks.items():
            G = grads[block]
            if grad_scale != 1.0:
                G = G / grad_scale
            fresh = update_now and layer.has_statistics(self.steps)
            missing = update_now and not fresh and layer.name not in self._lost
            if missing and self._missing_statistics(entry, layer, G):
                return None  # trained by the fallback rule from this step on
            if fresh and not layer.updated:
                self._marks.append(partial(setattr, layer, "updated", True))
            elif not (update_now or layer.updated or layer.name in self._lost):
                self._never_updated(layer, G, group["T"])
            if fresh and layer.own is not None and not layer.own_checked:
                self._check_own_gradient(entry, layer, G)
            stats = layer.pending if fresh else None
            output_scale = (layer.capture_scale / g_scale) ** 2
            new_factors[block], nat = self._update_block(layer, G, group, stats, output_scale)
            nats[block] = nat
            computed = not isinstance(nat, NaturalGradientTask)
            inners[block] = _inner(nat, G) if trust_region and computed else None
        return new_factors, nats, inners

    def _directions(self, entry: ModuleEntry, started: tuple[dict, dict, dict]):
        """``(new_factors, directions, <G_nat, G>)`` of a module from what
        :meth:`_precondition` gave, its natural gradients computed. The inner product (a
        0-d tensor in the gradient's dtype, at least float32: a float64 model's trust
        region is float64-exact; the blocks' summed in their order) is only computed
        for groups with a trust region (``kl_clip``), else ``None``."""
        new_factors, nats, inners = started
        inner = None
        trust_region = self._kl_clip(self.param_groups[entry.group_index]) is not None
        for block, nat in nats.items():
            if isinstance(nat, NaturalGradientTask):
                nats[block] = nat.result
                if trust_region:
                    inners[block] = _inner(nat.result, nat.G)
            if trust_region:
                inner = inners[block] if inner is None else inner + inners[block]
        directions = entry.adapter.directions(entry.module, nats)
        self._check_shapes(entry, directions)
        return new_factors, directions, inner

    def _missing_statistics(self, entry: ModuleEntry, layer: BlockState, G: Tensor) -> bool:
        """Warn (once per block) that a factor-update step has no statistics of a block
        whose weight has a nonzero gradient: its forward ran in this step and the
        gradient of its output never arrived, or its forward never ran with gradients
        (its weight is used outside it). A weight whose gradient came from an earlier
        step's forward (``step()`` twice, a late backward) is not reported.

        A layer whose forward never ran while other layers' did, at ``HAND_OVER_AFTER``
        factor-update steps where its weight had a gradient, is, in a single process,
        handed to the fallback rule from that step on (returns ``True``): with factors
        that never see a statistic its step would be plain momentum SGD at the
        preconditioned ``lr``.
        """
        hooked = layer.hooked_step == self.steps
        if not hooked and (layer.seen or not self._observed_now()):
            # its gradient came from an earlier step's forward, or from none; or no
            # layer's forward was observed (an optimizer constructed after a backward)
            return False
        if not bool(G.any()):  # zeroed gradients, no backward through it: nothing lost
            return False
        if not hooked:
            layer.unseen_updates += 1
            if layer.unseen_updates < HAND_OVER_AFTER:
                return False  # (a head used in turns, an expert without tokens so far)
        self._lost.add(layer.name)
        head = (
            f"{type(self).__name__}: the weight of layer {layer.name!r} has a gradient in "
            f"step {self.steps}, but "
        )
        if hooked:
            warn(
                f"{head}the gradient of its output never reached the optimizer (e.g. "
                "its output is a view that an in-place operation rebased). Its factors "
                "keep their values in this step, its step is preconditioned by them as "
                "they are. Apply the in-place operation to a copy, or make the output "
                "contiguous."
            )
            return False
        if tdist.world(self._group)[1] > 1:  # (ranks must agree on who trains what)
            warn(
                f"{head}its forward has not run with gradients on since the optimizer "
                f"was constructed (in {HAND_OVER_AFTER} factor-update steps where other "
                f"layers' did): {_OUTSIDE} Its factors keep their values; call the "
                "module itself."
            )
            return False
        self._demote(entry)
        self._handed_over.append(entry)
        return True

    def _never_updated(self, layer: BlockState, G: Tensor, T: int) -> None:
        """Warn (once per block) of a layer whose forward keeps running, with a
        gradient, in the steps between factor updates while no statistic ever reached
        its factors: a layer whose forward runs only in those steps (two heads used in
        turns with ``T = 2``, a branch taken at odd steps) is stepped by its initial
        factors, i.e. as momentum SGD at ``lr``, and :meth:`_missing_statistics` never
        sees it (no gradient in the factor-update steps). At most ``T - 1`` such steps
        fall between two factor updates, so ``HAND_OVER_AFTER * T`` of them span at
        least ``HAND_OVER_AFTER`` factor-update steps without its forward."""
        if layer.idle_warned or layer.forward_step != self.steps or not bool(G.any()):
            return
        count = layer.idle_steps + 1
        warned = count >= HAND_OVER_AFTER * T
        # (written, and said, only if the step commits)
        self._marks.append(partial(_count_idle, layer, count, warned))
        if not warned:
            return
        self._note(
            None,
            f"{type(self).__name__}: the weight of layer {layer.name!r} had gradients in "
            f"{count} steps between factor updates (T={T}), but no statistic "
            "of it has reached its factors since the optimizer was constructed: its "
            "forward runs only in steps that do not update factors (at least "
            f"{HAND_OVER_AFTER} factor-update steps passed without it). It is "
            "preconditioned by its initial factors (an SGD-like step, not a natural-"
            "gradient one). Run its forward in the steps whose count is a multiple of T "
            "too (step 0, T, 2T, ...), or use T=1.",
        )

    def _observed_now(self) -> bool:
        """Whether some block has statistics captured in this step."""
        return any(layer.has_statistics(self.steps) for layer in self.layers.values())

    def _tell_handed_over(self) -> None:
        """One warning for the layers :meth:`_missing_statistics` handed over in this step."""
        if not self._handed_over:
            return
        names = [e.name for e in self._handed_over]
        params = [self._name(p) for e in self._handed_over for p in e.covered]
        rules = sorted(
            {
                self.param_groups[i]["fallback"]
                for e in self._handed_over
                for i in e.groups(len(e.covered))
            }
        )
        self._handed_over = []
        warn(
            f"{type(self).__name__}: the weights of {len(names)} layer(s) {names} have "
            f"gradients in step {self.steps}, but their forward has not run with "
            f"gradients on since the optimizer was constructed (in {HAND_OVER_AFTER} "
            f"factor-update steps where other layers' did): {_OUTSIDE} Their "
            f"parameters are trained by the fallback rule ({', '.join(rules)}) from this "
            f"step on, as those of unsupported layers: {params} (see "
            "fallback_parameters; a checkpoint keeps this)."
        )

    def _demote(self, entry: ModuleEntry, fresh_state: bool = True) -> None:
        """Stop preconditioning ``entry``: its parameters join the fallback rule (with
        fresh state, unless a checkpoint's state is loaded next) and its blocks leave
        :attr:`layers` and checkpoints."""
        del self._entries[entry.name]
        self._demoted[entry.name] = entry
        known = {id(p) for _, p in self._fallback_params}
        params = entry.covered
        for i, p in zip(entry.groups(len(params)), params, strict=True):
            if id(p) not in known:
                if fresh_state:
                    self.state.pop(p, None)
                self._fallback_params.append((i, p))

    def _undemote(self, name: str) -> None:
        """Precondition a demoted layer again (a checkpoint from before its hand-over is
        loaded): back in :attr:`layers`, in the model's order, as if never observed."""
        entry = self._demoted.pop(name)
        params = {id(p) for p in entry.covered}
        self._fallback_params = [(i, p) for i, p in self._fallback_params if id(p) not in params]
        self._insert_entry(entry)
        for layer in entry.blocks.values():
            layer.seen, layer.unseen_updates, layer.hooked_step = False, 0, -1
            self._lost.discard(layer.name)

    def _check_own_gradient(self, entry: ModuleEntry, layer: BlockState, G: Tensor) -> None:
        """Warn (once per block, at its first factor update, in a single process) if
        ``grad(W)`` is not a multiple of what the module's own passes contribute.

        Why: the statistics come from the module's own forward passes. An embedding
        whose weight also serves as the output projection through a plain tensor
        product (``logits = h @ emb.weight.T``, GPT-style tying without a module)
        gets the projection's gradient too, yet ``K`` is built from the looked-up
        tokens only: the weight is preconditioned with statistics of part of its
        uses, silently. The comparison is up to a factor (norm clipping, or a
        gradient unscaled after the backward pass, scales ``grad(W)`` as a whole): the
        part of ``grad(W)`` orthogonal to the own contribution, relative to
        ``grad(W)``, above 1e-3. PyTorch sums a 16-bit weight's gradient in 16 bits
        (4-7% off in bfloat16 at ~400-1000 lookups per row, measured by review), so
        there the columns the own passes leave at exactly zero (tokens not looked
        up) must be zero, and the rest must be off by at most 50%.
        Under several ranks the gradient is averaged over all ranks' passes, so the
        check runs only in a single process. A step whose ``grad(W)`` is zero or not
        finite (to be skipped) leaves the check to the next factor update."""
        own, layer.own = layer.own, None
        if own.shape != G.shape:
            layer.own_checked = True
            return
        G = G.to(own.dtype)
        norm = torch.linalg.vector_norm(G)
        if not bool(norm > 0) or not bool(torch.isfinite(norm)):
            return
        layer.own_checked = True
        mass = (own * own).sum()
        factor = (G * own).sum() / mass if bool(mass > 0) else mass
        outside = float(torch.linalg.vector_norm(G - factor * own) / norm)
        unseen = int(((own == 0).all(0) & (G != 0).any(0)).sum())
        if entry.watched[0].element_size() < 4:
            if not unseen and outside <= 0.5:
                return
        elif outside <= 1e-3:
            return
        name = entry.name or "<model>"
        warn(
            f"Layer {name!r} ({type(entry.module).__name__}): {outside:.0%} of grad(weight) "
            f"does not come from the layer's own lookups ({unseen} rows it did not look "
            "up have gradient), so the weight is used outside the module as well (an "
            f"output projection tied as `h @ {name}.weight.T`, or a penalty on the "
            f"weight). {type(self).__name__} preconditions it with statistics of the "
            "lookups only. To tie an output projection, make it a module sharing the "
            f"parameter (`head = nn.Linear(d, vocab, bias=False); head.weight = "
            f"{name}.weight`): a shared weight is trained by the fallback rule. (Checked "
            "once per layer, at its first factor update.)"
        )

    def _grad_matrices(self, entry: ModuleEntry) -> dict[str, Tensor] | None:
        """Every block's ``grad(W)`` matrix; ``None`` if no block has a gradient. A
        block outside this backward pass while others are in it (attention whose
        output is unused, only its weights: the q/k blocks still train) gets zeros."""
        grads = {b: entry.adapter.grad_matrix(entry.module, block=b) for b in entry.blocks}
        present = next((G for G in grads.values() if G is not None), None)
        if present is None:
            return None
        for block, G in grads.items():
            if G is None:
                d_i, d_o = entry.adapter.dims(entry.module, block=block)
                grads[block] = present.new_zeros(d_o, d_i)
        return grads

    def _captured_now(self) -> bool:
        """Whether any block holds statistics captured in this step."""
        return any(
            layer.has_statistics(self.steps)
            for entry in self._entries.values()
            for layer in entry.blocks.values()
        )

    def _check_shapes(self, entry: ModuleEntry, directions: list[Tensor]) -> None:
        """Raise (before anything is written) if a user adapter's ``directions`` do not
        have its parameters' shapes."""
        params = entry.adapter.params(entry.module)
        if [d.shape for d in directions] != [p.shape for p in params]:
            raise ValueError(
                f"Layer {entry.name!r}: {type(entry.adapter).__name__}.directions (from "
                f"split_matrix) returned shapes {[tuple(d.shape) for d in directions]} "
                f"for parameters of shapes {[tuple(p.shape) for p in params]}."
            )
        entry.shapes_checked = True

    #: The largest valid ``lr_cov`` (KFAC's is a running-average weight: 1).
    LR_COV_UPPER = math.inf

    #: Group options read only when the factors are made: a change after construction
    #: would be ignored, so a step refuses it (see :meth:`_check_frozen`).
    FROZEN_OPTIONS: tuple[str, ...] = ("vocab_structure",)

    def _frozen_of(self, group: dict[str, Any]) -> dict[str, Any]:
        """A group's :attr:`FROZEN_OPTIONS` (copies)."""
        return {k: copy.deepcopy(group[k]) for k in self.FROZEN_OPTIONS if k in group}

    def _meaning(self, key: str, value: Any, group: dict[str, Any]) -> Any:
        """What a frozen option's value means in ``group`` (spellings of one structure
        or dtype compare equal, ``None`` is the weights' dtype); the value itself
        where it cannot be read. Here the options every method has: the embeddings'
        structure and the factors' dtype (``*_dtype``)."""
        try:
            if key == "vocab_structure":
                return get_structure(value).name
            if key.endswith("_dtype"):
                return parse_dtypes(value, key, self._weight_dtype(group))
        except ValueError:
            pass
        return value

    @staticmethod
    def _weight_dtype(group: dict[str, Any]) -> torch.dtype | None:
        """The dtype a ``None`` dtype option stands for in ``group``."""
        params = group["params"]
        return params[0].dtype if params else None

    def _check_sparse_fallback(self) -> None:
        """A sparse parameter (a sparse COO ``nn.Parameter``) trained by the fallback
        rule needs ``fallback="sgd"``: AdamW's moments are not defined for sparse
        tensors (``torch.optim.AdamW`` refuses them too)."""
        if not self._sparse_fallback:
            return
        for i, p in self._fallback_params:
            if p.layout != torch.strided and self.param_groups[i]["fallback"] == "adamw":
                raise ValueError(
                    f"Parameter {self._name(p)!r} is sparse ({p.layout}), and the "
                    "fallback rule of its group is 'adamw', which cannot train sparse "
                    "tensors: give it a group with fallback='sgd', or train it with "
                    "torch.optim.SparseAdam (leave it out of params)."
                )

    def _check_step_options(self) -> None:
        """Checks of the group options beyond :data:`STEP_CHECKS` (each raises a
        ``ValueError`` before a step writes anything)."""
        self._check_frozen()
        self._check_sparse_fallback()
        for entry in self._entries.values():
            if entry.param_groups:
                differ = self._layer_options_differ(entry.param_groups)
                if differ:
                    raise ValueError(
                        f"Layer {entry.name!r} has parameters in param groups "
                        f"{sorted(set(entry.param_groups))}, which now differ in "
                        f"{', '.join(differ)}: they must agree on every option but "
                        f"{', '.join(PARAMETER_OPTIONS)} (the layer's factors use one "
                        "value). Nothing was updated."
                    )

    def _layer_options_differ(self, indices: tuple[int, ...]) -> list[str]:
        """The options (of :attr:`defaults`, but :data:`PARAMETER_OPTIONS` and the
        fallback rule's) in which the groups ``indices`` of one layer differ; not
        ``differentiable``, which ``torch.optim``'s ``load_state_dict`` adds to
        :attr:`defaults` (so to the groups added after it, not to those before)."""
        groups = [self.param_groups[i] for i in dict.fromkeys(indices)]
        first, rest = groups[0], groups[1:]
        return [
            key
            for key in self.defaults
            if key not in PARAMETER_OPTIONS
            and key != "differentiable"
            and not key.startswith("fallback")
            and any(not _same(first.get(key), g.get(key)) for g in rest)
        ]

    def _check_frozen(self) -> None:
        """Raise a ``ValueError`` if a group's :attr:`FROZEN_OPTIONS` changed meaning
        since the factors were made (before a step writes anything)."""
        for i, (group, frozen) in enumerate(zip(self.param_groups, self._frozen, strict=False)):
            for key, value in frozen.items():
                if key not in group or group[key] == value:
                    continue
                if self._meaning(key, group[key], group) != self._meaning(key, value, group):
                    raise ValueError(
                        f"{key} of param group {i} was changed from {value!r} to "
                        f"{group[key]!r} after construction; the factors were made with "
                        "the former and cannot follow. Construct a new optimizer with it "
                        "(or set it back). Nothing was updated."
                    )

    #: How often (in steps) parameters left out as frozen are looked at again: a scan
    #: costs ~0.1 us per parameter (a frozen backbone may have thousands).
    LEFT_OUT_CHECK_EVERY = 16

    def _warn_left_out(self) -> None:
        """Warn (once per parameter) about parameters left out of the optimizer as
        frozen at construction that have a gradient now: it does not train them.
        Looked at in the first steps and then every ``LEFT_OUT_CHECK_EVERY`` steps."""
        if self.steps > 2 and self.steps % self.LEFT_OUT_CHECK_EVERY:
            return
        if all(p.grad is None for p in self._left_out):
            return
        mine = {id(p) for g in self.param_groups for p in g["params"]}
        found = [p for p in self._left_out if p.grad is not None and id(p) not in mine]
        self._left_out = [p for p in self._left_out if p.grad is None and id(p) not in mine]
        if found:
            warn(
                f"{type(self).__name__}: parameters {[self._name(p) for p in found]} have "
                f"gradients but {type(self).__name__} does not train them: they were "
                "frozen (requires_grad=False) when it was constructed with params=None. "
                "Add them with add_param_group, or construct the optimizer after "
                "unfreezing (if another optimizer trains them, ignore this)."
            )

    SIZE_ADVICE = ""

    def _advise_on_size(self) -> None:
        """Warn when dense factors make the state far larger than AdamW's (the
        default ``structures``, as the reference's, is dense: a ResNet-18's factors
        take 16x its parameters' bytes at construction, 25x once the first factor
        update (19-24 s on a CPU) has cached ``K K^T`` / ``C C^T``;
        KFAC's are dense always), with the subclass's :attr:`SIZE_ADVICE`."""
        dense = [
            block.name
            for block in self.layers.values()
            if any(type(f).family == "dense" for f in block.factors().values() if f is not None)
        ]
        if not dense:
            return
        state = self.state_bytes()
        params = sum(tensor_bytes(p) for g in self.param_groups for p in g["params"])
        if state < DENSE_ADVICE_BYTES or state < DENSE_ADVICE_RATIO * max(params, 1):
            return
        warn(
            f"{type(self).__name__}'s state takes {state / 2**20:.0f} MiB, "
            f"{state / max(params, 1):.1f}x the parameters' bytes (AdamW keeps 2x), "
            + self.SIZE_ADVICE.format(blocks=len(dense))
        )

    def _check_state_shapes(self, fallback: list[tuple[int, nn.Parameter, Tensor]]) -> None:
        """Move a fallback parameter's state to its device where the model moved (an
        optimizer without preconditioned layers sees no move in ``_check_placement``),
        and raise (before anything is written) where its state was made for another
        shape (a tied embedding resized by resize_token_embeddings after steps: AdamW's
        moments no longer fit; torch.optim fails the same way, from inside its step)."""
        for _, p, _ in fallback:
            state = self.state.get(p)
            if not state:
                continue
            for key in (*ADAMW_MOMENTS, "momentum_buffer"):
                value = state.get(key)
                if not isinstance(value, Tensor):
                    continue
                if value.device != p.device and value.shape == p.shape:
                    state[key] = value.to(p.device)  # (the model moved: it follows)
                if value.shape != p.shape:
                    raise ValueError(
                        f"Parameter {self._name(p)!r} changed shape from {tuple(value.shape)} "
                        f"to {tuple(p.shape)} after {type(self).__name__} made its state "
                        "(e.g. resize_token_embeddings, pruning). Construct a new optimizer "
                        "after changing the model."
                    )

    def _check_placement(self, in_step: bool = False) -> None:
        """The model moved or cast after construction (``Accelerator.prepare`` moves a
        model whose optimizer exists): a layer's factors, statistics and cached
        operators follow its weight to another device (in the observed forward pass or
        the step that first sees it, before anything is written); another dtype is
        warned about once (the factors keep the dtype they were made in). The
        per-parameter state (momentum buffers, the fallback's moments) follows the
        parameters' device and dtype, as ``torch.optim``'s ``load_state_dict`` casts it.

        Raises (before anything is written) where a layer's parameters changed shape
        (in place, or replaced by ones of another shape) and, ``in_step``, where they
        were replaced at all: the optimizer would have trained parameters outside its
        groups, whose state ``state_dict()`` then failed on (``KeyError``). Only in
        the step: ``torch.func.functional_call`` swaps parameters in during a forward
        pass."""
        changed, resized, replaced = [], [], []
        for entry in self._entries.values():
            weight = entry.watched[0]  # (the module's first parameter: one is enough)
            if (weight.dtype, weight.device) != entry.placement:
                changed.append((entry, weight))
            now_resized, now_replaced = entry.changes()
            if now_resized:
                resized.append(entry)
            elif in_step and now_replaced:
                replaced.append(entry.name)
        if in_step:  # a frozen layer's replaced parameter, once it would train
            replaced += [name for name, d in self._dormant.items() if d.replaced()]
        if resized:
            entry = resized[0]
            now = [tuple(p.shape) for p in entry.current()]
            raise ValueError(
                f"The parameters of layers {[e.name for e in resized]} changed shape after "
                f"{type(self).__name__} was constructed ({entry.name!r}: from "
                f"{[tuple(s) for s in entry.watched_shapes]} to {now}; e.g. "
                "resize_token_embeddings, pruning): their Kronecker factors are sized for "
                "the former. Construct a new optimizer after changing the model."
            )
        if replaced:
            raise ValueError(
                f"The parameters of layer {replaced[0]!r} were replaced after "
                f"{type(self).__name__} was constructed"
                + (f" (also of {replaced[1:]})" if replaced[1:] else "")
                + ": a parameter is no longer in its place (a new nn.Parameter assigned, "
                "load_state_dict(assign=True)), or the weight became a computed tensor "
                "(torch.nn.utils.prune, e.g. Lightning's ModelPruning, or a "
                "parametrization such as weight_norm). Its Kronecker factors and state "
                "are those of the layer as it was. Apply such changes before constructing "
                "the optimizer (a pruned or parametrized layer then goes to the fallback "
                "rule), or construct a new one. Nothing was updated."
            )
        if not changed:
            return
        cast = [(e, w) for e, w in changed if w.dtype != e.placement[0]]
        if cast:
            entry, weight = cast[0]
            warn(
                f"The parameters of layers {[e.name for e, _ in cast]} changed dtype from "
                f"{entry.placement[0]} to {weight.dtype} after {type(self).__name__} was "
                "constructed; their Kronecker factors stay in the dtype they were made in "
                "(the weights' at construction, or preconditioner_dtype). Cast the model "
                "before constructing the optimizer to have them follow."
            )
        for entry, weight in changed:
            if weight.device != entry.placement[1]:
                for layer in entry.blocks.values():
                    _move_block(layer, weight.device)
                    self._factors_replaced(layer)
            entry.placement = (weight.dtype, weight.device)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                for key, value in (state or {}).items():
                    dtype = moment_dtype(p.dtype) if key in ADAMW_MOMENTS else p.dtype
                    if not isinstance(value, Tensor) or value.shape != p.shape:
                        continue  # (AdamW's step counts stay where torch.optim keeps them)
                    if value.is_floating_point() and value.dtype != dtype:
                        value = value.to(dtype)
                    state[key] = value.to(p.device)

    def _step(self) -> None:
        self._marks = []  # (of a step that was skipped or raised)
        check_step_hyperparameters(self.param_groups, self.LR_COV_UPPER)
        self._check_step_options()
        self._check_placement(in_step=True)
        if self._left_out:
            self._warn_left_out()
        grad_scale, g_scale, found_inf = self._read_scales()
        if found_inf:  # routine under a GradScaler (it lowers the scale): never raises
            self._skip("the gradient scaler found inf/NaN gradients", g_scale, may_raise=False)
            return

        rank, size = tdist.world(self._group)
        if size == 1 and all(p.grad is None for g in self.param_groups for p in g["params"]):
            # no gradient at all (a closure that skipped its backward: Lightning steps
            # when training_step returns None): nothing changes, as in torch.optim, and
            # the step does not count (counted, it took the factor update due in it)
            self._end_step(g_scale, count=False)
            return
        if size > 1 and self.distributed_strategy == "shard":
            # a scheduled lr_cov is read by the owners only: check it on every rank,
            # so that a bad value raises everywhere instead of hanging the others
            for group in self.param_groups:
                if callable(group["lr_cov"]) and self.steps % group["T"] == 0:
                    scheduled_lr_cov(group, self.steps, upper=self.LR_COV_UPPER)
        updated = self._sync_statistics() if size > 1 else []
        owned = [entry for entry in self._entries.values() if self._owner(entry) == rank]
        self._prepare_updates(owned, g_scale)
        started = []  # (entry, _precondition's work or None, its result or None)
        for entry in list(self._entries.values()):  # (_precondition may demote one)
            if self._owner(entry) == rank:
                work = self._precondition(entry, g_scale, grad_scale)
                if work is not None:
                    started.append((entry, work, None))
            else:  # another rank computes it; contribute zeros to the sum below
                result = self._zero_directions(entry)
                if result is not None:
                    started.append((entry, None, result))
        self._prepare_updates([], g_scale)  # (drops what no block took)
        # the natural gradients left to compute, of all modules together (layers of
        # equal shapes in batched operations)
        natural_gradients(
            [
                nat
                for _, work, _ in started
                if work is not None
                for nat in work[1].values()
                if isinstance(nat, NaturalGradientTask)
            ]
        )
        pending = [
            (entry, *(result if work is None else self._directions(entry, work)))
            for entry, work, result in started
        ]
        del started  # (the deferred tasks hold their small layers' gradients)
        self._tell_handed_over()
        if size > 1 and self.distributed_strategy == "shard":
            shared = [d for _, _, dirs, _ in pending for d in dirs]
            # a trust-region scalar exists for the same entries on every rank
            shared += [inner for _, _, _, inner in pending if inner is not None]
            # the factor safeguards acted on the owners only: count them on every rank
            # (only in steps that update factors: the same steps on every rank)
            owned = ("factor_step_bounded", "factor_repaired")
            mine = [sum(e == event for e, _ in self._notes) for event in owned]
            if updated:
                entry = updated[0][0]
                device = entry.adapter.params(entry.module)[0].device
                counts = torch.tensor(mine, dtype=torch.float32, device=device)
                shared.append(counts)
            tdist.all_reduce_tensors(shared, self._group)
            if updated:
                for event, own, total in zip(owned, mine, counts.tolist(), strict=True):
                    self._notes += [(event, None)] * (round(total) - own)  # (warned by owners)
        fallback = [
            (i, p, _dense(p.grad, p)) for i, p in self._fallback_params if p.grad is not None
        ]
        if self._dormant and fallback:
            held = self._held_back(fallback)
            fallback = [f for f in fallback if id(f[1]) not in held] if held else fallback
        self._check_state_shapes(fallback)
        inners = self._group_inners(pending)
        if not self._finite(pending, fallback, inners):
            self._skip("non-finite gradients, factor updates or natural gradients", g_scale)
            return

        for i, group in enumerate(self.param_groups):
            mine = [(ds, inner) for e, _, ds, inner in pending if e.group_index == i]
            dirs = [d for ds, _ in mine for d in ds]
            kl_clip = self._kl_clip(group)
            if kl_clip is not None and i in inners:
                inner = inners[i]
                clipped = trust_region_scale(dirs, lr_value(group["lr"]), inner, kl_clip) < 1.0
                advice = self._trust_region_advice(i, kl_clip, clipped)
                if clipped or advice is not None:
                    self._note("kl_clipped" if clipped else None, advice)
            if group["max_update_norm"] is not None:
                clip_by_global_norm(dirs, group["max_update_norm"])
        self._commit_notes()
        for mark in self._marks:
            mark()
        self._marks = []

        for entry, new_factors, _, _ in pending:
            for block, factors in new_factors.items():
                for attr, value in factors.items():
                    setattr(entry.blocks[block], attr, value)
        self._parameter_updates([(entry, directions) for entry, _, directions, _ in pending])
        if size > 1 and self.distributed_strategy == "shard":
            self._share_factors(updated)

        self._fallback_step(fallback, grad_scale)
        self._clear_captures()
        self._end_step(g_scale)
        if self._dormant:
            self._wake_dormant()

    def _wake_dormant(self) -> None:
        """Precondition the dormant layers whose weight requires gradients now (with
        factors for what requires them: a frozen bias stays out, as at construction),
        from the next step on, where that step updates the factors. Until then their
        unfrozen parameters stay as they are (:meth:`_held_back`): a step of
        the fallback rule at the preconditioned ``lr`` (AdamW moves every weight by
        about ``lr`` in its first steps) could wreck pretrained weights, and a step
        without statistics would be preconditioned by factors that never saw one. Their
        factors start as a new optimizer's, their fallback state is dropped, as if the
        optimizer had been constructed now. Under ``torch.distributed`` a layer wakes
        where every rank unfroze the same parameters. One that cannot be preconditioned
        (e.g. its param groups' options made to differ since) goes to the fallback rule,
        with a warning; one unfrozen only in part (a BitFit bias; an attention or
        recurrent layer with some of its weights) stays dormant, said once."""
        now = {i for i, g in enumerate(self.param_groups) if self.steps % g["T"] == 0}
        due = [name for name, d in self._dormant.items() if d.group_index in now]
        if not due:
            return
        here = ready = [self._dormant[n].unfrozen() for n in due]
        size = tdist.world(self._group)[1]
        if size > 1:  # (every rank has the same due layers: the same steps and groups)
            # every covered parameter's flag: a layer wakes where all ranks unfroze its
            # weight and agree on the rest (its factors are sized by them)
            flags = [[p.requires_grad for p in self._dormant[n].covers] for n in due]
            device = self._dormant[due[0]].covers[0].device
            votes = torch.tensor(sum(flags, []), dtype=torch.float32, device=device)
            tdist.all_reduce_tensors([votes], self._group)
            counts, start = votes.tolist(), 0
            ready = []
            for layer in flags:
                mine = counts[start : start + len(layer)]
                start += len(layer)
                ready.append(mine[0] == size and all(c in (0, size) for c in mine))
            apart = [
                n
                for n, mine, go in zip(due, here, ready, strict=True)
                if mine and not go and n not in self._told_apart
            ]
            if apart:
                self._told_apart.update(apart)
                warn(
                    f"{type(self).__name__}: layer(s) {apart}, frozen when they came in, "
                    "are unfrozen on this rank but not in the same way on every rank: "
                    "they stay unchanged until every rank unfreezes the same parameters "
                    "(ranks must agree on what trains)."
                )
        partly, waiting = [], []
        if (
            self.steps <= 2 * self.LEFT_OUT_CHECK_EVERY
            or not (self.steps // self.param_groups[self._dormant[due[0]].group_index]["T"])
            % self.LEFT_OUT_CHECK_EVERY
        ):  # (warnings only: looked for now and then)
            for n, mine in zip(due, here, strict=True):
                d = self._dormant[n]
                if mine or not any(map(_REQUIRES_GRAD, d.covers)):
                    continue
                if d.waiting() and n not in self._told_waiting:  # another weight
                    waiting.append((n, f"until {self._name(d.covers[0])} is unfrozen"))
                elif not d.waiting() and n not in self._told:  # biases only
                    partly.append(n)
        if partly:
            self._told.update(partly)
            weights = [
                self._name(p)
                for n in partly
                for i, p in enumerate(self._dormant[n].covers)
                if i == 0 or p.dim() >= 2
            ]
            warn(
                f"{type(self).__name__}: layer(s) {partly}, frozen when they came in, are "
                f"unfrozen in part: until their weights {weights} require gradients, the "
                "fallback rule trains what is unfrozen (at the group's lr) and the layers "
                "are not preconditioned."
            )
        failed = []
        for name, go in zip(due, ready, strict=True):
            if not go:
                continue
            try:
                self._wake(name)
            except Exception as err:  # (the step is done: a failed wake must not undo it)
                if isinstance(err, _RefusedError) and self._refused_by_flags(name):
                    if name not in self._told_waiting:  # (stays dormant, held back)
                        waiting.append((name, err))
                    continue
                del self._dormant[name]
                self._dormant_of = None
                failed.append(f"{name!r} ({err})")
        if waiting:
            self._told_waiting.update(name for name, _ in waiting)
            why = "; ".join(f"{name!r} ({err})" for name, err in waiting)
            warn(
                f"{type(self).__name__}: layer(s) frozen at construction are unfrozen in a "
                "way they cannot be preconditioned; they stay unchanged until that is "
                f"unfrozen too: {why}."
            )
        if failed:
            warn(
                f"{type(self).__name__}: layer(s) frozen at construction and unfrozen since "
                f"cannot be preconditioned, so the fallback rule trains them from now on: "
                f"{'; '.join(failed)}."
            )

    def _refused_by_flags(self, name: str) -> bool:
        """Whether dormant layer ``name`` is refused only for which of its parameters
        require gradients now (an attention or recurrent layer's check wants all or
        none of its weights trainable): it would be made with all of them."""
        d = self._dormant[name]
        try:
            with _trainable(d.module):
                self._refuse(name, d.module, d.adapter, self.param_groups[d.group_index])
        except Exception:
            return False
        return True

    def _held_back(self, fallback: list[tuple[int, nn.Parameter, Tensor]]) -> set[int]:
        """Of ``fallback``'s parameters (those with gradients), the ones of dormant
        layers whose weight is unfrozen, waiting for the factor-update step from which
        they are preconditioned: not updated until then."""
        if self._dormant_of is None:  # (reset wherever the dormant layers change)
            self._dormant_of = {id(p): d for d in self._dormant.values() for p in d.covers}
        of = self._dormant_of
        return {id(p) for _, p, _ in fallback if id(p) in of and of[id(p)].waiting()}

    def _wake(
        self, name: str, drop_state: bool = True, covering: set[str] | None = None
    ) -> ModuleEntry:
        """Make dormant layer ``name`` a preconditioned one: factors for the parameters
        that require gradients now (as a new optimizer), or, where a checkpoint wakes
        it (perhaps while frozen: it then pauses until unfrozen, as a layer frozen whole
        after construction), for those it covered there (``covering``, names); hooks
        installed; its parameters' fallback state dropped unless a checkpoint's state
        is loaded next. Raises (changing nothing) where that is refused."""
        module, adapter = self._dormant[name].module, self._dormant[name].adapter
        flags = (
            contextlib.nullcontext()
            if covering is None
            else _trainable(module, lambda p: self._name(p) in covering)
        )
        with flags:
            params = adapter.params(module)
            group_of = self._group_of()
            indices = tuple(group_of.get(id(p)) for p in params)
            if None in indices:
                left = [self._name(p) for p, i in zip(params, indices, strict=True) if i is None]
                raise ValueError(f"its parameters {left} are not in the optimizer")
            differ = self._layer_options_differ(indices) if len(set(indices)) > 1 else []
            if differ:
                raise ValueError(
                    f"its parameters are in param groups whose {', '.join(differ)} differ"
                )
            try:
                self._refuse(name, module, adapter, self.param_groups[indices[0]])
            except ValueError as err:
                raise _RefusedError(str(err)) from None
            entry = self._new_entry(name, module, adapter, indices)
        del self._dormant[name]
        self._dormant_of = None
        ids = {id(p) for p in params}
        self._fallback_params = [(i, p) for i, p in self._fallback_params if id(p) not in ids]
        for p in params if drop_state else ():
            self.state.pop(p, None)  # (the fallback's moments)
        self._insert_entry(entry)
        return entry

    def _insert_entry(self, entry: ModuleEntry) -> None:
        """Add ``entry`` to the preconditioned layers, in the model's order."""
        merged = {**self._entries, entry.name: entry}
        order = [n for n, _ in self._model.named_modules()]
        self._entries = {n: merged[n] for n in order if n in merged}
        self._entries.update({n: e for n, e in merged.items() if n not in self._entries})
        self._owners = {}

    def _group_inners(self, pending: list) -> dict[int, Any]:
        """Per param group with a trust region: ``sum <G_nat, G>`` over its modules, a
        0-d tensor of at least float32 (added in the modules' order: the same number)."""
        parts: dict[int, list[Tensor]] = {}
        for entry, _, _, inner in pending:
            if inner is not None:
                parts.setdefault(entry.group_index, []).append(inner)
        return {i: sum(terms[1:], start=terms[0]) for i, terms in parts.items()}

    def _finite(self, pending: list, fallback: list, inners: dict[int, Any]) -> bool:
        """Whether every direction and fallback gradient is finite; replaces the
        tensors in ``inners`` by their Python floats (all read in one synchronisation).

        A module's ``<G_nat, G>`` is non-finite wherever its direction holds an inf or
        NaN (``inf * x`` is +-inf, ``inf * 0`` and ``inf - inf`` are NaN, and no sum
        with such a term is finite), so the directions of groups with a trust region
        need no reduction of their own; the others and the fallback gradients are
        reduced to one float32 sum per tensor (non-finite where an entry is) and those
        to one total. A non-finite number is confirmed entry by entry (``isfinite``),
        since sums of finite numbers can overflow float32, which is no reason to skip.
        """
        sums = [
            d.sum(dtype=torch.float32)
            for _, _, dirs, inner in pending
            if inner is None
            for d in dirs
        ]
        sums += [g.sum(dtype=torch.float32) for _, _, g in fallback]
        groups = list(inners)
        totals = [inners[i] for i in groups] + ([torch.stack(sums).sum()] if sums else [])
        values = read_scalars(totals)
        inners.update(zip(groups, values[: len(groups)], strict=True))
        if all(math.isfinite(v) for v in values):
            return True
        tensors = [d for _, _, dirs, _ in pending for d in dirs] + [g for _, _, g in fallback]
        finite = [torch.isfinite(t._values() if t.is_sparse else t).all() for t in tensors]
        return not tensors or bool(torch.stack(finite).all())

    def _zero_directions(self, entry: ModuleEntry):
        """Zero directions (and no new factors) for a layer another rank preconditions."""
        if not self._active(entry):
            return None
        if not any(entry.adapter.has_gradient(entry.module, block=b) for b in entry.blocks):
            return None
        if not entry.shapes_checked:  # once: the owner raises on a wrong shape, and so
            # must this rank, or it would wait for the owner in the next collective
            grads = self._grad_matrices(entry)
            if grads is not None:
                self._check_shapes(entry, entry.adapter.directions(entry.module, grads))
        params = entry.adapter.params(entry.module)
        inner = None
        if self._kl_clip(self.param_groups[entry.group_index]) is not None:
            acc = torch.promote_types(params[0].dtype, torch.float32)  # as the owner's
            inner = torch.zeros((), dtype=acc, device=params[0].device)
        return {}, [torch.zeros_like(p) for p in params], inner

    def _share_factors(self, updated: list[tuple[ModuleEntry, BlockState]]) -> None:
        """Broadcast the factors updated this step from their owners (``"shard"``)."""
        by_owner: dict[int, list[Tensor]] = {}
        for entry, layer in updated:
            tensors = by_owner.setdefault(self._owner(entry), [])
            tensors += [t for f in layer.factors().values() if f is not None for t in f.tensors()]
        for owner in sorted(by_owner):
            tdist.broadcast_tensors(by_owner[owner], owner, self._group)
        for _, layer in updated:
            self._factors_replaced(layer)

    def _factors_replaced(self, layer: BlockState) -> None:
        """Called when a block's factors were overwritten (drop derived caches)."""

    def _sync_statistics(self) -> list[tuple[ModuleEntry, BlockState]]:
        """Combine this step's statistics across ranks as one process with all ranks'
        batches would have them (N ranks; rank ``r`` captured ``N_a^r`` input rows and
        ``n^r`` loss terms for the block, ALGORITHM.md section 2):

        - input side, a mean over the block's input rows: ``sum_r N_a^r H_K^r /
          sum_r N_a^r``. An MoE expert that got tokens on some ranks only, or per-rank
          batches of different sizes, get the mean over all rows, not the mean of
          the ranks' means;
        - output side, ``n^r`` times the squared gradients of the rank's loss (with
          ``loss_average="batch"``, ``n`` is the rows the layer saw, ``B`` for most
          layers, an expert's tokens in an MoE): ``sum_r n^r / N^2 * sum_r H_C^r /
          n^r`` (the mean of the ranks' statistics when every ``n^r`` is equal; the
          ``1/N^2`` is the averaging of the ranks' gradients); summed for
          ``loss_average=None`` (a sum loss).

        A rank that captured nothing for the block contributes nothing (zeros with
        weight 0). With several captures of a block per step (backward passes of
        micro-batches, or a layer applied several times in one forward: each adds its
        own statistics) the counts are the captures' totals: exact when every rank
        splits its rows over its captures in the same proportions (equal
        micro-batches); otherwise off (measured: micro-batches of 2+2 rows on one rank
        and 1+5 on the other, up to 1.3e-2 in the parameters after 4 steps; a layer
        applied to every sample and again to the flagged ones, all flagged on one
        rank and none on the other, up to 4.7e-3).
        A step retried after raising past this reduction (``layer.reduced``) holds
        the combined statistics already (plus what a backward pass since added): its
        sides are averaged with equal weights (a sum loss's output side: ``A / N`` summed).

        Every rank takes part for every block due for an update, so that the packed
        buffers line up. Returns the blocks whose factors are updated this step.
        """
        due = [
            (entry, layer)
            for entry in self._entries.values()
            if self.steps % self.param_groups[entry.group_index]["T"] == 0
            for layer in entry.blocks.values()
        ]
        if not due:
            return []
        device = due[0][0].adapter.params(due[0][0].module)[0].device  # NCCL: not the CPU
        mine = [self._counts(layer) for _, layer in due]  # (fresh, rows, terms)
        # float64 counts stay exact past 2^24 rows; MPS has no float64 (relative 6e-8 there)
        wide = torch.float32 if device.type == "mps" else torch.float64
        totals = torch.tensor([c for counts in mine for c in counts], dtype=wide, device=device)
        tdist.all_reduce_tensors([totals], self._group)
        totals = totals.view(-1, 3).tolist()
        size = tdist.world(self._group)[1]
        tensors, scales, updated, combined = [], [], [], []
        for (entry, layer), (fresh, rows, terms), (ranks, all_rows, all_terms) in zip(
            due, mine, totals, strict=True
        ):
            if ranks == 0:
                continue
            updated.append((entry, layer))
            combined.append((layer, all_rows, all_terms))
            if not layer.has_statistics(self.steps):
                layer.pending = [x.clone().mul_(0.0) for x in layer.pending_like()]
                layer.capture_step = self.steps
                layer.capture_scale = self._capture_scale
                layer.reduced = False
            mean = self.param_groups[entry.group_index]["loss_average"] is not None
            # this rank's factor per side (equal weights where a count is missing on
            # some rank: a retried step, a capture made in a single process, an old
            # checkpoint (NaN: so is the sum), or an adapter that counts none)
            if layer.reduced:  # every rank holds the combined value: average it again
                by_rows = by_terms = 1.0 / size
            else:
                by_rows = rows / all_rows if all_rows > 0 else fresh / ranks
                if not mean:
                    by_terms = 1.0
                elif all_terms > 0 and terms > 0:
                    by_terms = all_terms / (size * size * terms)
                else:
                    by_terms = fresh / size
            for side, stat in enumerate(layer.pending):  # (input side, output side)
                for t in stat.tensors():
                    tensors.append(t)
                    scales.append(by_rows if side == 0 else by_terms)
        tdist.all_reduce_tensors(tensors, self._group, scales=scales)
        for layer, all_rows, all_terms in combined:  # (only once the reduction succeeded)
            layer.rows, layer.terms = all_rows, all_terms
            layer.reduced = True
        return updated

    def _counts(self, layer: BlockState) -> tuple[float, float, float]:
        """``(1, N_a, n)`` of this step's statistics of ``layer`` on this rank, or
        zeros where it has none (see :meth:`_sync_statistics`)."""
        if not layer.has_statistics(self.steps):
            return 0.0, 0.0, 0.0
        return 1.0, layer.rows, layer.terms

    def _parameter_updates(self, items: list[tuple[ModuleEntry, list[Tensor]]]) -> None:
        """Step 3 of ALGORITHM.md for the given modules, one call per param group (all
        of a group's tensors at once; a parameter of a layer split across groups is
        stepped with its own group's momentum and weight decay, and the lr they share);
        protected entries stay as they were."""
        by_group: dict[int, list[tuple[Tensor, Tensor]]] = {}
        saved = []
        for entry, directions in items:
            params = entry.adapter.params(entry.module)
            indices = entry.groups(len(params))
            for p, d, index in zip(params, directions, indices, strict=True):
                by_group.setdefault(index, []).append((p, d))
            saved += [(p, idx, p[idx].clone()) for p, idx in entry.adapter.protected(entry.module)]
        for index, pairs in by_group.items():
            group = self.param_groups[index]
            params = [p for p, _ in pairs]
            buffers = parameter_step(
                params,
                [d for _, d in pairs],
                [self.state[p].get("momentum_buffer") for p in params],
                lr=lr_value(group["lr"]),
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

    def _fallback_step(self, items: list[tuple[int, nn.Parameter, Tensor]], grad_scale: float):
        by_group: dict[int, list[tuple[nn.Parameter, Tensor]]] = {}
        for i, p, g in items:
            by_group.setdefault(i, []).append((p, g if grad_scale == 1.0 else g / grad_scale))
        for i, pairs in by_group.items():
            group = self.param_groups[i]
            params = [p for p, _ in pairs]
            grads = [g for _, g in pairs]
            states = [self.state[p] for p in params]
            lr = lr_value(group["lr"]) if group["fallback_lr"] is None else group["fallback_lr"]
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
    def __getstate__(self) -> dict[str, Any]:
        # torch.optim's would keep only the groups and the state, which gives a copy
        # that fails at its first use; the observed model cannot be copied along
        raise TypeError(
            f"A {type(self).__name__} cannot be pickled or copied: it observes its model "
            "through hooks. Save state_dict() instead and load it into an optimizer "
            "constructed for the model (or for its copy)."
        )

    def state_dict(self) -> dict[str, Any]:
        """The ``torch.optim`` state plus every block's factors and the step counter.

        Callable hyper-parameters (e.g. a scheduled ``lr_cov``) are not saved (they may
        not pickle); the loading optimizer's own callables are used.
        """
        # torch.optim runs the post-hooks on its part of the state: run them below, on
        # the whole state (the factors included), instead
        post_hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = OrderedDict()
        try:
            sd = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = post_hooks
        for group in sd["param_groups"]:
            for key, value in group.items():
                if callable(value):
                    group[key] = _CALLABLE
            # (a scheduler may have put a NumPy number back since the last step)
            plain_numbers(group)

        def tensors(x: StructuredMatrix | None) -> list[Tensor] | None:
            return None if x is None else list(x.tensors())

        sd["kronecker"] = {
            "optimizer": type(self).__name__,
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "capture_scale": self._capture_scale,
            "safeguard_events": dict(self.safeguard_events),
            # the trust region's warning: steps and hits of each group's window
            "kl_window": {i: list(w) for i, w in self._kl_window.items()},
            "kl_warned": sorted(self._kl_warned),
            "demoted": sorted(self._demoted),
            # the parameters each layer's factors cover (a layer woken in a loading
            # optimizer while frozen is made for them)
            "covered": {
                name: [self._name(p) for p in e.covered]
                for name, e in {**self._entries, **self._demoted}.items()
            },
            "layers": {
                name: {
                    "structures": {k: _family(v) for k, v in s.factors().items()},
                    "factors": {k: tensors(v) for k, v in s.factors().items()},
                    "pending": None if s.pending is None else [tensors(p) for p in s.pending],
                    "capture_step": s.capture_step,
                    "capture_scale": s.capture_scale,
                    # (None: not counted, as in a single process)
                    "rows": None if math.isnan(s.rows) else s.rows,
                    "terms": None if math.isnan(s.terms) else s.terms,
                    # (the hand-over of a weight used outside its forward is counted)
                    "seen": s.seen,
                    "unseen_updates": s.unseen_updates,
                    "updated": s.updated,
                    "idle_steps": s.idle_steps,
                    "idle_warned": s.idle_warned,
                }
                for name, s in self.layers.items()
            },
        }
        for hook in post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict`; the layers must match by name and shape.

        All or nothing: a state that does not fit (another model, other structures,
        a callable hyper-parameter the loading optimizer lacks) raises a ``ValueError``
        and leaves this optimizer as it was (hyper-parameters, per-parameter state,
        factors, step counters), as ``torch.optim`` does.
        """
        # torch.optim's load hooks, run here around the whole load: the pre-hooks see
        # the whole state (the factors included), the post-hooks run once everything
        # is loaded, and only if the load succeeded (torch.optim would run them before
        # the factors are restored, and after a load that then fails)
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        kept = (
            self.state,
            self.param_groups,
            [(layer, dict(vars(layer))) for layer in self.layers.values()],
            (self.steps, self.skipped_steps, self._capture_scale, self._events()),
            (dict(self._entries), list(self._fallback_params), dict(self._demoted)),
            (dict(self._dormant), len(self._handles)),
        )
        hooks = (
            self._optimizer_load_state_dict_pre_hooks,
            self._optimizer_load_state_dict_post_hooks,
        )
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            self._load_state_dict(state_dict)
        except BaseException:
            self.state, self.param_groups, layers, counters, routing, asleep = kept
            self._entries, self._fallback_params, self._demoted = routing
            self._dormant, n_handles = asleep
            self._dormant_of = None
            _remove_handles(self._handles[n_handles:])  # (of layers woken for the load)
            del self._handles[n_handles:]
            self._owners = {}
            for layer, attributes in layers:
                vars(layer).clear()
                vars(layer).update(attributes)
            self.steps, self.skipped_steps, self._capture_scale, events = counters
            self._restore_events(events)
            raise
        finally:
            self._optimizer_load_state_dict_pre_hooks = hooks[0]
            self._optimizer_load_state_dict_post_hooks = hooks[1]
        for group, frozen in zip(self.param_groups, self._frozen, strict=False):
            # the factors were made (and the loaded ones cast) as this optimizer's
            # options say: the checkpoint's spelling, or a value changed before it was
            # saved, does not replace them
            group.update(copy.deepcopy(frozen))
        for hook in hooks[1].values():
            hook(self)

    def _restore_wide_moments(self, state_dict: dict[str, Any]) -> None:
        """The fallback's AdamW moments of float16 weights as saved (float32, see
        :func:`adamw_step`): ``torch.optim``'s load casts every floating state tensor
        to its parameter's dtype, which flushes the small ones to zero."""
        saved = state_dict["state"]
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups, strict=True):
            for index, p in zip(saved_group["params"], group["params"], strict=True):
                wide = moment_dtype(p.dtype)
                if wide == p.dtype or index not in saved:
                    continue
                for key in ADAMW_MOMENTS:
                    value = saved[index].get(key)
                    if isinstance(value, Tensor) and value.is_floating_point():
                        self.state[p][key] = value.to(p.device, wide, copy=True)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("kronecker", None)
        if extra is None or extra["optimizer"] != type(self).__name__:
            raise ValueError(
                f"This state dict was not produced by torchsingd's {type(self).__name__}."
            )
        callables = [{k: v for k, v in g.items() if callable(v)} for g in self.param_groups]
        current_groups = [dict(g) for g in self.param_groups]
        # the checkpoint's hand-overs (before the state is mapped onto the parameters)
        demoted = set(extra.get("demoted", []))
        saved = {k.replace("_orig_mod.", "") for k in extra["layers"]} | set(extra["layers"])
        for name in list(self._demoted):  # preconditioned again where the checkpoint is
            if name not in demoted and any(k == name or k.startswith(f"{name}.") for k in saved):
                self._undemote(name)
        covered = extra.get("covered", {})
        for name in list(self._dormant):  # (frozen here, woken where it was saved)
            covering = covered.get(name, [self._name(p) for p in self._dormant[name].covers])
            # (one in ``demoted`` was woken, then handed over: demoted below, as saved)
            if name in demoted or any(k == name or k.startswith(f"{name}.") for k in saved):
                try:
                    self._wake(name, drop_state=False, covering=set(covering))
                except (ValueError, TypeError, NotImplementedError) as err:
                    if name not in demoted:
                        raise ValueError(
                            f"The saved state preconditions layer {name!r}, which this "
                            f"optimizer cannot: {err}."
                        ) from None
                    del self._dormant[name]  # (the fallback rule's, as saved)
                    self._dormant_of = None
        for name in demoted:  # (one woken, then handed over, is demoted after its wake)
            if name in self._entries:
                self._demote(self._entries[name], fresh_state=False)
        super().load_state_dict(state_dict)
        self._restore_wide_moments(state_dict)
        for group, current in zip(self.param_groups, current_groups, strict=True):
            for key, value in current.items():  # states saved before an option existed
                group.setdefault(key, value)
        for group, current in zip(self.param_groups, callables, strict=True):
            for key, value in group.items():
                if isinstance(value, str) and value == _CALLABLE:
                    if key not in current:
                        raise ValueError(
                            f"The saved state used a callable {key}; construct the loading "
                            "optimizer with the same callable."
                        )
                    group[key] = current[key]
        layers = self.layers
        saved_layers = {  # states saved before torch.compile's wrapper was unwrapped
            (k.replace("_orig_mod.", "") if k not in layers else k): v
            for k, v in extra["layers"].items()
        }
        extra = dict(extra, layers=saved_layers)
        missing = set(layers) ^ set(extra["layers"])
        if missing:
            raise ValueError(
                f"Saved and current preconditioned layers differ: {sorted(missing)}. (A "
                "layer frozen whole when the saving optimizer was constructed is "
                "preconditioned only from a factor-update step after it was unfrozen: "
                "construct the loading optimizer with the same layers frozen.)"
            )
        for name, saved in extra["layers"].items():
            layer = layers[name]
            current = layer.factors()
            restored = _restore_factors(current, saved, name)
            for key, value in restored.items():
                setattr(layer, key, value)
            self._factors_replaced(layer)
            if saved["pending"] is None:
                layer.pending = None
            else:
                layer.pending = [
                    _restore(like, t, f"{name} statistics")
                    for like, t in zip(layer.pending_like(), saved["pending"], strict=True)
                ]
            layer.capture_step = saved["capture_step"]
            layer.capture_scale = saved["capture_scale"]
            # (saved before the counts were kept: not known, so equal weights)
            rows, terms = saved.get("rows"), saved.get("terms")
            layer.rows = math.nan if rows is None else float(rows)
            layer.terms = math.nan if terms is None else float(terms)
            layer.reduced = False  # (not saved: the loaded statistics are this rank's)
            layer.seen = bool(saved.get("seen", False))  # (older states: not counted)
            layer.unseen_updates = int(saved.get("unseen_updates", 0))
            # (older states: as if updated; a factor update on resume sets it anyway)
            layer.updated = bool(saved.get("updated", True))
            layer.idle_steps = int(saved.get("idle_steps", 0))
            layer.idle_warned = bool(saved.get("idle_warned", False))
        self.steps = extra["steps"]
        self.skipped_steps = extra["skipped_steps"]
        self._capture_scale = extra["capture_scale"]
        # (older states: counted from the load on)
        events = dict.fromkeys(self.safeguard_events, 0)
        events.update(extra.get("safeguard_events", {}))
        window = {int(i): (int(w[0]), int(w[1])) for i, w in extra.get("kl_window", {}).items()}
        self._restore_events((events, window, {int(i) for i in extra.get("kl_warned", ())}))

    def _events(self) -> tuple[dict[str, int], dict[int, tuple[int, int]], set[int]]:
        """Copies of the safeguards' counts and the trust region's warning window."""
        return dict(self.safeguard_events), dict(self._kl_window), set(self._kl_warned)

    def _restore_events(self, events) -> None:
        counts, self._kl_window, self._kl_warned = events
        restored = {k: int(v) for k, v in counts.items()}
        self.safeguard_events.clear()  # (in place: a reference taken before stays live)
        self.safeguard_events.update(restored)


#: a state with dense factors this large, and this many times the parameters' bytes,
#: is warned about at construction (``KroneckerOptimizer._advise_on_size``)
DENSE_ADVICE_BYTES = 256 * 2**20
DENSE_ADVICE_RATIO = 8.0


def _count_idle(layer: BlockState, count: int, warned: bool) -> None:
    """Commit what :meth:`KroneckerOptimizer._never_updated` counted in a step."""
    layer.idle_steps = count
    layer.idle_warned = layer.idle_warned or warned


#: factor-update steps at which a layer's weight has a gradient while its forward has
#: never run (and other layers' have) before its parameters go to the fallback rule
HAND_OVER_AFTER = 5

_OUTSIDE = (
    "the weight is used outside it (e.g. F.linear(x, m.weight, m.bias), as "
    "torchvision's Swin attention does), where no statistic can be seen."
)


def tensor_bytes(t: Tensor) -> int:
    """Bytes of ``t``'s data; for a sparse COO tensor (a sparse parameter's momentum)
    its indices' and values' (``nbytes`` refuses sparse tensors)."""
    if t.layout == torch.strided:
        return t.nbytes
    if t.layout == torch.sparse_coo:
        return t._indices().nbytes + t._values().nbytes
    return t.numel() * t.element_size()  # (other layouts: as dense)


#: device types whose autocast a step turns off (those PyTorch knows that may be on)
_AUTOCAST_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")


def _autocast_off() -> contextlib.AbstractContextManager:
    """Autocast off for the step's own arithmetic where the caller's is on: ``step()``
    called inside ``torch.autocast`` ran its products (factor updates, natural
    gradients) in the autocast dtype (dense and Toeplitz factors: parameters 1.2-1.7%
    off those of a step outside it) or failed on the mixed dtypes (block-diagonal,
    hierarchical: "expected scalar type BFloat16 but found Float"). A closure still
    runs under the caller's autocast."""
    on = [kind for kind in _AUTOCAST_TYPES if torch.is_autocast_enabled(kind)]
    if not on:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for kind in on:
        stack.enter_context(torch.autocast(kind, enabled=False))
    return stack


#: the adapter methods that make a block's input rows or statistic (see _rows_keyed)
_ROWS_METHODS = (
    "capture_input",
    "input_rows",
    "is_batched",
    "input_count",
    "input_statistic",
    "input_gram",
    "_input_sum",
)


@functools.cache
def _rows_keyed(adapter_class: type[LayerAdapter]) -> bool:
    """Whether blocks of ``adapter_class`` may share input Grams: its statistic is the
    default one (``input_gram``, then ``K``) and it makes its rows as the class that
    defines its ``rows_key`` does (a subclass that changes how rows are made, but
    inherits the key, is not shared)."""
    if adapter_class.input_statistic is not LayerAdapter.input_statistic:
        return False
    owner = next(c for c in adapter_class.__mro__ if "rows_key" in c.__dict__)
    return all(getattr(adapter_class, n) is getattr(owner, n) for n in _ROWS_METHODS)


def _inner(nat: Tensor, G: Tensor) -> Tensor:
    """``<G_nat, G>`` in ``G``'s dtype, at least float32."""
    acc = torch.promote_types(G.dtype, torch.float32)
    return torch.dot(nat.reshape(-1).to(acc), G.reshape(-1).to(acc))


def _dense(grad: Tensor, param: Tensor) -> Tensor:
    """``grad`` as a strided tensor where ``param`` is one: the fallback rule takes a
    sparse gradient (e.g. of an ``Embedding(sparse=True)`` it trains) as its dense
    equivalent, so that it makes the step it makes for ``sparse=False`` (every row
    decays and keeps its moments). A sparse parameter keeps its sparse gradient."""
    if grad.layout == torch.strided or param.layout != torch.strided:
        return grad
    return grad.to_dense()


def _whole_view(view: Tensor, base: Tensor) -> bool:
    """Whether ``view`` is ``base`` reshaped (both contiguous, the same numbers), so
    that the gradient of ``base`` reshaped is the gradient of ``view``."""
    return (
        base.requires_grad
        and view.numel() == base.numel()
        and view.storage_offset() == base.storage_offset()
        and view.is_contiguous()
        and base.is_contiguous()
    )


def _accumulates_into(weight: Tensor) -> bool:
    """Whether the running backward pass will accumulate a gradient into ``weight``
    (a leaf): ``False`` for ``torch.autograd.grad`` with respect to other tensors and
    ``backward(inputs=...)`` without it. ``autograd.grad`` with respect to parameters
    (gradients the caller may write into ``.grad`` itself) cannot be told apart and
    counts as accumulating, as does anything this private API cannot answer."""
    try:
        with torch.enable_grad():  # (backward hooks run without grad mode)
            node = weight.view_as(weight).grad_fn.next_functions[0][0]
        return node is None or bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, IndexError, RuntimeError, TypeError):
        return True


class _Observer:
    """Reports one module's forward passes to its optimizer (see ``layers.Observer``).

    Held only by hooks, so deep copies of the model share it; it ignores forward
    passes of modules other than the one it was made for.
    """

    def __init__(self, optimizer: KroneckerOptimizer, entry: ModuleEntry) -> None:
        # weak references only: a hook left on a deep copy of the model (an EMA copy)
        # keeps neither the optimizer nor its factors alive
        self._optimizer = weakref.ref(optimizer)
        self._module = weakref.ref(entry.module)
        self._name = entry.name

    def _entry(self, module: nn.Module) -> tuple[KroneckerOptimizer, ModuleEntry] | None:
        optimizer = self._optimizer()
        if optimizer is None or module is not self._module():
            return None
        entry = optimizer._entries.get(self._name)
        return None if entry is None else (optimizer, entry)

    def __call__(self, module: nn.Module, block: str, x: Tensor, output: Tensor) -> None:
        found = self._entry(module)
        if found is not None:
            found[0]._on_forward(found[1], block, x, output)

    def wants(self, module: nn.Module) -> bool:
        found = self._entry(module)
        # (a layer frozen whole since construction trains nothing: nothing to observe)
        return found is not None and found[0]._wants(found[1]) and found[0]._active(found[1])


def _remove_handles(handles: list[Any]) -> None:
    """Finaliser of an optimizer: detach its hooks from the model."""
    for handle in handles:
        handle.remove()
    handles.clear()


@contextlib.contextmanager
def _trainable(module: nn.Module, which: Callable[[nn.Parameter], bool] = lambda p: True):
    """Within: ``module``'s parameters require gradients where ``which`` says so (an
    adapter covers a bias only while it requires them); restored after."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(which(p))
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _covered(adapter: LayerAdapter, module: nn.Module) -> tuple[nn.Parameter, ...]:
    """The parameters ``adapter`` covers for ``module`` once all of the module's require
    gradients."""
    with _trainable(module):
        return tuple(adapter.params(module))


def _layout(adapter: LayerAdapter, module: nn.Module) -> tuple[tuple[int, bool], ...]:
    return tuple((id(p), p.requires_grad) for p in adapter.params(module))


def _family(x: StructuredMatrix | None) -> str | None:
    return None if x is None else f"{type(x).family}{list(x.options())}"


def _restore_factors(
    current: dict[str, StructuredMatrix | None], saved: dict[str, Any], name: str
) -> dict[str, StructuredMatrix | None]:
    """The saved factors of layer ``name`` in the current layer's dtypes and devices.

    A factor that exists on one side only (momenta appear when a group's ``alpha1``
    was changed from 0 after construction, and vanish when it is set to 0) follows
    the saved state, restored like a current factor of the same structure and shape.
    """
    wanted = {k: _family(v) for k, v in current.items()}
    families = saved["structures"]
    if families.keys() != wanted.keys() or any(
        families[k] is not None and wanted[k] is not None and families[k] != wanted[k]
        for k in wanted
    ):
        raise ValueError(
            f"Layer {name!r} was saved with factors {families}, but this optimizer has {wanted}."
        )
    out: dict[str, StructuredMatrix | None] = {}
    for key, like in current.items():
        tensors = saved["factors"][key]
        if tensors is None:
            out[key] = None
            continue
        if like is None:
            shapes = [tuple(t.shape) for t in tensors]
            like = next(
                (
                    f
                    for f in current.values()
                    if f is not None
                    and _family(f) == families[key]
                    and [tuple(t.shape) for t in f.tensors()] == shapes
                ),
                None,
            )
            if like is None:
                raise ValueError(
                    f"Layer {name!r} was saved with a factor {key!r} ({families[key]}) "
                    "that this optimizer cannot hold."
                )
        out[key] = _restore(like, tensors, f"{name}.{key}")
    return out


def _float16_forward(output: Any, x: Tensor) -> bool:
    """Whether an observed forward ran in float16 (its output, or float16 autocast on
    its input's device: an embedding's output stays float32 under it)."""
    if getattr(output, "dtype", None) == torch.float16:  # (StepGradients has none)
        return True
    if not isinstance(x, Tensor):
        return False
    try:
        kind = x.device.type
        return torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.float16
    except RuntimeError:  # a device type without autocast ("meta")
        return False


def _move_block(layer: BlockState, device: torch.device) -> None:
    """Move a block's factors, pending statistics and own-gradient sum to ``device``."""
    for key, value in layer.factors().items():
        if value is not None:
            setattr(layer, key, value.to(device=device))
    if layer.pending is not None:
        layer.pending = [x.to(device=device) for x in layer.pending]
    if layer.own is not None:
        layer.own = layer.own.to(device)


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
