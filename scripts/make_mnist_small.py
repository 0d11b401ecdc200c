#!/usr/bin/env python3
"""Build the embedded `mnist-small` set from the full MNIST IDX files.

    python3 scripts/make_mnist_small.py [SRC_DIR] [OUT_DIR]

SRC_DIR defaults to ../shared/data/mnist, OUT_DIR to data/mnist-small. Takes
the first 10,000 training and the first 2,000 test images (and their labels)
unchanged, and writes them as gzip'd IDX with a fixed timestamp so the output
is byte-for-byte reproducible. Standard library only.
"""
import gzip
import struct
import sys
from pathlib import Path

SRC = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/mnist")
OUT = Path(sys.argv[2] if len(sys.argv) > 2 else "data/mnist-small")
TAKE = {"train": 10_000, "t10k": 2_000}


def read_idx(path):
    data = gzip.open(path, "rb").read()
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return data[:4], list(dims), data[4 + 4 * ndim :]


def write_idx(path, magic, dims, body):
    raw = magic + struct.pack(">" + "I" * len(dims), *dims) + body
    with open(path, "wb") as f:
        with gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="", compresslevel=9) as g:
            g.write(raw)


OUT.mkdir(parents=True, exist_ok=True)
for split, n in TAKE.items():
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        name = f"{split}-{kind}"
        magic, dims, body = read_idx(SRC / f"{name}.gz")
        per = 1
        for d in dims[1:]:
            per *= d
        dims[0] = n
        write_idx(OUT / f"{name}.gz", magic, dims, body[: n * per])
        print(f"{OUT / (name + '.gz')}: {dims}")
