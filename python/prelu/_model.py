"""The ``Model`` class: a prelu model held by the Rust core, with numpy in
and out, and its tensors under the names of the user's PyTorch module."""

from __future__ import annotations

import json
import os

import numpy as np

from . import _arrays, _display
from ._prelu import Model as _Core
from ._torch_names import TorchNames


class Model:
    """A prelu model: a layer graph with its weights, run by the Rust core.

    Get one with :meth:`Model.load` (a ``.safetensors`` checkpoint, a run
    folder or an ``.onnx`` file), :func:`prelu.from_torch` (a PyTorch module)
    or :func:`prelu.canonicalize`.
    """

    def __init__(self, core: _Core, torch_names: TorchNames | None = None):
        self._core = core
        self._torch = torch_names

    @classmethod
    def load(cls, path, spec=None) -> "Model":
        """Loads a checkpoint (``.safetensors``), a run folder or an ``.onnx``
        model; ``spec`` is the graph file for a bare PyTorch state dict."""
        spec = None if spec is None else os.fspath(spec)
        return cls(_Core.load(os.fspath(path), spec))

    @property
    def input_shape(self) -> tuple:
        """The input shape ``(C, H, W)`` of one example."""
        return tuple(self._core.input_shape)

    @property
    def classes(self) -> int:
        """The first output's values per example."""
        return self._core.classes

    @property
    def input_layout(self) -> str:
        """How examples are laid out: ``nchw`` (also taking ``[N, C*H*W]``),
        or an imported ONNX model's own (``nhwc``, ``flat``, ``flat-hwc``)."""
        return self._core.input_layout

    @property
    def notes(self) -> list:
        """What the ONNX import had to say (foldings done, ops dropped)."""
        return list(self._core.notes)

    def outputs(self, x) -> list:
        """Every head's output ``[N, F]`` (evaluation mode) for examples
        ``[N, C, H, W]`` or ``[N, C*H*W]`` (numpy, torch or lists; ``[N, H,
        W, C]`` for an imported model whose input is NHWC, ``input_layout``)."""
        data, n = _arrays.examples_bytes(_arrays.to_numpy(x, np.float32), self.input_shape, self.input_layout)
        return [_arrays.from_bytes(shape, b) for shape, b in self._core.forward(data, n)]

    def forward(self, x) -> np.ndarray:
        """The first head's output ``[N, F]`` for examples ``x``."""
        return self.outputs(x)[0]

    __call__ = forward

    def state_dict(self) -> dict:
        """Every tensor under prelu's names (PyTorch style: ``{node}.weight``,
        ``.bias``, ``.running_mean``, ``.running_var``), as numpy arrays."""
        return {k: _arrays.from_bytes(s, b) for k, s, b in self._core.state_dict()}

    def graph(self) -> dict:
        """The graph description ``to_torch`` builds from: nodes (op, fields,
        inputs, resolved ``pads``, output ``rank`` and ``shape``), ``outputs``,
        ``input`` and its normalisation."""
        return json.loads(self._core.graph_json())

    def spec(self) -> dict:
        """The model's spec, as a checkpoint stores it."""
        return json.loads(self._core.spec_json())

    def torch_state_dict(self) -> dict:
        """The tensors as a PyTorch ``state_dict``: for a model from
        :func:`prelu.from_torch` (or derived from one) exactly the module's
        keys, loadable with ``load_state_dict(sd, strict=True)`` into the
        user's own module class, which then computes this model's function;
        BatchNorms that canonicalize folded become identities (weight 1,
        running_mean 0, running_var 1 - eps; their bias carries the folded
        shift where the layer before has no bias of its own, else 0). For
        any other model: prelu's names, plus ``num_batches_tracked`` (0) per
        BatchNorm, as :func:`prelu.to_torch`'s module has them. Values are
        torch tensors when torch is installed, else numpy arrays."""
        sd = self.state_dict()
        if self._torch is not None:
            out = self._torch.to_module(sd, self.graph())
        else:
            out = dict(sd)
            for node in self.graph()["nodes"]:
                if node["op"] == "batch_norm":
                    out[node["name"] + ".num_batches_tracked"] = np.zeros((), np.int64)
        return _as_torch(out)

    def save(self, path) -> None:
        """Writes the model as a ``.safetensors`` checkpoint the CLI reads."""
        self._core.save(os.fspath(path))

    def to_onnx(self) -> bytes:
        """The model as an ONNX file's bytes."""
        return self._core.to_onnx()

    def __repr__(self) -> str:
        return repr(self._core)

    def _repr_html_(self) -> str:
        nodes = [
            {"name": n["name"], "op": n["op"], "inputs": n.get("inputs", [])}
            for n in self.graph()["nodes"]
        ]
        summary = {
            "input": list(self.input_shape),
            "layout": self.input_layout,
            "classes": self.classes,
            "source": self._core.source,
            "notes": self.notes,
            "nodes": nodes,
        }
        return _display.table_html(repr(self), summary)


def _as_torch(sd: dict) -> dict:
    """Numpy arrays as torch tensors when torch is there (else as they are)."""
    try:
        import torch
    except ImportError:
        return sd
    return {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
