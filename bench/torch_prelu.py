#!/usr/bin/env python3
"""PyTorch's nn.PReLU on the shapes `prelu bench kernels` measures.

    python3 bench/torch_prelu.py --threads 2 [--json]

Same byte accounting as ours: forward moves 2B (read x, write y), forward +
backward 5B (plus read x, read dy, write dx), B = 4 * numel. Forward+backward
is `y = prelu(x); y.backward(ones)` with x and the slope requiring grad, the
same seed our autograd path uses. Medians over --reps runs after one warm-up.
"""
import argparse
import json
import statistics
import time

import torch


def median_secs(reps, f):
    f()
    t = []
    for _ in range(reps):
        s = time.perf_counter()
        f()
        t.append(time.perf_counter() - s)
    return statistics.median(t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--shapes", default="256x64x56x56,128x512")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = []
    for spec in a.shapes.split(","):
        shape = [int(d) for d in spec.split("x")]
        x = (torch.rand(shape) * 2 - 1).requires_grad_(True)
        m = torch.nn.PReLU(shape[1])
        b = x.numel() * 4
        with torch.no_grad():
            fwd = median_secs(a.reps, lambda: m(x))

        def fb():
            x.grad = None
            m.weight.grad = None
            y = m(x)
            y.backward(torch.ones_like(y))

        fwdbwd = median_secs(a.reps, fb)
        rows.append({
            "shape": shape,
            "fwd_ms": fwd * 1e3,
            "fwd_gbps": 2 * b / fwd / 1e9,
            "fwdbwd_ms": fwdbwd * 1e3,
            "fwdbwd_gbps": 5 * b / fwdbwd / 1e9,
        })
    out = {"torch": torch.__version__, "threads": a.threads, "rows": rows}
    if a.json:
        print(json.dumps(out))
    else:
        print(f"PyTorch {torch.__version__} nn.PReLU, {a.threads} thread(s)")
        for r in rows:
            s = "x".join(map(str, r["shape"]))
            print(f"{s:<16} fwd {r['fwd_ms']:8.2f} ms {r['fwd_gbps']:6.2f} GB/s   fwd+bwd {r['fwdbwd_ms']:8.2f} ms {r['fwdbwd_gbps']:6.2f} GB/s")


if __name__ == "__main__":
    main()
