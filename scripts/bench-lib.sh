# Shared by scripts/bench.sh and scripts/bench-compare.sh: the benchmark repository, the
# readiness wait, one loadgen run, and the server processes to stop on exit.
# Source it from the repository root: `. scripts/bench-lib.sh`.

# Server processes started by the caller; bench_cleanup (the EXIT trap) stops them.
bench_pids=()
bench_cleanup() {
  local p
  for p in "${bench_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}

# bench_make_repo DIR: the repository of the performance report: `mlp` (from models/) and
# the heavy model (MLP 512 -> 2048 -> 2048 -> 10, ~21 MB, generated, never committed),
# each at its defaults (no config.toml).
bench_make_repo() {
  local repo="$1" venv="$PWD/.cache/bench-venv"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet numpy==2.4.6 onnx==1.23.2
  fi
  mkdir -p "$repo"
  "$venv/bin/python" loadtest/generate_heavy.py "$repo" >/dev/null
  mkdir -p "$repo/mlp" && cp -r models/mlp/1 "$repo/mlp/1"
}

# bench_wait_ready PORT...: waits (up to 60 s each) until each HTTP port answers ready.
bench_wait_ready() {
  local port
  for port in "$@"; do
    for _ in $(seq 1 300); do
      curl -fsS "http://127.0.0.1:$port/v2/health/ready" >/dev/null 2>&1 && continue 2
      sleep 0.2
    done
    echo "port $port never became ready" >&2
    return 1
  done
}

# bench_run GEN OUT SECS NAME LABEL URL MODEL PROTOCOL CONCURRENCY: one closed-loop run
# (connections = concurrency, 1 s warm-up excluded) into OUT/NAME.json, tagged with
# "server": LABEL. A failed run is reported and leaves no JSON; the caller goes on.
bench_run() {
  local gen="$1" out="$2" secs="$3" name="$4" label="$5" url="$6" model="$7" proto="$8" c="$9"
  "$gen" --protocol "$proto" --url "$url" --model "$model" --concurrency "$c" --connections "$c" \
    --duration "$secs" --warmup 1 --json "$out/$name.json" >/dev/null 2>"$out/$name.err" \
    || echo "run $name failed: $(tail -1 "$out/$name.err")" >&2
  [ -f "$out/$name.json" ] || return 0
  python3 - "$out/$name.json" "$label" <<'PY' || true
import json, sys
p, label = sys.argv[1], sys.argv[2]
d = json.load(open(p)); d["server"] = label; json.dump(d, open(p, "w"))
PY
}
