"""No structured path materialises a dense ``d x d`` matrix (issue: AdamW-level memory).

A dispatch mode records the largest tensor any operator creates during a training
step with capture (forward, backward hooks, ``step``) of a layer of width 4096.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from torchsingd import KFAC, SINGD

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


def test_dense_factors_far_beyond_adamw_state_are_advised_against(monkeypatch) -> None:
    """Above the size and ratio thresholds, dense factors get one warning with the
    state's size and its ratio to the parameters' bytes; structured ones none."""
    import torchsingd.optim.base as base_module

    monkeypatch.setattr(base_module, "DENSE_ADVICE_BYTES", 2**20)  # 1 MiB for the test
    model = torch.nn.Sequential(torch.nn.Linear(1000, 20), torch.nn.Linear(20, 10))
    params = sum(p.numel() * 4 for p in model.parameters())
    dense_floats = 1001**2 + 20**2 + 21**2 + 10**2  # K and C of each layer, float32
    with pytest.warns(UserWarning, match="structured family") as caught:
        opt = SINGD(model)
    advice = [str(w.message) for w in caught if "structured family" in str(w.message)]
    assert len(advice) == 1
    assert opt.state_bytes() >= dense_floats * 4
    assert f"{opt.state_bytes() / params:.1f}x the parameters' bytes" in advice[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SINGD(model, structures="diagonal")  # far below: nothing said
        monkeypatch.setattr(base_module, "DENSE_ADVICE_BYTES", 2**30)
        SINGD(model)  # dense, but below the size threshold
        KFAC(model)
    # KFAC's factors are dense always: it said nothing (282 MiB, 15x a ResNet's bytes)
    monkeypatch.setattr(base_module, "DENSE_ADVICE_BYTES", 2**20)
    with pytest.warns(UserWarning, match="SINGD with a structured family") as caught:
        opt = KFAC(model)
    (advice,) = [str(w.message) for w in caught if "structured family" in str(w.message)]
    assert f"KFAC's state takes {opt.state_bytes() / 2**20:.0f} MiB, " in advice
    assert f"{opt.state_bytes() / params:.1f}x the parameters' bytes" in advice
