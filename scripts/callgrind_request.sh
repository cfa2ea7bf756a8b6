#!/usr/bin/env bash
# Instructions per request, modelgate against the bare reference server (issue 15, item 2).
#
#   scripts/callgrind_request.sh OUT [N]     (PROTOS="grpc http", SERVERS="ref mg" by default;
#                                            CONC=64: requests in flight, 8 connections at most;
#                                            CACHE_SIM=1: also simulated cache misses;
#                                            MODELGATE_BIN=path: another modelgate build)
#
# Starts `refserver` and `modelgate serve` (release build, `models/mlp`, the defaults)
# one after the other under `valgrind --tool=callgrind` with instrumentation off, warms each
# up, then counts the instructions of exactly N requests (default 2000) at concurrency 1
# (or CONC), over gRPC and HTTP/1.1 JSON (h2load, and --h1 for HTTP/1.1, with a fixed request count). The
# counts are instructions, not seconds: far steadier than timings on a shared machine
# (a busy one still moves them by up to ~10 %: more polls and wake-ups per request).
# Writes OUT/<server>-<proto>.callgrind (per-stage costs: callgrind_annotate --inclusive=yes
# --tree=calling) and prints instructions per request.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:?usage: callgrind_request.sh OUT [N]}
n=${2:-2000}
mkdir -p "$out"
out=$(cd "$out" && pwd)
for tool in valgrind callgrind_control h2load; do
  command -v "$tool" >/dev/null || { echo "error: $tool is needed (apt-get install valgrind nghttp2-client)" >&2; exit 1; }
done
scripts/fetch-onnxruntime.sh >/dev/null
[ -x target/release/modelgate ] && [ -x target/release/refserver ] \
  || cargo build --release --locked --bin modelgate --bin refserver
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$PWD/.onnxruntime/libonnxruntime.so}
repo=$(mktemp -d)
trap 'rm -rf "$repo"; [ -z "${pid:-}" ] || kill "$pid" 2>/dev/null || true' EXIT
mkdir -p "$repo/mlp/1"
cp models/mlp/1/model.onnx "$repo/mlp/1/"
python3 scripts/grpc_payload.py mlp input FP32 1,16 "$out/mlp.grpc"
row=$(python3 -c 'print(",".join(str(round(0.1 * (i % 7), 1)) for i in range(16)))')
printf '{"inputs":[{"name":"input","datatype":"FP32","shape":[1,16],"data":[%s]}]}' "$row" >"$out/mlp.json"

wait_ready() {
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$1/v2/health/ready" >/dev/null && return 0
    sleep 0.5
  done
  echo "error: server on port $1 not ready" >&2
  exit 1
}

conc=${CONC:-1}
conns=$((conc < 8 ? conc : 8))
streams=$((conc / conns))
load() { # proto port count
  if [ "$1" = grpc ]; then
    h2load -t 1 -c "$conns" -m "$streams" -n "$3" --data "$out/mlp.grpc" -H "content-type: application/grpc" \
      -H "te: trailers" "http://127.0.0.1:$2/inference.GRPCInferenceService/ModelInfer" \
      | grep -E "^requests:" >&2
  else
    # HTTP/1.1 has one request in flight per connection.
    h2load --h1 -t 1 -c "$conc" -m 1 -n "$3" --data "$out/mlp.json" -H "content-type: application/json" \
      "http://127.0.0.1:$2/v2/models/mlp/infer" | grep -E "^requests:" >&2
  fi
}

measure() { # name proto http grpc cmd...
  local name=$1 proto=$2 http=$3 grpc=$4
  shift 4
  local file="$out/$name-$proto.callgrind"
  rm -f "$file"
  if curl -sf "http://127.0.0.1:$http/v2/health/ready" >/dev/null; then
    echo "error: port $http already serves: stop that server first" >&2
    exit 1
  fi
  local sim=()
  [ "${CACHE_SIM:-0}" = 0 ] || sim=(--cache-sim=yes)
  valgrind --tool=callgrind --instr-atstart=no "${sim[@]}" --callgrind-out-file="$file" "$@" \
    >"$out/$name-$proto.log" 2>&1 &
  pid=$!
  wait_ready "$http"
  local port=$grpc
  [ "$proto" = grpc ] || port=$http
  load "$proto" "$port" 300
  callgrind_control -i on "$pid" >/dev/null
  load "$proto" "$port" "$n"
  callgrind_control -i off "$pid" >/dev/null
  kill -INT "$pid"
  wait "$pid" || true
  pid=
  local total
  total=$(grep -E "^totals:" "$file" | awk '{print $2}')
  echo "$name $proto: $total instructions, $((total / n)) per request"
  if [ "${CACHE_SIM:-0}" != 0 ]; then
    # Ir I1mr ILmr Dr D1mr DLmr Dw D1mw DLmw, per request.
    grep -E "^events:" "$file" >&2
    grep -E "^totals:" "$file" | awk -v n="$n" '{for (i = 2; i <= NF; i++) printf "%.0f ", $i / n; print ""}'
  fi
}

# The native layout, which valgrind would change: it reports one CPU (so both servers
# would use one thread and one session, and modelgate no I/O cores), and a run of the
# model takes ~50x as long there, past the inline budget (so modelgate would hand every
# request to a worker, which it does not do natively).
cores=$(nproc)
printf 'io_threads = %s\n[model_defaults]\ninstances = %s\ninline_budget_us = 1000000\n' \
  "$cores" "$cores" >"$out/modelgate.toml"
for proto in ${PROTOS:-grpc http}; do
  if [[ " ${SERVERS:-ref mg} " == *" ref "* ]]; then
    measure ref "$proto" 19300 19301 target/release/refserver --model-path "$repo/mlp/1/model.onnx" \
      --model-name mlp --http-port 19300 --grpc-port 19301 --instances "$cores"
  fi
  if [[ " ${SERVERS:-ref mg} " == *" mg "* ]]; then
    measure mg "$proto" 19100 19101 "${MODELGATE_BIN:-target/release/modelgate}" serve --model-repository "$repo" \
      --config "$out/modelgate.toml" --host 127.0.0.1 --http-port 19100 --grpc-port 19101 \
      --metrics-port 19102
  fi
done
