#!/usr/bin/env bash
# Run the gateway on the bundled models/ registry (or pass your own flags, e.g.
# --model-repository DIR --http-port 8000). Installs what it needs first: the ONNX
# Runtime library (from the PyPI wheel) and a release build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/build.sh
exec target/release/modelgate serve "$@"
