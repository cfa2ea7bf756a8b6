#!/usr/bin/env bash
# Fetch the ONNX Runtime shared library from the PyPI wheel into .onnxruntime/.
# ort's own binary download cannot be used (its host is not reachable everywhere we run),
# so the library comes from the official `onnxruntime` wheel, which any pip can fetch.
# Idempotent: does nothing when the library is already in place.
set -euo pipefail

ORT_VERSION="${ORT_VERSION:-1.31.1}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$root/.onnxruntime}"
lib="$dest/libonnxruntime.so.$ORT_VERSION"

if [ -f "$lib" ]; then
  exit 0
fi

python="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$dest"
echo "fetching onnxruntime==$ORT_VERSION from PyPI ..." >&2
# The wheel's Python tag does not matter (we only take the C library), but pip needs one it accepts.
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
  --dest "$tmp" "onnxruntime==$ORT_VERSION"
"$python" - "$tmp" "$dest" "$ORT_VERSION" <<'PY'
import pathlib, sys, zipfile
tmp, dest, version = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
wheel = next(pathlib.Path(tmp).glob("onnxruntime-*.whl"))
name = f"libonnxruntime.so.{version}"
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith("/capi/" + name))
    part = dest / (name + ".part")
    part.write_bytes(z.read(member))
    # rename last so that a half-written library is never picked up
    part.rename(dest / name)
PY
ln -sf "libonnxruntime.so.$ORT_VERSION" "$dest/libonnxruntime.so"
echo "onnxruntime library: $lib" >&2
