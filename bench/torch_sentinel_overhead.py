#!/usr/bin/env python3
"""What prelu.torch.Sentinel costs a PyTorch training step.

    pip install ./python   # into a Python with torch
    python3 bench/torch_sentinel_overhead.py --threads 1,2 [--every N] [--json]

Two models with per-channel PReLU: an MLP 784-256-256-10 (batch 128) and a
ResNet-20-like CNN (3 stages of 3 basic blocks, 16/32/64 channels, 19 PReLU
layers; batch 64, 3x32x32 unless --input). One step is forward, cross-entropy,
backward and an SGD update. Rounds alternate the order (plain then watched,
watched then plain, ...) so drift in the machine's load hits both alike; each
round times --mlp-steps (--cnn-steps) steps of each after one untimed step. Reported: the median
over rounds of each round's mean step time (a mean, so that --every > 1 counts
its counted steps), the overhead of the watched step in percent, and the time
of one epoch_end (the counters read back once and a line written).
--every N measures the sentinel counting every N-th step only.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

import prelu.torch as pt  # the installed package: pip install ./python


def mlp():
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 256),
        nn.PReLU(256),
        nn.Linear(256, 256),
        nn.PReLU(256),
        nn.Linear(256, 10),
    )


class Block(nn.Module):
    """A basic residual block, declared in the order it applies its layers."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act2 = nn.PReLU(cout)

    def forward(self, x):
        h = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(h)) + self.shortcut(x))


def resnet20(in_ch):
    layers = [nn.Conv2d(in_ch, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.PReLU(16)]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            layers.append(Block(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def step_times(model, opt, x, y, steps):
    """Times `steps` training steps after one untimed step."""
    out = []
    for i in range(steps + 1):
        t = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            out.append(time.perf_counter() - t)
    return out


def measure(name, model, x, y, rounds, steps, every):
    """Median step times without and with the sentinel, and one epoch_end."""
    torch.manual_seed(0)
    pt.init_he_prelu_(model)
    opt = torch.optim.SGD(pt.param_groups(model, 5e-4), lr=0.01, momentum=0.9)
    plain, watched, closes = [], [], []
    with tempfile.TemporaryDirectory() as d:
        for r in range(rounds):
            for watch in (r % 2 == 1, r % 2 == 0):
                if not watch:
                    plain.append(statistics.mean(step_times(model, opt, x, y, steps)))
                    continue
                s = pt.Sentinel(model, d, optimizer=opt, every=every, overwrite=True)
                watched.append(statistics.mean(step_times(model, opt, x, y, steps)))
                t = time.perf_counter()
                s.epoch_end(r + 1)
                closes.append(time.perf_counter() - t)
                s.close()
    p, w = statistics.median(plain), statistics.median(watched)
    return {
        "model": name,
        "threads": torch.get_num_threads(),
        "batch": x.shape[0],
        "every": every,
        "plain_ms": 1e3 * p,
        "sentinel_ms": 1e3 * w,
        "overhead_pct": 100.0 * (w - p) / p,
        "epoch_end_ms": 1e3 * statistics.median(closes),
        "steps_each": len(plain) * steps,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--mlp-steps", type=int, default=30)
    ap.add_argument("--cnn-steps", type=int, default=4)
    ap.add_argument("--input", default="3x32x32", help="the CNN's input, CxHxW")
    ap.add_argument("--every", type=int, default=1, help="count every N-th step")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    c, h, w = (int(v) for v in a.input.split("x"))
    g = torch.Generator().manual_seed(0)
    rows = []
    for threads in (int(t) for t in a.threads.split(",")):
        torch.set_num_threads(threads)
        x, y = torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)
        rows.append(measure("mlp 784-256-256-10", mlp(), x, y, a.rounds, a.mlp_steps, a.every))
        x, y = torch.randn(64, c, h, w, generator=g), torch.randint(0, 10, (64,), generator=g)
        rows.append(measure(f"resnet-20 {a.input}", resnet20(c), x, y, a.rounds, a.cnn_steps, a.every))
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"torch {torch.__version__}; medians over {a.rounds} alternating rounds; counting every {a.every} step(s)")
    head = ("model", "threads", "batch", "plain ms", "sentinel ms", "overhead", "epoch_end ms")
    print(f"{head[0]:<22} {head[1]:>7} {head[2]:>5} {head[3]:>9} {head[4]:>11} {head[5]:>8} {head[6]:>12}")
    for r in rows:
        print(
            f"{r['model']:<22} {r['threads']:>7} {r['batch']:>5} {r['plain_ms']:>9.2f} {r['sentinel_ms']:>11.2f} "
            f"{r['overhead_pct']:>7.1f}% {r['epoch_end_ms']:>12.2f}"
        )


if __name__ == "__main__":
    main()
