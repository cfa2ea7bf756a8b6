#!/usr/bin/env python3
"""Summarise target/bench/compare/*.json (from scripts/bench-compare.sh) as a markdown
table: medians over rounds, before and after, and the after/before ratios."""
import json
import os
import statistics
import sys

out = sys.argv[1]
meta = json.load(open(os.path.join(out, "meta.json")))
rounds = meta["rounds"]


def load(name):
    p = os.path.join(out, name + ".json")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def med(runs, key):
    vals = [key(d) for d in runs]
    return statistics.median(vals) if vals else float("nan")


def tp(d):
    return d["throughput_rps"]


def p50(d):
    return d["latency_us"]["p50"]


def p99(d):
    return d["latency_us"]["p99"]


print(f"Before: `{meta['before']}` {meta['before_desc']}  ")
print(f"After: `{meta['after']}` {meta['after_desc']}\n")
print(
    f"Machine: {os.cpu_count()} cores, shared with loadgen (1 thread); both servers up at once, "
    f"load average {meta['load_start']} at the start, {meta['load_end']} at the end. "
    f"{rounds} rounds, {meta['secs']:g} s per run after 1 s warm-up, closed loop, connections = "
    "concurrency; per round and cell before and after run back to back, the order flipped every "
    "other round. Medians over rounds; ratio = after / before (req/s: above 1 is faster; "
    "latency: below 1 is faster); the last column gives each round's own ratio, whose spread "
    "shows the noise.\n"
)
print(
    "| model | protocol | c | before req/s | after req/s | ratio | before p50 µs | after p50 µs | ratio "
    "| before p99 µs | after p99 µs | ratio | req/s ratio per round (median) |"
)
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
failed = []
for model, proto, c in meta["cells"]:
    sides = {}
    for side in ("before", "after"):
        runs = []
        for r in range(1, rounds + 1):
            name = f"{model}-{proto}-c{c}-{side}-r{r}"
            d = load(name)
            if d is None:
                failed.append(name)
            else:
                runs.append((r, d))
                if d.get("errors"):
                    failed.append(f"{name} ({sum(d['errors'].values())} errors: {d['errors']})")
        sides[side] = runs
    b = [d for _, d in sides["before"]]
    a = [d for _, d in sides["after"]]
    if not b or not a:
        print(f"| {model} | {proto} | {c} | failed |")
        continue
    # After/before of the same round: the two ran back to back, so a round's load hit both.
    per_round = []
    bd, ad = dict(sides["before"]), dict(sides["after"])
    for r in range(1, rounds + 1):
        if r in bd and r in ad and tp(bd[r]):
            per_round.append(tp(ad[r]) / tp(bd[r]))
    row = [model, proto, c]
    for key, fmt in ((tp, "{:,.0f}"), (p50, "{:,.0f}"), (p99, "{:,.0f}")):
        mb, ma = med(b, key), med(a, key)
        row += [fmt.format(mb), fmt.format(ma), f"{ma / mb:.2f}" if mb else "nan"]
    if per_round:
        row.append(" ".join(f"{x:.2f}" for x in per_round) + f" ({statistics.median(per_round):.2f})")
    else:
        row.append("")
    print("| " + " | ".join(str(x) for x in row) + " |")

if failed:
    print("\nFailed runs or runs with errors:\n")
    for f in failed:
        print(f"- {f}")

cg = {}
for side in ("before", "after"):
    for proto in ("grpc", "http-binary"):
        d = load(f"cg-{side}-{proto}")
        if d:
            cg[(side, proto)] = d
if cg:
    print("\nInstructions per request (callgrind, `mlp`, concurrency 1, whole server; repeatable to about 1 %):\n")
    print("| protocol | requests | before | after | ratio |")
    print("|---|---|---|---|---|")
    for proto in ("grpc", "http-binary"):
        b, a = cg.get(("before", proto)), cg.get(("after", proto))
        if b and a:
            print(
                f"| {proto} | {b['requests']:,} | {b['per_request']:,.0f} | {a['per_request']:,.0f} "
                f"| {a['per_request'] / b['per_request']:.3f} |"
            )
