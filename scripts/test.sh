#!/usr/bin/env bash
# Run the whole test suite: formatting and lints, Rust unit and integration tests (real
# ONNX Runtime, real sockets on 127.0.0.1), and the tritonclient compatibility suite
# against the real binary, plus the supply-chain check (cargo deny). Installs what it
# needs itself.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/fetch-onnxruntime.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings

echo "== cargo doc (broken links and malformed docs are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --locked --workspace --no-deps -q

echo "== cargo deny (licenses, bans, sources)"
# A pinned cargo-deny, installed from crates.io on first use (about 2.5 minutes).
if ! cargo deny --version 2>/dev/null | grep -q "0.20.2"; then
  cargo install cargo-deny --version 0.20.2 --locked
fi
# cargo-deny reads `cargo metadata`, which needs the crates of every platform in the lock
# file (Windows- and macOS-only ones too), which a Linux build never downloads: fetch them
# all first, or a brand-new CARGO_HOME fails here.
cargo fetch --locked
cargo deny --offline check licenses bans sources

echo "== Prometheus (Debian package: a real server and promtool for tests/it/prometheus.rs)"
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
promtool check rules deploy/prometheus/alerts.yml

echo "== MLflow (a real tracking server for tests/it/mlflow.rs, in .venv-mlflow)"
# Installed when tests/mlflow-requirements.txt changed since the last install (about
# 2 minutes the first time).
mlflow_req=tests/mlflow-requirements.txt
mlflow_stamp=".venv-mlflow/.installed.$(sha256sum "$mlflow_req" | cut -d' ' -f1)"
if [ ! -f "$mlflow_stamp" ]; then
  [ -x .venv-mlflow/bin/python ] || "${PYTHON:-python3}" -m venv .venv-mlflow
  .venv-mlflow/bin/python -m pip install --quiet --disable-pip-version-check -r "$mlflow_req"
  rm -f .venv-mlflow/.installed.*
  touch "$mlflow_stamp"
fi

echo "== Chromium (Debian package: a real browser for the operator's page, tests/it/ui.rs)"
# 25 packages, 350 MB installed; 42 s to download and install here (once per machine).
if ! command -v chromium >/dev/null; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

echo "== cargo test"
cargo test --locked --workspace --all-targets

echo "== tritonclient compatibility (Python)"
cargo build --locked --bin modelgate
MODELGATE_BIN="$PWD/target/debug/modelgate" tests/python/run.sh
