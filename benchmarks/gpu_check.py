"""SINGD on CUDA computes what it computes on the CPU: a check for a machine with a GPU.

The test suite runs on the CPU only (CI has no GPU). This script, run where CUDA is
available, trains the same models from the same initial weights on both devices and
prints, per model and structure pair, ``max|p_cuda - p_cpu| / max|p_cpu - p_init|``
over all parameters after a few steps:

1. every model of the test zoo (``tests/test_zoo.py``: ViT, GPT, ResNet, 1-d/3-d
   convolutions, U-Net with a transposed convolution, Embedding, EmbeddingBag, GCN)
   with every structure family, CUDA float64 against CPU float64 (the same function:
   differences are reduction order, so ``<= 1e-8``) and CUDA float32 (TF32 off)
   against CPU float64 (``<= 1e-3``);
2. the benchmark's MLP and CNN with the structures the reference supports, ours on
   CUDA against the reference (``singd==0.0.5``, when importable) on CUDA, float32,
   mild hyper-parameters where our safeguards do not act (``<= 1e-3``);
3. every zoo model in pure bfloat16 on CUDA: the loss falls and nothing is NaN.

Exit status 1 if any line fails. ``python benchmarks/gpu_check.py`` (about a minute).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from torchsingd import SINGD
from torchsingd.experiments.bench import MODELS, REFERENCE_NAMES, reference_cls

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [
    ("dense", "dense"),
    ("diagonal", "diagonal"),
    ("blockdiagonal:8", "hierarchical:3,2"),
    ("triltoeplitz", "triutoeplitz"),
    ("triltopleftdiag:2", "trilbottomrightdiag:2"),
    ("triutopleftdiag:1", "triubottomrightdiag:3"),
]
HYPER = dict(lr=0.02, lr_cov=0.05, damping=1e-2, T=2, momentum=0.9, warn_unsupported=False)


def load_zoo():
    spec = importlib.util.spec_from_file_location("zoo", ROOT / "tests" / "test_zoo.py")
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)
    return zoo


def move(x, device, dtype):
    if isinstance(x, tuple):
        return tuple(move(t, device, dtype) for t in x)
    x = x.to(device)
    return x.to(dtype) if x.is_floating_point() else x


def train_zoo(zoo, name, structures, device, dtype, steps=4):
    make_model, make_data, loss_average = zoo.ZOO[name]
    torch.manual_seed(0)
    model = make_model().double()  # the same initial weights on every device/dtype
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = model.to(device=device, dtype=dtype)
    x, y = make_data(torch.Generator().manual_seed(1))
    x, y = move(x, device, dtype), y.to(device)
    opt = SINGD(model, loss_average=loss_average, structures=structures, fallback_lr=0.01, **HYPER)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        out = out.float() if out.dtype in (torch.bfloat16, torch.float16) else out
        loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    params = {n: p.detach().double().cpu() for n, p in model.named_parameters()}
    return init, params, losses, opt.skipped_steps


def rel(init, ref, other) -> float:
    worst = 0.0
    for n, p0 in init.items():
        moved = (ref[n] - p0).abs().max().item()
        if moved == 0.0:
            continue
        diff = (other[n] - ref[n]).abs().max().item()
        worst = max(worst, diff / moved if math.isfinite(diff) else math.inf)
    return worst


def main() -> int:
    warnings.filterwarnings("ignore")
    # ``python benchmarks/gpu_check.py cpu``: a dry run of the script without a GPU
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("device", nargs="?", default="cuda", help="the GPU (default: cuda)")
    cuda = torch.device(parser.parse_args().device)
    if cuda.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    zoo = load_zoo()
    names = list(zoo.ZOO)
    if importlib.util.find_spec("torch_geometric") is None:
        names.remove("gcn")
    failures = []
    t0 = time.perf_counter()

    print("1. zoo, CUDA vs CPU float64 (4 steps, T=2): worst relative difference")
    print("| model | structures | cuda f64 | cuda f32 |")
    print("|---|---|---|---|")
    for name in names:
        for pair in PAIRS:
            init, cpu, _, _ = train_zoo(zoo, name, pair, "cpu", torch.float64)
            _, c64, _, _ = train_zoo(zoo, name, pair, cuda, torch.float64)
            _, c32, _, _ = train_zoo(zoo, name, pair, cuda, torch.float32)
            r64, r32 = rel(init, cpu, c64), rel(init, cpu, c32)
            ok = r64 <= 1e-8 and r32 <= 1e-3
            if not ok:
                failures.append(f"zoo {name} {pair}: {r64:.2e} / {r32:.2e}")
            flag = "" if ok else " FAIL"
            print(f"| {name} | {','.join(pair)} | {r64:.1e} | {r32:.1e}{flag} |", flush=True)

    ref = reference_cls()
    print("\n2. ours vs the reference, both on CUDA, float32 (6 steps, T=1, lr 5e-3)")
    if ref is None:
        print("reference not importable: skipped")
    else:
        print("| model | structure | worst relative difference |")
        print("|---|---|---|")
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(6, 32, 1, 28, 28, generator=gen)
        y = torch.randint(0, 10, (6, 32), generator=gen)
        for model_name in ("mlp", "cnn"):
            for ours_name, ref_name in REFERENCE_NAMES.items():
                runs = []
                for impl in ("ref", "ours"):
                    torch.manual_seed(0)
                    model = MODELS[model_name]().to(cuda)
                    init = {n: p.detach().double().cpu() for n, p in model.named_parameters()}
                    kw = dict(lr=5e-3, lr_cov=5e-3, damping=1e-3, T=1, momentum=0.9)
                    if impl == "ref":
                        opt = ref(model, structures=(ref_name, ref_name), **kw)
                    else:
                        opt = SINGD(model, structures=ours_name, **kw)
                    for xb, yb in zip(x, y, strict=True):
                        opt.zero_grad()
                        nn.functional.cross_entropy(model(xb.to(cuda)), yb.to(cuda)).backward()
                        opt.step()
                    runs.append({n: p.detach().double().cpu() for n, p in model.named_parameters()})
                r = rel(init, *runs)
                ok = r <= 1e-3
                if not ok:
                    failures.append(f"reference {model_name} {ours_name}: {r:.2e}")
                print(
                    f"| {model_name} | {ours_name} | {r:.1e}{'' if ok else ' FAIL'} |", flush=True
                )

    print("\n3. zoo in pure bfloat16 on CUDA (20 steps): first -> last loss")
    print("| model | structures | loss | skipped |")
    print("|---|---|---|---|")
    for name in names:
        for pair in (("blockdiagonal:8", "diagonal"), ("hierarchical:3,2", "triltoeplitz")):
            _, params, losses, skipped = train_zoo(zoo, name, pair, cuda, torch.bfloat16, 20)
            finite = all(torch.isfinite(p).all() for p in params.values())
            ok = finite and losses[-1] < 0.8 * losses[0] and skipped == 0
            if not ok:
                failures.append(f"bf16 {name} {pair}: {losses[0]:.3f} -> {losses[-1]:.3f}")
            print(
                f"| {name} | {','.join(pair)} | {losses[0]:.3f} -> {losses[-1]:.3f} | "
                f"{skipped}{'' if ok else ' FAIL'} |",
                flush=True,
            )

    where = torch.cuda.get_device_name() if cuda.type == "cuda" else "CPU (dry run)"
    print(f"\n{where}, torch {torch.__version__}, ", end="")
    print(f"{time.perf_counter() - t0:.0f} s; failures: {len(failures)}")
    for f in failures:
        print("  " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
