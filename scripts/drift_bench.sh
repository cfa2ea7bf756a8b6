#!/usr/bin/env bash
# Cost of drift sampling on the request path: throughput and latency of iris (version
# 2, with its profile.json) with drift detection on (every request sampled) and off,
# toggled through the model's config.toml between interleaved rounds (the order
# alternates per round). gRPC, closed loop
# at concurrency 1 and 8. Writes target/driftbench/results.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"
out="$root/target/driftbench"
secs="${BENCH_SECS:-5}"
rounds="${BENCH_ROUNDS:-4}"
rm -rf "$out" && mkdir -p "$out/repo/iris/2"
scripts/fetch-onnxruntime.sh
cargo build --release --locked -p modelgate -p modelgate-loadtest 2>&1 | tail -1
mg="$root/target/release/modelgate"
gen="$root/target/release/loadgen"
cp models/iris/2/model.onnx models/iris/2/profile.json "$out/repo/iris/2/"
cfg="$out/repo/iris/config.toml"
echo '[drift]' >"$cfg"

"$mg" serve --model-repository "$out/repo" --host 127.0.0.1 --http-port 19300 --grpc-port 19301 --metrics-port 19302 \
  --repository-poll-secs 1 >"$out/modelgate.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do curl -fsS http://127.0.0.1:19300/v2/health/ready >/dev/null 2>&1 && break; sleep 0.1; done
sampled() { curl -fsS http://127.0.0.1:19302/metrics | awk '/^modelgate_drift_samples_total\{model="iris"\}/ {print $2}'; }

order() { if [ $(($1 % 2)) = 1 ]; then echo off on; else echo on off; fi; }
for r in $(seq 1 "$rounds"); do
  # Alternate which mode goes first, so that drift over time hits both alike.
  for mode in $(order "$r"); do
    if [ "$mode" = on ]; then printf '[drift]\nenabled = true\n' >"$cfg"; else printf '[drift]\nenabled = false\n' >"$cfg"; fi
    sleep 2.5 # the watcher applies config.toml changes (poll 1 s, settle)
    for c in 1 8; do
      before=$(sampled); before=${before:-0}
      "$gen" --protocol grpc --url 127.0.0.1:19301 --model iris --concurrency "$c" --duration "$secs" \
        --warmup 1 --json "$out/$mode-c$c-r$r.json" >/dev/null
      after=$(sampled); after=${after:-0}
      echo "$mode c=$c r=$r samples: $((${after%.*} - ${before%.*}))" >>"$out/samples.txt"
    done
  done
done

python3 - "$out" "$rounds" <<'PY' > "$out/results.md"
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def runs(m, c):
    return [json.load(open(f"{out}/{m}-c{c}-r{r}.json")) for r in range(1, rounds + 1)]
print(f"gRPC, iris version 2 (profile.json), {rounds} interleaved rounds; medians over rounds.\n")
print("| drift | concurrency | req/s | p50 µs | p99 µs | req/s on / off |")
print("|---|---|---|---|---|---|")
for c in (1, 8):
    off_tp = statistics.median(d["throughput_rps"] for d in runs("off", c))
    for m in ("off", "on"):
        rs = runs(m, c)
        tp = statistics.median(d["throughput_rps"] for d in rs)
        p50 = statistics.median(d["latency_us"]["p50"] for d in rs)
        p99 = statistics.median(d["latency_us"]["p99"] for d in rs)
        print(f"| {m} | {c} | {tp:,.0f} | {p50:,.0f} | {p99:,.0f} | {tp / off_tp:.3f}x |")
print("\nSamples taken by the detector per run (0 when off):\n\n```")
print(open(f"{out}/samples.txt").read().strip())
print("```")
PY
cat "$out/results.md"
