"""The user's PyTorch module's ``state_dict`` keys for a model imported by
``from_torch``: which of prelu's tensors goes under which key, what the
module holds that prelu does not (``num_batches_tracked``, buffers the
forward pass never reads), the BatchNorms, so that a canonical model
whose BatchNorms were folded still fills every key, and a per-channel input
normalisation that the import folded into the first layer, taken back out
of that layer's weights."""

from __future__ import annotations

import re

import numpy as np

from ._prelu import PreluError

# Values of a folded BatchNorm that make it the identity (running_var is
# 1 - eps, so that sqrt(running_var + eps) = 1).
_IDENTITY = ("weight", "bias", "running_mean", "running_var")


class _Unfold:
    """A per-channel input normalisation ``(x - mean[c]) / std[c]`` that the
    import folded into ``layer`` (``w' = w / std``, ``b' = b - w' mean``),
    recovered from the module's and the import's values of that layer, to be
    taken out of the layer's weights again (exact for any later change of
    its output rows: BatchNorm folds, rescaling, sign flips)."""

    def __init__(self, layer: str, channel: np.ndarray, mean: np.ndarray, std: np.ndarray):
        self.layer, self.channel, self.mean, self.std = layer, channel, mean, std

    @classmethod
    def recover(cls, layer: str, mine: dict, imported: dict, input_shape) -> "_Unfold":
        c, h, w = input_shape
        folded = imported[f"{layer}.weight"].astype(np.float64)
        rows = folded.reshape(folded.shape[0], -1)
        per = rows.shape[1]
        # The input channel each weight column reads: conv [O, C, kh, kw], or a
        # linear layer's C*H*W features in C, H, W order.
        k = folded.shape[2] * folded.shape[3] if folded.ndim == 4 else h * w
        channel = (np.arange(per) // k) % c
        orig = mine[f"{layer}.weight"].astype(np.float64).reshape(rows.shape)
        std = np.ones(c)
        for j in range(c):
            cols = channel == j
            at = np.unravel_index(np.argmax(np.abs(rows[:, cols])), rows[:, cols].shape)
            if rows[:, cols][at] != 0:
                std[j] = orig[:, cols][at] / rows[:, cols][at]
        # b - b' = A mean, A[o, c] = the sum of row o's folded weights on channel c;
        # a part of mean that A does not see never shows in the layer either.
        a = np.stack([rows[:, channel == j].sum(1) for j in range(c)], 1)
        bias = mine.get(f"{layer}.bias")
        orig_b = np.zeros(rows.shape[0]) if bias is None else bias.astype(np.float64)
        mean = np.linalg.lstsq(a, orig_b - imported[f"{layer}.bias"].astype(np.float64), rcond=None)[0]
        return cls(layer, channel, mean, std)

    def apply(self, sd: dict) -> dict:
        """``sd`` with the layer's weight and bias in the module's terms."""
        w, b = f"{self.layer}.weight", f"{self.layer}.bias"
        if w not in sd:
            return sd
        rows = sd[w].astype(np.float64).reshape(sd[w].shape[0], -1)
        out = dict(sd)
        out[w] = (rows * self.std[self.channel]).reshape(sd[w].shape).astype(sd[w].dtype)
        out[b] = (sd[b].astype(np.float64) + (rows * self.mean[self.channel]).sum(1)).astype(sd[b].dtype)
        return out


def _folded_layer(notes) -> str | None:
    """The layer the import folded a per-channel input normalisation into, from its notes."""
    for n in notes:
        m = re.search(r"input normalisation is folded into `([^`]+)`", n)
        if m:
            return m.group(1)
    return None


class TorchNames:
    """The module's keys (in its order, with shapes and dtypes), its own
    values of the keys prelu has no tensor for, and its BatchNorms (node
    name -> ``eps`` and the node the BatchNorm reads)."""

    def __init__(self, keys, extras, batch_norms, unfold=None):
        self.keys = keys
        self.extras = extras
        self.batch_norms = batch_norms
        self.unfold = unfold

    @classmethod
    def from_import(cls, module_sd: dict, imported_sd: dict, graph: dict, notes=(), input_shape=None) -> "TorchNames":
        """Checks that the import kept the module's tensors under their own
        names and values (after taking a folded input normalisation back
        out, see the notes), and records the rest. ``module_sd``: the
        module's state dict as numpy arrays."""
        layer = _folded_layer(notes)
        unfold = None if layer is None else _Unfold.recover(layer, module_sd, imported_sd, input_shape)
        if unfold is not None:
            imported_sd = _drop_gained_bias(unfold.apply(imported_sd), module_sd, layer)
        for key, v in imported_sd.items():
            mine = module_sd.get(key)
            if mine is None:
                raise PreluError(
                    f"the imported graph has a tensor `{key}` that the module's state_dict lacks "
                    f"(its keys: {', '.join(list(module_sd)[:8])}{', ...' if len(module_sd) > 8 else ''}); "
                    "a parameter used twice, or a layer the import changed"
                )
            if mine.size != v.size or not np.allclose(mine.reshape(v.shape), v, rtol=1e-5, atol=1e-6):
                raise PreluError(f"the import changed `{key}`; its values would not load back into the module")
        keys = [(k, tuple(v.shape), v.dtype.str) for k, v in module_sd.items()]
        extras = {k: v.copy() for k, v in module_sd.items() if k not in imported_sd}
        nodes = graph["nodes"]
        batch_norms = {
            n["name"]: {"eps": float(n.get("eps", 1e-5)), "input": n["inputs"][0]}
            for n in nodes
            if n["op"] == "batch_norm"
        }
        return cls(keys, extras, batch_norms, unfold)

    def _folded(self, present: set, node: str) -> list:
        """The BatchNorms that read ``node`` in the module and are gone from
        the model (folded into it)."""
        return [b for b, info in self.batch_norms.items() if info["input"] == node and b not in present]

    def to_module(self, sd: dict, graph: dict) -> dict:
        """The module's state dict from prelu's tensors ``sd`` of the graph
        ``graph`` (the imported model or one derived from it)."""
        present = {n["name"] for n in graph["nodes"]}
        if self.unfold is not None and self.unfold.layer in present:
            sd = self.unfold.apply(sd)
            layer = self.unfold.layer
            # Without a bias in the module, the layer's bias is zero again, or
            # the shift of a BatchNorm folded into it (placed below).
            if all(k != f"{layer}.bias" for k, _, _ in self.keys) and not self._folded(present, layer):
                sd = _drop_gained_bias(sd, None, layer)
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


def _drop_gained_bias(sd: dict, module_sd, layer: str) -> dict:
    """``sd`` without the bias the fold gave ``layer`` where the module's
    layer has none (it is zero once the normalisation is taken back out)."""
    key = f"{layer}.bias"
    if key not in sd or (module_sd is not None and key in module_sd):
        return sd
    b = sd[key]
    if np.abs(b).max(initial=0.0) > 1e-4 * (1.0 + np.abs(sd[f"{layer}.weight"]).max(initial=0.0)):
        raise PreluError(f"`{key}` is not zero after taking the input normalisation back out of `{layer}`")
    return {k: v for k, v in sd.items() if k != key}


def _fit(v: np.ndarray, shape: tuple, dtype: str, key: str) -> np.ndarray:
    """``v`` in the module's shape and dtype (a PReLU's ``[C]`` slopes may be
    kept as ``[C, 1, 1]``: same values)."""
    if v.size != int(np.prod(shape, dtype=np.int64)):
        raise PreluError(f"the model's `{key}` has shape {list(v.shape)}, the module's {list(shape)}")
    return v.reshape(shape).astype(np.dtype(dtype))
