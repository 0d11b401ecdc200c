#!/usr/bin/env python3
"""Run an ONNX model exported by `prelu export --reference N` in onnxruntime
and compare its logits with prelu's own.

    python3 scripts/check_onnx.py MODEL.onnx [MAX_ABS_DIFF]

Reads MODEL.onnx.ref.json (written beside the model), feeds the reference
images, and exits 1 if any logit differs by more than MAX_ABS_DIFF (1e-4).
"""
import json
import os
import sys

import numpy as np
import onnxruntime as ort

path = sys.argv[1]
tol = float(sys.argv[2]) if len(sys.argv) > 2 else 1e-4
ref = json.load(open(path + ".ref.json"))
# The file names in .ref.json are relative to the .ref.json itself.
here = os.path.dirname(os.path.abspath(path))
x = np.fromfile(os.path.join(here, ref["inputs"]), dtype="<f4").reshape(ref["n"], ref["features"])
want = np.fromfile(os.path.join(here, ref["logits"]), dtype="<f4").reshape(ref["n"], ref["classes"])
sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
got = sess.run(["logits"], {"input": x})[0]
diff = float(np.abs(got - want).max())
agree = float((got.argmax(1) == want.argmax(1)).mean())
print(f"{path}: onnxruntime {ort.__version__}, {ref['n']} images, max |logit diff| {diff:.3e}, argmax agreement {agree:.4f}")
sys.exit(0 if diff <= tol else 1)
