#!/bin/bash
# The depth studies behind the README's "Depth: where PReLU helps" section
# (issue 18). Each is an ordinary `prelu study`: re-running resumes, and the
# run folders, study.json and report.html land under $OUT/<name>.
# Usage: scripts/depth_studies.sh [OUT] [STUDY...]   (default OUT: runs/depth)
# Needs $PRELU_DATA (or --data-dir) for fashion-mnist.
set -euo pipefail
OUT=${1:-runs/depth}
shift || true
PRELU=${PRELU:-target/release/prelu}
# 30 hidden layers of 256, as a comma list for --hidden.
H30=$(printf '256,%.0s' $(seq 30)); H30=${H30%,}
SGD="--optimizer sgd --lr 0.01 --momentum 0.9 --epochs 3 --no-sentinel"
for STUDY in grid30 depth fashion30 conv20 conv20bn; do
  [ -z "${SELECT:-}" ] || [[ " $SELECT " == *" $STUDY "* ]] || continue
  case $STUDY in
    grid30)    # activation x init at depth 30, mnist-small
      $PRELU --threads 1 study --vary act=relu,leaky,prelu,prelu-shared --vary init=xavier,he-relu,he-prelu \
        --seeds 3 --hidden $H30 $SGD --out $OUT/grid30 ;;
    depth)     # depth sweep, mnist-small
      $PRELU --threads 1 study --vary act=relu,prelu --vary hidden=256x2,256x10,256x20,256x30,256x50 \
        --vary init=xavier,he-prelu --seeds 3 $SGD --out $OUT/depth ;;
    fashion30) # depth 30 on a 10,000/2,000 slice of Fashion-MNIST
      $PRELU --threads 1 study --data fashion-mnist --train-limit 10000 --test-limit 2000 \
        --vary act=relu,prelu --vary init=xavier,he-relu,he-prelu --seeds 3 --hidden $H30 $SGD --out $OUT/fashion30 ;;
    conv20)    # 20-layer conv nets without and with shortcuts (presets), 2,000 images of mnist-small
      $PRELU --threads 1 study --train-limit 2000 --test-limit 1000 --vary act=relu,prelu --vary model=plain-20,resnet-20 \
        --seeds 3 $SGD --out $OUT/conv20 ;;
    conv20bn)  # the same with BatchNorm
      $PRELU --threads 1 study --train-limit 2000 --test-limit 1000 --vary act=relu,prelu --vary model=plain-20,resnet-20 \
        --seeds 3 --batch-norm $SGD --out $OUT/conv20bn ;;
  esac
done
