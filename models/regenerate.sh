#!/usr/bin/env bash
# Regenerate models/{iris,mlp}/**/model.onnx deterministically and verify them
# with onnxruntime. Idempotent: reuses models/.venv (git-ignored) and only
# reinstalls when requirements.txt changes.
#
#   models/regenerate.sh            # generate + verify
#   VENV=/tmp/mg-venv models/regenerate.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${VENV:-$here/.venv}"
python="${PYTHON:-python3}"
req="$here/requirements.txt"

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi

stamp="$venv/.requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
    echo "$want" > "$stamp"
fi

cd "$here"
PYTHONDONTWRITEBYTECODE=1 PYTHONHASHSEED=0 "$venv/bin/python" generate.py --check "$@"

# Drift reference profiles of the iris versions, from the training data.
for v in 1 2; do
    (cd "$here/.." && cargo run --quiet --release -- profile --model-repository models \
        --model iris --version "$v" --data models/iris/reference.csv)
done

echo
(cd "$here" && sha256sum iris/*/model.onnx mlp/*/model.onnx)
