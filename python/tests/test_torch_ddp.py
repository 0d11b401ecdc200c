"""The sentinel under DDP: torchrun with 2 CPU ranks (gloo) writes the same
merged counts as one process over the same global batches
(``ddp_sentinel.py``)."""

import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "ddp_sentinel.py")

# Summed counts: equal exactly. Output moments: equal up to the order of the sums.
EXACT = [
    "layer",
    "kind",
    "channels",
    "negative_share",
    "negative_share_per_channel",
    "dead",
    "linear",
    "stuck",
    "slopes",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, out):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, *args, "--out", str(out)], capture_output=True, text=True, timeout=300, env=env)
    if p.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")


def sentinel_lines(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [line for line in map(json.loads, f) if line["kind"] == "sentinel"]


def test_two_ranks_merge_to_the_single_process_counts(tmp_path):
    pytest.importorskip("torch.distributed.run")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    torchrun = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    run([*torchrun, SCRIPT], tmp_path / "ddp")
    run([SCRIPT], tmp_path / "single")
    ddp, single = sentinel_lines(tmp_path / "ddp"), sentinel_lines(tmp_path / "single")
    assert [line["epoch"] for line in ddp] == [1, 2] == [line["epoch"] for line in single]
    for a, b in zip(ddp, single):
        assert [r["layer"] for r in a["layers"]] == ["1", "4", "6"]
        for ra, rb in zip(a["layers"], b["layers"]):
            assert {k: ra[k] for k in EXACT} == {k: rb[k] for k in EXACT}
            assert ra["act_mean"] == pytest.approx(rb["act_mean"], rel=1e-6)
            assert ra["act_var"] == pytest.approx(rb["act_var"], rel=1e-6)
            # Per-rank gradients (of half batches), added over the ranks: present, not equal.
            assert (ra["weight_grad_norm"] is None) == (rb["weight_grad_norm"] is None)
    # Rank 0 alone wrote the folder: one epoch line per epoch.
    with open(tmp_path / "ddp" / "metrics.jsonl", encoding="utf-8") as f:
        assert [json.loads(line)["kind"] for line in f].count("epoch") == 2
