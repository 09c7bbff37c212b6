#!/usr/bin/env bash
# Busy CPU and wall time per full checkpoint of an idle busybox sandbox, through the daemon:
# `crab serve` on loopback with a private state dir, `crab sandbox create`, 3 warm-up
# checkpoints, then N timed `crab checkpoint --kind KIND` (default full; `fs` for filesystem
# checkpoints). CPU is the whole machine's busy time from /proc/stat, so run it on an otherwise
# idle machine, alternating the builds compared. With WITH_PROCESS=1 a shell loop runs in the
# sandbox (a sandbox with only its init gets full points without a CRIU dump).
# Usage (root): [WITH_PROCESS=1] full-checkpoint-loop.sh [CRAB_BIN] [CRIU_BIN] [N] [KIND]
set -euo pipefail
CRAB=${1:-target/release/crab}
CRIU=${2:-/usr/local/sbin/criu}
N=${3:-20}
KIND=${4:-full}
export PATH=/usr/local/sbin:$PATH
STATE=$(mktemp -d /tmp/crab-ckloop.XXXXXX)
PORT=$((20000 + RANDOM % 20000))
export CRAB_ADMIN=127.0.0.1:$((PORT + 1))
CRAB_CRIU=$CRIU "$CRAB" serve --listen 127.0.0.1:$PORT --admin "$CRAB_ADMIN" --state-dir "$STATE" \
    --upstream http://127.0.0.1:9 >"$STATE.log" 2>&1 &
DAEMON=$!
cleanup() {
    "$CRAB" sandbox rm ckloop >/dev/null 2>&1 || true
    kill "$DAEMON" 2>/dev/null || true
    wait "$DAEMON" 2>/dev/null || true
    umount "$STATE/engine/pool" 2>/dev/null || true
    for l in $(losetup -j "$STATE/engine/btrfs.img" -O NAME -n 2>/dev/null); do losetup -d "$l"; done
    rm -rf "$STATE" "$STATE.log"
}
trap cleanup EXIT
for _ in $(seq 100); do "$CRAB" sandboxes >/dev/null 2>&1 && break; sleep 0.1; done
"$CRAB" sandbox create ckloop >/dev/null
if [ "${WITH_PROCESS:-0}" = 1 ]; then
    "$CRAB" sandbox exec --detach ckloop -- sh -c 'while :; do sleep 5; done' >/dev/null
fi
for _ in 1 2 3; do "$CRAB" checkpoint ckloop --kind "$KIND" >/dev/null; done
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
b0=$(busy)
s=$(date +%s%N)
for _ in $(seq "$N"); do "$CRAB" checkpoint ckloop --kind "$KIND" >/dev/null; done
e=$(date +%s%N)
b1=$(busy)
hz=$(getconf CLK_TCK)
echo "$CRAB with $CRIU: $(( (b1 - b0) * 1000 / hz / N )) ms of CPU, $(( (e - s) / 1000000 / N )) ms wall per $KIND checkpoint ($N)"
