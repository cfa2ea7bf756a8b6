#!/usr/bin/env bash
# The build both `scripts/serve.sh` and the Dockerfile run, so that what is tested
# here is what the image runs: the ONNX Runtime library from the PyPI wheel (into
# $1, default .onnxruntime/) and a release build of the gateway.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-onnxruntime.sh "$@"
# MODELGATE_BUILD_PROFILE=dist (the Dockerfile's) adds whole-program optimisation
# (Cargo.toml): faster, but every change relinks the whole program.
profile=${MODELGATE_BUILD_PROFILE:-release}
if [ ! -x "target/$profile/modelgate" ]; then
  echo "building modelgate ($profile): the first build on a fresh 2-core machine downloads and" >&2
  echo "compiles every crate and takes about 12 minutes; later builds only what changed." >&2
fi
cargo build --profile "$profile" --locked --bin modelgate
