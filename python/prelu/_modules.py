"""Which modules of a PyTorch model are activations and weight layers, and
which weight layer feeds which activation.

The rule is module order, not data flow: a weight layer (``nn.Linear``,
``nn.Conv1d/2d/3d``) feeds the next activation (``nn.PReLU``,
``nn.LeakyReLU``, ``nn.ReLU``) after it in ``named_modules()`` order,
whatever lies between (BatchNorm, dropout, pooling, other weight layers).
Models that declare their layers in the order they apply them (the usual
``nn.Sequential`` style, and blocks that declare ``conv, bn, act``) get the
pairing data flow gives; a model that declares one activation and applies
it in several places gets the pairing of its declaration order.
"""

import torch
from torch import nn

from ._prelu import leaky_kind

#: The activations the sentinel watches and He init reads slopes from.
ACTIVATIONS = (nn.PReLU, nn.LeakyReLU, nn.ReLU)

#: The layers whose weights feed an activation.
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def unwrap(module):
    """The model inside a ``DistributedDataParallel`` / ``DataParallel``
    wrapper (so layer names carry no ``module.`` prefix), else ``module``."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(module, wrappers):
        module = module.module
    return module


def activations(module):
    """``(name, module)`` of every watched activation, in module order (a
    module that appears under several names counts once, under its first)."""
    return [(n, m) for n, m in unwrap(module).named_modules() if isinstance(m, ACTIVATIONS)]


def feeding_pairs(module):
    """``(weight_name, weight_layer, act_name, activation)`` for every weight
    layer followed by an activation in module order (see the module doc)."""
    pending = []
    pairs = []
    for name, m in unwrap(module).named_modules():
        if isinstance(m, WEIGHT_LAYERS):
            pending.append((name, m))
        elif isinstance(m, ACTIVATIONS):
            pairs.extend((wn, w, name, m) for wn, w in pending)
            pending = []
    return pairs


def feeding_weight(module):
    """For each activation (by id): the weight layer right before it in
    module order with no other activation between them, i.e. the last
    weight layer paired with it by :func:`feeding_pairs`."""
    out = {}
    for _, w, _, act in feeding_pairs(module):
        out[id(act)] = w
    return out


def slope_of(act):
    """The negative slope of an activation: 0 for ReLU, ``negative_slope``
    for LeakyReLU, the mean of a PReLU's current slopes."""
    if isinstance(act, nn.PReLU):
        with torch.no_grad():
            return float(act.weight.detach().double().mean().cpu())
    if isinstance(act, nn.LeakyReLU):
        return float(act.negative_slope)
    return 0.0


def kind_of(act):
    """prelu's name of an activation's kind: ``relu``, ``leaky:A``,
    ``prelu`` (a slope per channel) or ``prelu-shared`` (one slope)."""
    if isinstance(act, nn.PReLU):
        return "prelu-shared" if act.num_parameters == 1 else "prelu"
    if isinstance(act, nn.LeakyReLU):
        return leaky_kind(float(act.negative_slope))
    return "relu"
