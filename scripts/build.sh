#!/usr/bin/env bash
# The build both `scripts/serve.sh` and the Dockerfile run, so that what is tested
# here is what the image runs: the ONNX Runtime library from the PyPI wheel (into
# $1, default .onnxruntime/) and a release build of the gateway.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-onnxruntime.sh "$@"
cargo build --release --locked --bin modelgate
