#!/usr/bin/env bash
# Run the whole test suite: formatting and lints, Rust unit and integration tests (real
# ONNX Runtime, real sockets on 127.0.0.1), and the tritonclient compatibility suite
# against the real binary, plus the supply-chain check (cargo deny). Installs what it
# needs itself.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/fetch-onnxruntime.sh

# What the tests need besides the build, installed in the background while the build
# runs (downloads and unpacking, not compiling: it overlaps with the compiler instead of
# adding to the wall time). Each step logs to target/ci-setup/<step>.log; `setup_wait`
# fails the run with that log when a step failed.
mkdir -p target/ci-setup
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
debian() {
  # Debian's packages: a real Prometheus and promtool (tests/it/prometheus.rs) and a real
  # browser for the operator's page (tests/it/ui.rs); 26 packages, about 45 s.
  local want=()
  command -v prometheus >/dev/null && command -v promtool >/dev/null || want+=(prometheus)
  command -v chromium >/dev/null || want+=(chromium)
  [ ${#want[@]} -gt 0 ] || return 0
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${want[@]}"
}
mlflow_venv() {
  # A real MLflow tracking server for tests/it/mlflow.rs, in .venv-mlflow; installed when
  # tests/mlflow-requirements.txt changed since the last install (about 2 minutes).
  local req=tests/mlflow-requirements.txt
  local stamp=".venv-mlflow/.installed.$(sha256sum "$req" | cut -d' ' -f1)"
  [ ! -f "$stamp" ] || return 0
  [ -x .venv-mlflow/bin/python ] || "${PYTHON:-python3}" -m venv .venv-mlflow
  .venv-mlflow/bin/python -m pip install --quiet --disable-pip-version-check -r "$req"
  rm -f .venv-mlflow/.installed.*
  touch "$stamp"
}
declare -A setup_pids
for step in debian mlflow_venv tests/python/venv.sh; do
  log="target/ci-setup/$(basename "$step").log"
  "$step" >"$log" 2>&1 &
  setup_pids[$step]=$!
done
setup_wait() {
  local step=$1
  if ! wait "${setup_pids[$step]}"; then
    echo "error: setup step $step failed:" >&2
    cat "target/ci-setup/$(basename "$step").log" >&2
    exit 1
  fi
}

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

echo "== Prometheus rules (promtool)"
setup_wait debian
promtool check rules deploy/prometheus/alerts.yml

echo "== MLflow venv"
setup_wait mlflow_venv
.venv-mlflow/bin/mlflow --version

echo "== cargo test"
cargo test --locked --workspace --all-targets

echo "== tritonclient compatibility (Python)"
cargo build --locked --bin modelgate
setup_wait tests/python/venv.sh
MODELGATE_BIN="$PWD/target/debug/modelgate" tests/python/run.sh
