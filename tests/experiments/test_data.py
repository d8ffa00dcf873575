"""The embedded data sets: documented shapes, class counts, determinism per seed."""

import random

import numpy as np
import pytest
import torch

from torchsingd.experiments import data
from torchsingd.experiments.tasks import TASKS


def test_digits_shapes_classes_and_range():
    d = data.digits(0)
    assert d.X_train.shape == (1437, 1, 8, 8) and d.X_test.shape == (360, 1, 8, 8)
    assert d.y_train.shape == (1437,) and d.y_test.shape == (360,)
    assert d.X_train.dtype == torch.float32 and d.y_train.dtype == torch.long
    assert d.X_train.min() >= 0.0 and d.X_train.max() <= 1.0
    assert set(d.y_train.tolist()) == set(range(10)) == set(d.y_test.tolist())


def test_digits_split_is_fixed_by_the_seed():
    a, b, c = data.digits.__wrapped__(0), data.digits.__wrapped__(0), data.digits.__wrapped__(1)
    assert torch.equal(a.X_train, b.X_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_test, c.y_test)
    # a split, not a resampling: train and test together are the 1797 images
    from sklearn.datasets import load_digits

    both = torch.cat([a.X_train, a.X_test]).flatten(1)
    full = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    assert torch.allclose(both.sum(0), full.sum(0)) and len(both) == len(full)


def test_mnist1d_shapes_classes_determinism_and_rng_hygiene():
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    a = data.mnist1d.__wrapped__(0, n_train=400, n_test=100)
    assert (np.random.rand(), random.random()) == (expected_np, expected_py)
    b = data.mnist1d.__wrapped__(0, n_train=400, n_test=100)
    c = data.mnist1d.__wrapped__(1, n_train=400, n_test=100)
    assert a.X_train.shape == (400, 1, 40) and a.X_test.shape == (100, 1, 40)
    assert a.X_train.dtype == torch.float32 and a.y_train.dtype == torch.long
    assert set(a.y_train.tolist()) == set(range(10))
    assert torch.equal(a.X_train, b.X_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.X_train, c.X_train)


def test_stdlib_text_windows_are_shifted_characters():
    d = data.stdlib_text.__wrapped__(0, n_chars=6600, context=32)
    n = 6600 // 33
    assert d.X_test.shape == (n // 10, 32) and d.X_train.shape == (n - n // 10, 32)
    assert d.y_train.shape == d.X_train.shape
    assert torch.equal(d.X_train[:, 1:], d.y_train[:, :-1])  # y is x shifted by one
    assert int(d.X_train.min()) >= 0 and int(d.X_train.max()) < data.VOCAB_SIZE
    text = data.stdlib_source(6600)
    assert "def " in text and len(text) == 6600
    assert data.encode("a\n\t")[2] == data.UNKNOWN and data.VOCABULARY[data.encode("a")[0]] == "a"
    e = data.stdlib_text.__wrapped__(0, n_chars=6600, context=32)
    f = data.stdlib_text.__wrapped__(1, n_chars=6600, context=32)
    assert torch.equal(d.X_test, e.X_test) and not torch.equal(d.X_test, f.X_test)


def test_validation_split_holds_out_the_last_fifth():
    X, y = torch.arange(50).view(25, 2), torch.arange(25)
    s = data.validation_split(X, y)
    assert s.y_train.tolist() == list(range(20)) and s.y_test.tolist() == list(range(20, 25))


@pytest.mark.parametrize("name", list(TASKS))
def test_task_models_fit_their_data(name):
    task = TASKS[name]
    split = task.load(0)
    torch.manual_seed(0)
    model = task.model()
    out = model(split.X_test[:4])
    loss = task.loss(out, split.y_test[:4])
    assert loss.ndim == 0 and torch.isfinite(loss)
    metric = task.metric(out, split.y_test[:4])
    assert np.isfinite(metric)
    if task.metric_name == "accuracy":
        assert out.shape == (4, 10)
    elif task.metric_name == "bits/char":
        assert out.shape == (*split.y_test[:4].shape, data.VOCAB_SIZE)
        assert 5.0 < metric < 8.0  # an untrained model: about log2(97) = 6.6 bits
    else:
        assert out.shape == (4, 64) and torch.equal(split.y_test, split.X_test.flatten(1))


@pytest.mark.parametrize("name", ["digits-mlp", "charlm", "autoencoder"])
def test_chance_is_the_metric_of_a_model_that_ignores_its_input(name):
    """Against float64 sums over the examples (Python counts for the characters)."""
    from collections import Counter

    from torchsingd.experiments.tasks import chance

    split = TASKS[name].load(0)
    value = chance(TASKS[name], split)
    if name == "digits-mlp":
        assert value == 1 / 10
    elif name == "charlm":
        counts = Counter(split.y_train.flatten().tolist())
        total = sum(counts.values()) + 0.5 * data.VOCAB_SIZE
        test = split.y_test.flatten().tolist()
        bits = -sum(np.log2((counts[c] + 0.5) / total) for c in test) / len(test)
        assert value == pytest.approx(bits, rel=1e-5)
        assert 3 < value < np.log2(data.VOCAB_SIZE)  # below uniform: frequencies help
    else:
        train = split.y_train.double().numpy()
        test = split.y_test.double().numpy()
        assert value == pytest.approx(((test - train.mean(0)) ** 2).mean(), rel=1e-5)
