#!/usr/bin/env python3
"""A PyTorch model with its own module names, saved as a `state_dict` in
safetensors, and the prelu graph file that describes it (node names = the
module paths, so the state dict's keys map onto the graph without renaming).

    python3 scripts/torch_state_dict_graph.py [OUT_DIR]   # a Python with torch; default tests/vectors/torch_sd

Writes:
  net.safetensors  `safetensors.torch.save_file(net.state_dict())`: keys
                   features.0.weight/bias (Conv2d), features.1.weight
                   (nn.PReLU(4)), features.3.weight (Conv2d, no bias),
                   bn.weight/bias/running_mean/running_var/num_batches_tracked,
                   act.weight (nn.PReLU(), one slope), classifier.weight/bias
  net.graph.toml   the graph file (input [1, 10, 10])
  net.json         5 inputs and the model's outputs in eval mode

Weights, slopes and BatchNorm statistics are random (seeded). Run once; the
outputs are committed so tests need no Python.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/vectors/torch_sd")

GRAPH = """# The graph of scripts/torch_state_dict_graph.py's `Net`: node names are the
# PyTorch module paths, so `features.0.weight` etc. are read as they are.
input = [1, 10, 10]
outputs = ["classifier"]

[[nodes]]
name = "features.0"
op = "conv2d"
out_channels = 4
kernel = 3
padding = 1

[[nodes]]
name = "features.1"
op = "act"
act = "prelu"

[[nodes]]
name = "features.2"
op = "max_pool"
kernel = 2

[[nodes]]
name = "features.3"
op = "conv2d"
out_channels = 6
kernel = 3
bias = false

[[nodes]]
name = "bn"
op = "batch_norm"

[[nodes]]
name = "act"
op = "act"
act = "prelu-shared"

[[nodes]]
name = "flatten"
op = "flatten"

[[nodes]]
name = "classifier"
op = "linear"
out_features = 5
"""


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.PReLU(4), nn.MaxPool2d(2),
                                      nn.Conv2d(4, 6, 3, bias=False))
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.PReLU()
        self.classifier = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x):
        return self.classifier(self.act(self.bn(self.features(x))).flatten(1))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.features[1].weight.uniform_(-0.3, 0.6)
        net.act.weight.fill_(0.15)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.2, 0.2)
        net.bn.running_mean.uniform_(-0.3, 0.3)
        net.bn.running_var.uniform_(0.5, 2.0)
    net.eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(OUT / "net.safetensors"))
    (OUT / "net.graph.toml").write_text(GRAPH)
    x = torch.rand(5, 1, 10, 10)
    with torch.no_grad():
        y = net(x)
    (OUT / "net.json").write_text(json.dumps({
        "torch": torch.__version__, "input_shape": list(x.shape), "input": x.flatten().tolist(),
        "output_shape": list(y.shape), "output": y.flatten().tolist(),
        "keys": {k: list(v.shape) for k, v in net.state_dict().items()},
    }) + "\n")
    print(sorted(net.state_dict().keys()))


if __name__ == "__main__":
    main()
