"""Layer adapters: how one module family becomes the matrices SINGD works with.

The optimizer never asks what kind of layer it holds. For each supported module it
asks the registry for an adapter, which answers (after kfac-pytorch's ``ModuleHelper``):

1. ``blocks``: the module's Kronecker-factored blocks (``("",)`` for most layers;
   ``("q", "k", "v", "out")`` for multi-head attention), each with its own ``K``, ``C``;
2. ``dims``: ``(d_i, d_o)`` of a block's weight as a matrix (``d_i`` includes the bias);
3. ``input_rows`` / ``input_statistic``: the block input as rows ``a`` (``[N_a, d_i]``,
   ALGORITHM.md section 2), or directly ``H_K = P(K^T a^T a K)`` where rows would be
   wasteful (one-hot embedding inputs); both take the input as ``capture_input``
   returns it (the forward's input itself, except for transposed convolutions);
4. ``grad_rows``: the block's output gradient as rows ``g`` (``[N_g, d_o]``);
5. ``grad_matrix``: ``grad(W)`` of a block as ``[d_o, d_i]`` (bias as the last column);
6. ``directions``: the blocks' ``[d_o, d_i]`` updates back into tensors shaped like
   :meth:`LayerAdapter.params`;
7. ``install``: how the optimizer's :class:`Observer` is told about a forward pass (a
   forward hook by default; multi-head attention re-routes its projections so they
   can be observed).

Register a new layer type with :func:`register_layer`; see the README for an example.
"""

from __future__ import annotations

import inspect
import sys
import types
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from math import prod, sqrt
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from torchsingd.structures import StructuredMatrix

KFAC_APPROXIMATIONS = ("expand", "reduce")
LOSS_AVERAGES = (None, "batch", "batch+sequence")


class Observer(Protocol):
    """What an adapter reports forward passes to (the optimizer provides it)."""

    def __call__(self, module: nn.Module, block: str, x: Tensor, output: Tensor) -> None:
        """A forward pass of ``module``'s ``block`` with input ``x`` and ``output``.

        The optimizer ignores modules it was not built for (e.g. deep copies).
        """

    def wants(self, module: nn.Module) -> bool:
        """Whether a forward pass of ``module`` now would be observed at all."""


class LayerAdapter(ABC):
    """The questions about one module family; see the module docstring."""

    #: Group option that names the structure of ``K`` instead of ``structures[0]``
    #: (e.g. ``"vocab_structure"`` for embeddings, whose input side is the vocabulary).
    k_structure_option: str | None = None

    def blocks(self, module: nn.Module) -> tuple[str, ...]:
        """Names of the Kronecker-factored blocks of ``module``."""
        return ("",)

    def params(self, module: nn.Module) -> list[nn.Parameter]:
        """The parameters the Kronecker-factored preconditioner covers (weight, bias)."""
        out = [module.weight]
        if self.has_bias(module):
            out.append(module.bias)
        return out

    def supports(self, module: nn.Module) -> bool:
        """Whether this module's configuration can be preconditioned at all (if not,
        its parameters go to the fallback rule, with the usual warning)."""
        return True

    def submodules(self, module: nn.Module) -> list[nn.Module]:
        """Child modules whose parameters this adapter covers (not adapted separately)."""
        return []

    def check(self, module: nn.Module, name: str) -> None:
        """Raise a ``ValueError`` if ``module`` cannot be preconditioned as configured."""
        for p in self.params(module):
            if isinstance(p, nn.parameter.UninitializedParameter):
                raise ValueError(
                    f"Layer {name!r} has uninitialized (lazy) parameters; run one forward "
                    "pass before constructing the optimizer."
                )

    def block_parameter(self, module: nn.Module, *, block: str = "") -> nn.Parameter:
        """The leaf parameter whose gradient a block's statistics belong to (its
        weight): a backward pass that does not accumulate into it (``autograd.grad``
        with respect to other tensors, ``backward(inputs=...)`` without it) adds no
        statistics to the block. Default: the first of :meth:`params`."""
        return self.params(module)[0]

    def has_bias(self, module: nn.Module) -> bool:
        """Whether the bias is trained as the extra last column of ``W``."""
        bias = getattr(module, "bias", None)
        return isinstance(bias, Tensor) and bias.requires_grad

    @abstractmethod
    def dims(self, module: nn.Module, *, block: str = "") -> tuple[int, int]:
        """``(d_i, d_o)``: sizes of ``K`` and ``C`` for a block."""

    @abstractmethod
    def input_rows(self, module: nn.Module, x: Tensor, kfac_approx: str, *, block: str = ""):
        """``a``: ``[N_a, d_i]``, ones column appended for a bias, divided by ``sqrt(N_a)``."""

    def input_count(
        self, module: nn.Module, x: Tensor, kfac_approx: str, *, block: str = ""
    ) -> int:
        """``N_a``: the number of rows :meth:`input_rows` gives for ``x`` (a rank's
        weight when statistics are combined across ranks). Default: from the rows of
        one sample where :meth:`is_batched`, else from all rows; the built-in adapters
        count from shapes alone."""
        if self.is_batched(module, x) and x.shape[0] > 1:
            return x.shape[0] * self.input_rows(module, x[:1], kfac_approx, block=block).shape[0]
        return self.input_rows(module, x, kfac_approx, block=block).shape[0]

    @abstractmethod
    def grad_rows(
        self,
        module: nn.Module,
        g: Tensor,
        loss_average: str | None,
        kfac_approx: str,
        *,
        block: str = "",
    ) -> Tensor:
        """``g``: ``[N_g, d_o]``, multiplied by ``sqrt(number of loss terms)``."""

    def loss_terms(
        self, module: nn.Module, g: Tensor, loss_average: str | None, *, block: str = ""
    ) -> int:
        """``n``: the number of loss terms whose square root :meth:`grad_rows`
        multiplies the output gradient ``g`` by (a rank's weight when statistics are
        combined across ranks). Default: as for ``nn.Linear`` (``g`` is ``[B, ...,
        d_o]``: ``B`` for ``"batch"``, ``B`` times the shared sizes for
        ``"batch+sequence"``; ``[d_o]`` is one sample)."""
        if g.ndim <= 1:
            return 1
        return loss_term_count(g.shape[0], prod(g.shape[1:-1]), loss_average)

    def capture_input(
        self, module: nn.Module, x: Tensor, output_shape: torch.Size, *, block: str = ""
    ) -> Tensor:
        """The block input as :meth:`input_rows` and :meth:`input_statistic` take it,
        from the forward pass's input ``x`` and the shape of its output (called in the
        backward pass, before those two). Default: ``x`` itself; a transposed
        convolution returns its input zero-stuffed and padded, whose right padding
        depends on the output size (``output_size`` in the forward call)."""
        return x

    def input_statistic(
        self,
        module: nn.Module,
        x: Tensor,
        K: StructuredMatrix,
        kfac_approx: str,
        *,
        block: str = "",
    ) -> StructuredMatrix:
        """``H_K = P(K^T a^T a K)`` for the block input ``x`` (in ``K``'s dtype).

        Over chunks of the batch when the rows ``a`` would hold more than
        ``STATISTIC_CHUNK_NUMEL`` numbers (a convolution's unfolded input can be the
        largest tensor of a step): ``H_K`` is linear in ``a^T a``, and with ``a``
        divided by ``sqrt(rows)`` a chunk of ``b`` of the ``B`` samples contributes
        its own statistic times ``b / B`` (every sample has as many rows).
        """
        by_gram, H = self._input_sum(module, x, K, kfac_approx, block)
        return K.inner_of_gram(H) if by_gram else H

    def input_gram(
        self,
        module: nn.Module,
        x: Tensor,
        K: StructuredMatrix,
        kfac_approx: str,
        *,
        block: str = "",
    ) -> StructuredMatrix | None:
        """The Gram of the rows that :meth:`input_statistic` applies ``K`` to where it
        takes the Gram route (``input_statistic = K.inner_of_gram(input_gram)``), or
        ``None`` (nothing computed) where it does not (``K.gram_pays`` is false for
        :meth:`input_count` rows).

        The Gram depends on ``K`` only through its class, sizes, dtype and device:
        blocks that read the same input (an attention's query, key and value
        projections) may share it (see :meth:`rows_key`). ``None`` also where an
        adapter's :meth:`input_count` is not the number of its rows (then the
        statistic computed here is computed again by :meth:`input_statistic`)."""
        if not K.gram_pays(self.input_count(module, x, kfac_approx, block=block)):
            return None
        by_gram, H = self._input_sum(module, x, K, kfac_approx, block)
        return H if by_gram else None  # (not by_gram: a count that is not the rows')

    def _input_sum(
        self, module: nn.Module, x: Tensor, K: StructuredMatrix, kfac_approx: str, block: str
    ) -> tuple[bool, StructuredMatrix]:
        """``(by the Gram route, H)``: the Gram of the rows summed over chunks (``K``
        still to apply), or the statistic itself (:meth:`input_statistic`)."""
        x = x.to(K.dtype)
        B = x.shape[0] if self.is_batched(module, x) else 1
        if B > 1:
            one = self.input_rows(module, x[:1], kfac_approx, block=block)
            chunk = max(1, STATISTIC_CHUNK_NUMEL // max(one.numel(), 1))
            if chunk < B:
                # the Gram route (see gram_of_rows) sums the chunks' Grams, applies K once
                gram = K.gram_pays(one.shape[0] * B)
                H = None
                for start in range(0, B, chunk):
                    part = x[start : start + chunk]
                    a = self.input_rows(module, part, kfac_approx, block=block)
                    H_part = gram_of_rows(K, a) if gram else inner_of_rows(K, a)
                    H_part.mul_(part.shape[0] / B)
                    H = H_part if H is None else H.add_(H_part)
                return gram, H
        a = self.input_rows(module, x, kfac_approx, block=block)
        if K.gram_pays(a.shape[0]):  # (else inner_of_rows takes the direct route)
            return True, gram_of_rows(K, a)
        return False, inner_of_rows(K, a)

    def rows_key(self, module: nn.Module, x: Tensor, *, block: str = "") -> Hashable | None:
        """What, besides the input tensor ``x``, decides :meth:`capture_input`,
        :meth:`input_rows` (and so :meth:`input_gram`) for a block: blocks of any modules
        whose keys are equal and which read the same input tensor (the same memory,
        unchanged in between) in one step make the same rows, and the optimizer
        computes their Gram once (an attention's query, key and value projections of
        one input; the gate and up projections of a gated MLP). ``None`` (the
        default): not shared. Only adapters whose statistic is the default
        :meth:`input_statistic` (``input_gram``, then ``K``) share; a subclass that
        inherits a key but makes its rows another way (its own ``input_rows``,
        ``capture_input``, ``is_batched``, ``input_count``) does not, unless it
        defines ``rows_key`` itself."""
        return None

    def own_gradient(
        self, module: nn.Module, x: Tensor, grad_output: Tensor, *, block: str = ""
    ) -> Tensor | None:
        """``grad(W)`` as ``[d_o, d_i]`` that one forward pass contributes, from its
        captured input ``x`` and output gradient ``grad_output`` (at least float32), or
        ``None`` (default: not computed).

        Embeddings answer (an index-add of the output gradient): where the weight's
        gradient at the first factor update is not (a multiple of) the sum of these,
        the weight is used outside the module as well (a tied output projection
        written as ``h @ emb.weight.T``) and the optimizer warns once, since its
        statistics come from the module's own passes only."""
        return None

    def is_batched(self, module: nn.Module, x: Tensor) -> bool:
        """Whether :meth:`input_statistic` may split ``x`` along dimension 0: it indexes
        samples that each give the same number of rows of ``a`` (default: no)."""
        return False

    def has_gradient(self, module: nn.Module, *, block: str = "") -> bool:
        """Whether :meth:`grad_matrix` would return a matrix (without building it, for
        the default layout; an adapter with its own ``grad_matrix`` and no
        ``has_gradient`` is asked by building it: ranks that do not own a layer under
        ``distributed_strategy="shard"`` call this)."""
        if type(self).grad_matrix is not LayerAdapter.grad_matrix:
            return self.grad_matrix(module, block=block) is not None
        return module.weight.grad is not None

    def weight_matrix(self, module: nn.Module, w: Tensor) -> Tensor:
        """A tensor shaped like the weight as the ``[d_o, d_i - bias]`` matrix (default:
        its leading dimension as rows, the rest flattened)."""
        return w.flatten(start_dim=1)

    def matrix_weight(self, module: nn.Module, mat: Tensor) -> Tensor:
        """The inverse of :meth:`weight_matrix` (``mat`` without the bias column)."""
        return mat.reshape_as(module.weight)

    def grad_matrix(self, module: nn.Module, *, block: str = "") -> Tensor | None:
        """``grad(W)`` as ``[d_o, d_i]`` (bias gradient as the last column), or ``None``."""
        if module.weight.grad is None:
            return None
        G = self.weight_matrix(module, module.weight.grad)
        if self.has_bias(module):
            bias_grad = module.bias.grad
            if bias_grad is None:
                bias_grad = torch.zeros_like(module.bias)
            G = torch.cat([G, bias_grad.unsqueeze(1)], dim=1)
        return G

    def split_matrix(self, module: nn.Module, mat: Tensor) -> list[Tensor]:
        """Split a ``[d_o, d_i]`` matrix into tensors shaped like :meth:`params`."""
        if self.has_bias(module):
            return [self.matrix_weight(module, mat[:, :-1]), mat[:, -1].reshape_as(module.bias)]
        return [self.matrix_weight(module, mat)]

    def directions(self, module: nn.Module, mats: dict[str, Tensor]) -> list[Tensor]:
        """The blocks' ``[d_o, d_i]`` updates as tensors aligned with :meth:`params`."""
        return self.split_matrix(module, mats[""])

    def protected(self, module: nn.Module) -> list[tuple[nn.Parameter, Any]]:
        """``(parameter, index)`` pairs an update must leave untouched."""
        return []

    def install(self, module: nn.Module, observer: Observer) -> list[Any]:
        """Report ``module``'s forward passes to ``observer``; return removable handles.

        The hook (:class:`ObservingHook`) is shared by a deep copy of the model, whose
        forward passes the observer recognises (and ignores), and pickles as a no-op.
        """
        return [module.register_forward_hook(ObservingHook(observer), with_kwargs=True)]


_FIRST_ARGUMENT: dict[type, str | None] = {}


class StepGradients:
    """The output gradients of a block applied once per time step of a recurrence,
    delivered as one ``[N, L, F]`` gradient (step ``t`` at ``[:, t]``): what an adapter
    passes to its :class:`Observer` as the block's output when the steps' outputs are
    separate tensors.

    :meth:`tap` collects each step's output; the hook the observer registers gets, once
    per backward pass that reaches any of them, the stack of their gradients (zeros
    for the steps it does not reach), at the end of that pass: the first step's
    gradient to arrive in a pass (a graph task) queues the delivery on the autograd
    engine. The outputs lie on
    the backward's path to the weights, so ``backward(inputs=params)`` and
    ``autograd.grad(loss, params)`` reach them. (``torch.autograd.graph.
    register_multi_grad_hook`` would do the same, but its hooks hold the graph's nodes
    they are registered on: a cycle through C++ that kept every observed graph alive,
    ~2 MB per step of a small LSTM.)
    """

    def __init__(self, steps: int) -> None:
        self._outputs: list[Tensor | None] = [None] * steps
        self._numel = 0
        self.requires_grad = False

    def tap(self, t: int, y: Tensor) -> Tensor:
        """Collect step ``t``'s output ``y``; returns ``y``."""
        if y.requires_grad:
            self.requires_grad = True
            self._numel += y.numel()
            self._outputs[t] = y
        return y

    def register_hook(self, hook: Callable[[Tensor], Any]) -> None:
        """``hook(stacked_gradient)`` once per backward pass that reaches the steps."""
        length = len(self._outputs)
        # the gradients of each running backward pass (by its graph task: a backward
        # nested in another one's hook, or one after a pass that failed before its
        # end, is a pass of its own)
        pending: dict[int, list[Tensor | None]] = {}

        def finish(task: int) -> None:
            grads = pending.pop(task)
            arrived = next(g for g in grads if g is not None)
            zero = torch.zeros_like(arrived)
            hook(torch.stack([zero if g is None else g for g in grads], dim=1))

        def arrive(t: int, grad: Tensor) -> None:
            task = torch._C._current_graph_task_id()
            if task not in pending:
                pending[task] = [None] * length
                torch.autograd.Variable._execution_engine.queue_callback(lambda: finish(task))
            pending[task][t] = grad

        for t, y in enumerate(self._outputs):
            if y is not None:
                y.register_hook(lambda grad, t=t: arrive(t, grad))
        self._outputs = [None] * length  # (the hooks hold no tensor of the graph)

    def numel(self) -> int:
        return self._numel


class RestoreForward:
    """A handle whose ``remove()`` gives the module its class's forward back, unless
    another forward replaced the one installed since (a second optimizer built on the
    same model: the first one's removal must not take the second one's forward)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.installed = module.__dict__.get("forward")

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is self.installed:
            self.module.__dict__.pop("forward", None)


def install_forward(
    module: nn.Module, observer: Observer, observed: Callable[..., Any]
) -> list[Any]:
    """Replace ``module``'s forward (on the instance) by one that calls
    ``observed(module, observer, *args, **kwargs)`` in forward passes whose backward
    is observed (grad enabled, ``observer.wants(module)``) and the class's forward in
    every other; returns the handle that restores it. For layers that apply their
    weights inside one kernel, where no hook can see the blocks' inputs and outputs.

    A bound method (not a closure over ``module``), so a deep copy rebinds it to the
    copy (which the observer ignores). Dynamo would reuse one compiled frame of it for
    every such module (wrong weights), so this frame stays eager; what it calls is
    still compiled."""

    def forward(mod, *args, **kwargs):
        if not (torch.is_grad_enabled() and observer.wants(mod)):
            return type(mod).forward(mod, *args, **kwargs)
        return observed(mod, observer, *args, **kwargs)

    forward = torch.compiler.disable(forward, recursive=False)
    module.forward = types.MethodType(forward, module)
    return [RestoreForward(module)]


def first_argument(module: nn.Module) -> str | None:
    """The name of the first argument of ``module``'s forward (``input`` for torch's
    layers), by which a call may pass the input as a keyword (cached per class)."""
    cls = type(module)
    if cls not in _FIRST_ARGUMENT:
        try:
            names = list(inspect.signature(cls.forward).parameters)[1:]  # without self
        except (TypeError, ValueError):
            names = []
        _FIRST_ARGUMENT[cls] = names[0] if names else None
    return _FIRST_ARGUMENT[cls]


def _observe(
    observer: Observer | None, module: nn.Module, args: tuple, kwargs: dict, output: Any
) -> None:
    if observer is None or not isinstance(output, Tensor):
        return
    if args:
        observer(module, "", args[0], output)
    elif kwargs:  # layer(input=x)
        x = kwargs.get(first_argument(module))
        if isinstance(x, Tensor):
            observer(module, "", x, output)


_observe_eagerly: Callable[..., None] | None = None  # _observe, kept out of Dynamo


class ObservingHook:
    """A forward hook (``with_kwargs=True``) that reports ``(module, "", input,
    output)`` to an observer; the input is the first positional argument, or the
    forward's first argument passed by keyword (``layer(input=x)``).

    A deep copy is the same hook (the observer ignores the copied module); pickling
    (``torch.save(model)``) stores an inert hook, since the optimizer is not part of
    the model: the loaded model is not observed.
    """

    def __init__(self, observer: Observer | None) -> None:
        self.observer = observer

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        global _observe_eagerly
        if "torch._dynamo" not in sys.modules:  # nothing is compiled (not even loaded)
            _observe(self.observer, module, args, kwargs, output)
            return
        # Dynamo would trace into the observer and guard on which layer it belongs to,
        # compiling the hook's frame once per layer (a 12-layer MLP hit the recompile
        # limit); run eagerly, it is one graph break. Made on first use: importing
        # torch.compiler's machinery costs ~1.2 s, which a run without compile skips.
        if _observe_eagerly is None:
            _observe_eagerly = torch.compiler.disable(_observe)
        _observe_eagerly(self.observer, module, args, kwargs, output)

    def __deepcopy__(self, memo: dict) -> ObservingHook:
        return self

    def __reduce__(self) -> tuple:
        return (type(self), (None,))


#: Input statistics are computed over chunks of the batch whose rows ``a`` hold at
#: most this many numbers (see :meth:`LayerAdapter.input_statistic`).
STATISTIC_CHUNK_NUMEL = 1 << 20

#: A statistic of rows (:func:`inner_of_rows`, :func:`gram_of_rows`) sums products
#: over at most this many rows at a time: one float32 product's sum over ``n`` rows
#: rounds by up to ~``n`` ulps where the terms share a sign, and the chunks' results
#: add with one rounding each. Measured on the benchmark CNN's first convolution
#: (``d = 10``, 100352 rows of positive inputs, against float64): relative error
#: 1.6e-4 in one product, 1.8e-5 in chunks of 16384 rows (5.1e-6 at 4096, 4.2e-7 at
#: 1024, at up to twice the time), in the same time as one product (3.4 / 3.1 ms
#: block-diagonal, 3.5 / 1.9 ms dense; 16.2 / 16.8 ms for the second convolution's
#: 289 columns, whose chunks of numbers hold fewer rows). (Block-diagonal factors of
#: such a convolution had a route of their own until ``a3603f5``, summing one sample
#: at a time: 7.9e-8 there, a review measured; the rows route is faster.)
STATISTIC_CHUNK_ROWS = 1 << 14


def inner_of_rows(X: StructuredMatrix, rows: Tensor) -> StructuredMatrix:
    """``X.inner_of(rows.T) = P(X^T rows^T rows X)`` over chunks of at most
    ``STATISTIC_CHUNK_NUMEL`` numbers (and ``STATISTIC_CHUNK_ROWS`` rows) of ``rows:
    [N, d]``: the statistic is a sum over rows, so the products' temporaries stay
    chunk-sized. By the Gram route (:func:`gram_of_rows`, then ``X`` applied once)
    where ``X.gram_pays(N)``."""
    if X.gram_pays(rows.shape[0]):
        return X.inner_of_gram(gram_of_rows(X, rows))
    return _sum_over_row_chunks(X.inner_of, rows)


def gram_of_rows(X: StructuredMatrix, rows: Tensor) -> StructuredMatrix:
    """``P(rows^T rows)`` in ``X``'s family (:meth:`StructuredMatrix.gram_of`), summed
    over chunks of rows (as :func:`inner_of_rows`) of ``rows: [N, d]``."""
    return _sum_over_row_chunks(X.gram_of, rows)


def _sum_over_row_chunks(statistic, rows: Tensor) -> StructuredMatrix:
    """``sum of statistic(chunk.T)`` over consecutive chunks of at most
    ``STATISTIC_CHUNK_NUMEL`` numbers and ``STATISTIC_CHUNK_ROWS`` rows of ``rows: [N,
    d]`` (one call when all fit)."""
    step = max(1, min(STATISTIC_CHUNK_ROWS, STATISTIC_CHUNK_NUMEL // max(rows.shape[1], 1)))
    H = statistic(rows[:step].T)
    for start in range(step, rows.shape[0], step):
        H.add_(statistic(rows[start : start + step].T))
    return H


def divide_into(a: Tensor, divisor: float, out: Tensor) -> None:
    """``out <- a / divisor`` in one pass (``torch.div`` with ``out=``), or, where
    autograd records it (grad mode on and ``a`` requiring a gradient, which ``out=``
    does not support), as a differentiable copy of the quotient into ``out``."""
    if torch.is_grad_enabled() and a.requires_grad:
        out.copy_(a / divisor)
    else:
        torch.div(a, divisor, out=out)


def finish_input_rows(a: Tensor, with_bias: bool) -> Tensor:
    """Rows ``[N, d (+ 1)]``: ``a`` (``[..., d]`` in any layout, ``N`` = the product
    of its leading sizes) divided by ``sqrt(N)``, and a column of ``1 / sqrt(N)`` for
    the bias.

    One pass over ``a`` writes the divided values straight into the new row-major
    tensor (no separate reshape copy, concatenation and division). (A convolution's
    "expand" rows are written channel-major instead: ``conv.write_patch_columns``.)
    """
    d = a.shape[-1]
    N = prod(a.shape[:-1])
    rows = a.new_empty(N, d + int(with_bias))
    divide_into(a, sqrt(N), rows[:, :d].view(a.shape))
    if with_bias:
        rows[:, d:].fill_(1.0).div_(sqrt(N))
    return rows


def loss_term_count(batch_size: int, shared_size: int, loss_average: str | None) -> int:
    """``n``: the number of terms the loss averages over (1 for a sum loss)."""
    if loss_average is None:
        return 1
    if loss_average == "batch":
        return batch_size
    if loss_average == "batch+sequence":
        return batch_size * shared_size
    raise ValueError(f"loss_average must be one of {LOSS_AVERAGES}, got {loss_average!r}.")


def loss_terms_scale(batch_size: int, shared_size: int, loss_average: str | None) -> float:
    """``sqrt(n)`` with ``n`` the number of terms the loss averages over."""
    return sqrt(loss_term_count(batch_size, shared_size, loss_average))


def linear_input_rows(x: Tensor, kfac_approx: str, with_bias: bool) -> Tensor:
    """Rows of a linear map's input ``[B, ..., d_in]`` (``[d_in]`` is one sample)."""
    if x.ndim == 1:
        x = x.unsqueeze(0)
    if kfac_approx == "expand":
        a = x.reshape(-1, x.shape[-1])
    else:
        a = x.reshape(x.shape[0], -1, x.shape[-1]).mean(1)
    return finish_input_rows(a, with_bias)


def linear_input_count(x: Tensor, kfac_approx: str) -> int:
    """The number of rows :func:`linear_input_rows` gives for ``x``."""
    if x.ndim <= 1:
        return 1
    return prod(x.shape[:-1]) if kfac_approx == "expand" else x.shape[0]


def linear_grad_rows(g: Tensor, loss_average: str | None, kfac_approx: str) -> Tensor:
    """Rows of a linear map's output gradient ``[B, ..., d_out]``."""
    if g.ndim == 1:
        g = g.unsqueeze(0)
    g3 = g.reshape(g.shape[0], -1, g.shape[-1])
    scale = loss_terms_scale(g3.shape[0], g3.shape[1], loss_average)
    rows = g3.reshape(-1, g.shape[-1]) if kfac_approx == "expand" else g3.sum(1)
    return rows * scale


_ADAPTERS: dict[type[nn.Module], LayerAdapter] = {}
_ADAPTERS_BY_NAME: dict[str, LayerAdapter] = {}


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_layer(module_type: type[nn.Module] | str, adapter: LayerAdapter) -> None:
    """Precondition modules of ``module_type`` (and its subclasses that keep its
    ``forward``: see :func:`overrides_forward`) with ``adapter``.

    ``module_type`` may also be a fully qualified class name (``"pkg.mod.Class"``), so
    that a third-party layer is supported without importing its package. The latest
    registration for a class wins, by type or by name; replacing one warns (optimizers
    constructed before keep the adapter they found). :func:`unregister_layer` undoes it.
    """
    if not isinstance(adapter, LayerAdapter):
        raise TypeError(f"adapter must be a LayerAdapter instance, got {type(adapter).__name__}.")
    if isinstance(module_type, str):
        if "." not in module_type.strip("."):
            raise ValueError(
                f"module_type {module_type!r} must be a fully qualified class name "
                "('package.module.Class'), as modules are matched by it."
            )
        name = module_type
    elif isinstance(module_type, type) and issubclass(module_type, nn.Module):
        name = _qualified(module_type)
    else:
        raise TypeError(
            f"module_type must be an nn.Module subclass or a class name, got {module_type!r}."
        )
    old = unregister_layer(module_type)
    if old is not None:
        warnings.warn(
            f"register_layer: {name} had the adapter {type(old).__name__}; now "
            f"{type(adapter).__name__} (optimizers constructed before keep the old one).",
            stacklevel=2,
        )
    if isinstance(module_type, str):
        _ADAPTERS_BY_NAME[name] = adapter
    else:
        _ADAPTERS[module_type] = adapter


def unregister_layer(module_type: type[nn.Module] | str) -> LayerAdapter | None:
    """Remove the adapter registered for ``module_type``: for a class, its own
    registration and one by its fully qualified name; for a name, that one and those
    of classes with that name. Returns the removed adapter (``None`` if none).
    Optimizers constructed before keep it."""
    if isinstance(module_type, str):
        removed = _ADAPTERS_BY_NAME.pop(module_type, None)
        for cls in [c for c in _ADAPTERS if _qualified(c) == module_type]:
            removed = _ADAPTERS.pop(cls)
        return removed
    by_name = _ADAPTERS_BY_NAME.pop(_qualified(module_type), None)
    return _ADAPTERS.pop(module_type, by_name)


def find_adapter(module: nn.Module) -> tuple[LayerAdapter | None, type | None]:
    """The adapter for ``module`` (most specific registered base class) and the class
    it is registered for, or ``(None, None)``."""
    for cls in type(module).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls], cls
        qualified = f"{cls.__module__}.{cls.__qualname__}"
        if qualified in _ADAPTERS_BY_NAME:
            return _ADAPTERS_BY_NAME[qualified], cls
    return None, None


def get_adapter(module: nn.Module) -> LayerAdapter | None:
    """The adapter for ``module`` (most specific registered base class), or ``None``."""
    return find_adapter(module)[0]


def overrides_forward(module: nn.Module, registered: type) -> bool:
    """Whether ``module``'s class derives from ``registered`` and defines another
    ``forward``: what it computes is not known to ``registered``'s adapter (timm's
    ``Conv2dSame`` pads in its forward, ``StdConv2d`` standardises the weight first,
    quantisation-aware layers fake-quantise it)."""
    cls = type(module)
    return cls is not registered and getattr(cls, "forward", None) is not getattr(
        registered, "forward", None
    )
