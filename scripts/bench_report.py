#!/usr/bin/env python3
"""Summarise target/bench/*.json (from scripts/bench.sh) as markdown tables with ratios."""
import glob
import json
import os
import sys

out = sys.argv[1]
runs = {}
for p in glob.glob(os.path.join(out, "*.json")):
    with open(p) as f:
        runs[os.path.basename(p)[:-5]] = json.load(f)


def fmt(d):
    if not d:
        return "failed", "", ""
    lat = d["latency_us"]
    return f"{d['throughput_rps']:,.0f}", f"{lat['p50']:,.0f}", f"{lat['p99']:,.0f}"


cores = os.cpu_count()
print(f"Machine: {cores} cores (load generator included, 1 thread). Window {os.environ.get('BENCH_SECS', '4')} s after 1 s warm-up.\n")
floor = os.path.join(out, "ort_floor.txt")
if os.path.exists(floor):
    print("In-process ORT floor (criterion, `Session::run` of mlp, median):\n")
    print("```")
    print(open(floor).read().strip())
    print("```\n")

print("### modelgate vs the reference server\n")
print("| model | protocol | c | ref req/s | mg req/s | ratio | ref p50 µs | mg p50 µs | Δp50 µs | ref p99 µs | mg p99 µs |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for model in ("mlp", "heavy"):
    for proto in ("grpc", "http-binary"):
        for c in (1, 8, 64):
            r = runs.get(f"{model}-{proto}-c{c}-ref")
            m = runs.get(f"{model}-{proto}-c{c}-mg")
            if not r or not m:
                continue
            ratio = m["throughput_rps"] / r["throughput_rps"] if r["throughput_rps"] else float("nan")
            d50 = m["latency_us"]["p50"] - r["latency_us"]["p50"]
            print(f"| {model} | {proto} | {c} | {fmt(r)[0]} | {fmt(m)[0]} | {ratio:.2f} | {fmt(r)[1]} | {fmt(m)[1]} | {d50:+,.0f} | {fmt(r)[2]} | {fmt(m)[2]} |")

print("\n### Batching on the heavy model (gRPC)\n")
print("Same model file and defaults (2 worker instances, 1 intra-op thread each), `max_batch_size = 64`, `max_queue_delay_us = 2000`.\n")
print("| c | mode | req/s | p50 µs | p99 µs | vs off |")
print("|---|---|---|---|---|---|")
for c in (1, 8, 64):
    off = runs.get(f"batching-heavy-grpc-c{c}-off")
    for mode in ("off", "static", "adaptive"):
        d = runs.get(f"batching-heavy-grpc-c{c}-{mode}")
        if not d:
            continue
        vs = d["throughput_rps"] / off["throughput_rps"] if off and off["throughput_rps"] else float("nan")
        t, p50, p99 = fmt(d)
        print(f"| {c} | {mode} | {t} | {p50} | {p99} | {vs:.2f}x |")

print("\n### What batching costs `mlp` at concurrency 1 (gRPC, default `max_queue_delay_us = 500`)\n")
print("| mode | req/s | p50 µs | p99 µs | p50 vs off |")
print("|---|---|---|---|---|")
off = runs.get("batching-mlp-grpc-c1-off")
for mode in ("off", "static", "adaptive"):
    d = runs.get(f"batching-mlp-grpc-c1-{mode}")
    if not d:
        continue
    t, p50, p99 = fmt(d)
    delta = d["latency_us"]["p50"] - off["latency_us"]["p50"] if off else float("nan")
    print(f"| {mode} | {t} | {p50} | {p99} | {delta:+,.0f} µs |")
