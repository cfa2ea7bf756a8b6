#!/usr/bin/env bash
# Runs the retraining webhook receiver (receiver.py) in its own virtualenv,
# examples/retrain/.venv, created and filled from requirements.txt on first use.
#
#   examples/retrain/run.sh --secret whsec_... --repository models --model iris \
#       --data fresh.csv [--port 9000] [--modelgate target/release/modelgate]  (scripts/serve.sh builds it)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
req="$here/requirements.txt"
stamp="$venv/.requirements.$(sha256sum "$req" | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
  rm -f "$venv"/.requirements.* && touch "$stamp"
fi
exec "$venv/bin/python" "$here/receiver.py" "$@"
