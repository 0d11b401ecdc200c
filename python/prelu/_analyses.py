"""The analyses of the Rust core on numpy data: ``diagnose`` and
``canonicalize``, with the CLI's ``--json`` fields as plain dicts."""

from __future__ import annotations

import json

import numpy as np

from . import _arrays
from ._model import Model


def diagnose(model: Model, inputs, labels=None, batch_size: int = 256) -> dict:
    """``prelu diagnose`` over ``inputs`` (numpy array, torch tensor, or a
    DataLoader of ``(x, y)`` or ``x`` batches): the CLI's ``--json`` fields
    (``examples``, ``labels``, ``acc``, ``loss``, ``layers`` with each
    activation layer's ``layer``, ``negative_share``, ``dead``, slopes...,
    ``slope_histograms``, ``alarms``). Without labels the gradients are those
    of the loss against the model's own predictions, and ``acc`` and
    ``loss`` are ``None``, as the CLI's are null."""
    x, y = _arrays.gather(inputs, labels)
    data, n = _arrays.examples_bytes(x, model.input_shape, model.input_layout)
    y = None if y is None else [int(v) for v in y.reshape(-1)]
    return json.loads(model._core.diagnose(data, n, y, batch_size))


def canonicalize(model: Model, inputs=None, return_report: bool = False, examples: int = 64):
    """``prelu canonicalize``: the symmetry canonical form of ``model`` (its
    BatchNorms folded into the layers before them, steep slopes flipped,
    channel groups rescaled to unit norm), the same function. It is checked
    on ``inputs`` (default: ``examples`` uniform random examples in [0, 1),
    seed 0); with ``return_report=True`` also the report (the CLI's
    ``report``: ``bn``, ``flipped``, ``max_output_diff``, ...) as a dict."""
    if inputs is None:
        x = np.random.default_rng(0).random((examples, *model.input_shape), dtype=np.float32)
    else:
        x, _ = _arrays.gather(inputs)
    data, n = _arrays.examples_bytes(x, model.input_shape, model.input_layout)
    core, report = model._core.canonicalize(data, n)
    out = Model(core, model._torch)
    return (out, json.loads(report)) if return_report else out
