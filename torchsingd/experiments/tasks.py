"""The comparison tasks: data, model, loss and test metric, default budget.

| task | data (train / test) | model | metric |
|---|---|---|---|
| ``digits-mlp`` | 8x8 digits, 1437 / 360 | MLP 64-128-128-10 | accuracy |
| ``digits-cnn`` | 8x8 digits, 1437 / 360 | 2 Conv2d + Linear | accuracy |
| ``mnist1d-cnn`` | MNIST-1D, 4000 / 1000 | 3 Conv1d + Linear | accuracy |
| ``charlm`` | stdlib source, 1637 / 181 windows of 32 chars | causal transformer | bits/char |
| ``charlm-lstm`` | the same | 2-layer LSTM | bits/char |
| ``autoencoder`` | 8x8 digits, 1437 / 360 | MLP 64-128-64-32-8-...-64 | reconstruction MSE |
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from torchsingd.experiments import data, models

CHARLM_CONTEXT = 32
CHARLM_CHARS = 60_000


@dataclass(frozen=True)
class Task:
    """One task of the comparison.

    ``load(data_seed)`` gives the fixed train/test :class:`~.data.Split`; ``model()``
    a fresh model (initialised from torch's global RNG); ``loss(output, target)`` the
    mean training loss; ``metric(output, target)`` the test metric of a batch (a mean
    over its examples, so batch means combine by example counts).
    """

    name: str
    description: str
    load: Callable[[int], data.Split]
    model: Callable[[], nn.Module]
    loss: Callable[[Tensor, Tensor], Tensor]
    metric: Callable[[Tensor, Tensor], float]
    metric_name: str
    higher_is_better: bool
    epochs: int
    batch_size: int
    quick_epochs: int
    quick_train: int  # training examples used by --quick
    #: loss terms the mean loss averages, for SINGD/KFAC's statistics: ``"batch"``, or
    #: ``"batch+sequence"`` where it averages over every token of every sequence
    loss_average: str = "batch"


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of ``logits [B, C]`` whose argmax is ``labels [B]``."""
    return (logits.argmax(-1) == labels).float().mean().item()


def sequence_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy (nats per character) of ``logits [B, L, V]`` for ``targets [B, L]``."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def bits_per_character(logits: Tensor, targets: Tensor) -> float:
    """Mean cross-entropy in bits per character."""
    return sequence_loss(logits, targets).item() / math.log(2)


def reconstruction_mse(output: Tensor, target: Tensor) -> float:
    """Mean squared error per pixel of ``output [B, 64]`` against ``target [B, 64]``."""
    return F.mse_loss(output, target).item()


def squared_error(output: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over pixels, averaged over images (``[B, 64]`` each)."""
    return F.mse_loss(output, target, reduction="sum") / len(target)


def autoencoder_data(seed: int) -> data.Split:
    """Digits as their own targets: inputs ``[N, 1, 8, 8]``, targets ``[N, 64]``."""
    d = data.digits(seed)
    return data.Split(d.X_train, d.X_train.flatten(1), d.X_test, d.X_test.flatten(1))


def charlm_data(seed: int) -> data.Split:
    return data.stdlib_text(seed, n_chars=CHARLM_CHARS, context=CHARLM_CONTEXT)


def charlm_model() -> nn.Module:
    return models.CharTransformer(data.VOCAB_SIZE, CHARLM_CONTEXT)


def charlm_lstm_model() -> nn.Module:
    return models.CharLSTM(data.VOCAB_SIZE)


#: the character language model; ``charlm-lstm`` is the same task with an LSTM
CHARLM = Task(
    "charlm",
    "2-layer causal transformer (d=32) on Python stdlib source characters",
    charlm_data,
    charlm_model,
    sequence_loss,
    bits_per_character,
    "bits/char",
    False,
    epochs=3,
    batch_size=32,
    quick_epochs=1,
    quick_train=512,
    loss_average="batch+sequence",
)

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "digits-mlp",
            "MLP 64-128-128-10 on scikit-learn's 8x8 digits",
            data.digits,
            models.digits_mlp,
            F.cross_entropy,
            accuracy,
            "accuracy",
            True,
            epochs=10,
            batch_size=64,
            quick_epochs=4,
            quick_train=768,
        ),
        Task(
            "digits-cnn",
            "2 Conv2d + Linear on scikit-learn's 8x8 digits",
            data.digits,
            models.digits_cnn,
            F.cross_entropy,
            accuracy,
            "accuracy",
            True,
            epochs=8,
            batch_size=64,
            quick_epochs=3,
            quick_train=512,
        ),
        Task(
            "mnist1d-cnn",
            "3 Conv1d + Linear on MNIST-1D (4000 train / 1000 test)",
            data.mnist1d,
            models.mnist1d_cnn,
            F.cross_entropy,
            accuracy,
            "accuracy",
            True,
            epochs=6,
            batch_size=128,
            quick_epochs=2,
            quick_train=1024,
        ),
        CHARLM,
        dataclasses.replace(
            CHARLM,
            name="charlm-lstm",
            description="2-layer LSTM (width 64) on Python stdlib source characters",
            model=charlm_lstm_model,
        ),
        Task(
            "autoencoder",
            "deep MLP autoencoder 64-128-64-32-8-32-64-128-64 on 8x8 digits",
            autoencoder_data,
            models.autoencoder,
            squared_error,
            reconstruction_mse,
            "mse",
            False,
            epochs=10,
            batch_size=64,
            quick_epochs=3,
            quick_train=512,
        ),
    )
}


def chance(task: Task, split: data.Split) -> float:
    """The test metric of a model that ignores its input: ``1 / classes`` for accuracy;
    otherwise the metric of the best constant output fitted on the training set (the
    mean training target for MSE; the training characters' frequencies, add-1/2
    smoothed, for bits/char: the unigram model)."""
    if task.metric_name == "accuracy":
        return 1.0 / int(split.y_train.max().item() + 1)
    if task.metric_name == "bits/char":
        vocab = max(data.VOCAB_SIZE, int(split.y_train.max().item()) + 1)
        counts = torch.bincount(split.y_train.flatten(), minlength=vocab).double() + 0.5
        logits = (counts / counts.sum()).log().float()
        return task.metric(logits.expand(*split.y_test.shape, vocab), split.y_test)
    mean = split.y_train.float().mean(0, keepdim=True)
    return task.metric(mean.expand_as(split.y_test), split.y_test)


@torch.no_grad()
def evaluate(
    task: Task, model: nn.Module, X: Tensor, y: Tensor, batch_size: int = 512
) -> tuple[float, float]:
    """``(mean loss, metric)`` of ``model`` on ``X``, ``y`` (weighted by batch sizes).

    Runs in the caller's precision context (autocast or not); outputs are cast to
    float32 before the loss, as in training.
    """
    loss_sum, metric_sum = 0.0, 0.0
    for start in range(0, len(y), batch_size):
        xb, yb = X[start : start + batch_size], y[start : start + batch_size]
        out = model(xb).float()
        loss_sum += task.loss(out, yb).item() * len(yb)
        metric_sum += task.metric(out, yb) * len(yb)
    return loss_sum / len(y), metric_sum / len(y)
