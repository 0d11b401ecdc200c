#!/usr/bin/env bash
# Fuzz every parser of user files for SECONDS each (default 60), two targets
# at a time on a 2-core machine:
#   idx         IDX files, raw and gzip
#   checkpoint  safetensors checkpoints and imported state dicts
#   run_config  TOML run configs
#   model_spec  JSON model specs
#   metrics     metrics.jsonl (the strict reader)
#   run_json    JSON beside a run (stability.json, attack.json) as the report reads it
#   npy         .npy files (header and data)
#   graph       graph files (TOML or JSON), resolved on a few inputs
#   onnx_import ONNX models (import, with and without an input size, and
#               the export of what was imported, imported again)
#     bash scripts/fuzz.sh 600                  # every target
#     bash scripts/fuzz.sh 300 npy graph onnx_import   # only these
# An input that takes over 10 s counts as a failure (libFuzzer's -timeout).
# Seeds are the committed real files in fuzz/corpus/<target>; what the fuzzer
# finds goes to fuzz/target/corpus-<target> (not committed). A crash stops
# with the input in fuzz/artifacts/<target>/: turn it into a regression test.
# cargo fuzz passes -Z flags to rustc; RUSTC_BOOTSTRAP=1 lets the stable
# toolchain (the only one here) accept them.
set -euo pipefail
secs=${1:-60}
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz
export RUSTC_BOOTSTRAP=1
cargo fuzz build -s none -O
mkdir -p fuzz/target
run() {
    local t=$1
    mkdir -p "fuzz/target/corpus-$t"
    cargo fuzz run -s none -O "$t" "fuzz/target/corpus-$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=4096 -timeout=10 -print_final_stats=1 > "fuzz/target/$t.log" 2>&1
    local execs
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "fuzz/target/$t.log" | grep -o '[0-9]*$' || echo "?")
    echo "$t: $execs executions in ${secs}s, no crash"
}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(idx checkpoint run_config model_spec metrics run_json npy graph onnx_import)
status=0
# Two at a time: one per core.
for ((i = 0; i < ${#targets[@]}; i += 2)); do
    pids=()
    for t in "${targets[@]:i:2}"; do
        run "$t" & pids+=("$!:$t")
    done
    for p in "${pids[@]}"; do
        wait "${p%%:*}" || { echo "${p#*:}: CRASH or error, see fuzz/target/${p#*:}.log" >&2; status=1; }
    done
done
exit $status
