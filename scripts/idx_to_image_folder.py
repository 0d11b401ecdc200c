#!/usr/bin/env python3
"""Writes the first N test images of an MNIST-format set as an image folder:
OUT/<label>/<index>.png, one subfolder per class (grey 8-bit PNG), the
layout `--data DIR` reads (torchvision's ImageFolder). Standard library
only (gzip, zlib, struct).

    python scripts/idx_to_image_folder.py ../shared/data/mnist /tmp/mnist_png 500 [SIZE]

With SIZE, each image is first scaled to SIZExSIZE by nearest neighbour
(so the folder does not match the model's input and gets resized back).
"""

import gzip
import os
import struct
import sys
import zlib


def read_idx(path):
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    rank = data[3]
    dims = struct.unpack(">" + "I" * rank, data[4 : 4 + 4 * rank])
    return dims, data[4 + 4 * rank :]


def png_grey(rows, w, h):
    raw = b"".join(b"\0" + bytes(r) for r in rows)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def main(src, out, n, size=None):
    find = lambda stem: next(os.path.join(src, f) for f in (stem + ".gz", stem) if os.path.exists(os.path.join(src, f)))
    (count, h, w), pixels = read_idx(find("t10k-images-idx3-ubyte"))
    _, labels = read_idx(find("t10k-labels-idx1-ubyte"))
    for i in range(min(n, count)):
        img = pixels[i * h * w : (i + 1) * h * w]
        rows = [img[r * w : (r + 1) * w] for r in range(h)]
        if size:
            rows = [[rows[r * h // size][c * w // size] for c in range(size)] for r in range(size)]
        d = os.path.join(out, str(labels[i]))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{i:05}.png"), "wb") as f:
            f.write(png_grey(rows, len(rows[0]), len(rows)))
    print(f"{min(n, count)} images written to {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else None)
