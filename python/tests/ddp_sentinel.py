"""The sentinel under DistributedDataParallel (gloo, CPU).

    torchrun --nproc_per_node 2 python/tests/ddp_sentinel.py --out DIR
    python python/tests/ddp_sentinel.py --out DIR     # one process, for comparison

A fixed model (seed 0: conv, PReLU, linear, in-place ReLU, linear, LeakyReLU)
sees the same global batches in both cases: 2 epochs of 3 steps, each step
a global batch of 12 examples, which the ranks split into equal contiguous
parts. The weights stay fixed (backward without an optimiser step), so
the merged counts rank 0 writes to DIR/metrics.jsonl must equal those of
the single process exactly (``test_torch_ddp.py`` compares them).
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import prelu.torch as pt

EPOCHS = 2
STEPS = 3
GLOBAL_BATCH = 12


def model():
    """The fixed model (seed 0)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.PReLU(4),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 16),
        nn.ReLU(inplace=True),
        nn.Linear(16, 10),
        nn.LeakyReLU(0.1),
    )


def batches():
    """The global batches of every step (seed 1), shared by all ranks."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g) for _ in range(EPOCHS * STEPS)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if GLOBAL_BATCH % world:
        raise SystemExit(f"the global batch of {GLOBAL_BATCH} does not split over {world} ranks")
    net = model()
    watched = nn.parallel.DistributedDataParallel(net) if distributed else net
    s = pt.Sentinel(watched, a.out, config={"batch_size": GLOBAL_BATCH, "epochs": EPOCHS})
    part = GLOBAL_BATCH // world
    data = batches()
    for epoch in range(EPOCHS):
        for step in range(STEPS):
            x = data[epoch * STEPS + step][rank * part : (rank + 1) * part]
            watched(x).square().mean().backward()
            net.zero_grad()
        s.epoch_end(epoch + 1, train_loss=0.0)
    s.close()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
