#!/usr/bin/env python3
"""The tables of docs/convnets.md from a finished conv-net study folder
(scripts/convnet_study.sh): accuracy per cell, the paired contrasts, and the
learned slope profile by depth averaged over the seeds. Standard library only.

    python3 scripts/convnet_tables.py OUT
"""
import json
import re
import statistics as st
import sys
from pathlib import Path


def cells_table(study):
    print("| model | activation | test acc, mean ± sd (3 seeds) | min | max | best-epoch acc | s/run |")
    print("|---|---|---|---|---|---|---|")
    for c in sorted(study["cells"], key=lambda c: (c["config"]["model"], c["config"]["act"])):
        cfg = c["config"]
        print(f"| {cfg['model']} | {cfg['act']} | {c['test_acc_mean']:.4f} ± {c['test_acc_sd']:.4f} | "
              f"{c['test_acc_min']:.4f} | {c['test_acc_max']:.4f} | {c['best_test_acc_mean']:.4f} | "
              f"{c['seconds_mean']:.0f} |")


def contrasts_table(study):
    print()
    print("| contrast (b - a, paired by seed) | context | n | mean difference | 95% interval | p |")
    print("|---|---|---|---|---|---|")
    for k in study["contrasts"]:
        lo, hi = k["ci95"]
        ctx = k["context"]
        where = ", ".join(f"{a}={b}" for a, b in ctx.items()) if isinstance(ctx, dict) else str(ctx)
        print(f"| {k['b']} - {k['a']} | {where} | {k['n']} | {k['diff_mean']:+.4f} | "
              f"[{lo:+.4f}, {hi:+.4f}] | {k['p_value']:.3f} |")


def cell_of(path):
    m = re.search(r"act-([a-z-]+)__model-([a-z0-9-]+)", path)
    return (m.group(2), m.group(1)) if m else (path, "")


def slopes_table(slopes):
    groups = {}
    for m in slopes["models"]:
        groups.setdefault(cell_of(m["model"]), []).append(m)
    keys = sorted(groups)
    print()
    print("Mean slope per PReLU layer (mean over the seeds of the layer's mean; in brackets the mean over the "
          "seeds of the spread (sd) over its channels):")
    print()
    print("| depth | " + " | ".join(f"{m} {a}" for m, a in keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    depth = max(len(m["layers"]) for g in groups.values() for m in g)
    for d in range(depth):
        row = []
        for k in keys:
            ls = [m["layers"][d] for m in groups[k] if d < len(m["layers"])]
            mean = st.mean(l["mean"] for l in ls)
            sd = st.mean(l["sd"] for l in ls)
            row.append(f"{mean:.3f} ({sd:.3f})" if k[1] == "prelu" else f"{mean:.3f}")
        print(f"| {d + 1} | " + " | ".join(row) + " |")
    print()
    print("| model | activation | first layer | deeper layers (mean) | deeper layers below the first | "
          "slopes < 0 |")
    print("|---|---|---|---|---|---|")
    for k in keys:
        g = groups[k]
        pats = [m["pattern"] for m in g if m["pattern"]]
        neg = sum(l["negative"] for m in g for l in m["layers"])
        tot = sum(l["slopes"] for m in g for l in m["layers"])
        below = ", ".join(f"{p['deeper_below_first']}/{p['deeper_layers']}" for p in pats)
        print(f"| {k[0]} | {k[1]} | {st.mean(p['first_mean'] for p in pats):.3f} | "
              f"{st.mean(p['deeper_mean'] for p in pats):.3f} | {below} (per seed) | {neg} of {tot} |")


def main():
    out = Path(sys.argv[1])
    study = json.loads((out / "study.json").read_text())
    cells_table(study)
    contrasts_table(study)
    slopes_table(json.loads((out / "slopes.json").read_text()))


if __name__ == "__main__":
    main()
