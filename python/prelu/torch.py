"""prelu for PyTorch users: the diagnostic sentinel and PReLU training helpers.

Pure Python (torch and the standard library); the Rust extension is not
needed. Everything here works on any ``nn.Module``:

- :class:`Sentinel` watches the activations while the model trains and
  writes a prelu run folder (``metrics.jsonl``, ``config.toml``) that
  ``prelu report RUN`` renders;
- :func:`param_groups` keeps weight decay off slopes, norm parameters and
  biases;
- :func:`init_he_prelu_` is He init with the gain of the slope that each
  layer's activation really has;
- :func:`clamp_slopes_` clamps PReLU slopes in place (e.g. after each
  optimiser step, to keep a layer invertible).

Which weight layer feeds which activation is read from module order (see
``prelu._modules``): a Linear/Conv feeds the next PReLU/LeakyReLU/ReLU
after it in ``named_modules()`` order.
"""

import math

import torch
from torch import nn

from . import _modules
from ._sentinel import Sentinel

__all__ = ["Sentinel", "param_groups", "init_he_prelu_", "clamp_slopes_"]


def _norm_types():
    """The normalisation layers whose weights and biases take no decay."""
    types = [nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm]
    if hasattr(nn, "RMSNorm"):
        types.append(nn.RMSNorm)
    return tuple(types)


def param_groups(module, weight_decay):
    """Two optimiser parameter groups over every parameter of ``module``,
    each exactly once (a parameter shared by several modules counts once):
    first the decayed ones with ``weight_decay``, then, with weight decay 0,
    the PReLU slopes, the weights and biases of BatchNorm, LayerNorm,
    GroupNorm, InstanceNorm (and RMSNorm) layers and every parameter named
    ``bias``. Pass the result to any ``torch.optim`` optimiser."""
    wd = float(weight_decay)
    if not (wd >= 0.0 and math.isfinite(wd)):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    norms = _norm_types()
    seen = set()
    decay, no_decay = [], []
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(m, (nn.PReLU, *norms)) or name == "bias":
                no_decay.append(p)
            else:
                decay.append(p)
    return [
        {"params": decay, "weight_decay": wd},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def init_he_prelu_(module):
    """He (Kaiming) normal init for PReLU networks, in place: every Linear /
    Conv1d/2d/3d followed by a PReLU, LeakyReLU or ReLU gets
    ``W ~ N(0, 2 / (fan_in * (1 + a^2)))`` with ``a`` that activation's own
    slope (a PReLU: the mean of its current slopes; LeakyReLU: its
    ``negative_slope``; ReLU: 0), and zero biases. The activation is the
    next one after the layer in ``named_modules()`` order; layers with no
    activation after them (a classifier head) are left as they are.
    Returns ``module``."""
    with torch.no_grad():
        for name, layer, _, act in _modules.feeding_pairs(module):
            w = layer.weight
            if isinstance(w, nn.parameter.UninitializedParameter):
                raise ValueError(f"init_he_prelu_: `{name}` is a lazy layer; run one forward pass first")
            fan_in = w[0].numel()
            if fan_in == 0:
                raise ValueError(f"init_he_prelu_: `{name}` has zero fan-in")
            a = _modules.slope_of(act)
            w.normal_(0.0, math.sqrt(2.0 / (fan_in * (1.0 + a * a))))
            if layer.bias is not None:
                layer.bias.zero_()
    return module


def clamp_slopes_(module, min, max=None):
    """Clamps every PReLU slope of ``module`` to ``[min, max]`` in place
    (``max=None``: no upper bound), outside autograd. Returns ``module``."""
    lo = float(min)
    hi = None if max is None else float(max)
    if math.isnan(lo) or (hi is not None and not hi >= lo):
        raise ValueError(f"clamp_slopes_: need min <= max, got min={min!r}, max={max!r}")
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.PReLU):
                m.weight.clamp_(min=lo, max=hi)
    return module
