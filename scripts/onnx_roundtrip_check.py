#!/usr/bin/env python3
"""Import -> export round trip in onnxruntime: for each ONNX file, run
`prelu import` and `prelu export`, then feed the same random inputs (in the
original's layout) to the original and the exported model and compare every
output by name.

    python3 scripts/onnx_roundtrip_check.py [--prelu BIN] MODEL.onnx[:HxW] ...   # a Python with onnxruntime

`:HxW` gives the input size of a model whose spatial size is free. Exits 1
if an output is missing, has another shape, or differs by more than 1e-4
relative (to the largest magnitude, at least 1).
"""
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

args = sys.argv[1:]
prelu = "target/release/prelu"
if args[:1] == ["--prelu"]:
    prelu, args = args[1], args[2:]
rng = np.random.default_rng(0)
ok = True
with tempfile.TemporaryDirectory() as tmp:
    for spec in args:
        path, _, size = spec.partition(":")
        ckpt, back = Path(tmp) / "m.safetensors", Path(tmp) / "back.onnx"
        cmd = [prelu, "import", path, "-o", str(ckpt)] + (["--input-size", size] if size else [])
        subprocess.run(cmd, check=True, capture_output=True)
        subprocess.run([prelu, "export", str(ckpt), "--onnx", str(back)], check=True, capture_output=True)
        a = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        b = ort.InferenceSession(str(back), providers=["CPUExecutionProvider"])
        ia, ib = a.get_inputs()[0], b.get_inputs()[0]
        hw = [int(v) for v in size.split("x")] if size else []
        shape = [d if isinstance(d, int) else None for d in ia.shape]
        shape[0] = 5
        free = [i for i, d in enumerate(shape) if d is None]
        for i, v in zip(free, hw):
            shape[i] = v
        x = rng.random(shape, dtype=np.float32)
        if ia.name != ib.name:
            print(f"{path}: input `{ia.name}` came back as `{ib.name}`")
            ok = False
            continue
        names = [o.name for o in a.get_outputs()]
        ya = a.run(names, {ia.name: x})
        try:
            yb = b.run(names, {ib.name: x})
        except Exception as e:  # a missing output name
            print(f"{path}: {e}")
            ok = False
            continue
        worst = 0.0
        for n, u, v in zip(names, ya, yb):
            if u.shape != v.shape:
                print(f"{path}: output `{n}` shape {u.shape} came back as {v.shape}")
                ok = False
            else:
                worst = max(worst, float(np.abs(u - v).max() / max(1.0, np.abs(u).max())))
        print(f"{path}: input `{ia.name}` {list(x.shape)}, outputs {names}: max relative difference {worst:.2e}")
        ok &= worst <= 1e-4
sys.exit(0 if ok else 1)
