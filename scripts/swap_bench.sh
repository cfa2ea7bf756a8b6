#!/usr/bin/env bash
# Swap under load: the load generator runs at concurrency 32 while 20 new versions are
# published (atomic rename) and 10 removed; then 100 more swaps to see whether memory
# comes back. Writes target/swapbench/results.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"
out="$root/target/swapbench"
rm -rf "$out" && mkdir -p "$out/repo/swap"
scripts/fetch-onnxruntime.sh
cargo build --release --locked -p modelgate -p modelgate-loadtest 2>&1 | tail -1
mg="$root/target/release/modelgate"
gen="$root/target/release/loadgen"
model="$root/models/mlp/1/model.onnx"
m="$out/repo/swap"

publish() { # version: write elsewhere, then rename into place
  mkdir -p "$m/.incoming-$1" && cp "$model" "$m/.incoming-$1/model.onnx" && mv "$m/.incoming-$1" "$m/$1"
}
serving() { curl -fsS "http://127.0.0.1:19100/v2/models/swap" | python3 -c 'import json,sys; print(",".join(json.load(sys.stdin)["versions"]))'; }
wait_serving() { for _ in $(seq 1 200); do [ "$(serving 2>/dev/null)" = "$1" ] && return 0; sleep 0.05; done; echo "version $1 never served" >&2; return 1; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

publish 1
"$mg" serve --model-repository "$out/repo" --host 127.0.0.1 --http-port 19100 --grpc-port 19101 --metrics-port 19102 \
  --repository-poll-secs 1 >"$out/modelgate.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do curl -fsS http://127.0.0.1:19100/v2/health/ready >/dev/null 2>&1 && break; sleep 0.1; done

# Steady state first, then the same load while versions come and go.
"$gen" --protocol grpc --url 127.0.0.1:19101 --model swap --concurrency 32 --duration 8 --json "$out/steady.json" >/dev/null
"$gen" --protocol grpc --url 127.0.0.1:19101 --model swap --concurrency 32 --duration 25 --json "$out/swaps.json" >/dev/null &
gen_pid=$!
sleep 2
published=0; removed=0
for k in $(seq 1 10); do
  v=$((2 * k)); publish $v; published=$((published + 1)); wait_serving $v
  w=$((v + 1)); publish $w; published=$((published + 1)); wait_serving $w
  rm -rf "${m:?}/$w"; removed=$((removed + 1)); wait_serving $v
done
wait $gen_pid

# Memory: RSS after 1 swap and after 100 (each swap: publish a new version, drop the old).
next=100
swap_once() { publish $next; wait_serving $next; rm -rf "${m:?}/$((next - 1))"; next=$((next + 1)); }
publish 99; wait_serving 99
swap_once; sleep 1; rss1=$(rss_kb $pid)
for _ in $(seq 2 100); do swap_once; done
sleep 2; rss100=$(rss_kb $pid)

python3 - "$out" "$published" "$removed" "$rss1" "$rss100" <<'PY' > "$out/results.md"
import json, sys
out, published, removed, rss1, rss100 = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
s = json.load(open(f"{out}/steady.json")); w = json.load(open(f"{out}/swaps.json"))
def row(name, d):
    l = d["latency_us"]
    errs = sum(d["errors"].values()) if d["errors"] else 0
    return f"| {name} | {d['requests']:,} | {d['ok']:,} | {errs} | {d['throughput_rps']:,.0f} | {l['p50']:,.0f} | {l['p99']:,.0f} |"
print(f"gRPC, mlp, concurrency 32; {published} versions published and {removed} removed during the second run.\n")
print("| phase | requests | ok | failed | req/s | p50 µs | p99 µs |")
print("|---|---|---|---|---|---|---|")
print(row("steady", s))
print(row("during swaps", w))
print(f"\np99 during swaps / steady: {w['latency_us']['p99'] / s['latency_us']['p99']:.2f}\n")
print(f"RSS after 1 swap: {rss1 / 1024:.1f} MiB; after 100 swaps: {rss100 / 1024:.1f} MiB (ratio {rss100 / rss1:.2f})")
PY
cat "$out/results.md"
