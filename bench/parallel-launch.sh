#!/usr/bin/env bash
# Launches N detached namespace bottles at once, checks that every one got its own 127.0.0.N and its own CA,
# stops them all, and checks that no bottle process is left. Usage: bench/parallel-launch.sh [N] (default 100)
set -euo pipefail
N=${1:-100}
BB=${BB:-$(cd "$(dirname "$0")/.." && pwd)/target/release/bot-bottle}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
export XDG_STATE_HOME=$work/state
mkdir -p "$work/ws"; cd "$work/ws"
marker="bb-parallel-$$"
start=$(date +%s.%N)
for i in $(seq 1 "$N"); do
  "$BB" run -d --name "p$i" -- bash -c "exec -a $marker sleep 600" >/dev/null 2>"$work/err.$i" &
done
wait
launched=$(date +%s.%N)
"$BB" --json ls > "$work/ls.json"
python3 - "$work/ls.json" "$N" "$XDG_STATE_HOME/bot-bottle" <<'PY'
import json, sys, os, hashlib
rows = json.load(open(sys.argv[1])); n = int(sys.argv[2]); root = sys.argv[3]
running = [r for r in rows if r["state"] == "running"]
addrs = [r["address"] for r in running]
cas = {hashlib.sha256(open(os.path.join(root, r["name"], "ca.pem"), "rb").read()).hexdigest() for r in running}
print(f"bottles running: {len(running)}/{n}; distinct addresses: {len(set(addrs))}; distinct CAs: {len(cas)}")
failed = [r for r in rows if r["state"] != "running"]
for r in failed: print("not running:", r["name"], r["state"], r.get("error"))
sys.exit(0 if len(running) == n and len(set(addrs)) == n and len(cas) == n else 1)
PY
ok=$?
for i in $(seq 1 "$N"); do "$BB" rm -f "p$i" >/dev/null & done
wait
sleep 0.5
left=$(pgrep -f "$marker" | wc -l || true)
echo "launch of $N in parallel took $(python3 -c "print(round($launched - $start, 2))") s; processes left after rm -f: $left"
leases=$(ls "$XDG_STATE_HOME/bot-bottle/leases" | wc -l)
echo "leases left: $leases"
[ "$ok" = 0 ] && [ "$left" = 0 ] && [ "$leases" = 0 ]
