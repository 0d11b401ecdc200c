#!/usr/bin/env bash
# The conv-net study behind docs/convnets.md (issue 29): ReLU vs channel-wise
# vs channel-shared PReLU in ResNet-20 and plain-20 with BatchNorm on a slice
# of Fashion-MNIST, 3 seeds, the schedule of the README's 16-epoch ResNet-20
# run (SGD 0.1, momentum 0.9, weight decay 5e-4 never on the slopes, cosine,
# batch 128) over 6 epochs of the first 4,000 training images, tested on the
# first 2,000 test images.
#
#   PRELU_DATA=../shared/data bash scripts/convnet_study.sh [OUT] [WORKERS]
#
# (OUT default runs/convnets, WORKERS default 2.) The grid runs as
# independent jobs: `prelu study ... --plan` prints one `prelu study ...
# --cell K` command per cell and seed, WORKERS of them run at a time
# (xargs -P; a Slurm array or GNU parallel takes the same lines), then the
# study command without --cell merges them into OUT/study.json and
# OUT/report.html. Re-running skips what is done. Last, the slope profiles
# of every PReLU run (`prelu slopes --json`) go to OUT/slopes.json and the
# tables of docs/convnets.md are printed (scripts/convnet_tables.py).
# PRELU names the binary (default target/release/prelu).
set -euo pipefail
OUT=${1:-runs/convnets}
WORKERS=${2:-2}
PRELU=${PRELU:-target/release/prelu}
PYTHON=${PYTHON:-python3}
ARGS=(--vary act=relu,prelu,prelu-shared --vary model=resnet-20,plain-20 --seeds 3
      --data fashion-mnist --batch-norm --optimizer sgd --lr 0.1 --momentum 0.9 --weight-decay 5e-4
      --schedule cosine --epochs 6 --batch-size 128 --train-limit 4000 --test-limit 2000 --log-every 0
      --out "$OUT")
# One thread per job, WORKERS jobs at a time; each planned line starts with `prelu`.
"$PRELU" --threads 1 study "${ARGS[@]}" --plan \
    | sed "s|^prelu |$PRELU |" \
    | xargs -P "$WORKERS" -I{} sh -c '{} > /dev/null'
"$PRELU" study "${ARGS[@]}" > "$OUT/study.txt"
cat "$OUT/study.txt"
"$PRELU" slopes "$OUT"/act-prelu*__model-*/seed* --json > "$OUT/slopes.json"
"$PRELU" slopes "$OUT"/act-prelu__model-resnet-20/seed0 "$OUT"/act-prelu-shared__model-resnet-20/seed0 \
    "$OUT"/act-prelu__model-plain-20/seed0 "$OUT"/act-prelu-shared__model-plain-20/seed0 \
    -o "$OUT/slopes.svg" > /dev/null
"$PYTHON" scripts/convnet_tables.py "$OUT"
