#!/usr/bin/env bash
# Run the pruning tool:  bash tools/run_default.sh [args for //tools:prune]
# Exits with the tool's (or bazel's) exit status.
#
# `bazel run` starts the binary inside its runfiles tree; the directory this
# script was called from is passed in $BUILD_WORKING_DIRECTORY (resolve
# relative path arguments against it).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)" || exit 1
# Stay in the caller's directory if it is inside the workspace, so that
# BUILD_WORKING_DIRECTORY is the caller's directory; otherwise go to the root.
case "$(pwd -P)/" in
  "$root"/*) ;;
  *) cd "$root" || exit 1 ;;
esac
# shellcheck source=../third_party/bootstrap.sh
source "$root/third_party/bootstrap.sh" || exit 1
bazel run //tools:prune -- "$@"
exit $?
