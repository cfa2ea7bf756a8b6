#!/usr/bin/env bash
# Before/after benchmark of the request path: two modelgate binaries, side by side.
#
#   scripts/bench-compare.sh BEFORE_REV [AFTER_REV]
#   BENCH_SECS=2 BENCH_ROUNDS=5 scripts/bench-compare.sh d72d989 HEAD
#
# BEFORE_REV is built (release) in a temporary git worktree, target/bench-before/src,
# into target/bench-before/target; that target dir is kept so that building another
# revision later only rebuilds what changed (the worktree is removed after the build), and
# each commit's binary is kept as target/bench-before/bin/modelgate-<hash> for reruns.
# AFTER_REV is built the same way under target/bench-after/; without it, the working tree
# as it is (committed or not) is built into target/release. loadgen always comes from the
# working tree, so both sides meet the same client.
#
# Both servers run at once on the repository of scripts/bench.sh (`mlp` and the generated
# `heavy`, defaults; one copy each since a server writes its audit log into it), and
# loadgen drives each in turn: per round and cell, before then after, the order flipped
# every other round, so machine drift hits both alike. Cells: gRPC and HTTP (binary
# tensors) x {mlp c=1, mlp c=64, heavy c=64}. Writes target/bench/compare.md (medians over
# rounds and after/before ratios) and the raw JSON under target/bench/compare/.
#
# Env: BENCH_SECS (4, measured seconds per run, after 1 s warm-up), BENCH_ROUNDS (3),
# BENCH_PORT (19400: before listens on +0/+1/+2, after on +10/+11/+12), BENCH_REBUILD=1
# (build a revision's binary again even if one is kept), BENCH_CALLGRIND=1 (also count
# instructions per request under valgrind, see below; about 5 more minutes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/bench-lib.sh
root="$PWD"

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 BEFORE_REV [AFTER_REV]" >&2
  exit 2
fi
secs="${BENCH_SECS:-4}"
rounds="${BENCH_ROUNDS:-3}"
base="${BENCH_PORT:-19400}"
out="$root/target/bench/compare"
report="$root/target/bench/compare.md"

# A revision as "<short hash> (<subject>)", for the report.
describe() { git log -1 --format='%h (%s)' "$1" | cut -c1-100; }
before_hash="$(git rev-parse --verify "$1^{commit}")"
before_desc="$(describe "$before_hash")"
if [ $# -eq 2 ]; then
  after_hash="$(git rev-parse --verify "$2^{commit}")"
  after_desc="$(describe "$after_hash")"
else
  after_hash=""
  after_desc="working tree at $(describe HEAD)"
  if [ -n "$(git status --porcelain -- src Cargo.toml Cargo.lock build.rs proto)" ]; then
    after_desc="$after_desc + uncommitted changes"
  fi
fi

on_exit() {
  bench_cleanup
  local side
  for side in before after; do
    [ -e "$root/target/bench-$side/src" ] && git worktree remove --force "$root/target/bench-$side/src" 2>/dev/null
  done
  return 0
}
trap on_exit EXIT

rm -rf "$out" "$report" && mkdir -p "$out"
scripts/fetch-onnxruntime.sh
# Both binaries load the working tree's library (a removed worktree has no .onnxruntime/).
export ORT_DYLIB_PATH="$root/.onnxruntime/libonnxruntime.so.1.31.1"

# The working tree: loadgen always, modelgate when no AFTER_REV is given.
echo "building the working tree ..." >&2
cargo build --release --locked --bin modelgate -p modelgate 2>&1 | tail -1
# A bin of the other package: `--bin modelgate` above does not build it.
cargo build --release --locked -p modelgate-loadtest --bin loadgen 2>&1 | tail -1
gen="$root/target/release/loadgen"

# build_rev HASH SIDE: builds the release modelgate of commit HASH under target/bench-SIDE/
# and sets `built` to it. A commit's binary is kept as bin/modelgate-HASH and reused by
# later runs (BENCH_REBUILD=1 builds it again).
build_rev() {
  local rev="$1" dir="$root/target/bench-$2"
  local src="$dir/src" bin="$dir/bin/modelgate-$1"
  built="$bin"
  if [ -x "$bin" ] && [ -z "${BENCH_REBUILD:-}" ]; then
    echo "$2: reusing $bin" >&2
    return 0
  fi
  git worktree remove --force "$src" 2>/dev/null || true
  rm -rf "$src" && git worktree prune
  mkdir -p "$dir/bin"
  # A first build starts from the working tree's release artefacts: with the same
  # Cargo.lock the dependencies are the same, and cargo rebuilds whatever differs.
  if [ ! -d "$dir/target/release" ] && [ -d "$root/target/release/deps" ]; then
    mkdir -p "$dir/target" && cp -a "$root/target/release" "$dir/target/release"
  fi
  git worktree add --detach --quiet "$src" "$rev"
  echo "building $2: $(describe "$rev") ..." >&2
  if ! (cd "$src" && CARGO_TARGET_DIR="$dir/target" cargo build --release --locked --bin modelgate -p modelgate \
    >"$dir/build.log" 2>&1); then
    tail -20 "$dir/build.log" >&2
    echo "$2: $rev does not build (log: $dir/build.log)" >&2
    return 1
  fi
  tail -1 "$dir/build.log" >&2
  git worktree remove --force "$src"
  cp "$dir/target/release/modelgate" "$bin"
}
build_rev "$before_hash" before
mg_before="$built"
if [ -n "$after_hash" ]; then
  build_rev "$after_hash" after
  mg_after="$built"
else
  mg_after="$root/target/release/modelgate"
fi

bench_make_repo "$out/repo"
for side in before after; do
  cp -r "$out/repo" "$out/repo-$side"
done
port() { # side http|grpc|metrics
  local off=0
  [ "$1" = after ] && off=10
  case "$2" in http) echo $((base + off));; grpc) echo $((base + off + 1));; metrics) echo $((base + off + 2));; esac
}
for side in before after; do
  bin="$mg_before"
  [ "$side" = after ] && bin="$mg_after"
  "$bin" serve --model-repository "$out/repo-$side" --host 127.0.0.1 --http-port "$(port "$side" http)" \
    --grpc-port "$(port "$side" grpc)" --metrics-port "$(port "$side" metrics)" >"$out/modelgate-$side.log" 2>&1 &
  bench_pids+=($!)
done
bench_wait_ready "$(port before http)" "$(port after http)"

load_start="$(cut -d' ' -f1-3 /proc/loadavg)"
cells=("mlp grpc 1" "mlp grpc 64" "heavy grpc 64" "mlp http-binary 1" "mlp http-binary 64" "heavy http-binary 64")
for r in $(seq 1 "$rounds"); do
  order="before after"
  [ $((r % 2)) -eq 0 ] && order="after before"
  for cell in "${cells[@]}"; do
    read -r model proto c <<<"$cell"
    for side in $order; do
      p=grpc
      [ "$proto" = grpc ] || p=http
      bench_run "$gen" "$out" "$secs" "$model-$proto-c$c-$side-r$r" "$side" \
        "127.0.0.1:$(port "$side" "$p")" "$model" "$proto" "$c"
    done
  done
  echo "round $r of $rounds done" >&2
done
load_end="$(cut -d' ' -f1-3 /proc/loadavg)"

# Optional (BENCH_CALLGRIND=1): instructions per request, which machine noise does not
# move. Each binary serves `mlp` alone under callgrind; after 500 requests of warm-up the
# counters are zeroed, BENCH_CG_REQUESTS (5000) requests are sent at concurrency 1 and the
# counts dumped, gRPC then HTTP. The count covers every thread of the server (idle
# background threads included, which are a small share).
if [ -n "${BENCH_CALLGRIND:-}" ]; then
  bench_cleanup
  bench_pids=()
  n="${BENCH_CG_REQUESTS:-5000}"
  for side in before after; do
    bin="$mg_before"
    [ "$side" = after ] && bin="$mg_after"
    repo="$out/cg-repo-$side"
    mkdir -p "$repo/mlp" && cp -r models/mlp/1 "$repo/mlp/1"
    http=$(($(port "$side" http) + 20)) grpc=$(($(port "$side" grpc) + 20))
    valgrind --tool=callgrind --callgrind-out-file="$out/callgrind-$side.out" "$bin" serve --model-repository "$repo" \
      --host 127.0.0.1 --http-port "$http" --grpc-port "$grpc" --metrics-port $(($(port "$side" metrics) + 20)) \
      >"$out/callgrind-$side.log" 2>&1 &
    cg_pid=$!
    bench_pids+=("$cg_pid")
    bench_wait_ready "$http"
    k=0
    for proto in grpc http-binary; do
      k=$((k + 1))
      url="127.0.0.1:$http"
      [ "$proto" = grpc ] && url="127.0.0.1:$grpc"
      "$gen" --protocol "$proto" --url "$url" --model mlp --concurrency 1 --requests 500 --warmup 0 >/dev/null
      callgrind_control -z "$cg_pid" >/dev/null
      "$gen" --protocol "$proto" --url "$url" --model mlp --concurrency 1 --requests "$n" --warmup 0 --timeout 60 \
        --json "$out/cg-$side-$proto.load.json" >/dev/null
      callgrind_control -d "$proto" "$cg_pid" >/dev/null
      for _ in $(seq 1 100); do [ -s "$out/callgrind-$side.out.$k" ] && break; sleep 0.1; done
      python3 - "$out/callgrind-$side.out.$k" "$n" "$out/cg-$side-$proto.json" <<'PY'
import json, sys
src, n, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ir = next(int(l.split()[1]) for l in open(src) if l.startswith("summary:"))
json.dump({"instructions": ir, "requests": n, "per_request": ir / n}, open(dst, "w"))
PY
    done
    kill "$cg_pid" 2>/dev/null || true
    wait "$cg_pid" 2>/dev/null || true
    echo "callgrind: $side done" >&2
  done
fi

BEFORE="$before_hash" BEFORE_DESC="$before_desc" AFTER="${after_hash:-working tree}" AFTER_DESC="$after_desc" \
  SECS="$secs" ROUNDS="$rounds" LOAD_START="$load_start" LOAD_END="$load_end" \
  CELLS="$(printf '%s;' "${cells[@]}")" python3 - "$out/meta.json" <<'PY'
import json, os, sys
e = os.environ
meta = {k.lower(): e[k] for k in ("BEFORE", "BEFORE_DESC", "AFTER", "AFTER_DESC", "LOAD_START", "LOAD_END")}
meta.update(secs=float(e["SECS"]), rounds=int(e["ROUNDS"]),
            cells=[c.split() for c in e["CELLS"].split(";") if c.strip()])
json.dump(meta, open(sys.argv[1], "w"), indent=1)
PY
python3 scripts/bench_compare_report.py "$out" > "$report"
cat "$report"
