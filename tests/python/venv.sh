#!/usr/bin/env bash
# Creates (on first use) the virtualenv <repo>/.venv for the Python suite and installs
# tests/python/requirements.txt into it when that file changed since the last install.
# run.sh calls it; scripts/test.sh runs it early, in the background, beside the build.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$script_dir/../.." && pwd)"
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
