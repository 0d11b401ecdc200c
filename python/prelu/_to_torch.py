"""``to_torch``: an ``nn.Module`` for any prelu graph, with PyTorch's names
(``{node}.weight`` under nested modules, so ``layer1.0.conv1.weight``) and
prelu's tensors, computing what prelu computes."""

from __future__ import annotations

import numpy as np


def _pair(v) -> tuple:
    """A graph file's size: one number for both sides, or ``[h, w]``."""
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


def _symmetric(pads) -> bool:
    t, l, b, r = pads
    return t == b and l == r


def _layer(torch, node: dict, sd: dict, rank_in: int):
    """The torch module holding node ``node``'s tensors, or ``None`` for an
    op without tensors."""
    nn = torch.nn
    name, op = node["name"], node["op"]

    def t(suffix):
        return torch.from_numpy(np.array(sd[f"{name}.{suffix}"], dtype=np.float32))

    if op == "conv2d":
        w = t("weight")
        pads = node["pads"]
        m = nn.Conv2d(
            w.shape[1],
            w.shape[0],
            _pair(node["kernel"]),
            stride=_pair(node["stride"]),
            padding=(pads[0], pads[1]) if _symmetric(pads) else 0,
            dilation=_pair(node["dilation"]),
            bias=node["bias"],
        )
    elif op == "linear":
        w = t("weight")
        m = nn.Linear(w.shape[1], w.shape[0], bias=node["bias"])
    elif op == "batch_norm":
        c = t("weight").shape[0]
        kind = nn.BatchNorm1d if rank_in == 2 else nn.BatchNorm2d
        m = kind(c, eps=node["eps"], momentum=node["momentum"])
    elif op == "act" and node["act"].startswith("prelu"):
        m = nn.PReLU(num_parameters=t("weight").numel())
    else:
        return None
    with torch.no_grad():
        for pname, p in list(m.named_parameters()) + list(m.named_buffers()):
            if pname != "num_batches_tracked":
                p.copy_(t(pname).reshape(p.shape))
    return m.eval()


def _attach(torch, root, path: str, module) -> None:
    """Sets ``module`` at the dotted ``path`` under ``root``, making plain
    container modules for the missing levels."""
    parts = path.split(".")
    at = root
    for p in parts[:-1]:
        if not hasattr(at, p) or not isinstance(getattr(at, p), torch.nn.Module):
            at.add_module(p, torch.nn.Module())
        at = getattr(at, p)
    at.add_module(parts[-1], module)


def _pool(F, torch, node: dict, x):
    """Max or average pooling with prelu's padding and output size."""
    k, pads = _pair(node["kernel"]), node["pads"]
    s = _pair(node["stride"]) if node.get("stride") is not None else k
    ceil = node["ceil_mode"]
    _, ho, wo = node["shape"]
    t, l, b, r = pads
    native = _symmetric(pads) and 2 * t <= k[0] and 2 * l <= k[1]
    if node["op"] == "max_pool":
        if native:
            y = F.max_pool2d(x, k, s, padding=(t, l), ceil_mode=ceil)
        else:
            y = F.max_pool2d(F.pad(x, (l, r, t, b), value=float("-inf")), k, s, ceil_mode=ceil)
    elif native:
        y = F.avg_pool2d(x, k, s, padding=(t, l), ceil_mode=ceil, count_include_pad=node["count_include_pad"])
    else:
        xp = F.pad(x, (l, r, t, b))
        y = F.avg_pool2d(xp, k, s, ceil_mode=ceil, count_include_pad=True)
        if not node["count_include_pad"]:
            ones = F.pad(torch.ones_like(x[:1, :1]), (l, r, t, b))
            y = y / F.avg_pool2d(ones, k, s, ceil_mode=ceil, count_include_pad=True)
    return y[..., :ho, :wo]


def to_torch(model):
    """An ``nn.Module`` (evaluation mode) computing ``model``'s function,
    for any prelu graph: convs, linear layers, BatchNorms and PReLUs are
    PyTorch modules under the nodes' names (its ``state_dict`` is
    ``model.torch_state_dict()`` for a model not from ``from_torch``: prelu's
    tensors and a ``num_batches_tracked`` per BatchNorm), the other ops and
    the model's input normalisation are done in ``forward``. It returns the
    first head's output, or a tuple of every head's for a graph with several."""
    import torch

    return _build(torch, model.graph(), model.state_dict())


def _build(torch, graph: dict, sd: dict):
    """The module class is made here so that torch is imported only when used."""
    F = torch.nn.functional

    class PreluGraph(torch.nn.Module):
        """A prelu layer graph as a PyTorch module."""

        def __init__(self):
            super().__init__()
            self._graph = graph
            c = graph["input"][0]
            norm = graph.get("input_norm") or {"mean": [0.0] * c, "std": [1.0] * c}
            # Not in the state dict: the normalisation is the graph's, not a tensor of prelu's.
            self.register_buffer("_mean", torch.tensor(norm["mean"]).reshape(1, c, 1, 1), persistent=False)
            self.register_buffer("_std", torch.tensor(norm["std"]).reshape(1, c, 1, 1), persistent=False)
            self._layers = {}
            ranks = {"input": 4}
            nodes = sorted(graph["nodes"], key=lambda n: n["name"].count("."))
            for n in graph["nodes"]:
                ranks[n["name"]] = n["rank"]
            for n in nodes:
                m = _layer(torch, n, sd, ranks[n["inputs"][0]])
                if m is not None:
                    _attach(torch, self, n["name"], m)
                    self._layers[n["name"]] = m
            self.eval()

        def _node(self, node: dict, xs: list):
            op, x = node["op"], xs[0]
            m = self._layers.get(node["name"])
            if op == "conv2d":
                t, l, b, r = node["pads"]
                return m(x if _symmetric(node["pads"]) else F.pad(x, (l, r, t, b)))
            if op == "linear":
                return m(x.flatten(1) if x.dim() > 2 else x)
            if op == "batch_norm" or m is not None:
                return m(x)
            if op == "act":
                act = node["act"]
                return F.relu(x) if act == "relu" else F.leaky_relu(x, float(act.split(":")[1]))
            if op in ("max_pool", "avg_pool"):
                return _pool(F, torch, node, x)
            if op == "global_avg_pool":
                return x.mean((2, 3), keepdim=True)
            if op == "flatten":
                return x.flatten(1)
            acc = x
            for o in xs[1:]:
                acc = acc + o.reshape(acc.shape)
            return acc

        def forward(self, x):
            g = self._graph
            c, h, w = g["input"]
            x = x.reshape(x.shape[0], c, h, w)
            x = (x - g["input_mean"]) / g["input_std"]
            x = (x - self._mean) / self._std
            vals = {"input": x}
            for node in g["nodes"]:
                vals[node["name"]] = self._node(node, [vals[i] for i in node["inputs"]])
            outs = [v.flatten(1) if v.dim() > 2 else v for v in (vals[o] for o in g["outputs"])]
            return outs[0] if len(outs) == 1 else tuple(outs)

    return PreluGraph()
