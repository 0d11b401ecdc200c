#!/usr/bin/env bash
# Re-runs every command whose output README.md and docs/*.md show, and
# refreshes the shown output in place.
#
#   scripts/readme_outputs.sh            rewrite every shown output
#   scripts/readme_outputs.sh --check    change nothing; print a diff and exit 1
#                                        where a shown output differs
#   scripts/readme_outputs.sh --all      also the blocks marked `all`: they need
#                                        the full MNIST / Fashion-MNIST in
#                                        ../shared/data or run for more than a
#                                        minute (the 15-epoch Fashion CNN, the
#                                        MTCNN windows, the benchmarks)
#   scripts/readme_outputs.sh docs/import.md ...   only these files
#
# It builds `cargo build --release --bins --examples` first, unless PRELU
# names a binary (then EXAMPLES names the examples' folder, default
# PRELU's folder/examples). PYTHON (default python3) runs the Python
# scripts; blocks that need onnxruntime or torch are skipped, and reported,
# when PYTHON cannot import them (`python3 -m venv v && v/bin/pip install
# onnxruntime numpy`, then PYTHON=v/bin/python).
#
# How a shown output is marked, and what the check compares (timings and
# benchmark numbers masked): see the doc at the top of
# scripts/readme_outputs.py.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PRELU:-}" ]; then
    cargo build --release --bins --examples
    export PRELU=target/release/prelu
fi
exec python3 scripts/readme_outputs.py "$@"
