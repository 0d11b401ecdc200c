"""Model: load, forward, state_dict, save, to_torch."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import prelu
from nets import ResNet, randomize


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return prelu.from_torch(randomize(ResNet()), torch.rand(2, 3, 16, 16))


def test_save_and_load_give_the_same_model(model, tmp_path):
    path = tmp_path / "m.safetensors"
    model.save(path)
    back = prelu.Model.load(path)
    x = np.random.default_rng(0).random((5, 3, 16, 16), dtype=np.float32)
    np.testing.assert_array_equal(back(x), model(x))
    assert back.state_dict().keys() == model.state_dict().keys()


def test_onnx_bytes_load_back(model, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(model.to_onnx())
    back = prelu.load(path)
    x = np.random.default_rng(1).random((3, 3 * 16 * 16), dtype=np.float32)
    np.testing.assert_allclose(back(x), model(x), rtol=1e-5, atol=1e-6)


def test_forward_refuses_the_wrong_size(model):
    with pytest.raises(prelu.PreluError, match="3x16x16"):
        model(np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(prelu.PreluError, match="not finite"):
        model(np.full((1, 3, 16, 16), np.nan, np.float32))


def test_load_names_a_missing_file(tmp_path):
    with pytest.raises(prelu.PreluError, match="nothing.safetensors"):
        prelu.Model.load(tmp_path / "nothing.safetensors")


def test_graph_describes_every_node(model):
    g = model.graph()
    assert g["input"] == [3, 16, 16] and g["input_mean"] == 0.5 and g["input_std"] == 0.25
    ops = {n["op"] for n in g["nodes"]}
    assert {"conv2d", "batch_norm", "act", "add", "global_avg_pool", "linear"} <= ops
    conv = next(n for n in g["nodes"] if n["name"] == "conv1")
    assert conv["pads"] == [1, 1, 1, 1] and conv["inputs"] == ["input"]


@pytest.mark.parametrize("canonical", [False, True])
def test_to_torch_computes_what_prelu_computes(model, canonical):
    m = prelu.canonicalize(model) if canonical else model
    net = prelu.to_torch(m)
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = net(x).numpy()
    np.testing.assert_allclose(got, m(x), rtol=1e-4, atol=1e-5)
    assert "layer1.1.down.0.weight" in net.state_dict()


def test_to_torch_of_a_model_from_a_file_loads_its_torch_state_dict(model, tmp_path):
    path = tmp_path / "m.safetensors"
    model.save(path)
    plain = prelu.Model.load(path)
    net = prelu.to_torch(plain)
    net.load_state_dict(plain.torch_state_dict(), strict=True)


GRAPH = """
input = [2, 9, 9]
outputs = ["fc", "fmax"]
[[nodes]]
name = "conv"
op = "conv2d"
out_channels = 4
kernel = 3
stride = 2
padding = [0, 0, 1, 1]
[[nodes]]
name = "act"
op = "act"
act = "prelu"
[[nodes]]
name = "max"
op = "max_pool"
kernel = 2
ceil_mode = true
[[nodes]]
name = "avg"
inputs = ["act"]
op = "avg_pool"
kernel = 2
padding = [1, 0, 0, 1]
count_include_pad = false
[[nodes]]
name = "fmax"
inputs = ["max"]
op = "flatten"
[[nodes]]
name = "favg"
inputs = ["avg"]
op = "flatten"
[[nodes]]
name = "head"
inputs = ["favg"]
op = "linear"
out_features = 16
[[nodes]]
name = "fc"
inputs = ["head"]
op = "linear"
out_features = 3
"""


def _safetensors(path, tensors):
    """A safetensors file of float32 arrays (the format: header length, JSON header, data)."""
    header, blobs, at = {}, [], 0
    for k, v in tensors.items():
        b = np.ascontiguousarray(v, dtype="<f4").tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [at, at + len(b)]}
        blobs.append(b)
        at += len(b)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_to_torch_pads_asymmetric_windows(tmp_path):
    rng = np.random.default_rng(5)
    shapes = {"conv.weight": (4, 2, 3, 3), "conv.bias": (4,), "act.weight": (4,), "head.weight": (16, 16),
              "head.bias": (16,), "fc.weight": (3, 16), "fc.bias": (3,)}
    _safetensors(tmp_path / "w.safetensors", {k: rng.normal(size=s) for k, s in shapes.items()})
    (tmp_path / "g.toml").write_text(GRAPH)
    m = prelu.Model.load(tmp_path / "w.safetensors", spec=tmp_path / "g.toml")
    x = rng.random((3, 2, 9, 9), dtype=np.float32)
    net = prelu.to_torch(m)
    with torch.no_grad():
        got = net(torch.from_numpy(x))
    # Two heads: a tuple, in the graph's order.
    assert len(got) == 2
    for g, want in zip(got, m.outputs(x)):
        np.testing.assert_allclose(g.numpy(), want, rtol=1e-4, atol=1e-5)


VECTORS = Path(__file__).resolve().parents[2] / "tests" / "vectors"


def test_a_keras_model_takes_its_own_nhwc_examples():
    case = json.loads((VECTORS / "onnx_keras" / "keras_cnn_opset17.json").read_text())["cases"][0]
    m = prelu.load(VECTORS / "onnx_keras" / "keras_cnn_opset17.onnx")
    assert m.input_layout == "nhwc"
    x = np.array(case["input"], np.float32).reshape(case["input_shape"])
    logits = m(x)
    # onnxruntime's outputs are after the model's softmax, which the import drops.
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = case["outputs"][0]
    np.testing.assert_allclose(p, np.array(want["data"]).reshape(want["shape"]), rtol=1e-4, atol=1e-5)
    # diagnose reads the same layout.
    assert prelu.diagnose(m, x)["examples"] == 4


def test_import_prelu_loads_neither_torch_nor_prelu_torch():
    import subprocess
    import sys

    code = "import sys, prelu; print('torch' in sys.modules, 'prelu.torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.split() == ["False", "False"]
