#!/usr/bin/env bash
# Run Triton's perf_analyzer (PyPI package `perf-analyzer`) on Debian 12.
#
# The wheel's binary needs GLIBC_2.38 and GLIBCXX_3.4.32, newer than Debian 12's
# glibc 2.36 / libstdc++ 12. This script keeps everything under a git-ignored
# folder and changes nothing system-wide:
#   1. a venv holding the pinned, hash-checked perf-analyzer wheel;
#   2. libc6, libstdc++6 and libgcc-s1 from Debian 13 (trixie), downloaded by apt
#      through a PRIVATE apt configuration (own sources list, lists and cache;
#      the system's sources and state are only read, never written), verified by
#      apt against the signed archive and again against pinned SHA-256 sums,
#      then unpacked with `dpkg-deb -x` into a private sysroot (never installed);
#   3. runs the binary through that glibc's dynamic loader with a library path
#      of private libs first, then the system's (libssl3, libcrypto, zlib).
#
# Usage:
#   loadtest/perf_analyzer.sh [perf_analyzer args...]
#   loadtest/perf_analyzer.sh -m mlp -u 127.0.0.1:8001 -i grpc --concurrency-range 1:8:7
#   loadtest/perf_analyzer.sh --setup-only     # just prepare the cache
#
# Environment:
#   PA_CACHE_DIR        cache folder (default: <repo>/.cache/perf_analyzer)
#   PA_DEBIAN_MIRROR    Debian mirror URI (default: the one the system's apt uses
#                       for the running release)
#   PA_LIBC6_VERSION, PA_LIBSTDCXX6_VERSION, PA_LIBGCC_S1_VERSION
#                       override the pinned .deb versions (e.g. after a trixie
#                       point release removed the pinned one from the archive);
#                       the pinned SHA-256 check is then skipped for that .deb
#                       (apt still verifies it against the signed archive).
set -euo pipefail

# ---- pins -------------------------------------------------------------------
PA_PKG_VERSION="2.60.0"
PA_WHEEL_PLATFORM="manylinux_2_38_x86_64"
PA_WHEEL_SHA256="23ef56b107ae9233e5cf09fbdf508dd9b936a52f1bae2f63f53c8117087b3f25"

DEB_SUITE="trixie"
DEB_KEYRING="/usr/share/keyrings/debian-archive-keyring.gpg"
PINNED_LIBC6_VERSION="2.41-12+deb13u5"
PINNED_LIBC6_SHA256="b59b0625cd1a791375d40dab23a4d5d3d0641e3d0a773501becdc3725b7f99cf"
PINNED_LIBSTDCXX6_VERSION="14.2.0-19"
PINNED_LIBSTDCXX6_SHA256="ab1fa05837aa7a92aae748fd07a18a35f7d18bb4a71c4724fe2bbf0e32089de0"
PINNED_LIBGCC_S1_VERSION="14.2.0-19"
PINNED_LIBGCC_S1_SHA256="3c71917b490d1a17aed43196a2787a256ecf060526cdb20216a74bedc061b150"

LIBC6_VERSION="${PA_LIBC6_VERSION:-$PINNED_LIBC6_VERSION}"
LIBSTDCXX6_VERSION="${PA_LIBSTDCXX6_VERSION:-$PINNED_LIBSTDCXX6_VERSION}"
LIBGCC_S1_VERSION="${PA_LIBGCC_S1_VERSION:-$PINNED_LIBGCC_S1_VERSION}"

# ---- paths ------------------------------------------------------------------
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${PA_CACHE_DIR:-$REPO_ROOT/.cache/perf_analyzer}"
VENV="$CACHE/venv"
APT_DIR="$CACHE/apt"
DEB_DIR="$CACHE/debs"
SYSROOT="$CACHE/sysroot"
PRIV_LIB="$SYSROOT/usr/lib/x86_64-linux-gnu"
LOADER="$PRIV_LIB/ld-linux-x86-64.so.2"

log() { echo "[perf_analyzer.sh] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(uname -m)" = "x86_64" ] || die "only x86_64 is supported (got $(uname -m))"
for tool in python3 apt-get dpkg-deb sha256sum; do
  command -v "$tool" >/dev/null || die "missing tool: $tool"
done

mkdir -p "$CACHE"

# ---- 1. perf-analyzer wheel in a venv ---------------------------------------
setup_venv() {
  local stamp="$VENV/.perf-analyzer-$PA_PKG_VERSION-$PA_WHEEL_SHA256"
  [ -f "$stamp" ] && [ -x "$VENV/bin/python" ] && return 0
  log "creating venv with perf-analyzer==$PA_PKG_VERSION"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  local site req
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  req="$CACHE/requirements-perf-analyzer.txt"
  printf 'perf-analyzer==%s --hash=sha256:%s\n' "$PA_PKG_VERSION" "$PA_WHEEL_SHA256" >"$req"
  # The venv's pip would refuse a manylinux_2_38 wheel on glibc 2.36, so install it
  # with an explicit platform into the venv's site-packages (no Python deps).
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install --quiet \
    --no-deps --only-binary=:all: --require-hashes \
    --platform "$PA_WHEEL_PLATFORM" --python-version 3.11 --implementation py \
    --target "$site" --upgrade -r "$req"
  [ -x "$site/perf_analyzer/bin/perf_analyzer" ] || die "perf_analyzer binary missing after install"
  touch "$stamp"
}

pa_binary() {
  "$VENV/bin/python" -c 'import perf_analyzer, pathlib; print(pathlib.Path(perf_analyzer.__file__).parent / "bin" / "perf_analyzer")'
}

# ---- 2. private glibc + libstdc++ from trixie -------------------------------
debian_mirror() {
  if [ -n "${PA_DEBIAN_MIRROR:-}" ]; then echo "$PA_DEBIAN_MIRROR"; return; fi
  local codename uri
  # shellcheck disable=SC1091
  codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
  # Read-only query of the system's apt sources: the URI serving "<codename>".
  # shellcheck disable=SC2016  # $(...) is apt's format syntax, not the shell's
  uri="$(env -u APT_CONFIG apt-get indextargets --format '$(RELEASE) $(REPO_URI)' 2>/dev/null \
        | awk -v c="$codename" '$1 == c { print $2; exit }')"
  [ -n "$uri" ] || die "no Debian mirror found in the system's apt sources; set PA_DEBIAN_MIRROR"
  echo "${uri%/}"
}

write_apt_config() {
  mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial" "$APT_DIR/etc/preferences.d"
  : >"$APT_DIR/status"
  local mirror
  mirror="$(debian_mirror)"
  printf 'deb [signed-by=%s target=Packages] %s %s main\n' \
    "$DEB_KEYRING" "$mirror" "$DEB_SUITE" >"$APT_DIR/etc/sources.list"
  cat >"$APT_DIR/apt.conf" <<EOF
Dir::Etc::sourcelist "$APT_DIR/etc/sources.list";
Dir::Etc::sourceparts "-";
Dir::Etc::preferences "$APT_DIR/etc/preferences";
Dir::Etc::preferencesparts "$APT_DIR/etc/preferences.d";
Dir::State "$APT_DIR";
Dir::State::lists "$APT_DIR/lists";
Dir::State::status "$APT_DIR/status";
Dir::Cache "$APT_DIR/cache";
Dir::Cache::archives "$APT_DIR/cache/archives";
APT::Architecture "amd64";
APT::Architectures { "amd64"; };
Acquire::Languages "none";
EOF
  if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then
    chown -R _apt "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial" || true
  fi
}

sysroot_stamp() {
  echo "$SYSROOT/.stamp-libc6_${LIBC6_VERSION}-libstdc++6_${LIBSTDCXX6_VERSION}-libgcc-s1_${LIBGCC_S1_VERSION}"
}

setup_sysroot() {
  [ -f "$(sysroot_stamp)" ] && [ -x "$LOADER" ] && return 0
  [ -r "$DEB_KEYRING" ] || die "$DEB_KEYRING missing (package debian-archive-keyring)"
  log "fetching libc6=$LIBC6_VERSION libstdc++6=$LIBSTDCXX6_VERSION libgcc-s1=$LIBGCC_S1_VERSION from $DEB_SUITE (private apt config)"
  write_apt_config
  export APT_CONFIG="$APT_DIR/apt.conf"
  apt-get -q update >&2 || die "private apt-get update failed"
  rm -rf "$DEB_DIR"; mkdir -p "$DEB_DIR"
  if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$DEB_DIR" || true; fi
  (cd "$DEB_DIR" && apt-get -q download \
      "libc6=$LIBC6_VERSION" "libstdc++6=$LIBSTDCXX6_VERSION" "libgcc-s1=$LIBGCC_S1_VERSION" >&2) \
    || die "apt-get download failed; if a $DEB_SUITE point release replaced a pinned version, \
check 'APT_CONFIG=$APT_DIR/apt.conf apt-cache policy libc6 libstdc++6 libgcc-s1' and set PA_*_VERSION (or update the pins)"
  unset APT_CONFIG

  check_deb() { # name version pinned_version pinned_sha
    local f
    f="$(ls "$DEB_DIR"/"$1"_*_amd64.deb)"
    if [ "$2" = "$3" ]; then
      echo "$4  $f" | sha256sum --check --quiet - || die "SHA-256 mismatch for $f"
    else
      log "WARNING: $1 $2 is not the pinned $3; relying on apt's signature check only"
    fi
  }
  check_deb libc6 "$LIBC6_VERSION" "$PINNED_LIBC6_VERSION" "$PINNED_LIBC6_SHA256"
  check_deb libstdc++6 "$LIBSTDCXX6_VERSION" "$PINNED_LIBSTDCXX6_VERSION" "$PINNED_LIBSTDCXX6_SHA256"
  check_deb libgcc-s1 "$LIBGCC_S1_VERSION" "$PINNED_LIBGCC_S1_VERSION" "$PINNED_LIBGCC_S1_SHA256"

  local tmp="$SYSROOT.tmp"
  rm -rf "$tmp"; mkdir -p "$tmp"
  for deb in "$DEB_DIR"/*.deb; do dpkg-deb -x "$deb" "$tmp"; done
  [ -x "$tmp/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" ] || die "loader missing in unpacked libc6"
  rm -rf "$SYSROOT"; mv "$tmp" "$SYSROOT"
  touch "$(sysroot_stamp)"
}

setup_venv
setup_sysroot
BIN="$(pa_binary)"
LIB_PATH="$PRIV_LIB:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu"

if [ "${1:-}" = "--setup-only" ]; then
  log "ready: $("$LOADER" --library-path "$LIB_PATH" --argv0 perf_analyzer "$BIN" --version 2>&1 | head -n1)"
  log "binary:  $BIN"
  log "loader:  $LOADER"
  log "libpath: $LIB_PATH"
  exit 0
fi

# GCONV_PATH: keep iconv (if ever used) on the private glibc's own modules.
export GCONV_PATH="$PRIV_LIB/gconv"
exec "$LOADER" --library-path "$LIB_PATH" --argv0 perf_analyzer "$BIN" "$@"
