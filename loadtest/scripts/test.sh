#!/usr/bin/env bash
# The one test command (README "Quick start", and what CI runs): installs prerequisites, builds
# the `crab` binary, then runs every test of the workspace as root with CRAB_TEST_STRICT=1, so a
# test whose prerequisite (root, eBPF, cgroups, runc, btrfs, CRIU, nginx, the openai SDK) is
# missing fails instead of skipping. Extra arguments go to `cargo test`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "test.sh: the tests load eBPF and run containers: run as root" >&2; exit 1; }
    exec sudo -E env "PATH=$PATH" bash "$0" "$@"
fi

bash "$ROOT/loadtest/scripts/bootstrap.sh"
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

CACHE_DIR=${CRAB_CACHE_DIR:-/var/cache/crab}
export CRAB_TEST_STRICT=1
export CRAB_TEST_PYTHON="$CACHE_DIR/pyenv/bin/python"
export CRAB_CRIU=${CRAB_CRIU:-/usr/local/sbin/criu}
export PATH="/usr/local/sbin:$PATH"   # runc must find CRIU 4.x before any older one

cargo build --locked -p proxy --bin crab
export CRAB_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/crab"
cargo test --locked --workspace --no-fail-fast "$@"
