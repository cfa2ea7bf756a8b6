#!/usr/bin/env bash
# Cost of traffic routing on the request path, measured side by side in one run:
#   plain   routing.toml: stable 1 only
#   shadow  stable 1 + a 100% shadow of version 5, built to be slow (~13 ms a row,
#           about 100x the primary), on the default mirror budget (1 run on 2 cores)
#   canary  stable 1 + canary 2 at 50% (each canary answer also run on stable to
#           measure agreement, on the same budget)
# Rounds interleave the three so that machine noise hits them alike; the routing is
# switched with `modelgate ctl`. gRPC, closed loop at concurrency 1 and 8.
# Writes target/trafficbench/results.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"
out="$root/target/trafficbench"
secs="${BENCH_SECS:-5}"
rounds="${BENCH_ROUNDS:-3}"
rm -rf "$out" && mkdir -p "$out/repo/route"
scripts/fetch-onnxruntime.sh
cargo build --release --locked -p modelgate -p modelgate-loadtest 2>&1 | tail -1
mg="$root/target/release/modelgate"
gen="$root/target/release/loadgen"
for v in 1 2 5; do
  mkdir -p "$out/repo/route/$v" && cp "tests/fixtures/route/$v/model.onnx" "$out/repo/route/$v/"
done
echo 'version_policy = "all"' >"$out/repo/route/config.toml"

"$mg" serve --model-repository "$out/repo" --host 127.0.0.1 --http-port 19200 --grpc-port 19201 --metrics-port 19202 \
  >"$out/modelgate.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do curl -fsS http://127.0.0.1:19200/v2/health/ready >/dev/null 2>&1 && break; sleep 0.1; done
ctl() { "$mg" ctl --url http://127.0.0.1:19200 traffic set route "$@" >/dev/null; }

set_scenario() {
  case "$1" in
    plain) ctl --stable 1 --no-canary --no-shadows ;;
    shadow) ctl --stable 1 --no-canary --shadow 5:100 ;;
    canary) ctl --stable 1 --canary 2 --weight 50 --no-shadows ;;
  esac
}

for r in $(seq 1 "$rounds"); do
  for s in plain shadow canary; do
    set_scenario "$s"
    for c in 1 8; do
      "$gen" --protocol grpc --url 127.0.0.1:19201 --model route --concurrency "$c" --duration "$secs" \
        --warmup 1 --json "$out/$s-c$c-r$r.json" >/dev/null
    done
  done
done
curl -fsS http://127.0.0.1:19202/metrics | grep -E '^modelgate_mirror_shed_total|^modelgate_requests_total.*variant="shadow"' >"$out/shadow-metrics.txt" || true

python3 - "$out" "$rounds" <<'PY' > "$out/results.md"
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def runs(s, c):
    return [json.load(open(f"{out}/{s}-c{c}-r{r}.json")) for r in range(1, rounds + 1)]
print(f"gRPC, model `route` (tests/fixtures/route), {rounds} interleaved rounds; medians over rounds.\n")
print("| scenario | concurrency | req/s | p50 µs | p99 µs | req/s vs plain | p50 vs plain |")
print("|---|---|---|---|---|---|---|")
for c in (1, 8):
    base = runs("plain", c)
    b_tp = statistics.median(d["throughput_rps"] for d in base)
    b_p50 = statistics.median(d["latency_us"]["p50"] for d in base)
    for s in ("plain", "shadow", "canary"):
        rs = runs(s, c)
        tp = statistics.median(d["throughput_rps"] for d in rs)
        p50 = statistics.median(d["latency_us"]["p50"] for d in rs)
        p99 = statistics.median(d["latency_us"]["p99"] for d in rs)
        errs = sum(sum(d["errors"].values()) for d in rs if d["errors"])
        note = f" ({errs} errors)" if errs else ""
        print(f"| {s}{note} | {c} | {tp:,.0f} | {p50:,.0f} | {p99:,.0f} | {tp / b_tp:.2f}x | {p50 - b_p50:+,.0f} µs |")
print("\nShadow runs made and shed (whole run):\n")
print("```")
print(open(f"{out}/shadow-metrics.txt").read().strip())
print("```")
PY
cat "$out/results.md"
