"""Hugging Face's ``Conv1D`` (``y = x @ W + b``, ``W`` stored ``[d_in, d_out]``).

It is registered by its qualified name, so these tests define a class with that name
(our own forward, as documented by transformers: ``addmm(b, x.view(-1, d_in), W)``
viewed back). SINGD and KFAC must take exactly the steps of the ``nn.Linear`` with
weight ``W^T`` (whose steps are checked against the reference elsewhere), in float64.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from torchsingd import KFAC, SINGD


class Conv1D(nn.Module):
    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(*x.shape[:-1], self.nf)


Conv1D.__module__ = "transformers.pytorch_utils"


def pair() -> tuple[nn.Module, nn.Module]:
    """A GPT-2-style MLP block of Conv1D layers and the same one of nn.Linear layers."""
    torch.manual_seed(0)
    a = nn.Sequential(Conv1D(8, 5), nn.ReLU(inplace=True), Conv1D(3, 8)).double()
    b = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        for conv, lin in ((a[0], b[0]), (a[2], b[2])):
            lin.weight.copy_(conv.weight.T)
            lin.bias.copy_(conv.bias)
    return a, b


def train(model: nn.Module, opt, steps: int = 4) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 6, 5, generator=gen, dtype=torch.float64)
        y = torch.randn(4, 6, 3, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


CASES = [("singd", s) for s in ("dense", "diagonal", "hierarchical:2,2", "triltoeplitz")]


@pytest.mark.parametrize(("impl", "structure"), [*CASES, ("kfac", "dense")])
def test_conv1d_steps_equal_the_transposed_linear(impl: str, structure: str) -> None:
    a, b = pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every parameter preconditioned: nothing said
        if impl == "singd":
            kw = dict(lr=0.05, lr_cov=0.05, T=2, structures=structure, weight_decay=1e-3)
            opt_a, opt_b = SINGD(a, **kw), SINGD(b, **kw)
        else:
            opt_a, opt_b = KFAC(a, lr=0.05, damping=1e-2, T=2), KFAC(b, lr=0.05, damping=1e-2, T=2)
    assert set(opt_a.layers) == {"0", "2"} and not opt_a.fallback_parameters
    train(a, opt_a)
    train(b, opt_b)
    for i in (0, 2):
        torch.testing.assert_close(a[i].weight, b[i].weight.T, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(a[i].bias, b[i].bias, rtol=1e-12, atol=1e-13)
        assert a[i].weight.is_contiguous()
    assert (a[0].weight - pair()[0][0].weight).abs().max() > 1e-3  # it did train


def test_conv1d_checkpoint_round_trip() -> None:
    a, _ = pair()
    opt = SINGD(a, lr=0.05, T=1, structures="diagonal")
    train(a, opt, steps=2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # (in memory it would share the live buffers)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    copy, _ = pair()
    copy.load_state_dict(a.state_dict())
    opt2 = SINGD(copy, lr=0.05, T=1, structures="diagonal")
    opt2.load_state_dict(state)
    train(a, opt, steps=1)
    train(copy, opt2, steps=1)
    for p, q in zip(a.parameters(), copy.parameters(), strict=True):
        assert torch.equal(p, q)
