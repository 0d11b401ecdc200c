#!/usr/bin/env python3
"""ONNX files from PyTorch for the import tests, with onnxruntime's outputs.

    python3 scripts/torch_onnx_models.py [OUT_DIR]    # default tests/vectors/onnx

Writes NAME.onnx and NAME.json (8 inputs and onnxruntime's outputs for them)
for: the ResNet-8 twin of the `resnet-8 --batch-norm` preset (BN, PReLU
[C,1,1] slopes, strided convs, projection shortcuts, global pooling) at
opsets 9, 13 and 17; an MLP with a shared PReLU, Leaky ReLU and a layer
written as `x @ W + b` (MatMul + Add); a CNN with SAME-style padding,
ceil-mode max-pool, average pooling and a PReLU on a flat layer. Weights,
slopes and BatchNorm statistics are random. Run once with torch, onnx,
onnxruntime and safetensors installed; the outputs are committed so tests
need no Python.
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_presets as tp  # noqa: E402

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/vectors/onnx")


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(36, 20)
        self.act1 = nn.PReLU()
        self.w2 = nn.Parameter(torch.randn(20, 16) * 0.3)
        self.b2 = nn.Parameter(torch.randn(16) * 0.1)
        self.act2 = nn.LeakyReLU(0.05)
        self.fc3 = nn.Linear(16, 7)

    def forward(self, x):
        x = self.act1(self.fc1(x.flatten(1)))
        x = self.act2(x @ self.w2 + self.b2)
        return self.fc3(x)


class Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.act1 = nn.PReLU(6)
        self.pool1 = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.conv2 = nn.Conv2d(6, 8, (3, 2), padding=(1, 0), dilation=(1, 2), bias=False)
        self.act2 = nn.ReLU()
        self.pool2 = nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False)
        self.fc = nn.Linear(8 * 5 * 3, 12)
        self.act3 = nn.PReLU(12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = self.pool1(self.act1(self.bn1(self.conv1(x))))
        x = self.pool2(self.act2(self.conv2(x)))
        return self.head(self.act3(self.fc(x.flatten(1))))


def cases():
    spec = tp.spec_of({"kind": "resnet", "depth": 8, "shortcuts": True}, {"p-relu": {"shared": False}}, True, [1, 12, 12])
    for opset in (9, 13, 17):
        yield f"resnet8_opset{opset}", tp.ResNet(spec), (1, 12, 12), opset
    yield "mlp_matmul_opset13", Mlp(), (1, 6, 6), 13
    yield "cnn_pools_opset13", Cnn(), (3, 13, 11), 13


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for name, model, shape, opset in cases():
        torch.manual_seed(1)
        tp.randomise(model, gen)
        model.eval()
        x = torch.rand((8, *shape), generator=gen)
        path = OUT / f"{name}.onnx"
        torch.onnx.export(
            model, (x,), str(path), opset_version=opset, input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, dynamo=False,
        )
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        y = sess.run(None, {"x": x.numpy()})[0]
        with torch.no_grad():
            diff = float(np.abs(model(x).numpy() - y).max())
        (OUT / f"{name}.json").write_text(json.dumps({
            "torch": torch.__version__, "onnxruntime": ort.__version__, "opset": opset,
            "input_shape": list(shape), "input": x.reshape(8, -1).tolist(), "output": y.tolist(),
        }) + "\n")
        print(f"{name}: {path.stat().st_size} bytes, torch vs onnxruntime max diff {diff:.2e}")


if __name__ == "__main__":
    main()
