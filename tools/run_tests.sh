#!/usr/bin/env bash
# Run all Bazel tests of graph_prune:  bash tools/run_tests.sh [bazel test flags]
# Exits with bazel's exit status.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
# shellcheck source=../third_party/bootstrap.sh
source third_party/bootstrap.sh || exit 1
bazel test //... "$@"
exit $?
