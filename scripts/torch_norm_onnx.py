#!/usr/bin/env python3
"""ONNX files whose graphs start with a per-channel input normalisation, as
`torch.onnx.export` writes them, with onnxruntime's outputs.

    python3 scripts/torch_norm_onnx.py [OUT_DIR]   # a Python with torch; default tests/vectors/onnx_norm

* norm_padded: `(x / 255 - mean) / std` with mean/std shaped [1, 3, 1, 1]
  (torchvision style: Div by a scalar, Sub and Div per channel), then a
  conv with zero padding 1: the shift cannot be folded into it exactly, so
  it stays a per-channel normalisation step of the imported model;
* norm_valid: `(x + neg_mean) * inv_std` with [3, 1, 1] constants, then an
  unpadded conv without bias: folded into that conv exactly (a bias appears);
* norm_nhwc: an NHWC input [N, H, W, 3], `(x - mean) / std` with [3]
  constants (broadcast on the last axis: the channels), `permute(0, 3, 1, 2)`,
  a padded conv: kept as a step, input layout NHWC;
* norm_mlp: a flat input [N, 12], `(x - mean) / std` per feature ([12]),
  then Linear: folded into the linear layer.

Weights and slopes are random (seeded). Run once; the outputs are committed
so tests need no Python.
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/vectors/onnx_norm")


class Padded(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.act = nn.PReLU(5)
        self.fc = nn.Linear(5 * 6 * 6, 4)

    def forward(self, x):
        x = (x / 255.0 - self.mean) / self.std
        return self.fc(self.act(self.conv(x)).flatten(1))


class Valid(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("neg_mean", torch.tensor([-0.5, 0.25, -0.1]).reshape(3, 1, 1))
        self.register_buffer("inv_std", torch.tensor([2.0, 4.0, 0.5]).reshape(3, 1, 1))
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.act = nn.PReLU(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = (x + self.neg_mean) * self.inv_std
        return self.fc(self.act(self.conv(x)).flatten(1))


class Nhwc(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.3, -0.2, 0.1]))
        self.register_buffer("std", torch.tensor([0.5, 2.0, 1.5]))
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.PReLU(4)
        self.fc = nn.Linear(4 * 5 * 4, 3)

    def forward(self, x):
        x = ((x - self.mean) / self.std).permute(0, 3, 1, 2)
        return self.fc(self.act(self.conv(x)).flatten(1))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.linspace(-1, 1, 12))
        self.register_buffer("std", torch.linspace(0.5, 3, 12))
        self.fc1 = nn.Linear(12, 8)
        self.act = nn.PReLU(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1((x - self.mean) / self.std)))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    gen = np.random.default_rng(0)
    for name, net, shape, scale in [("norm_padded", Padded(), (3, 6, 6), 255.0), ("norm_valid", Valid(), (3, 6, 6), 1.0),
                                    ("norm_nhwc", Nhwc(), (5, 4, 3), 1.0), ("norm_mlp", Mlp(), (12,), 1.0)]:
        for m in net.modules():
            if isinstance(m, nn.PReLU):
                m.weight.data.uniform_(-0.5, 0.8)
        net.eval()
        path = OUT / f"{name}.onnx"
        torch.onnx.export(net, (torch.zeros(1, *shape),), str(path), opset_version=13, input_names=["x"],
                          output_names=["y"], dynamo=False, dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        x = (gen.uniform(0, 1, (4, *shape)) * scale).astype(np.float32)
        y = sess.run(None, {"x": x})[0]
        with torch.no_grad():
            diff = float(np.abs(net(torch.from_numpy(x)).numpy() - y).max())
        case = {"input_shape": list(x.shape), "input": x.ravel().tolist(),
                "outputs": [{"name": "y", "shape": list(y.shape), "data": y.ravel().tolist()}]}
        (OUT / f"{name}.json").write_text(json.dumps({
            "torch": torch.__version__, "onnxruntime": ort.__version__, "opset": 13, "cases": [case],
        }) + "\n")
        print(f"{name}: {path.stat().st_size} bytes, torch vs onnxruntime max diff {diff:.2e}, ops",
              [n.op_type for n in __import__('onnx').load(str(path)).graph.node])


if __name__ == "__main__":
    main()
