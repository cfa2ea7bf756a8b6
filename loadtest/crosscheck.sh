#!/usr/bin/env bash
# Cross-check our load generator against Triton's perf_analyzer: the same modelgate,
# the same model and concurrency, the two tools interleaved. Writes
# target/crosscheck/results.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"
out="$root/target/crosscheck"
rm -rf "$out" && mkdir -p "$out"
scripts/fetch-onnxruntime.sh
cargo build --release --locked -p modelgate -p modelgate-loadtest 2>&1 | tail -1
loadtest/perf_analyzer.sh --setup-only >/dev/null
"$root/target/release/modelgate" serve --model-repository models --host 127.0.0.1 \
  --http-port 19200 --grpc-port 19201 --metrics-port 19202 >"$out/modelgate.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do curl -fsS http://127.0.0.1:19200/v2/health/ready >/dev/null 2>&1 && break; sleep 0.1; done

for round in 1 2 3; do
  for proto in grpc http; do
    port=19201; gp=grpc; [ "$proto" = http ] && { port=19200; gp=http-binary; }
    for c in 1 8; do
      "$root/target/release/loadgen" --protocol "$gp" --url "127.0.0.1:$port" --model mlp \
        --concurrency "$c" --duration 4 --json "$out/loadgen-$proto-c$c-r$round.json" >/dev/null
      loadtest/perf_analyzer.sh -m mlp -u "127.0.0.1:$port" -i "$proto" --concurrency-range "$c" \
        --measurement-interval 4000 --percentile 99 -s 50 --max-trials 10 \
        -f "$out/pa-$proto-c$c-r$round.csv" >"$out/pa-$proto-c$c-r$round.log" 2>&1 \
        || echo "perf_analyzer $proto c$c failed: $(tail -2 "$out/pa-$proto-c$c-r$round.log")" >&2
    done
  done
done

python3 - "$out" <<'PY' | tee "$out/results.md"
import csv, glob, json, os, statistics, sys
out = sys.argv[1]
print("| protocol | c | loadgen req/s | perf_analyzer infer/s | ratio | loadgen p50 µs | perf_analyzer p50 µs | loadgen p99 µs | perf_analyzer p99 µs |")
print("|---|---|---|---|---|---|---|---|---|")
for proto in ("grpc", "http"):
    for c in (1, 8):
        lg, pa = [], []
        for r in (1, 2, 3):
            p = f"{out}/loadgen-{proto}-c{c}-r{r}.json"
            if os.path.exists(p):
                d = json.load(open(p)); lg.append((d["throughput_rps"], d["latency_us"]["p50"], d["latency_us"]["p99"]))
            p = f"{out}/pa-{proto}-c{c}-r{r}.csv"
            if os.path.exists(p):
                rows = list(csv.DictReader(open(p)))
                if rows:
                    row = rows[0]
                    pa.append((float(row["Inferences/Second"]), float(row["p50 latency"]), float(row["p99 latency"])))
        if not lg or not pa:
            continue
        med = lambda xs, i: statistics.median(x[i] for x in xs)
        print(f"| {proto} | {c} | {med(lg,0):,.0f} | {med(pa,0):,.0f} | {med(lg,0)/med(pa,0):.2f} | {med(lg,1):,.0f} | {med(pa,1):,.0f} | {med(lg,2):,.0f} | {med(pa,2):,.0f} |")
print("\nMedians of 3 interleaved rounds; 4 s windows; both tools on the same machine as the server.")
PY
