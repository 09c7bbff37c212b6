#!/usr/bin/env bash
# Installs everything Crab needs on a Debian/Ubuntu machine, idempotently: apt packages, a Rust
# toolchain check, CRIU >= 4.0 (built from Debian's 4.1.1 source when the system's is older),
# tracefs, and a Python venv with the official `openai` SDK for the SDK compatibility test.
#
# Usage: bash loadtest/scripts/bootstrap.sh        (as root, or with sudo available)
# Env:   CRAB_CACHE_DIR   where build products are cached   (default /var/cache/crab)
#        CRAB_SKIP_CRIU=1 skip the CRIU build (FS-only use)
set -euo pipefail

log() { printf '\033[1;34m[bootstrap]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[bootstrap] error:\033[0m %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "run as root (or install sudo): apt packages and CRIU need it"
    exec sudo -E bash "$0" "$@"
fi

CACHE_DIR=${CRAB_CACHE_DIR:-/var/cache/crab}
mkdir -p "$CACHE_DIR"

# --- apt packages ---------------------------------------------------------------------------
# clang/llvm/libbpf/bpftool: the eBPF programs; runc/btrfs/busybox/debootstrap: sandboxes;
# nginx-light: the proxy benchmark's peer; the rest: CRIU's build dependencies.
APT_PACKAGES=(
    ca-certificates curl xz-utils git pkg-config build-essential
    clang-19 llvm-19 libbpf-dev bpftool
    runc btrfs-progs busybox-static debootstrap util-linux e2fsprogs iproute2 iptables
    nginx-light python3 python3-venv sqlite3
    libbsd-dev libcap-dev libnet1-dev libnftables-dev libnl-3-dev
    libprotobuf-c-dev libprotobuf-dev protobuf-c-compiler protobuf-compiler python3-protobuf
    uuid-dev patch
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing apt packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "apt packages: present"
fi

# --- Rust toolchain -------------------------------------------------------------------------
if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null || die "cargo not found: install Rust >= 1.87 (https://rustup.rs) and re-run"
rustc_version=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n1.87.0\n' "$rustc_version" | sort -V | head -1)" != "1.87.0" ]; then
    die "rustc $rustc_version is too old: Crab needs >= 1.87"
fi
log "rust: rustc $rustc_version"

# --- CRIU >= 4.0 ------------------------------------------------------------------------------
criu_ok() {
    local v
    v=$("$1" --version 2>/dev/null | awk '/^Version:/ {print $2}')
    [ -n "$v" ] && [ "$(printf '%s\n4.0\n' "$v" | sort -V | head -1)" = "4.0" ]
}
CRIU_VERSION=4.1.1
CRIU_SHA256=f80a66cb3726bb2116266d4759ce3bcbfab7abdb6b6d430bf20dd41911717afe
CRIU_BIN="$CACHE_DIR/criu-$CRIU_VERSION/criu/criu"
# Crab's patches (e.g. inet sockets on Linux >= 6.16); a build is current when it was made from
# this tarball with exactly these patches and make flags (its build id is stored next to the binary).
CRIU_PATCHES=("$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"/criu-"$CRIU_VERSION"-*.patch)
# Built without GnuTLS (only its TLS page server uses it): every CRIU start then maps 18
# instead of 25 shared libraries, 3.5 instead of 6 ms of CPU here, paid by each dump and
# restore (runc starts CRIU twice per operation: a version check, then the work).
CRIU_MAKE_FLAGS=(NO_GNUTLS=1)
CRIU_BUILD_ID=$({ echo "$CRIU_SHA256"; echo "${CRIU_MAKE_FLAGS[*]}"; cat "${CRIU_PATCHES[@]}"; } | sha256sum | cut -d' ' -f1)
criu_current() { criu_ok "$1" && [ "$(cat "$2" 2>/dev/null)" = "$CRIU_BUILD_ID" ]; }
if [ "${CRAB_SKIP_CRIU:-0}" = 1 ]; then
    log "criu: skipped (CRAB_SKIP_CRIU=1)"
elif criu_current /usr/local/sbin/criu /usr/local/sbin/.crab-criu-build; then
    log "criu: $(/usr/local/sbin/criu --version | head -1) at /usr/local/sbin/criu"
else
    if ! criu_current "$CRIU_BIN" "$CACHE_DIR/criu-$CRIU_VERSION/.crab-build"; then
        tarball="$CACHE_DIR/criu_$CRIU_VERSION.orig.tar.xz"
        if ! echo "$CRIU_SHA256  $tarball" | sha256sum -c --status 2>/dev/null; then
            log "criu: fetching the $CRIU_VERSION source from Debian's archive (private apt config, trixie)"
            aptdir="$CACHE_DIR/apt-trixie"
            rm -rf "$aptdir"; mkdir -p "$aptdir/sources" "$aptdir/lists/partial"
            uris=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
            keyring=$(awk '/^Signed-By:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
            [ -n "$uris" ] || uris=http://deb.debian.org/debian
            [ -n "$keyring" ] || keyring=/usr/share/keyrings/debian-archive-keyring.gpg
            cat > "$aptdir/sources/trixie-src.sources" <<EOF
Types: deb-src
URIs: $uris
Suites: trixie
Components: main
Signed-By: $keyring
EOF
            aptopts=(-oDir::Etc::SourceList=/dev/null "-oDir::Etc::SourceParts=$aptdir/sources"
                     "-oDir::State::Lists=$aptdir/lists")
            apt-get "${aptopts[@]}" update -qq >/dev/null
            # Exits non-zero because the .dsc is missing from the mirror; the tarball arrives.
            (cd "$CACHE_DIR" && apt-get "${aptopts[@]}" source --download-only "criu=$CRIU_VERSION-*" >/dev/null 2>&1) || true
            [ -f "$tarball" ] || (cd "$CACHE_DIR" && apt-get "${aptopts[@]}" source --download-only criu >/dev/null 2>&1) || true
            echo "$CRIU_SHA256  $tarball" | sha256sum -c --status || die "criu source tarball missing or checksum mismatch: $tarball"
        fi
        log "criu: building $CRIU_VERSION (about 30 s)"
        rm -rf "$CACHE_DIR/criu-$CRIU_VERSION"
        tar -C "$CACHE_DIR" -xf "$tarball"
        for p in "${CRIU_PATCHES[@]}"; do
            patch -d "$CACHE_DIR/criu-$CRIU_VERSION" -p1 --quiet <"$p" || die "criu patch does not apply: $p"
        done
        make -C "$CACHE_DIR/criu-$CRIU_VERSION" -j"$(nproc)" "${CRIU_MAKE_FLAGS[@]}" criu >"$CACHE_DIR/criu-build.log" 2>&1 \
            || { tail -30 "$CACHE_DIR/criu-build.log" >&2; die "criu build failed (log: $CACHE_DIR/criu-build.log)"; }
        echo "$CRIU_BUILD_ID" >"$CACHE_DIR/criu-$CRIU_VERSION/.crab-build"
    fi
    install -m 0755 "$CRIU_BIN" /usr/local/sbin/criu
    echo "$CRIU_BUILD_ID" >/usr/local/sbin/.crab-criu-build
    log "criu: installed $(/usr/local/sbin/criu --version | head -1) to /usr/local/sbin/criu"
fi

# --- tracefs (tracepoint programs attach through it) ------------------------------------------
if [ ! -d /sys/kernel/tracing/events ]; then
    mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || log "warning: could not mount tracefs"
fi

# --- Python venv with the official openai SDK (the SDK compatibility test) --------------------
PYENV="$CACHE_DIR/pyenv"
if ! "$PYENV/bin/python" -c 'import openai, sys; sys.exit(0 if int(openai.__version__.split(".")[0]) >= 2 else 1)' 2>/dev/null; then
    log "python: creating $PYENV with openai>=2"
    rm -rf "$PYENV"
    python3 -m venv "$PYENV"
    "$PYENV/bin/pip" install -q 'openai>=2'
fi
log "python: $("$PYENV/bin/python" -c 'import openai; print("openai", openai.__version__)')"

log "ready"
