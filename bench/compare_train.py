#!/usr/bin/env python3
"""Side-by-side training speed: `prelu bench train` against PyTorch
(`bench/torch_reference.py`) at 1 and 2 threads, alternating the two so that
both see the same machine load, several rounds; prints each run's JSON and
a table of medians over the rounds with the ratio ours / PyTorch.

    cargo build --release
    python3 bench/compare_train.py --rounds 3 --data /path/to/mnist [--json]

Run it under a Python that has torch. Nothing else may run on the machine.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ["mlp_step_ms", "cnn_step_ms", "resnet_step_ms", "mlp_epoch_s"]
# prelu's achieved GFLOP/s and the GEMM reference rate of the same run.
RATES = ["mlp_gflops", "cnn_gflops", "resnet_gflops", "gemm_gflops"]


def ours(threads, data):
    cmd = [str(ROOT / "target/release/prelu"), "--threads", str(threads), "bench", "train", "--json"]
    if data:
        cmd += ["--data-dir", str(Path(data).parent)]
    else:
        cmd += ["--no-epoch"]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def torch(threads, data):
    cmd = [sys.executable, str(ROOT / "bench/torch_reference.py"), "--threads", str(threads), "--json"]
    if data:
        cmd += ["--epoch-data", data]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--data", help="folder with MNIST's IDX files (times one epoch)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    runs = {}
    for t in [int(x) for x in a.threads.split(",")]:
        for r in range(a.rounds):
            for name, f in [("prelu", ours), ("torch", torch)]:
                out = f(t, a.data)
                runs.setdefault((t, name), []).append(out)
                print(json.dumps({"round": r + 1, "impl": name, **out}), file=sys.stderr, flush=True)
    table = []
    for t in sorted({t for t, _ in runs}):
        row = {"threads": t}
        for f in FIELDS:
            vals = {n: [o[f] for o in runs[(t, n)] if o.get(f) is not None] for n in ["prelu", "torch"]}
            if all(vals.values()):
                p, q = statistics.median(vals["prelu"]), statistics.median(vals["torch"])
                row[f] = {"prelu": p, "torch": q, "ratio": p / q}
        for f in RATES:
            vals = [o[f] for o in runs[(t, "prelu")] if o.get(f) is not None]
            if vals:
                row[f] = statistics.median(vals)
        table.append(row)
    if a.json:
        print(json.dumps({"rounds": a.rounds, "rows": table}))
        return
    print(f"medians over {a.rounds} alternating rounds; ratio = prelu / PyTorch (below 1: prelu faster)")
    print(f"{'threads':>7} {'measure':<14} {'prelu':>9} {'PyTorch':>9} {'ratio':>6}")
    for row in table:
        for f in FIELDS:
            if f in row:
                c = row[f]
                print(f"{row['threads']:>7} {f:<14} {c['prelu']:>9.2f} {c['torch']:>9.2f} {c['ratio']:>6.2f}")
        if "gemm_gflops" in row:
            g = row["gemm_gflops"]
            rates = ", ".join(f"{f.split('_')[0]} {row[f]:.1f} ({row[f] / g:.2f})" for f in RATES[:3] if f in row)
            print(f"{row['threads']:>7} GFLOP/s (ratio to the {g:.1f} GFLOP/s GEMM): {rates}")


if __name__ == "__main__":
    main()
