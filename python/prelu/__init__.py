"""prelu from Python: the Rust core of prelu (a Parametric-ReLU toolkit)
on numpy arrays and PyTorch modules::

    import prelu
    model = prelu.from_torch(net, torch.rand(8, 3, 32, 32))  # a PyTorch module
    report = prelu.diagnose(model, images)                    # the CLI's diagnose JSON, as a dict
    canon = prelu.canonicalize(model)                         # the same function, canonical weights
    net.load_state_dict(canon.torch_state_dict(), strict=True)

``prelu.stability``, ``prelu.attack`` and ``prelu.sculpt`` are the CLI's
commands of those names; ``prelu.report(run_dir)`` its report page, shown
inline in a notebook as every result is.
``prelu.Model.load(path)`` reads checkpoints, run folders and ONNX files;
``prelu.to_torch(model)`` builds an ``nn.Module`` for any prelu graph.
``prelu.torch`` (a submodule, imported on its own) holds the PyTorch-side
tools. See docs/python.md.
"""

from ._prelu import PreluError, set_threads, __version__
from ._model import Model
from ._analyses import attack, canonicalize, diagnose, sculpt, stability
from ._display import Report, report
from ._from_torch import from_torch
from ._to_torch import to_torch

load = Model.load

__all__ = [
    "Model",
    "PreluError",
    "Report",
    "attack",
    "canonicalize",
    "diagnose",
    "from_torch",
    "load",
    "report",
    "sculpt",
    "set_threads",
    "stability",
    "to_torch",
]
