"""The analyses of the Rust core on numpy data: ``diagnose``,
``stability``, ``attack``, ``canonicalize`` and ``sculpt``, with the CLI's
``--json`` fields as dicts (shown as tables in a notebook)."""

from __future__ import annotations

import json

import numpy as np

from . import _arrays
from ._display import Result
from ._model import Model


def _examples(model: Model, inputs, labels=None):
    """``(float32 bytes, count, labels as a list or None)`` of ``inputs``."""
    x, y = _arrays.gather(inputs, labels)
    data, n = _arrays.examples_bytes(x, model.input_shape, model.input_layout)
    return data, n, (None if y is None else [int(v) for v in y.reshape(-1)])


def diagnose(model: Model, inputs, labels=None, batch_size: int = 256) -> dict:
    """``prelu diagnose`` over ``inputs`` (numpy array, torch tensor, or a
    DataLoader of ``(x, y)`` or ``x`` batches): the CLI's ``--json`` fields
    (``examples``, ``labels``, ``acc``, ``loss``, ``layers`` with each
    activation layer's ``layer``, ``negative_share``, ``dead``, slopes...,
    ``slope_histograms``, ``alarms``). Without labels the gradients are those
    of the loss against the model's own predictions, and ``acc`` and
    ``loss`` are ``None``, as the CLI's are null."""
    data, n, y = _examples(model, inputs, labels)
    return Result("prelu diagnose", json.loads(model._core.diagnose(data, n, y, batch_size)))


def stability(model: Model, inputs, labels=None) -> dict:
    """``prelu stability --checkpoint`` on ``inputs``: per activation layer
    (``layers``) the measured negative-path gain, the optimal slope ``a*``
    and the verdict, from one pass with gradients (against ``labels``, or
    the model's own predictions)."""
    data, n, y = _examples(model, inputs, labels)
    return Result("prelu stability", json.loads(model._core.stability(data, n, y)))


def attack(model: Model, inputs, labels, eps=(0.05, 0.1), method: str = "both", steps: int = 10,
           step_size=None, restarts: int = 1, seed: int = 0, batch_size: int = 256) -> dict:
    """``prelu attack``: FGSM and/or PGD (``method``: ``fgsm``, ``pgd`` or
    ``both``) at each ``eps`` on labelled inputs in [0, 1], with the
    gradient-masking measures: the CLI's per-model ``report`` fields
    (``clean_acc``, ``results`` per eps, ...)."""
    if method not in ("fgsm", "pgd", "both"):
        raise ValueError(f"method must be fgsm, pgd or both, got {method!r}")
    if labels is None and not _arrays._is_batches(inputs):
        raise ValueError("attack needs labels (or a DataLoader of (x, y) batches)")
    data, n, y = _examples(model, inputs, labels)
    if y is None:
        raise ValueError("attack needs labels (or a DataLoader of (x, y) batches)")
    out = model._core.attack(data, n, y, [float(e) for e in eps], method != "pgd", method != "fgsm",
                             steps, step_size, restarts, seed, batch_size)
    return Result("prelu attack", json.loads(out))


def sculpt(model: Model, inputs, labels=None, test_inputs=None, test_labels=None,
           dead_slope_tol: float = 0.0, slope_tol: float = 0.0, return_report: bool = False):
    """``prelu sculpt``: dead units pruned and linear ones folded, by the
    statistics of ``inputs``, and checked on ``test_inputs`` (default: the
    same inputs) against ``test_labels`` (default ``labels``, else the
    model's own predictions). Returns the sculpted ``Model`` (with
    ``return_report=True``, ``(Model, report)``)."""
    stats, n_stats, _ = _examples(model, inputs)
    if test_inputs is None:
        test_inputs, test_labels = inputs, labels if test_labels is None else test_labels
    test, n_test, y = _examples(model, test_inputs, test_labels)
    core, report = model._core.sculpt(stats, n_stats, test, n_test, y, dead_slope_tol, slope_tol)
    out = Model(core, model._torch)
    return (out, Result("prelu sculpt", json.loads(report))) if return_report else out


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
    return (out, Result("prelu canonicalize", json.loads(report))) if return_report else out
