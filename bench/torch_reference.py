#!/usr/bin/env python3
"""PyTorch CPU reference for `prelu bench train`: the same networks, batch sizes
and step (forward, cross-entropy, backward, SGD momentum 0.9 update).

    python3 bench/torch_reference.py --threads 2 [--json] [--epoch-data DIR]

Prints `mlp_step_ms` and `cnn_step_ms`, medians over --steps steps (50) after
--warmup untimed steps (5), the same counts as `prelu bench train`, on random
inputs in [0, 1) (the timing does not depend on the
data). With --epoch-data DIR (a folder with MNIST's IDX files), also times one
full MNIST epoch of the MLP (`mlp_epoch_s`).

MLP: 784-512-512-10, per-channel PReLU after each hidden layer, batch 128.
CNN: conv 1-32 3x3, PReLU, conv 32-64 3x3, PReLU, max-pool 2, linear 9216-128,
PReLU, linear 128-10, batch 64.
ResNet-20: the `resnet-20 --batch-norm --act prelu` preset's PyTorch twin from
scripts/torch_presets.py (BN, per-channel PReLU, 1x28x28), batch 128
(`resnet_step_ms`).
"""
import argparse
import gzip
import json
import statistics
import struct
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


def mlp():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.PReLU(512), nn.Linear(512, 512), nn.PReLU(512), nn.Linear(512, 10)
    )


class Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3)
        self.a1 = nn.PReLU(32)
        self.c2 = nn.Conv2d(32, 64, 3)
        self.a2 = nn.PReLU(64)
        self.f1 = nn.Linear(9216, 128)
        self.a3 = nn.PReLU(128)
        self.f2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.a2(self.c2(self.a1(self.c1(x))))
        x = torch.flatten(F.max_pool2d(x, 2), 1)
        return self.f2(self.a3(self.f1(x)))


def resnet20():
    import importlib.util

    spec = importlib.util.spec_from_file_location("torch_presets", Path(__file__).resolve().parent.parent / "scripts/torch_presets.py")
    presets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(presets)
    arch = {"kind": "resnet", "depth": 20, "shortcuts": True}
    return presets.ResNet(presets.spec_of(arch, {"p-relu": {"shared": False}}, True, [1, 28, 28]))


def step_ms(model, x, y, steps, warmup):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def one():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(warmup):
        one()
    t = []
    for _ in range(steps):
        s = time.perf_counter()
        one()
        t.append(time.perf_counter() - s)
    return statistics.median(t) * 1e3


def read_idx(path):
    data = gzip.open(path, "rb").read()
    nd = data[3]
    dims = struct.unpack(">" + "I" * nd, data[4 : 4 + 4 * nd])
    return torch.frombuffer(bytearray(data[4 + 4 * nd :]), dtype=torch.uint8).reshape(dims)


def mnist_epoch_s(folder):
    x = read_idx(Path(folder) / "train-images-idx3-ubyte.gz").float().div(255).reshape(-1, 784)
    y = read_idx(Path(folder) / "train-labels-idx1-ubyte.gz").long()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(x.shape[0], generator=g)
    s = time.perf_counter()
    for i in range(0, x.shape[0], 128):
        idx = perm[i : i + 128]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return time.perf_counter() - s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--epoch-data")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    out = {"torch": torch.__version__, "threads": a.threads, "steps": a.steps}
    out["mlp_step_ms"] = step_ms(mlp(), torch.rand(128, 784), torch.randint(0, 10, (128,)), a.steps, a.warmup)
    out["cnn_step_ms"] = step_ms(Cnn(), torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,)), a.steps, a.warmup)
    out["resnet_step_ms"] = step_ms(resnet20().train(), torch.rand(128, 784), torch.randint(0, 10, (128,)), a.steps, a.warmup)
    if a.epoch_data:
        out["mlp_epoch_s"] = mnist_epoch_s(a.epoch_data)
    if a.json:
        print(json.dumps(out))
    else:
        print(f"PyTorch {out['torch']}, {a.threads} thread(s), median of {a.steps} steps")
        print(f"  MLP 784-512-512-10 PReLU, batch 128: {out['mlp_step_ms']:.2f} ms")
        print(f"  CNN conv32-conv64-pool-9216-128-10 PReLU, batch 64: {out['cnn_step_ms']:.2f} ms")
        print(f"  ResNet-20 BN PReLU, batch 128: {out['resnet_step_ms']:.2f} ms")
        if "mlp_epoch_s" in out:
            print(f"  one MNIST epoch of the MLP: {out['mlp_epoch_s']:.2f} s")


if __name__ == "__main__":
    main()
