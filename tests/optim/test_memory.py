"""No structured path materialises a dense ``d x d`` matrix (issue: AdamW-level memory).

A dispatch mode records the largest tensor any operator creates during a training
step with capture (forward, backward hooks, ``step``) of a layer of width 4096.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from torchsingd import SINGD

WIDTH = 4096
STRUCTURED = [
    "diagonal",
    "blockdiagonal:32",
    "hierarchical:16,16",
    "triltoeplitz",
    "triutoeplitz",
    "triltopleftdiag:4",
    "trilbottomrightdiag:4",
    "triutopleftdiag:4",
    "triubottomrightdiag:4",
]


class LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("structure", STRUCTURED)
def test_training_step_creates_no_dense_factor_sized_tensor(structure):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, 8), nn.ReLU(), nn.Linear(8, WIDTH))
    opt = SINGD(model, structures=structure, T=1)
    x = torch.randn(16, WIDTH)
    with LargestTensor() as mode:
        for _ in range(2):  # the second step also uses the factors updated by the first
            opt.zero_grad()
            nn.functional.mse_loss(model(x), x).backward()
            opt.step()
    dense_factor = (WIDTH + 1) ** 2
    assert 0 < mode.largest < dense_factor // 16, (structure, mode.largest)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_dense_structure_is_detected_by_the_probe():
    """The probe itself sees a dense factor when there is one (it can fail)."""
    model = nn.Sequential(nn.Linear(512, 8))
    opt = SINGD(model, structures="dense", T=1)
    x = torch.randn(4, 512)
    with LargestTensor() as mode:
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    assert mode.largest >= 513 * 513
