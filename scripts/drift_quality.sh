#!/usr/bin/env bash
# Drift detection quality through the running gateway (issue 16): streams like the
# issue's (4 independent N(0,1) features, a 5,000-row reference profile made with
# `modelgate profile` through the served model, 10 rows per request, every request
# sampled, the [drift] defaults but cooldown_secs = 0), each stream on a model of its own:
# 20,000 in-distribution rows, then a change of feature 0 for up to 2,000 rows. Prints
# per scenario the delay (rows after the change, from the event's rows_tested) median and
# max, streams detected, and false alarms per 10,000 in-distribution rows.
#
#   scripts/drift_quality.sh            (STREAMS=5 per scenario; MODELGATE=path to a binary)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"
out="$root/target/driftquality"
rm -rf "$out" && mkdir -p "$out"
scripts/fetch-onnxruntime.sh >/dev/null
if [ -z "${MODELGATE:-}" ]; then
  cargo build --locked -p modelgate 2>&1 | tail -1
  MODELGATE="$root/target/debug/modelgate"
fi
python3 - "$out" "$MODELGATE" "$root" "${STREAMS:-5}" <<'PY'
import http.client, http.server, json, math, os, random, shutil, socket, statistics
import subprocess, sys, threading, time

out, mg, root, streams = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
PRE, POST, PER = 20_000, 2_000, 10
scenarios = [
    ("mean +0.5 sd", lambda x: x + 0.5),
    ("mean -0.5 sd", lambda x: x - 0.5),
    ("mean +1 sd", lambda x: x + 1.0),
    ("variance x2", lambda x: x * math.sqrt(2.0)),
    ("variance /2", lambda x: x * math.sqrt(0.5)),
]

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

# The reference: 5,000 rows, profiled through the model itself.
rng = random.Random(16)
repo = os.path.join(out, "repo")
base = os.path.join(repo, "ref", "1")
os.makedirs(base)
shutil.copy(os.path.join(root, "models/iris/2/model.onnx"), base)
csv = os.path.join(out, "reference.csv")
with open(csv, "w") as f:
    f.write("x0,x1,x2,x3\n")
    for _ in range(5000):
        f.write(",".join(f"{rng.gauss(0, 1):.6f}" for _ in range(4)) + "\n")
subprocess.run([mg, "profile", "--model-repository", repo, "--model", "ref", "--version", "1",
                "--data", csv], check=True, stdout=subprocess.DEVNULL)
names = []
for si, (label, _) in enumerate(scenarios):
    for k in range(streams):
        name = f"q{si}s{k}"
        names.append(name)
        os.makedirs(os.path.join(repo, name, "1"))
        for f in ("model.onnx", "profile.json"):
            shutil.copy(os.path.join(base, f), os.path.join(repo, name, "1"))
        with open(os.path.join(repo, name, "config.toml"), "w") as f:
            f.write("[drift]\ncooldown_secs = 0\n")
shutil.rmtree(os.path.join(repo, "ref"))

events = []
class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        events.append(json.loads(body))
        self.send_response(204); self.end_headers()
    def log_message(self, *a): pass
hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
threading.Thread(target=hook.serve_forever, daemon=True).start()

hp, gp, mp = free_port(), free_port(), free_port()
cfg = os.path.join(out, "modelgate.toml")
with open(cfg, "w") as f:
    f.write(f'''model_repository = "{repo}"
host = "127.0.0.1"
http_port = {hp}
grpc_port = {gp}
metrics_port = {mp}
[drift]
allow_private_webhooks = true
webhook_initial_backoff_ms = 100
[[drift.webhooks]]
name = "quality"
url = "http://127.0.0.1:{hook.server_address[1]}/hook"
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
''')
log = open(os.path.join(out, "modelgate.log"), "w")
gw = subprocess.Popen([mg, "serve", "--config", cfg], stdout=log, stderr=log)
try:
    conn = None
    for _ in range(600):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", hp)
            conn.request("GET", "/v2/health/ready"); r = conn.getresponse(); r.read()
            if r.status == 200: break
        except OSError:
            pass
        time.sleep(0.1)
    def infer(model, rows):
        body = json.dumps({"inputs": [{"name": "X", "shape": [len(rows), 4], "datatype": "FP32",
                                        "data": [v for r in rows for v in r]}]})
        conn.request("POST", f"/v2/models/{model}/infer", body, {"content-type": "application/json"})
        r = conn.getresponse(); r.read()
        assert r.status == 200, r.status
    def seen(model):
        # Every event for this model so far.
        return [e for e in events if e["data"]["model"] == model]
    def status(model):
        conn.request("GET", f"/admin/drift/{model}")
        r = conn.getresponse(); v = json.loads(r.read())
        return v["windows"][0] if v["windows"] else {"rows_seen": 0, "events": 0}
    def settle(model, rows):
        # The detector has taken every row sent (its first sample calibrates it).
        for _ in range(6000):
            st = status(model)
            if st["rows_seen"] >= rows: return st
            time.sleep(0.01)
        raise SystemExit(f"{model}: the detector did not take {rows} rows")
    results = {}
    for si, (label, change) in enumerate(scenarios):
        delays, missed, false_alarms = [], 0, 0
        for k in range(streams):
            model = f"q{si}s{k}"
            srng = random.Random(1000 * si + k)
            for _ in range(PRE // PER):
                infer(model, [[srng.gauss(0, 1) for _ in range(4)] for _ in range(PER)])
            pre = settle(model, PRE)["events"]
            sent = PRE
            for i in range(POST // PER):
                rows = [[srng.gauss(0, 1) for _ in range(4)] for _ in range(PER)]
                for r in rows: r[0] = change(r[0])
                infer(model, rows)
                sent += PER
                if i % 5 == 4 and settle(model, sent)["events"] > pre:
                    break
            settle(model, sent)
            for _ in range(300):
                if len(seen(model)) >= status(model)["events"]: break
                time.sleep(0.01)
            false_alarms += len([e for e in seen(model) if e["data"]["detector"]["rows_tested"] <= PRE])
            post = [e for e in seen(model) if e["data"]["detector"]["rows_tested"] > PRE]
            got = post[0] if post else None
            if got is None:
                missed += 1
            else:
                delays.append(got["data"]["detector"]["rows_tested"] - PRE)
                assert got["data"]["detector"]["feature"] == "x0", got["data"]["detector"]
        results[label] = (delays, missed, false_alarms)
    print(f"{streams} streams per scenario; 4 N(0,1) features, 5,000-row reference, 10 rows per request,")
    print(f"{PRE:,} in-distribution rows then up to {POST:,} changed rows of x0; [drift] defaults"
          " (sequential, arl_rows 1e7), cooldown_secs = 0.\n")
    print("| scenario | delay median (rows) | delay max | detected | false alarms / 10k rows |")
    print("|---|---|---|---|---|")
    for label, (d, missed, fa) in results.items():
        med = f"{statistics.median(d):.0f}" if d else "-"
        mx = f"{max(d)}" if d else "-"
        print(f"| {label} | {med} | {mx} | {len(d)}/{len(d) + missed} | {fa / (streams * PRE / 10_000):.3f} |")
    total_rows = len(scenarios) * streams * PRE
    total_fa = sum(r[2] for r in results.values())
    print(f"\nIn-distribution rows: {total_rows:,}; false alarms: {total_fa}.")
finally:
    gw.terminate(); gw.wait()
PY
