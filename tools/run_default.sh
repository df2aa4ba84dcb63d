#!/usr/bin/env bash
# The main job:  bash tools/run_default.sh [args for //tools:prune]
# With no arguments it runs //tools:main_job: the built-in default model
# (models/default) pruned at ratio 0.5 and verified, its accuracy restored
# (reconstruction, then a short distillation), evaluated on the Fashion-MNIST test
# images and benchmarked against the original; a summary block at the end, the
# pruned model and the reports in out/default/. With arguments it runs
# //tools:prune with them.
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
if [ "$#" -eq 0 ]; then
  mkdir -p "$root/out/default" || exit 1
  bazel run //tools:main_job -- --out_dir="$root/out/default"
  exit $?
fi
bazel run //tools:prune -- "$@"
exit $?
