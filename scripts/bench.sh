#!/usr/bin/env bash
# The performance report: builds release binaries, generates the compute-heavy model,
# starts the reference server and modelgate side by side, and runs the load generator
# against each in turn (interleaved, so machine drift hits all alike). Writes
# target/bench/results.md (a table with ratios) and the raw JSON next to it.
#
#   scripts/bench.sh            # full run (several minutes)
#   BENCH_SECS=2 scripts/bench.sh   # shorter windows
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/bench-lib.sh
root="$PWD"
secs="${BENCH_SECS:-4}"
out="$root/target/bench"
rm -rf "$out" && mkdir -p "$out"

scripts/fetch-onnxruntime.sh
# The C load generators (Debian's nghttp2-client for h2load, and wrk), for the honest
# small-model comparison at the end.
if ! command -v h2load >/dev/null || ! command -v wrk >/dev/null; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nghttp2-client wrk >/dev/null
fi
cargo build --release --locked --bin modelgate -p modelgate -p modelgate-loadtest 2>&1 | tail -1
cargo build --release --locked -p modelgate-loadtest 2>&1 | tail -1
mg="$root/target/release/modelgate"
ref="$root/target/release/refserver"
gen="$root/target/release/loadgen"

repo="$out/repo"
bench_make_repo "$repo"
# Variants of the heavy model for the batching comparison: same file, other config.
for mode in off static adaptive; do
  mkdir -p "$repo/heavy_$mode" "$repo/mlp_$mode"
  ln -sfn "$repo/heavy/1" "$repo/heavy_$mode/1"
  printf 'batching = "%s"\nmax_queue_delay_us = 2000\nmax_batch_size = 64\n' "$mode" > "$repo/heavy_$mode/config.toml"
  ln -sfn "$repo/mlp/1" "$repo/mlp_$mode/1"
  # mlp at the default delay (500 us): what static batching costs a lone request.
  printf 'batching = "%s"\n' "$mode" > "$repo/mlp_$mode/config.toml"
done

trap bench_cleanup EXIT

"$mg" serve --model-repository "$repo" --host 127.0.0.1 --http-port 19000 --grpc-port 19001 --metrics-port 19002 \
  >"$out/modelgate.log" 2>&1 &
bench_pids+=($!)
mg_pid=$!
"$ref" --model-path "$repo/mlp/1/model.onnx" --model-name mlp --http-port 19010 --grpc-port 19011 >"$out/ref-mlp.log" 2>&1 &
bench_pids+=($!)
ref_mlp_pid=$!
"$ref" --model-path "$repo/heavy/1/model.onnx" --model-name heavy --http-port 19020 --grpc-port 19021 >"$out/ref-heavy.log" 2>&1 &
bench_pids+=($!)
bench_wait_ready 19000 19010 19020

# The in-process ORT floor (criterion), for the record.
cargo bench --locked --bench components -- ort_run --warm-up-time 1 --measurement-time 3 2>"$out/ort_floor.err" \
  | grep -E "^ort_run|time:" > "$out/ort_floor.txt" || true

run() { bench_run "$gen" "$out" "$secs" "$@"; } # name server-label url model protocol concurrency

port() { case "$1:$2" in
  mg:grpc) echo 19001;; mg:*) echo 19000;;
  ref-mlp:grpc) echo 19011;; ref-mlp:*) echo 19010;;
  ref-heavy:grpc) echo 19021;; ref-heavy:*) echo 19020;;
esac; }

# Issue 3: modelgate vs the reference server, interleaved run by run.
for c in 1 8 64; do
  for proto in grpc http-binary; do
    for model in mlp heavy; do
      for server in ref mg; do
        label="$server"; [ "$server" = ref ] && label="ref-$model"
        run "$model-$proto-c$c-$server" "$server" "127.0.0.1:$(port "$label" "$proto")" "$model" "$proto" "$c"
      done
    done
  done
done
# Issue 4: batching off / static / adaptive on the heavy model, interleaved; and what
# batching costs mlp at concurrency 1.
for c in 1 8 64; do
  for mode in off static adaptive; do
    run "batching-heavy-grpc-c$c-$mode" "$mode" "127.0.0.1:19001" "heavy_$mode" grpc "$c"
  done
done
for mode in off static adaptive; do
  run "batching-mlp-grpc-c1-$mode" "$mode" "127.0.0.1:19001" "mlp_$mode" grpc 1
done

python3 scripts/bench_report.py "$out" > "$out/results.md"

# Issue 15: small models against the bare per-core server, with h2load and wrk (and
# loadgen next to them), requests per server CPU-second beside req/s. `mg-shared` is
# modelgate with its connections on the shared multi-thread runtime (io_threads = 0),
# the layout before the I/O cores.
echo 'io_threads = 0' > "$out/shared.toml"
"$mg" serve --config "$out/shared.toml" --model-repository "$repo" --host 127.0.0.1 --http-port 19030 \
  --grpc-port 19031 --metrics-port 19032 >"$out/modelgate-shared.log" 2>&1 &
bench_pids+=($!)
mg_shared=$!
bench_wait_ready 19030
mkdir -p "$out/c"
{
  echo
  echo "### Small model (mlp, 1 row) with C load generators"
  echo
  python3 scripts/bench_c.py "$out/c" "${BENCH_C_ROUNDS:-2}" "${BENCH_C_SECS:-5}" "$gen" \
    "ref=$ref_mlp_pid:19010:19011" \
    "mg=$mg_pid:19000:19001" \
    "mg-shared=$mg_shared:19030:19031"
} >> "$out/results.md"
cat "$out/results.md"
