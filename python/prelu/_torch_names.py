"""The user's PyTorch module's ``state_dict`` keys for a model imported by
``from_torch``: which of prelu's tensors goes under which key, what the
module holds that prelu does not (``num_batches_tracked``, buffers the
forward pass never reads), and the BatchNorms, so that a canonical model
whose BatchNorms were folded still fills every key."""

from __future__ import annotations

import numpy as np

from ._prelu import PreluError

# Values of a folded BatchNorm that make it the identity (running_var is
# 1 - eps, so that sqrt(running_var + eps) = 1).
_IDENTITY = ("weight", "bias", "running_mean", "running_var")


class TorchNames:
    """The module's keys (in its order, with shapes and dtypes), its own
    values of the keys prelu has no tensor for, and its BatchNorms (node
    name -> ``eps`` and the node the BatchNorm reads)."""

    def __init__(self, keys, extras, batch_norms):
        self.keys = keys
        self.extras = extras
        self.batch_norms = batch_norms

    @classmethod
    def from_import(cls, module_sd: dict, imported_sd: dict, graph: dict) -> "TorchNames":
        """Checks that the import kept the module's tensors under their own
        names and values, and records the rest. ``module_sd``: the module's
        state dict as numpy arrays."""
        for key, v in imported_sd.items():
            mine = module_sd.get(key)
            if mine is None:
                raise PreluError(
                    f"the imported graph has a tensor `{key}` that the module's state_dict lacks "
                    f"(its keys: {', '.join(list(module_sd)[:8])}{', ...' if len(module_sd) > 8 else ''}); "
                    "a parameter used twice, or a layer the import changed"
                )
            if mine.size != v.size or not np.allclose(mine.reshape(v.shape), v, rtol=1e-6, atol=1e-7):
                raise PreluError(
                    f"the import changed `{key}` (a per-channel input normalisation folded into the first "
                    "layer?); its values would not load back into the module"
                )
        keys = [(k, tuple(v.shape), v.dtype.str) for k, v in module_sd.items()]
        extras = {k: v.copy() for k, v in module_sd.items() if k not in imported_sd}
        nodes = graph["nodes"]
        batch_norms = {
            n["name"]: {"eps": float(n.get("eps", 1e-5)), "input": n["inputs"][0]}
            for n in nodes
            if n["op"] == "batch_norm"
        }
        return cls(keys, extras, batch_norms)

    def _folded(self, present: set, node: str) -> list:
        """The BatchNorms that read ``node`` in the module and are gone from
        the model (folded into it)."""
        return [b for b, info in self.batch_norms.items() if info["input"] == node and b not in present]

    def to_module(self, sd: dict, graph: dict) -> dict:
        """The module's state dict from prelu's tensors ``sd`` of the graph
        ``graph`` (the imported model or one derived from it)."""
        present = {n["name"] for n in graph["nodes"]}
        out, used = {}, set()
        for key, shape, dtype in self.keys:
            node, _, leaf = key.rpartition(".")
            if key in sd:
                out[key] = _fit(sd[key], shape, dtype, key)
                used.add(key)
            elif node in self.batch_norms and node not in present and leaf in _IDENTITY:
                eps = self.batch_norms[node]["eps"]
                fill = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0 - eps}[leaf]
                out[key] = np.full(shape, fill, dtype=np.dtype(dtype))
            elif key in self.extras:
                out[key] = self.extras[key].copy()
            else:
                raise PreluError(f"the model has no tensor for the module's `{key}`")
        for key in sorted(set(sd) - used):
            self._place_shift(out, key, sd[key], present)
        return out

    def _place_shift(self, out: dict, key: str, value: np.ndarray, present: set) -> None:
        """A bias prelu gained by folding a BatchNorm into a layer whose
        module has no bias: the folded BatchNorm carries it (as its bias, or
        as minus its running mean when it has no affine part)."""
        node, _, leaf = key.rpartition(".")
        folded = self._folded(present, node) if leaf == "bias" else []
        if len(folded) != 1:
            raise PreluError(f"the model's tensor `{key}` has no place in the module's state_dict")
        bn = folded[0]
        if f"{bn}.bias" in out:
            out[f"{bn}.bias"] = value.astype(out[f"{bn}.bias"].dtype).reshape(out[f"{bn}.bias"].shape)
        elif f"{bn}.running_mean" in out:
            rm = out[f"{bn}.running_mean"]
            out[f"{bn}.running_mean"] = (-value).astype(rm.dtype).reshape(rm.shape)
        else:
            raise PreluError(f"the model's tensor `{key}` has no place in the module's state_dict")


def _fit(v: np.ndarray, shape: tuple, dtype: str, key: str) -> np.ndarray:
    """``v`` in the module's shape and dtype (a PReLU's ``[C]`` slopes may be
    kept as ``[C, 1, 1]``: same values)."""
    if v.size != int(np.prod(shape, dtype=np.int64)):
        raise PreluError(f"the model's `{key}` has shape {list(v.shape)}, the module's {list(shape)}")
    return v.reshape(shape).astype(np.dtype(dtype))
