# shellcheck shell=bash
# Idempotent environment set-up for graph_prune.  Meant to be *sourced*:
#
#     source third_party/bootstrap.sh
#
# On a fresh Debian machine (run as root, or with sudo available) it
#   1. installs bazel-bootstrap, bazel-bootstrap-source and
#      dataset-fashion-mnist with apt-get (only if not installed yet),
#   2. creates .venv with `python3 -m venv` and installs
#      third_party/requirements.txt into it (only if .venv is missing or the
#      requirements changed since the last install; a sha256 stamp is kept in
#      .venv/.requirements.sha256),
#   3. links third_party/mock_repos -> the mock repositories shipped by
#      bazel-bootstrap-source (the WORKSPACE points at it),
#   4. exports PATH with .venv/bin first, so that Bazel's py_binary/py_test
#      pick up the venv's python3 (and `python`, which Bazel's launcher stub
#      needs: its shebang is `#!/usr/bin/env python`), plus
#      GRAPH_PRUNE_ROOT and GRAPH_PRUNE_VENV_STAMP.
# Later runs do nothing but checks, print nothing and take about a second.
# It never calls `exit` (it may be sourced from an interactive shell); on
# failure it returns non-zero.

_gp_bootstrap() {
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)" || return 1
  GRAPH_PRUNE_ROOT="$root"
  export GRAPH_PRUNE_ROOT

  _gp_log() { echo "bootstrap: $*" >&2; }

  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
  fi

  # --- 1. Debian packages ---------------------------------------------------
  local venv="$root/.venv"
  local pkgs=(bazel-bootstrap bazel-bootstrap-source dataset-fashion-mnist)
  if [ ! -x "$venv/bin/python3" ] &&
     ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    # Debian's python3 cannot create virtualenvs without python3-venv.
    pkgs+=(python3 python3-venv)
  fi
  local missing=() p
  for p in "${pkgs[@]}"; do
    # No pipe into `grep -q` here: under a caller's pipefail its early exit
    # would make dpkg-query die of SIGPIPE and count an installed package as missing.
    if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
      missing+=("$p")
    fi
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    _gp_log "installing Debian packages: ${missing[*]}"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || return 1
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
      --no-install-recommends "${missing[@]}" >&2 || return 1
  fi

  # --- 2. Python virtualenv -------------------------------------------------
  local req="$root/third_party/requirements.txt"
  local stamp="$venv/.requirements.sha256"
  if [ ! -x "$venv/bin/python3" ]; then
    _gp_log "creating virtualenv $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || return 1
    rm -f "$stamp"
  fi
  local want have=""
  want="$(sha256sum "$req" | cut -d' ' -f1)" || return 1
  [ -f "$stamp" ] && have="$(cat "$stamp")"
  if [ "$want" != "$have" ]; then
    _gp_log "installing $req into $venv"
    "$venv/bin/python3" -m pip install -q -r "$req" >&2 || return 1
    echo "$want" >"$stamp"
  fi
  # Passed to Bazel actions/tests (see .bazelrc) so that cached test results
  # are invalidated when the pinned requirements change.
  GRAPH_PRUNE_VENV_STAMP="$want"
  export GRAPH_PRUNE_VENV_STAMP

  # --- 3. Bazel mock repositories -------------------------------------------
  local mock
  mock="$(dpkg -L bazel-bootstrap-source 2>/dev/null | grep -m1 '/mock_repos$')"
  if [ -z "$mock" ] || [ ! -d "$mock" ]; then
    _gp_log "cannot find mock_repos of bazel-bootstrap-source"
    return 1
  fi
  local link="$root/third_party/mock_repos"
  if [ "$(readlink "$link" 2>/dev/null)" != "$mock" ]; then
    rm -rf "$link"
    ln -s "$mock" "$link" || return 1
  fi

  # --- 4. PATH ----------------------------------------------------------------
  case ":$PATH:" in
    ":$venv/bin:"*) ;;  # already first
    *) PATH="$venv/bin:$PATH" ;;
  esac
  export PATH
  unset -f _gp_log
  return 0
}

_gp_bootstrap
_gp_rc=$?
unset -f _gp_bootstrap
if [ "$_gp_rc" -ne 0 ]; then
  echo "bootstrap: FAILED (status $_gp_rc)" >&2
  unset _gp_rc
  return 1 2>/dev/null || exit 1
fi
unset _gp_rc
