"""``from_torch``: a PyTorch module into a prelu model, through an
in-memory ONNX export that the Rust core's importer reads."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np

from ._model import Model
from ._prelu import Model as _Core
from ._prelu import PreluError
from ._torch_names import TorchNames


def _export(module, example_input) -> bytes:
    """The module (in evaluation mode) as ONNX bytes: opset 17, BatchNorms
    kept as nodes (``TrainingMode.PRESERVE``), every parameter its own
    initializer under its ``state_dict`` name (initializers kept as inputs:
    the exporter would otherwise merge those that happen to hold equal
    values, as a fresh BatchNorm's weight and running_var do). Constant
    folding turns a PReLU's ``Unsqueeze`` of its slopes into a constant
    (the importer names the layer by the node then, ``act1``)."""
    import torch

    buf = io.BytesIO()
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The exporter's advice on constant folding is for modules in
            # training mode, and its deprecation notices are not the user's.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example_input,),
                buf,
                dynamo=False,
                opset_version=17,
                training=torch.onnx.TrainingMode.PRESERVE,
                do_constant_folding=True,
                keep_initializers_as_inputs=True,
                input_names=["input"],
                output_names=["output"],
            )
    finally:
        module.train(was_training)
    return buf.getvalue()


def module_path(node_name: str, op: str = "") -> str:
    """The module path of an ONNX node that PyTorch's exporter named by
    scope (``/layer1/layer1.0/act/Sigmoid`` -> ``layer1.0.act``), as the
    importer names layers."""
    parts = [p for p in node_name.split("/") if p]
    if parts and (not op or parts[-1].startswith(op)):
        parts.pop()
    kept = []
    for p in parts:
        if kept and p.startswith(kept[-1] + "."):
            kept.pop()
        kept.append(p)
    return ".".join(kept)


def _explain(e: PreluError) -> PreluError:
    """The importer's error, plus the op and module path of the node it names."""
    msg = str(e)
    m = re.search(r"node `([^`]*)` \(([A-Za-z0-9_]+)\)", msg)
    if not m:
        return PreluError(f"the module cannot be imported: {msg}")
    path = module_path(m.group(1), m.group(2)) or "the top-level module"
    return PreluError(f"the module cannot be imported: the op {m.group(2)} in `{path}`: {msg}")


def from_torch(module, example_input) -> Model:
    """A prelu model of a PyTorch module: exported to ONNX in memory
    (evaluation mode) and imported by prelu. ``example_input``: a batch
    ``[N, C, H, W]`` (or ``[N, F]``) of the module's input; the module's own
    normalisation inside ``forward`` (``x = (x - 0.5) / 0.25``) is imported
    as the model's input normalisation. The model's tensors keep the
    module's ``state_dict`` names (:meth:`Model.torch_state_dict`). An op
    prelu's graph cannot hold is a ``PreluError`` naming the op and the
    module path."""
    import torch

    x = example_input if isinstance(example_input, torch.Tensor) else torch.as_tensor(np.asarray(example_input))
    data = _export(module, x.detach().to(torch.float32))
    try:
        core = _Core.from_onnx(data)
    except PreluError as e:
        raise _explain(e) from None
    model = Model(core)
    mine = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
    model._torch = TorchNames.from_import(mine, model.state_dict(), model.graph(), model.notes, model.input_shape)
    return model
