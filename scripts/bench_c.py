#!/usr/bin/env python3
"""Side-by-side runs with efficient C load generators (h2load for gRPC, wrk for HTTP JSON,
one thread each) and modelgate's own loadgen, against servers already running.

    bench_c.py OUT ROUNDS SECS LOADGEN NAME=PID:HTTP_PORT:GRPC_PORT ...
    REPORT_ONLY=1 bench_c.py OUT ROUNDS SECS LOADGEN NAME=0:0:0 ...   (re-print OUT's runs)

For each round, each scenario (protocol x concurrency) runs against every server in turn
(interleaved, so machine drift hits all alike). Each run records req/s, p50 latency and
the server's CPU time during the run (utime + stime of its process from /proc), hence
requests per server CPU-second, which stays meaningful on a shared machine. Writes
OUT/c_runs.json and prints a markdown table of medians with ratios to the first server.
The loadgen rows measure the load generator itself: its rate against the first server
next to h2load's (the goal is at least 0.8x).
"""
import json
import os
import re
import statistics
import subprocess
import sys

TICK = os.sysconf("SC_CLK_TCK")
out, rounds, secs, loadgen = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
servers = []
report_only = os.environ.get("REPORT_ONLY") == "1"  # re-print OUT/c_runs.json, run nothing
for spec in sys.argv[5:]:
    name, rest = spec.split("=", 1)
    pid, http, grpc = rest.split(":")
    servers.append((name, int(pid), http, grpc))
here = os.path.dirname(os.path.abspath(__file__))
grpc_data = os.path.join(out, "mlp.grpc")
subprocess.run([sys.executable, os.path.join(here, "grpc_payload.py"), "mlp", "input", "FP32", "1,16", grpc_data], check=True)
lua = os.path.join(out, "mlp.lua")
with open(lua, "w") as f:
    f.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n')
    row = ",".join(str(round(0.1 * (i % 7), 1)) for i in range(16))
    f.write("wrk.body = '{\"inputs\":[{\"name\":\"input\",\"datatype\":\"FP32\",\"shape\":[1,16],\"data\":[%s]}]}'\n" % row)


def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def us(text):
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if m is None:
        raise SystemExit(f"cannot read a duration from {text!r}")
    v = float(m.group(1))
    return v * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]


def h2load(port, c):
    # c streams in flight: up to 8 connections, c/8 streams each (one thread).
    conns = min(c, 8)
    cmd = ["h2load", "-t", "1", "-c", str(conns), "-m", str(c // conns), "-D", secs, "--warm-up-time", "1",
           "--data", grpc_data, "-H", "content-type: application/grpc", "-H", "te: trailers",
           f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer"]
    text = subprocess.run(cmd, capture_output=True, text=True).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text).group(1))
    done = int(re.search(r"(\d+) succeeded", text).group(1))
    # h2load prints min, max, mean, sd of the request time; the mean stands in for p50.
    mean = us(re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", text).group(1))
    return rps, mean, done


def wrk(port, c):
    cmd = ["wrk", "-t1", f"-c{c}", f"-d{secs}s", "--latency", "-s", lua, f"http://127.0.0.1:{port}/v2/models/mlp/infer"]
    text = subprocess.run(cmd, capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    done = int(re.search(r"(\d+) requests in", text).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if bad:
        raise SystemExit(f"wrk: {bad.group(1)} failed responses on port {port}")
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.MULTILINE)
    if p50 is None:
        raise SystemExit(f"wrk printed no p50 on port {port}:\n{text}")
    return rps, us(p50.group(1)), done


def own(port, c, proto):
    path = os.path.join(out, "loadgen.json")
    subprocess.run([loadgen, "--protocol", proto, "--url", f"127.0.0.1:{port}", "--model", "mlp",
                    "--concurrency", str(c), "--connections", str(min(c, 8) if proto == "grpc" else c), "--duration", secs,
                    "--warmup", "1", "--json", path], check=True, capture_output=True)
    with open(path) as f:
        d = json.load(f)
    return d["throughput_rps"], d["latency_us"]["p50"], d.get("requests", 0)


scenarios = [("gRPC", "h2load", c) for c in (1, 8, 64)] + [("HTTP JSON", "wrk", c) for c in (1, 64)]
runs = []
for r in range(0 if report_only else rounds):
    for proto, tool, c in scenarios:
        for name, pid, http, grpc in servers:
            before = cpu(pid)
            if tool == "h2load":
                rps, p50, done = h2load(grpc, c)
            else:
                rps, p50, done = wrk(http, c)
            used = cpu(pid) - before
            # The run's CPU includes the 1 s warm-up (h2load) and so do its requests:
            # requests per CPU-second is done / used over the same span, roughly.
            runs.append({"round": r, "proto": proto, "tool": tool, "c": c, "server": name, "rps": rps,
                         "p50_us": p50, "cpu_s": used, "per_cpu_s": rps * float(secs) / used if used else 0})
    # The load generator against the first server, next to h2load / wrk above.
    name, pid, http, grpc = servers[0]
    for proto, c, p in (("gRPC", 64, "grpc"), ("HTTP JSON", 64, "http-json")):
        rps, p50, _ = own(grpc if p == "grpc" else http, c, p)
        runs.append({"round": r, "proto": proto, "tool": "loadgen", "c": c, "server": name, "rps": rps, "p50_us": p50})
if report_only:
    with open(os.path.join(out, "c_runs.json")) as f:
        runs = json.load(f)
else:
    with open(os.path.join(out, "c_runs.json"), "w") as f:
        json.dump(runs, f, indent=1)


def med(xs):
    return statistics.median(xs) if xs else float("nan")


first = servers[0][0]
names = [s[0] for s in servers]


def paired(tool, c, n, k):
    # Each round runs every server back to back: the ratio within a round cancels the
    # machine's drift between rounds, so ratios are the median of per-round ratios.
    per = []
    for r in range(rounds):
        a = [x[k] for x in runs if x["round"] == r and x["tool"] == tool and x["c"] == c and x["server"] == n]
        b = [x[k] for x in runs if x["round"] == r and x["tool"] == tool and x["c"] == c and x["server"] == first]
        if a and b and b[0]:
            per.append(a[0] / b[0])
    return med(per)


print(f"Median of {rounds} interleaved rounds, {secs} s each, 1-thread C load generators; ratios to `{first}`")
print("(ratios: the median of the per-round ratios).\n")
head = "| proto | c | " + " | ".join(f"{n} req/s" for n in names) + " | " + " | ".join(f"{n}/{first}" for n in names[1:])
head += " | " + " | ".join(f"{n} p50 µs" for n in names) + " | " + " | ".join(f"{n} req/CPU-s" for n in names)
head += " | " + " | ".join(f"{n}/{first} per CPU-s" for n in names[1:]) + " |"
print(head)
print("|" + "---|" * (2 + len(names) * 5 - 2))
for proto, tool, c in scenarios:
    sel = lambda n, k: med([x[k] for x in runs if x["tool"] == tool and x["c"] == c and x["server"] == n])
    rps = [sel(n, "rps") for n in names]
    row = f"| {proto} | {c} | " + " | ".join(f"{v:,.0f}" for v in rps) + " | "
    row += " | ".join(f"{paired(tool, c, n, 'rps'):.2f}" for n in names[1:]) + " | "
    row += " | ".join(f"{sel(n, 'p50_us'):,.0f}" for n in names) + " | "
    row += " | ".join(f"{sel(n, 'per_cpu_s'):,.0f}" for n in names) + " | "
    row += " | ".join(f"{paired(tool, c, n, 'per_cpu_s'):.2f}" for n in names[1:]) + " |"
    print(row)
print(f"\nThe load generator itself, against `{first}` at concurrency 64:\n")
print("| proto | C tool req/s | loadgen req/s | loadgen / C tool |")
print("|---|---|---|---|")
for proto, tool in (("gRPC", "h2load"), ("HTTP JSON", "wrk")):
    ctool = med([x["rps"] for x in runs if x["tool"] == tool and x["c"] == 64 and x["server"] == first])
    lg = med([x["rps"] for x in runs if x["tool"] == "loadgen" and x["proto"] == proto])
    print(f"| {proto} | {ctool:,.0f} | {lg:,.0f} | {lg / ctool:.2f} |")
