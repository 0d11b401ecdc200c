#!/usr/bin/env python3
"""Writes float32 `.npy` inputs for `prelu diagnose --data FILE.npy`.
Standard library only (no NumPy, no torch).

    python3 scripts/make_npy.py windows FASHION_MNIST_DIR OUT.npy SIZE [N] [SEED]
    python3 scripts/make_npy.py json FILE.json OUT.npy

`windows`: N (default 512) SIZExSIZE windows cut at seeded random places
from the Fashion-MNIST test images (t10k-images-idx3-ubyte[.gz]), grey
repeated to RGB and normalised as MTCNN normalises its input,
(x - 127.5) / 128: inputs for MTCNN's PNet (SIZE 12) and RNet (24), shape
[N, 3, SIZE, SIZE]. There are no faces in them.

`json`: the `input` array of a test-vector file (e.g.
tests/vectors/torch_sd/net.json) with its `input_shape`.

Prints the file written and its shape.
"""

import gzip
import json
import random
import struct
import sys
from array import array
from pathlib import Path


def write_npy(path, shape, values):
    """A C-order little-endian float32 array in NumPy's .npy format (v1.0)."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({', '.join(map(str, shape))},), }}"
    header = header.replace(",)", ")") if len(shape) > 1 else header
    pad = 64 - (10 + len(header) + 1) % 64
    data = array("f", values)
    if sys.byteorder != "little":
        data.byteswap()
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header) + pad + 1))
        f.write(header.encode() + b" " * pad + b"\n")
        f.write(data.tobytes())
    print(f"{path}: float32 {list(shape)}")


def read_images(folder):
    """The Fashion-MNIST test images as (count, rows, cols, bytes)."""
    folder = Path(folder)
    for name in ["t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte"]:
        path = folder / name
        if path.exists():
            data = (gzip.open if name.endswith(".gz") else open)(path, "rb").read()
            n, rows, cols = struct.unpack(">III", data[4:16])
            return n, rows, cols, data[16:]
    raise SystemExit(f"{folder}: no t10k-images-idx3-ubyte[.gz]")


def windows(folder, out, size, count=512, seed=0):
    n, rows, cols, pixels = read_images(folder)
    rng = random.Random(seed)
    values = []
    for i in rng.sample(range(n), count):
        r, c = rng.randrange(rows - size + 1), rng.randrange(cols - size + 1)
        base = i * rows * cols
        win = [(pixels[base + (r + y) * cols + c + x] - 127.5) / 128.0 for y in range(size) for x in range(size)]
        values += win * 3
    write_npy(out, (count, 3, size, size), values)


def from_json(path, out):
    d = json.loads(Path(path).read_text())
    write_npy(out, tuple(d["input_shape"]), d["input"])


def main():
    args = sys.argv[1:]
    if len(args) >= 4 and args[0] == "windows":
        windows(args[1], args[2], int(args[3]), *map(int, args[4:6]))
    elif len(args) == 3 and args[0] == "json":
        from_json(args[1], args[2])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
