#!/usr/bin/env python3
"""MTCNN's RNet and ONet (the face detector's second and third stages, PReLU
throughout) from the `facenet-pytorch` PyPI package (MIT licence, Tim
Esler), exported to ONNX as `torch.onnx.export` writes them.

    pip download facenet-pytorch==2.6.0 --no-deps -d /tmp/fnp
    unzip -q /tmp/fnp/facenet_pytorch-2.6.0-py3-none-any.whl -d /tmp/fnp/x
    python3 scripts/mtcnn_rnet_onet_onnx.py /tmp/fnp/x [OUT_DIR] [FASHION_MNIST_DIR]   # a Python with torch

The classes below are the package's RNet and ONet, layer for layer and with
the same `forward` (so the state dicts in facenet_pytorch/data/{rnet,onet}.pt
load by name). Both flatten with `x.permute(0, 3, 2, 1).contiguous()` and
`x.view(x.shape[0], -1)` before their dense layer: the exporter writes a
`Transpose` perm [0, 3, 2, 1] and a `Reshape` whose target is computed from
`Shape`/`Gather`/`Unsqueeze`/`Concat` (the free batch size). Writes to
OUT_DIR (default tests/vectors/onnx_mtcnn):

* rnet.onnx: opset 13, input `image` [N, 3, 24, 24], outputs `box_reg`
  [N, 4] and `face_prob` [N, 2] (softmax); rnet.json: onnxruntime's outputs
  for 3 random inputs;
* onet.onnx: input `image` [N, 3, 48, 48], outputs `box_reg` [N, 4],
  `landmarks` [N, 10], `face_prob` [N, 2]; onet.json likewise;
* with FASHION_MNIST_DIR: /tmp/rnet_windows.npy, 512 24x24 windows cut from
  Fashion-MNIST test images (grey repeated to RGB; no faces), normalised
  as MTCNN normalises its input, (x - 127.5) / 128. Not committed. (The
  docs' example cuts its windows with `scripts/make_npy.py windows`, which
  needs no torch.)

Give an OUT_DIR outside tests/vectors (e.g. /tmp/mtcnn) unless the
committed files are to be replaced.
"""
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

PKG = Path(sys.argv[1])
OUT = Path(sys.argv[2] if len(sys.argv) > 2 else "tests/vectors/onnx_mtcnn")
FMNIST = Path(sys.argv[3]) if len(sys.argv) > 3 else None


class RNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.softmax5_1 = nn.Softmax(dim=1)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        x = self.conv1(x)
        x = self.prelu1(x)
        x = self.pool1(x)
        x = self.conv2(x)
        x = self.prelu2(x)
        x = self.pool2(x)
        x = self.conv3(x)
        x = self.prelu3(x)
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.dense4(x.view(x.shape[0], -1))
        x = self.prelu4(x)
        a = self.dense5_1(x)
        a = self.softmax5_1(a)
        b = self.dense5_2(x)
        return b, a


class ONet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.softmax6_1 = nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = self.prelu1(x)
        x = self.pool1(x)
        x = self.conv2(x)
        x = self.prelu2(x)
        x = self.pool2(x)
        x = self.conv3(x)
        x = self.prelu3(x)
        x = self.pool3(x)
        x = self.conv4(x)
        x = self.prelu4(x)
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.dense5(x.view(x.shape[0], -1))
        x = self.prelu5(x)
        a = self.dense6_1(x)
        a = self.softmax6_1(a)
        b = self.dense6_2(x)
        c = self.dense6_3(x)
        return b, c, a


def export(name, net, size, outputs, seed):
    net.load_state_dict(torch.load(PKG / f"facenet_pytorch/data/{name}.pt", map_location="cpu"))
    net.eval()
    path = OUT / f"{name}.onnx"
    torch.onnx.export(
        net, (torch.zeros(1, 3, size, size),), str(path), opset_version=13, input_names=["image"],
        output_names=outputs, dynamo=False,
        dynamic_axes={"image": {0: "N"}, **{o: {0: "N"} for o in outputs}},
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = np.random.default_rng(seed)
    x = gen.uniform(-1, 1, (3, 3, size, size)).astype(np.float32)
    ys = sess.run(None, {"image": x})
    with torch.no_grad():
        diff = max(float(np.abs(t.numpy() - y).max()) for t, y in zip(net(torch.from_numpy(x)), ys))
    case = {"input_shape": list(x.shape), "input": x.ravel().tolist(),
            "outputs": [{"name": o.name, "shape": list(y.shape), "data": y.ravel().tolist()}
                        for o, y in zip(sess.get_outputs(), ys)]}
    (OUT / f"{name}.json").write_text(json.dumps({
        "source": f"facenet-pytorch 2.6.0, facenet_pytorch/data/{name}.pt (MIT licence)",
        "torch": torch.__version__, "onnxruntime": ort.__version__, "opset": 13, "cases": [case],
    }) + "\n")
    print(f"{path}: {path.stat().st_size} bytes, torch vs onnxruntime max diff {diff:.2e}, ops",
          sorted({n.op_type for n in __import__('onnx').load(str(path)).graph.node}))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    export("rnet", RNet(), 24, ["box_reg", "face_prob"], 1)
    export("onet", ONet(), 48, ["box_reg", "landmarks", "face_prob"], 2)
    if FMNIST:
        gen = np.random.default_rng(3)
        with gzip.open(FMNIST / "t10k-images-idx3-ubyte.gz") as f:
            imgs = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        idx = gen.choice(len(imgs), 512, replace=False)
        r, c = gen.integers(0, 5, 512), gen.integers(0, 5, 512)
        win = np.stack([imgs[i, a:a + 24, b:b + 24] for i, a, b in zip(idx, r, c)]).astype(np.float32)
        win = np.repeat(((win - 127.5) / 128.0)[:, None], 3, axis=1)
        np.save("/tmp/rnet_windows.npy", np.ascontiguousarray(win, dtype=np.float32))
        print(f"/tmp/rnet_windows.npy: {win.shape}")


if __name__ == "__main__":
    main()
