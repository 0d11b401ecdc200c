#!/usr/bin/env python3
"""Writes the image-folder test vectors: tests/vectors/image_folder/.

A 3-class folder (ants, bees, wasps) of PNG and JPEG files of different
sizes, grey, RGB, RGBA and 16-bit grey, with a text file and a hidden file
that must be skipped and a nested folder, plus the model inputs that
`prelu::data::images::load_image_folder` must produce for a 1x12x12 and a
3x12x12 model, computed independently here:

* pixels: PNG files from the numpy arrays written (lossless); JPEG files as
  PIL (libjpeg-turbo) decodes them;
* channels: RGB -> grey as 0.299 R + 0.587 G + 0.114 B, grey -> RGB
  repeated, alpha dropped;
* resize: torch.nn.functional.interpolate(mode="bilinear", antialias=True,
  align_corners=False) in float64 (what torchvision's Resize((H, W)) does).

The order of the files is torchvision's ImageFolder order (make_dataset:
sorted classes, os.walk roots sorted, file names sorted).

Also prints how far torchvision's PIL path (PIL resize, rounded to 8 bits)
is from the float reference, for the README.

Needs numpy, torch and Pillow:
    python scripts/image_folder_vectors.py tests/vectors/image_folder
"""

import json
import os
import shutil
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SIZE = (12, 12)


def smooth(rng, h, w, c):
    """Gradients plus noise in [0, 1], so that resizing matters."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for k in range(c):
        a, b, p = rng.uniform(0.2, 1.0), rng.uniform(0.2, 1.0), rng.uniform(0, 6.3)
        base = 0.5 + 0.35 * np.sin(a * yy / 2.0 + b * xx / 3.0 + p)
        out.append(np.clip(base + rng.normal(0, 0.08, (h, w)), 0, 1))
    return np.stack(out, -1)


def main(out):
    rng = np.random.default_rng(16)
    root = os.path.join(out, "folder")
    if os.path.exists(root):
        shutil.rmtree(root)
    # (class, relative name, kind, height, width)
    specs = [
        ("ants", "a1.png", "L", 16, 20),
        ("ants", "a2.png", "RGB", 9, 7),
        ("bees", "b1.jpg", "RGB", 30, 24),
        ("bees", "b2.JPEG", "L", 13, 29),
        ("bees", "b3.png", "RGBA", 12, 12),
        ("wasps", "w1.png", "I;16", 25, 11),
        ("wasps", "w2.png", "RGB", 40, 36),
        ("wasps", "more/w3.png", "L", 5, 50),
    ]
    pixels = {}
    for cls, name, kind, h, w in specs:
        path = os.path.join(root, cls, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if kind == "I;16":
            a = np.round(smooth(rng, h, w, 1)[..., 0] * 65535).astype(np.uint16)
            Image.fromarray(a).save(path)
            px = a.astype(np.float64)[None] / 65535
        else:
            c = {"L": 1, "RGB": 3, "RGBA": 4}[kind]
            a = np.round(smooth(rng, h, w, c) * 255).astype(np.uint8)
            img = Image.fromarray(a[..., 0] if c == 1 else a, kind)
            if name.lower().endswith((".jpg", ".jpeg")):
                img.save(path, format="JPEG", quality=95, subsampling=0)
                a = np.asarray(Image.open(path))
                if a.ndim == 2:
                    a = a[..., None]
            else:
                img.save(path)
                if a.ndim == 2:
                    a = a[..., None]
            px = a[..., :3].astype(np.float64).transpose(2, 0, 1) / 255
        pixels[os.path.relpath(path, root)] = px
    # Entries to skip: a text file, a hidden file at the top and in a class.
    with open(os.path.join(root, "wasps", "notes.txt"), "w") as f:
        f.write("not an image\n")
    with open(os.path.join(root, "bees", ".DS_Store"), "wb") as f:
        f.write(b"\0\0\0\1Bud1")
    with open(os.path.join(root, "README.txt"), "w") as f:
        f.write("3 classes\n")

    # torchvision.datasets.folder.make_dataset's order.
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    order = []
    for label, cls in enumerate(classes):
        for r, _, names in sorted(os.walk(os.path.join(root, cls))):
            for n in sorted(names):
                if n.lower().endswith((".png", ".jpg", ".jpeg")) and not n.startswith("."):
                    order.append((os.path.relpath(os.path.join(r, n), root), label))

    ref = {1: [], 3: []}
    pil_gap = 0.0
    for rel, _ in order:
        px = pixels[rel]
        grey = px if px.shape[0] == 1 else (0.299 * px[0] + 0.587 * px[1] + 0.114 * px[2])[None]
        rgb = np.repeat(px, 3, 0) if px.shape[0] == 1 else px
        for c, x in ((1, grey), (3, rgb)):
            t = torch.from_numpy(np.ascontiguousarray(x))[None]
            r = F.interpolate(t, size=SIZE, mode="bilinear", antialias=True, align_corners=False)
            ref[c].append(r[0].numpy())
        if px.shape[0] == 3 and not rel.lower().endswith((".jpg", ".jpeg")):
            # torchvision on a PIL image: PIL's resize of the 8-bit image.
            img = Image.fromarray(np.round(px.transpose(1, 2, 0) * 255).astype(np.uint8), "RGB")
            p = np.asarray(img.resize(SIZE[::-1], Image.BILINEAR)).astype(np.float64).transpose(2, 0, 1) / 255
            pil_gap = max(pil_gap, float(np.abs(p - ref[3][-1]).max()))
    np.save(os.path.join(out, "expected_c1.npy"), np.stack(ref[1]).astype(np.float32))
    np.save(os.path.join(out, "expected_c3.npy"), np.stack(ref[3]).astype(np.float32))
    np.save(os.path.join(out, "labels.npy"), np.array([l for _, l in order], dtype=np.int64))
    with open(os.path.join(out, "files.json"), "w") as f:
        json.dump({"classes": classes, "files": [r for r, _ in order]}, f, indent=1)
        f.write("\n")
    print(f"{len(order)} images in {len(classes)} classes written to {root}")
    print(f"torchvision's PIL path (8-bit PIL resize) vs the float reference, RGB PNGs: max |diff| {pil_gap:.5f}"
          f" = {pil_gap * 255:.2f}/255")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/vectors/image_folder")
