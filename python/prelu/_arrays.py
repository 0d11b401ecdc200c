"""Examples and labels from what users hold: numpy arrays, torch tensors,
lists, or an iterable of batches (a ``torch.utils.data.DataLoader``)."""

from __future__ import annotations

import numpy as np


def to_numpy(x, dtype=None) -> np.ndarray:
    """``x`` as a numpy array: torch tensors are detached and moved to the
    CPU, anything else goes through ``np.asarray``."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    return a if dtype is None else a.astype(dtype, copy=False)


def _is_batches(x) -> bool:
    """Whether ``x`` is an iterable of batches rather than one array."""
    if isinstance(x, (np.ndarray, list, tuple)) or hasattr(x, "detach"):
        return False
    return hasattr(x, "__iter__")


def gather(inputs, labels=None):
    """``(examples, labels)``: examples as float32 ``[N, ...]``, labels as
    int64 ``[N]`` or ``None``. A DataLoader (any iterable of batches) is
    concatenated; its batches are ``(x, y)`` pairs (labels taken from them
    unless ``labels`` is given) or bare ``x``."""
    if not _is_batches(inputs):
        x = to_numpy(inputs, np.float32)
        y = None if labels is None else to_numpy(labels, np.int64)
        return x, y
    xs, ys = [], []
    for batch in inputs:
        if isinstance(batch, (list, tuple)):
            xs.append(to_numpy(batch[0], np.float32))
            if len(batch) > 1:
                ys.append(to_numpy(batch[1], np.int64))
        else:
            xs.append(to_numpy(batch, np.float32))
    if not xs:
        raise ValueError("the data loader gave no batches")
    x = np.concatenate(xs)
    if labels is not None:
        return x, to_numpy(labels, np.int64)
    return x, (np.concatenate(ys) if len(ys) == len(xs) else None)


def examples_bytes(x: np.ndarray, input_shape, layout: str = "nchw") -> tuple[bytes, int]:
    """The examples as float32 bytes in C, H, W order and their count; a
    single example of the model's input shape counts as a batch of one. For
    a model whose original input is NHWC (``layout`` ``nhwc`` or
    ``flat-hwc``, a Keras model) the examples are in H, W, C order, as the
    CLI's ``.npy`` files are, and are transposed here."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise ValueError("a scalar is not a batch of examples")
    c, h, w = input_shape
    one = (h, w, c) if layout in ("nhwc", "flat-hwc") else (c, h, w)
    if tuple(x.shape) == one:
        x = x[None]
    if layout in ("nhwc", "flat-hwc") and x[0].size == c * h * w:
        x = x.reshape(x.shape[0], h, w, c).transpose(0, 3, 1, 2)
    x = np.ascontiguousarray(x, dtype="<f4")
    return x.tobytes(), int(x.shape[0])


def from_bytes(shape, data: bytes) -> np.ndarray:
    """A float32 array of ``shape`` from little-endian bytes (a copy, writable)."""
    return np.frombuffer(data, dtype="<f4").astype(np.float32).reshape(shape)
