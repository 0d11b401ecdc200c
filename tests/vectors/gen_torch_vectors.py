#!/usr/bin/env python3
"""Generate PyTorch reference vectors for the PReLU tests.

Run once (needs torch); the JSON it writes is committed and the Rust tests read
it, so the test suite never needs Python:

    python3 tests/vectors/gen_torch_vectors.py > tests/vectors/torch_prelu.json

Every case is float64. `dy` is the upstream gradient; `dx` and `dweight` are
what `torch.autograd` returns for `(y * dy).sum()`.
"""
import json

import torch

torch.manual_seed(20261129)


def case(name, x, weight, channel_last=False):
    x = x.clone().double().requires_grad_(True)
    w = weight.clone().double().requires_grad_(True)
    if channel_last:
        # PyTorch has no channel-last PReLU: move the channel to dim 1 and back.
        perm = [0, x.dim() - 1] + list(range(1, x.dim() - 1))
        inv = [0] + list(range(2, x.dim())) + [1]
        y = torch.nn.functional.prelu(x.permute(*perm), w).permute(*inv)
    else:
        y = torch.nn.functional.prelu(x, w)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    return {
        "name": name,
        "axis": "channel-last" if channel_last else ("shared" if w.numel() == 1 else "channel-first"),
        "shape": list(x.shape),
        "x": x.detach().flatten().tolist(),
        "weight": w.detach().flatten().tolist(),
        "y": y.detach().flatten().tolist(),
        "dy": dy.flatten().tolist(),
        "dx": x.grad.flatten().tolist(),
        "dweight": w.grad.flatten().tolist(),
    }


def with_zeros(t):
    t = t.clone()
    flat = t.view(-1)
    flat[:: max(1, flat.numel() // 5)] = 0.0  # exact zeros: PyTorch's x == 0 choice
    return t


cases = [
    case("shared_2d", with_zeros(torch.randn(3, 5)), torch.tensor([0.25])),
    case("channel_first_2d", with_zeros(torch.randn(4, 7)), torch.rand(7) * 0.5),
    case("channel_first_4d", with_zeros(torch.randn(2, 3, 4, 5)), torch.tensor([0.25, -0.3, 1.7])),
    case("channel_first_3d_odd", torch.randn(3, 5, 7), torch.rand(5)),
    case("shared_4d", torch.randn(2, 3, 3, 2), torch.tensor([0.1])),
    case("channel_last_4d", with_zeros(torch.randn(2, 3, 4, 5)), torch.rand(5), channel_last=True),
    case("one_element", torch.tensor([[-2.0]]), torch.tensor([0.3])),
]

gains = [{"a": a, "gain": torch.nn.init.calculate_gain("leaky_relu", a)} for a in [0.0, 0.01, 0.25, 1.0]]

print(json.dumps({"torch_version": torch.__version__, "cases": cases, "leaky_relu_gains": gains}, indent=None))
