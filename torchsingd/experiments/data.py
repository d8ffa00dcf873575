"""Embedded datasets (no download): scikit-learn's bundled 8x8 handwritten digits."""

from __future__ import annotations

import torch
from torch import Tensor


def digits(seed: int = 0, test_fraction: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(X_train, y_train, X_test, y_test)``: 1797 images ``[N, 1, 8, 8]`` in [0, 1], 10 classes.

    The split is fixed by ``seed`` (a stratified-free random permutation).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The digits task needs scikit-learn: pip install 'torchsingd[experiments]'."
        ) from err
    data = load_digits()
    X = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    return X[train], y[train], X[test], y[test]
