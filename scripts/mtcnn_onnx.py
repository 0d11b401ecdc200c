#!/usr/bin/env python3
"""MTCNN's PNet (the face detector's first stage, PReLU throughout) from the
`facenet-pytorch` PyPI package (MIT licence, Tim Esler), exported to ONNX.

    pip download facenet-pytorch==2.6.0 --no-deps -d /tmp/fnp
    unzip -q /tmp/fnp/facenet_pytorch-2.6.0-py3-none-any.whl -d /tmp/fnp/x
    python3 scripts/mtcnn_onnx.py /tmp/fnp/x [OUT_DIR] [FASHION_MNIST_DIR]   # a Python with torch

Loads facenet_pytorch/data/pnet.pt (its state dict; the class below is the
package's PNet, layer for layer, so the names match) and writes to OUT_DIR
(default tests/vectors/onnx_mtcnn):

* pnet.onnx: opset 13, input `image` [N, 3, H, W] with free batch and
  spatial size (PNet is fully convolutional: one 12x12 window gives one
  output pixel), outputs `box_reg` [N, 4, h, w] and `face_prob` [N, 2, h, w]
  (softmax over the channels);
* pnet.json: onnxruntime's outputs for random inputs at 12x12 and 23x17;
* with FASHION_MNIST_DIR: /tmp/pnet_windows.npy, 512 12x12 windows cut from
  Fashion-MNIST test images (grayscale repeated to RGB; no faces), normalised
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


class PNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.softmax4_1 = nn.Softmax(dim=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x):
        x = self.prelu1(self.conv1(x))
        x = self.pool1(x)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return self.conv4_2(x), self.softmax4_1(self.conv4_1(x))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    net = PNet()
    net.load_state_dict(torch.load(PKG / "facenet_pytorch/data/pnet.pt", map_location="cpu"))
    net.eval()
    path = OUT / "pnet.onnx"
    torch.onnx.export(
        net, (torch.zeros(1, 3, 12, 12),), str(path), opset_version=13, input_names=["image"],
        output_names=["box_reg", "face_prob"], dynamo=False,
        dynamic_axes={"image": {0: "N", 2: "H", 3: "W"}, "box_reg": {0: "N", 2: "h", 3: "w"},
                      "face_prob": {0: "N", 2: "h", 3: "w"}},
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = np.random.default_rng(0)
    cases = []
    for h, w in [(12, 12), (23, 17)]:
        x = gen.uniform(-1, 1, (3, 3, h, w)).astype(np.float32)
        ys = sess.run(None, {"image": x})
        with torch.no_grad():
            diff = max(float(np.abs(t.numpy() - y).max()) for t, y in zip(net(torch.from_numpy(x)), ys))
        cases.append({"input_shape": list(x.shape), "input": x.ravel().tolist(),
                      "outputs": [{"name": o.name, "shape": list(y.shape), "data": y.ravel().tolist()}
                                  for o, y in zip(sess.get_outputs(), ys)]})
        print(f"{h}x{w}: torch vs onnxruntime max diff {diff:.2e}")
    (OUT / "pnet.json").write_text(json.dumps({
        "source": "facenet-pytorch 2.6.0, facenet_pytorch/data/pnet.pt (MIT licence)",
        "torch": torch.__version__, "onnxruntime": ort.__version__, "opset": 13, "cases": cases,
    }) + "\n")
    print(f"{path}: {path.stat().st_size} bytes")
    if FMNIST:
        with gzip.open(FMNIST / "t10k-images-idx3-ubyte.gz") as f:
            imgs = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        idx = gen.choice(len(imgs), 512, replace=False)
        r, c = gen.integers(0, 17, 512), gen.integers(0, 17, 512)
        win = np.stack([imgs[i, a:a + 12, b:b + 12] for i, a, b in zip(idx, r, c)]).astype(np.float32)
        win = np.repeat(((win - 127.5) / 128.0)[:, None], 3, axis=1)
        np.save("/tmp/pnet_windows.npy", np.ascontiguousarray(win, dtype=np.float32))
        print(f"/tmp/pnet_windows.npy: {win.shape}")


if __name__ == "__main__":
    main()
