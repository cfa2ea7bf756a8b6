#!/usr/bin/env bash
# Run the tritonclient compatibility suite against a built modelgate binary.
#
#   tests/python/run.sh [extra pytest args]
#
# Uses (and creates on first use) the virtualenv <repo>/.venv; requirements are
# installed only when tests/python/requirements.txt changed since the last install.
# This script does NOT build modelgate: run `cargo build` first, or point
# MODELGATE_BIN at a binary.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$script_dir/../.." && pwd)"

bin="${MODELGATE_BIN:-$repo_root/target/debug/modelgate}"
case "$bin" in
  /*) ;;
  *) bin="$PWD/$bin" ;;
esac
if [ ! -f "$bin" ] || [ ! -x "$bin" ]; then
  echo "error: modelgate binary not found or not executable: $bin" >&2
  echo "       build it first (cargo build) or set MODELGATE_BIN" >&2
  exit 1
fi
export MODELGATE_BIN="$bin"

venv="$repo_root/.venv"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "creating virtualenv $venv" >&2
  "$python" -m venv "$venv"
fi

req="$script_dir/requirements.txt"
hash="$(sha256sum "$req" | cut -d' ' -f1)"
stamp="$venv/.tests-python-requirements.$hash"
if [ ! -f "$stamp" ]; then
  echo "installing $req into $venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
  rm -f "$venv"/.tests-python-requirements.*
  touch "$stamp"
fi

cd "$repo_root"
exec "$venv/bin/python" -m pytest -q tests/python "$@"
