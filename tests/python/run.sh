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

"$script_dir/venv.sh"
venv="$repo_root/.venv"

cd "$repo_root"
exec "$venv/bin/python" -m pytest -q tests/python "$@"
