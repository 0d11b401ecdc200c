#!/usr/bin/env python3
"""PyTorch twins of prelu's preset graphs, and test vectors from them.

    python3 scripts/torch_presets.py [OUT_DIR]             # write the vectors
    python3 scripts/torch_presets.py --check CKPT --reference OUT.onnx   # strict load

The modules below are written the way a PyTorch user writes these nets; their
attribute names are what make `state_dict()` use prelu's parameter names
(`layers.i`, `bn.i`, `act.i`, `convs.i` for the MLP/CNN presets; `conv1`,
`bn1`, `act1`, `layerS.B.{conv1,bn1,act1,conv2,bn2,shortcut.0,shortcut.1,act2}`,
`fc` for resnet-N / plain-N).

Writing vectors: for each case, a randomly initialised module (slopes,
BatchNorm affine parameters and running estimates randomised too) is saved
as OUT_DIR/NAME.safetensors (the full state_dict, `num_batches_tracked`
included, as `load_state_dict(strict=True)` wants it), with NAME.spec.json
(the prelu model spec) and NAME.io.json (8 inputs in pixel space and the
module's eval-mode logits). tests/interop.rs loads each into prelu, checks
that the tensor names are exactly PyTorch's, and compares logits. Run once;
the outputs are committed so tests need no Python.

--check CHECKPOINT --reference OUT.onnx: builds the twin from the spec in a
prelu checkpoint's header, loads the checkpoint with
`load_state_dict(strict=True)`, and compares its logits with the reference
inputs/logits that `prelu export RUN --onnx OUT.onnx --reference N` wrote.
Needs torch, numpy and safetensors.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn


def act_module(act, channels):
    if act == "relu":
        return nn.ReLU()
    if isinstance(act, dict) and "leaky-relu" in act:
        return nn.LeakyReLU(act["leaky-relu"])
    # `prelu` (current spelling) or `p-relu` (before issue 17).
    key = next((k for k in ("prelu", "p-relu") if isinstance(act, dict) and k in act), None)
    if key is not None:
        return nn.PReLU(1 if act[key]["shared"] else channels, init=0.25)
    raise ValueError(f"activation {act!r}")


class Normalise(nn.Module):
    def __init__(self, mean, std, shape):
        super().__init__()
        self.mean, self.std, self.shape = mean, std, shape

    def forward(self, x):
        return ((x.reshape(-1, *self.shape)) - self.mean) / self.std


class Mlp(nn.Module):
    def __init__(self, spec):
        super().__init__()
        c, h, w = spec["input"]
        widths = [c * h * w] + spec["arch"]["hidden"]
        self.norm = Normalise(spec["input_mean"], spec["input_std"], spec["input"])
        self.layers = nn.ModuleList(
            [nn.Linear(a, b) for a, b in zip(widths, widths[1:])] + [nn.Linear(widths[-1], spec["classes"])]
        )
        self.bn = nn.ModuleList([nn.BatchNorm1d(v) for v in widths[1:]]) if spec["batch_norm"] else None
        self.act = nn.ModuleList([act_module(spec["act"], v) for v in widths[1:]])

    def forward(self, x):
        x = self.norm(x).flatten(1)
        for i, act in enumerate(self.act):
            x = self.layers[i](x)
            if self.bn is not None:
                x = self.bn[i](x)
            x = act(x)
        return self.layers[-1](x)


class Cnn(nn.Module):
    def __init__(self, spec):
        super().__init__()
        a = spec["arch"]
        c, h, w = spec["input"]
        self.norm = Normalise(spec["input_mean"], spec["input_std"], spec["input"])
        self.pool_after = a["pool_after"]
        k, p = a["kernel"], a["padding"]
        chans = [c] + a["channels"]
        self.convs = nn.ModuleList([nn.Conv2d(i, o, k, padding=p) for i, o in zip(chans, chans[1:])])
        for i in range(len(a["channels"])):
            h, w = h + 2 * p - k + 1, w + 2 * p - k + 1
            if i in self.pool_after:
                h, w = h // 2, w // 2
        widths = a["channels"] + [a["hidden"]]
        self.bn = (
            nn.ModuleList(
                [nn.BatchNorm2d(v) for v in a["channels"]] + [nn.BatchNorm1d(a["hidden"])]
            )
            if spec["batch_norm"]
            else None
        )
        self.act = nn.ModuleList([act_module(spec["act"], v) for v in widths])
        self.layers = nn.ModuleList([nn.Linear(chans[-1] * h * w, a["hidden"]), nn.Linear(a["hidden"], spec["classes"])])

    def forward(self, x):
        x = self.norm(x)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.bn is not None:
                x = self.bn[i](x)
            x = self.act[i](x)
            if i in self.pool_after:
                x = nn.functional.max_pool2d(x, 2)
        x = self.layers[0](x.flatten(1))
        if self.bn is not None:
            x = self.bn[-1](x)
        return self.layers[1](self.act[-1](x))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, act, bn, shortcuts):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else None
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not bn)
        if bn:
            self.bn1 = norm(cout)
        self.act1 = act_module(act, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not bn)
        if bn:
            self.bn2 = norm(cout)
        self.shortcuts = shortcuts
        self.shortcut = None
        if shortcuts and (stride != 1 or cin != cout):
            mods = [nn.Conv2d(cin, cout, 1, stride, 0, bias=not bn)] + ([norm(cout)] if bn else [])
            self.shortcut = nn.Sequential(*mods)
        self.act2 = act_module(act, cout)
        self.bn = bn

    def forward(self, x):
        y = self.act1(self.bn1(self.conv1(x)) if self.bn else self.conv1(x))
        y = self.bn2(self.conv2(y)) if self.bn else self.conv2(y)
        if self.shortcuts:
            y = y + (self.shortcut(x) if self.shortcut is not None else x)
        return self.act2(y)


class ResNet(nn.Module):
    """He et al. 2016's ResNet for small images (depth 6n + 2), or the plain net."""

    def __init__(self, spec):
        super().__init__()
        a, act, bn = spec["arch"], spec["act"], spec["batch_norm"]
        n = (a["depth"] - 2) // 6
        self.norm = Normalise(spec["input_mean"], spec["input_std"], spec["input"])
        self.conv1 = nn.Conv2d(spec["input"][0], 16, 3, 1, 1, bias=not bn)
        if bn:
            self.bn1 = nn.BatchNorm2d(16)
        self.act1 = act_module(act, 16)
        self.bn = bn
        cin = 16
        for s in range(3):
            cout = 16 << s
            blocks = []
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(BasicBlock(cin, cout, stride, act, bn, a["shortcuts"]))
                cin = cout
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(64, spec["classes"])

    def forward(self, x):
        x = self.norm(x)
        x = self.act1(self.bn1(self.conv1(x)) if self.bn else self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


def build(spec):
    return {"mlp": Mlp, "cnn": Cnn, "resnet": ResNet}[spec["arch"]["kind"]](spec)


def spec_of(arch, act, bn, inp, classes=10):
    return {
        "arch": arch,
        "act": act,
        "alpha_init": 0.25,
        "slope_constraint": "none",
        "batch_norm": bn,
        "init": "he-prelu",
        "input": inp,
        "classes": classes,
        "input_mean": 0.13,
        "input_std": 0.31,
        "bias_init": 0.0,
    }


CASES = {
    "mlp_bn_prelu": spec_of({"kind": "mlp", "hidden": [12, 9]}, {"p-relu": {"shared": False}}, True, [1, 6, 5]),
    "cnn_bn_prelu": spec_of(
        {"kind": "cnn", "channels": [4, 6], "kernel": 3, "padding": 1, "pool_after": [0, 1], "hidden": 8},
        {"p-relu": {"shared": False}},
        True,
        [1, 9, 8],
    ),
    "resnet8_bn_prelu": spec_of({"kind": "resnet", "depth": 8, "shortcuts": True}, {"p-relu": {"shared": False}}, True, [1, 12, 12]),
    "resnet8_leaky": spec_of({"kind": "resnet", "depth": 8, "shortcuts": True}, {"leaky-relu": 0.1}, False, [2, 9, 10]),
    "plain8_bn_shared": spec_of({"kind": "resnet", "depth": 8, "shortcuts": False}, {"p-relu": {"shared": True}}, True, [1, 10, 10]),
}


def randomise(model, gen):
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var") or (name.endswith(".weight") and t.dim() == 1 and "act" not in name):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith("running_mean") or name.endswith(".bias"):
                t.copy_(torch.rand(t.shape, generator=gen) - 0.5)
            elif "act" in name:
                t.copy_(torch.rand(t.shape, generator=gen) * 0.6 - 0.1)


def write(out):
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for name, spec in CASES.items():
        torch.manual_seed(len(name))
        model = build(spec)
        randomise(model, gen)
        model.eval()
        x = torch.rand((8, *spec["input"]), generator=gen)
        with torch.no_grad():
            logits = model(x)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(out / f"{name}.safetensors"))
        (out / f"{name}.spec.json").write_text(json.dumps(spec, indent=1) + "\n")
        io = {
            "torch": torch.__version__,
            "input": x.reshape(8, -1).tolist(),
            "logits": logits.tolist(),
            "state_dict_keys": sorted(sd),
        }
        (out / f"{name}.io.json").write_text(json.dumps(io) + "\n")
        print(f"{name}: {sum(v.numel() for k, v in sd.items() if 'num_batches' not in k)} values, wrote {out}/{name}.*")


def check(ckpt, reference):
    """Loads a prelu checkpoint strictly and compares with `prelu export --reference` logits."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(ckpt, "pt") as f:
        spec = json.loads(f.metadata()["prelu.spec"])
    sd = load_file(ckpt)
    model = build(spec)
    keys = set(model.state_dict())
    # Training checkpoints also hold optimiser state: the model's own keys must all be there.
    model.load_state_dict({k: v for k, v in sd.items() if k in keys}, strict=True)
    model.eval()
    feats = int(np.prod(spec["input"]))
    x = torch.from_numpy(np.fromfile(reference + ".inputs.f32", dtype="<f4").reshape(-1, feats))
    want = np.fromfile(reference + ".logits.f32", dtype="<f4").reshape(x.shape[0], -1)
    with torch.no_grad():
        got = model(x).numpy()
    diff = float(np.abs(got - want).max())
    print(json.dumps({"examples": int(x.shape[0]), "max_abs_logit_diff": diff, "argmax_agreement": float((got.argmax(1) == want.argmax(1)).mean()), "extra_tensors": len(set(sd) - keys)}))
    return diff


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--check":
        # --check CHECKPOINT --reference MODEL.onnx (the prefix of `prelu export --reference` files)
        sys.exit(0 if check(sys.argv[2], sys.argv[4]) <= 1e-4 else 1)
    else:
        write(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/vectors/presets"))
