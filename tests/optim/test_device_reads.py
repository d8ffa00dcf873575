"""How often one SINGD step reads numbers back from the device.

On a GPU every ``float(t)``, ``bool(t)``, ``t.item()`` or ``t.tolist()`` of a device
tensor waits for all queued kernels and copies back; measured on an H200
(``benchmarks/gpu_profile.py``), a step of the benchmark's MLP with ``T=1`` did 34-42
such reads, the reference 17. A factor update now reads its four average traces, the
two factor-step bounds and the two factors' finiteness in one read each: three per
layer, plus two per step (the directions' finiteness and the trust region's inner
product). The tests count the reads on the CPU through the same Python entry points.
"""

from __future__ import annotations

import math

import pytest
import torch

from torchsingd import SINGD
from torchsingd.experiments.bench import STRUCTURES as BENCH_STRUCTURES
from torchsingd.experiments.bench import data, mlp
from torchsingd.structures import base, get_structure
from torchsingd.structures.base import read_scalars, round_float32

READS = ("__float__", "__bool__", "__int__", "item", "tolist")


@pytest.fixture
def reads(monkeypatch):
    """Counts the reads of tensor values into Python, with the CPU treated as a device
    whose reads wait (as a GPU's do; on the CPU ``read_scalars`` reads one by one)."""
    monkeypatch.setattr(base, "_read_waits", lambda device: True)
    counter = {"n": 0}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counter["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counter


STRUCTURES = [*BENCH_STRUCTURES, "trilbottomrightdiag:2"]  # the benchmark's and one more


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("T", [1, 10])
def test_reads_per_step(reads, structure, T):
    torch.manual_seed(0)
    model = mlp()  # 4 layers
    opt = SINGD(model, structures=structure, T=T, lr=1e-3, lr_cov=1e-2)
    x, y = data(32, torch.device("cpu"), torch.float32)
    counts = []
    for _ in range(12):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        before = reads["n"]
        opt.step()
        counts.append(reads["n"] - before)
    assert opt.safeguard_events["factor_step_bounded"] == 0  # else one read more, by design
    update = [c for step, c in enumerate(counts) if step % T == 0]
    other = [c for step, c in enumerate(counts) if step % T != 0]
    assert max(update) <= 3 * 4 + 2, counts  # was 8 (diagonal) to 10 per layer
    assert all(c <= 2 for c in other), counts


@pytest.mark.parametrize("batched", [False, True], ids=["cpu", "as-on-a-gpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_read_scalars_equals_float(dtype, batched, monkeypatch):
    if batched:  # the stacked reads a GPU gets
        monkeypatch.setattr(base, "_read_waits", lambda device: True)
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn((), generator=gen).to(dtype) for _ in range(3)]
    values += [
        torch.tensor(3.0, dtype=torch.float64),
        torch.tensor([[7.5]]),
        torch.tensor(math.inf),
    ]
    assert read_scalars(values) == [float(v) for v in values]
    assert read_scalars([]) == []


def test_round_float32():
    for x in (0.1, 1 / 3, -2.7e-30, 3.4028234663852886e38, 1e-46):
        assert round_float32(x) == torch.tensor(x, dtype=torch.float32).item()
    assert round_float32(1e39) == math.inf and round_float32(-1e39) == -math.inf
    assert math.isnan(round_float32(math.nan))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_diagonal_bound_decides_as_the_step_product(dtype):
    """``bounded_step`` decides from ``max|d|`` what the step ``beta * d`` (computed
    in at least float32) decides: at betas within an ulp of the threshold too."""
    gen = torch.Generator().manual_seed(1)
    wide = torch.promote_types(dtype, torch.float32)
    spec = get_structure("diagonal")
    decided = set()
    for trial in range(200):
        d = (torch.randn(37, generator=gen) * 10 ** (trial % 7 - 3)).to(dtype)
        m = spec.from_dense(torch.diag(d))
        largest = d.abs().max().to(torch.float64).item()
        for max_step in (0.5, 0.1):
            base = max_step / largest
            for beta in (base, math.nextafter(base, 0), math.nextafter(base, 2), base * (1 + 1e-7)):
                expected = bool(((d.to(wide) * beta).abs().max() > max_step).item())
                got = m.bounded_step(beta, max_step) is not None
                assert got == expected, (dtype, beta, max_step)
                decided.add(got)
    assert decided == {True, False}  # both sides of the threshold were met
