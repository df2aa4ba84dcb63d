#!/usr/bin/env bash
# Reproduces the README's trade-off table: `bash experiments/tradeoff.sh`.
# Writes out/tradeoff_lsq/rows.csv and out/tradeoff_lsq/plots/accuracy_vs_speedup.png.
# Resumable: run it again after an interruption and it goes on where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
source third_party/bootstrap.sh
bazel run //tools:sweep -- --flagfile="$PWD/experiments/tradeoff.flags" "$@"
