#!/usr/bin/env bash
# The demo (README "Quick start"): installs prerequisites, builds Crab in release mode, runs
# `loadtest demo` (the proxy in front of the built-in fake LLM with three scripted agents; the
# turns crab saw), then a short evaluation: 4 co-located sandboxes, 2 tasks of each suite, one
# crash per task, `chat-only` against `crab`; prints its summary and the HTML report's path.
# No API key needed. Extra arguments go to `loadtest run` (e.g. `--tasks 4`).
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
"$TARGET/loadtest" demo --crab "$TARGET/crab"
OUT="${CRAB_DEMO_OUT:-$ROOT/target/crab-demo-report}"
exec "$TARGET/loadtest" run --crab "$TARGET/crab" --sandboxes 4 --tasks 2 --crashes 1 \
    --method chat-only,crab --no-overhead --time-scale 0.1 --out "$OUT" "$@"
