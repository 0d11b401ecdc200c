#!/usr/bin/env python3
"""Train a small PReLU MLP with PyTorch and save it the way `prelu` imports it.

    python3 scripts/torch_export_example.py [OUT_DIR]

Writes (default OUT_DIR tests/vectors):
  torch_mlp.safetensors  the state_dict (PyTorch names: layers.i.*, bn.i.*, act.i.weight)
  torch_mlp.spec.json    the prelu model spec describing the layers
  torch_mlp.json         PyTorch's own test accuracy on the built-in mnist-small test set

The module's attribute names (`layers`, `bn`, `act` as ModuleLists) are what
make its state_dict names match prelu's. Needs torch and safetensors; run
once, the outputs are committed so tests need no Python.
"""
import gzip
import json
import struct
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/vectors")
DATA = Path("data/mnist-small")
torch.manual_seed(0)


def idx(name):
    raw = gzip.open(DATA / f"{name}.gz", "rb").read()
    nd = raw[3]
    dims = struct.unpack(">" + "I" * nd, raw[4 : 4 + 4 * nd])
    return torch.frombuffer(bytearray(raw[4 + 4 * nd :]), dtype=torch.uint8).reshape(dims)


xtr = idx("train-images-idx3-ubyte").float().div(255).reshape(-1, 784)
ytr = idx("train-labels-idx1-ubyte").long()
xte = idx("t10k-images-idx3-ubyte").float().div(255).reshape(-1, 784)
yte = idx("t10k-labels-idx1-ubyte").long()
MEAN, STD = float(xtr.mean()), float(xtr.std(unbiased=False))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(784, 64), nn.Linear(64, 10)])
        self.bn = nn.ModuleList([nn.BatchNorm1d(64)])
        self.act = nn.ModuleList([nn.PReLU(64)])

    def forward(self, x):
        x = (x - MEAN) / STD
        x = self.act[0](self.bn[0](self.layers[0](x)))
        return self.layers[1](x)


model = Mlp()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
for epoch in range(3):
    perm = torch.randperm(xtr.shape[0])
    model.train()
    for i in range(0, xtr.shape[0], 128):
        idx_ = perm[i : i + 128]
        opt.zero_grad()
        F.cross_entropy(model(xtr[idx_]), ytr[idx_]).backward()
        opt.step()
model.eval()
with torch.no_grad():
    acc = float((model(xte).argmax(1) == yte).float().mean())

OUT.mkdir(parents=True, exist_ok=True)
sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
save_file(sd, str(OUT / "torch_mlp.safetensors"))
spec = {
    "arch": {"kind": "mlp", "hidden": [64]},
    "act": {"prelu": {"shared": False}},
    "alpha_init": 0.25,
    "slope_constraint": "none",
    "batch_norm": True,
    "init": "he-prelu",
    "input": [1, 28, 28],
    "classes": 10,
    "input_mean": MEAN,
    "input_std": STD,
}
(OUT / "torch_mlp.spec.json").write_text(json.dumps(spec, indent=1) + "\n")
(OUT / "torch_mlp.json").write_text(json.dumps({"torch": torch.__version__, "data": "mnist-small", "split": "test", "examples": int(yte.shape[0]), "test_acc": acc}) + "\n")
print(f"PyTorch test accuracy {acc:.4f}; wrote {OUT}/torch_mlp.*")
