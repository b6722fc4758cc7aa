#!/usr/bin/env bash
# Launch time of two bot-bottle builds side by side with bare bwrap, in one sitting: ROUNDS rounds of hyperfine
# (RUNS launches each, 5 warm-ups), the order flipped every other round; prints each round's medians and ratios to
# bwrap. Usage: bench/launch-ab.sh OLD_BINARY NEW_BINARY   (ROUNDS=4 RUNS=60)
set -euo pipefail
old=${1:?usage: launch-ab.sh OLD_BINARY NEW_BINARY}
new=${2:?usage: launch-ab.sh OLD_BINARY NEW_BINARY}
rounds=${ROUNDS:-4}
runs=${RUNS:-60}
command -v hyperfine >/dev/null && command -v bwrap >/dev/null || { echo "needs hyperfine and bwrap" >&2; exit 2; }
# A scratch workspace: the launcher refuses a workspace that holds the user's home or its own state.
scratch=$(mktemp -d) && trap 'rm -rf "$scratch"' EXIT
cd "$scratch"
bw='bwrap --unshare-all --die-with-parent --ro-bind /usr /usr --symlink usr/lib /lib --symlink usr/lib64 /lib64 --symlink usr/bin /bin --proc /proc --dev /dev true'
for round in $(seq 1 "$rounds"); do
	if [ $((round % 2)) = 1 ]; then
		order=(-n bwrap "$bw" -n new "$new run --rm -- true" -n old "$old run --rm -- true")
	else
		order=(-n old "$old run --rm -- true" -n new "$new run --rm -- true" -n bwrap "$bw")
	fi
	hyperfine -N -w 5 -r "$runs" --export-json "$scratch/round$round.json" "${order[@]}" >/dev/null
done
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$scratch" "$rounds" <<'PY'
import json, statistics, sys
scratch, rounds = sys.argv[1], int(sys.argv[2])
for r in range(1, rounds + 1):
    results = json.load(open(f"{scratch}/round{r}.json"))["results"]
    med = {x["command"]: statistics.median(x["times"]) * 1000 for x in results}
    low = {x["command"]: min(x["times"]) * 1000 for x in results}
    print(f"round {r}: " + "  ".join(
        f"{k} median {med[k]:.1f} ms (min {low[k]:.1f}, {med[k] / med['bwrap']:.2f}x bwrap)" for k in ("bwrap", "old", "new")))
PY
