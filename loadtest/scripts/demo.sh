#!/usr/bin/env bash
# The demo (README "Quick start"): installs prerequisites, builds Crab in release mode, and runs
# `loadtest demo` — the proxy in front of the built-in fake LLM with a scripted agent, no API key.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "demo.sh: Crab's sandboxes need root" >&2; exit 1; }
    exec sudo -E env "PATH=$PATH" bash "$0" "$@"
fi

bash "$ROOT/loadtest/scripts/bootstrap.sh"
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
export PATH="/usr/local/sbin:$PATH"

cargo build --locked --release -p proxy -p loadtest
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}/release"
exec "$TARGET/loadtest" demo --crab "$TARGET/crab" "$@"
