"""Train a small MLP on CUDA with every structure, float32 and pure bfloat16; print losses."""

import argparse
import sys
import warnings

import torch
from torch import nn

from torchsingd import SINGD

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--device", default="cuda", help="the GPU (default: cuda)")
dev = torch.device(parser.parse_args().device)
if dev.type == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_smoke.py needs a CUDA device (torch.cuda.is_available() is False).")
warnings.filterwarnings("ignore")
gen = torch.Generator().manual_seed(0)
X = torch.randn(512, 32, generator=gen).to(dev)
y = (X[:, :4].sum(1) > 0).long().to(dev)
structures = [
    "dense",
    "diagonal",
    "blockdiagonal:16",
    "hierarchical:8,8",
    "triltoeplitz",
    "triutoeplitz",
    "triltopleftdiag:2",
    "trilbottomrightdiag:2",
]
for dtype in (torch.float32, torch.bfloat16):
    for s in structures:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 2)).to(dev, dtype)
        opt = SINGD(model, lr=1e-2, lr_cov=5e-2, damping=1e-2, T=2, structures=(s, s))
        first = None
        for _ in range(60):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(X.to(dtype)).float(), y)
            loss.backward()
            opt.step()
            first = loss.item() if first is None else first
        finite = all(torch.isfinite(p).all() for p in model.parameters())
        print(f"{str(dtype):15s} {s:22s} loss {first:.3f} -> {loss.item():.3f} finite={finite}")
