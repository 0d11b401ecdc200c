#!/usr/bin/env python3
"""Keras-style (NHWC) ONNX files for the import tests, with onnxruntime's outputs.

    python3 scripts/keras_style_onnx_models.py [OUT_DIR]   # a Python with onnx, onnxruntime and NumPy
    # default tests/vectors/onnx_keras

TensorFlow is not needed: the graphs are built with the `onnx.helper` API the
way tf2onnx writes a Keras model: an `[N, H, W, C]` input (batch named
`unk__N`), a `Mul` for Keras' Rescaling, a `Transpose` perm [0,3,1,2] to NCHW
before the first convolution, convolutions and pooling with
`auto_pad=SAME_UPPER` or explicit asymmetric pads, a Keras PReLU with
`shared_axes=[1, 2]` (slope `[1, 1, C]`) computed between Transposes on the
NHWC value, a `Transpose` back to NHWC before `Reshape` to `[-1, H*W*C]`
(Keras' Flatten order), `MatMul` + `Add` for Dense layers, and `Softmax` on
the output. Two models:

* keras_cnn_opset{9,13,17}: a classifier of 11x11x3 images (BN, Leaky ReLU,
  SAME max and average pooling, PReLU on NHWC maps and on a Dense layer).
* keras_fcn_opset13: a fully convolutional net with a free spatial size and
  two outputs: an NHWC map `heatmap` and `probs` (ReduceMean over H, W on the
  NHWC value, Dense, Softmax); its vectors hold two input sizes.

Writes NAME.onnx and NAME.json ({"cases": [{"input_shape", "input",
"outputs": [{"name", "shape", "data"}]}]}, data flattened row-major).
For keras_cnn_opset13 also: its first case's input and random labels as
.npy files, and in the JSON `prelu_inputs`: the negative share per channel
of each PRelu's input in the original graph. Weights are random (seed 0). Run once; the outputs are committed so tests
need no Python.
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/vectors/onnx_keras")
rng = np.random.default_rng(0)


def init(name, a, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(a, dtype=dtype), name)


def rand(*shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def keras_cnn(opset):
    inits = [
        init("scale", 1 / 255),
        init("model/conv2d/kernel", rand(8, 3, 3, 3)),
        init("model/conv2d/bias", rand(8, scale=0.1)),
        init("model/p_re_lu/alpha", rng.uniform(-0.2, 0.6, (1, 1, 8))),
        init("model/conv2d_1/kernel", rand(12, 8, 3, 3, scale=0.2)),
        init("model/bn/gamma", rng.uniform(0.5, 1.5, 12)),
        init("model/bn/beta", rand(12, scale=0.1)),
        init("model/bn/moving_mean", rand(12, scale=0.2)),
        init("model/bn/moving_variance", rng.uniform(0.5, 2.0, 12)),
        init("new_shape", [-1, 3 * 3 * 12], np.int64),
        init("model/dense/kernel", rand(108, 16, scale=0.15)),
        init("model/dense/bias", rand(16, scale=0.1)),
        init("model/p_re_lu_1/alpha", rng.uniform(-0.1, 0.5, 16)),
        init("model/dense_1/kernel", rand(16, 5)),
        init("model/dense_1/bias", rand(5, scale=0.1)),
    ]
    N = helper.make_node
    nodes = [
        N("Mul", ["input_1", "scale"], ["model/rescaling/mul:0"], name="model/rescaling/mul"),
        N("Transpose", ["model/rescaling/mul:0"], ["t0"], name="model/conv2d/Conv2D__6", perm=[0, 3, 1, 2]),
        N("Conv", ["t0", "model/conv2d/kernel", "model/conv2d/bias"], ["c1"], name="model/conv2d/BiasAdd",
          kernel_shape=[3, 3], strides=[1, 1], dilations=[1, 1], auto_pad="SAME_UPPER"),
        N("Transpose", ["c1"], ["c1_nhwc"], name="model/conv2d/BiasAdd__9", perm=[0, 2, 3, 1]),
        N("PRelu", ["c1_nhwc", "model/p_re_lu/alpha"], ["a1"], name="model/p_re_lu/Relu"),
        N("Transpose", ["a1"], ["a1_nchw"], name="model/max_pooling2d/MaxPool__12", perm=[0, 3, 1, 2]),
        N("MaxPool", ["a1_nchw"], ["p1"], name="model/max_pooling2d/MaxPool", kernel_shape=[2, 2],
          strides=[2, 2], auto_pad="SAME_UPPER"),
        N("Conv", ["p1", "model/conv2d_1/kernel"], ["c2"], name="model/conv2d_1/Conv2D",
          kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1]),
        N("BatchNormalization", ["c2", "model/bn/gamma", "model/bn/beta", "model/bn/moving_mean",
                                 "model/bn/moving_variance"], ["b2"], name="model/bn/FusedBatchNormV3", epsilon=1e-3),
        N("LeakyRelu", ["b2"], ["a2"], name="model/leaky_re_lu/LeakyRelu", alpha=0.2),
        N("AveragePool", ["a2"], ["p2"], name="model/average_pooling2d/AvgPool", kernel_shape=[3, 3],
          strides=[1, 1], auto_pad="SAME_UPPER"),
        N("Identity", ["p2"], ["d2"], name="model/dropout/Identity"),
        N("Transpose", ["d2"], ["p2_nhwc"], name="model/flatten/Reshape__20", perm=[0, 2, 3, 1]),
        N("Reshape", ["p2_nhwc", "new_shape"], ["f"], name="model/flatten/Reshape"),
        N("MatMul", ["f", "model/dense/kernel"], ["m1"], name="model/dense/MatMul"),
        N("Add", ["m1", "model/dense/bias"], ["h1"], name="model/dense/BiasAdd"),
        N("PRelu", ["h1", "model/p_re_lu_1/alpha"], ["a3"], name="model/p_re_lu_1/Relu"),
        N("MatMul", ["a3", "model/dense_1/kernel"], ["m2"], name="model/dense_1/MatMul"),
        N("Add", ["m2", "model/dense_1/bias"], ["logits"], name="model/dense_1/BiasAdd"),
        N("Softmax", ["logits"], ["dense_1"], name="model/dense_1/Softmax", axis=1 if opset < 13 else -1),
    ]
    g = helper.make_graph(
        nodes, "keras_cnn",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["unk__0", 11, 11, 3])],
        [helper.make_tensor_value_info("dense_1", TensorProto.FLOAT, ["unk__0", 5])],
        inits,
    )
    return g, [(11, 11)], 255.0


def keras_fcn(opset):
    inits = [
        init("model/conv/kernel", rand(6, 3, 3, 3)),
        init("model/conv/bias", rand(6, scale=0.1)),
        init("model/p_re_lu/alpha", rng.uniform(-0.2, 0.6, (6, 1, 1))),
        init("model/head/kernel", rand(4, 6, 1, 1)),
        init("model/head/bias", rand(4, scale=0.1)),
        init("model/dense/kernel", rand(4, 3)),
        init("model/dense/bias", rand(3, scale=0.1)),
    ]
    N = helper.make_node
    nodes = [
        N("Transpose", ["image"], ["t0"], name="model/conv/Conv2D__5", perm=[0, 3, 1, 2]),
        N("Conv", ["t0", "model/conv/kernel", "model/conv/bias"], ["c1"], name="model/conv/BiasAdd",
          kernel_shape=[3, 3], auto_pad="SAME_UPPER"),
        N("PRelu", ["c1", "model/p_re_lu/alpha"], ["a1"], name="model/p_re_lu/Relu"),
        N("AveragePool", ["a1"], ["p1"], name="model/avg/AvgPool", kernel_shape=[2, 2], strides=[2, 2],
          auto_pad="SAME_UPPER"),
        N("Conv", ["p1", "model/head/kernel", "model/head/bias"], ["c2"], name="model/head/BiasAdd",
          kernel_shape=[1, 1]),
        N("Transpose", ["c2"], ["heatmap"], name="model/head/BiasAdd__12", perm=[0, 2, 3, 1]),
        N("ReduceMean", ["heatmap"], ["gap"], name="model/gap/Mean", axes=[1, 2], keepdims=0),
        N("MatMul", ["gap", "model/dense/kernel"], ["m"], name="model/dense/MatMul"),
        N("Add", ["m", "model/dense/bias"], ["z"], name="model/dense/BiasAdd"),
        N("Softmax", ["z"], ["probs"], name="model/dense/Softmax", axis=-1),
    ]
    g = helper.make_graph(
        nodes, "keras_fcn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["unk__0", "unk__1", "unk__2", 3])],
        [helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["unk__0", "unk__3", "unk__4", 4]),
         helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["unk__0", 3])],
        inits,
    )
    return g, [(10, 8), (7, 9)], 1.0


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, make, opset in [
        ("keras_cnn_opset9", keras_cnn, 9),
        ("keras_cnn_opset13", keras_cnn, 13),
        ("keras_cnn_opset17", keras_cnn, 17),
        ("keras_fcn_opset13", keras_fcn, 13),
    ]:
        g, sizes, scale = make(opset)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="tf2onnx-style")
        m.ir_version = 7
        onnx.checker.check_model(m, full_check=True)
        path = OUT / f"{name}.onnx"
        onnx.save(m, str(path))
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        cases = []
        for h, w in sizes:
            x = (rng.random((4, h, w, 3)) * scale).astype(np.float32)
            ys = sess.run(None, {sess.get_inputs()[0].name: x})
            cases.append({
                "input_shape": list(x.shape), "input": x.ravel().tolist(),
                "outputs": [{"name": o.name, "shape": list(y.shape), "data": y.ravel().tolist()}
                            for o, y in zip(sess.get_outputs(), ys)],
            })
        extra = {}
        if name == "keras_cnn_opset13":
            # The first case as .npy files (as NumPy writes them), and the
            # negative share per channel of every PRelu's input in the
            # original graph (onnxruntime, the PRelu inputs made outputs).
            x = np.asarray(cases[0]["input"], dtype=np.float32).reshape(cases[0]["input_shape"])
            np.save(OUT / f"{name}.input.npy", x)
            np.save(OUT / f"{name}.labels.npy", rng.integers(0, 5, len(x)).astype(np.int64))
            probe = onnx.ModelProto()
            probe.CopyFrom(m)
            prelus = [n for n in probe.graph.node if n.op_type == "PRelu"]
            for n in prelus:
                probe.graph.output.append(helper.make_empty_tensor_value_info(n.input[0]))
            s2 = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
            vals = s2.run([n.input[0] for n in prelus], {"input_1": x})
            extra["prelu_inputs"] = [
                # NHWC maps and dense features both keep channels last.
                {"node": n.name, "negative_share_per_channel": (v < 0).reshape(-1, v.shape[-1]).mean(0).tolist()}
                for n, v in zip(prelus, vals)
            ]
        (OUT / f"{name}.json").write_text(json.dumps({
            "onnx": onnx.__version__, "onnxruntime": ort.__version__, "opset": opset, "cases": cases, **extra,
        }) + "\n")
        print(f"{name}: {path.stat().st_size} bytes, sizes {sizes}")


if __name__ == "__main__":
    main()
