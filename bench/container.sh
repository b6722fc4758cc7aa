#!/usr/bin/env bash
# Launch time of a container bottle side by side with a bare `docker run --rm --network none IMAGE true`, in one
# sitting: ROUNDS rounds of hyperfine (RUNS launches each, 3 warm-ups), the order flipped every other round; prints
# each round's medians and the ratio. Usage: bench/container.sh path/to/bot-bottle IMAGE   (ROUNDS=4 RUNS=20)
# RUNTIME=runsc: both under that engine runtime (gVisor, registered as README.md says).
# As root: the workspace is handed to nobody, whom a root launcher's container bottle runs as.
set -euo pipefail
bb=${1:?usage: container.sh BOT_BOTTLE IMAGE}
image=${2:?usage: container.sh BOT_BOTTLE IMAGE}
rounds=${ROUNDS:-4}
runs=${RUNS:-20}
command -v hyperfine >/dev/null && docker info >/dev/null 2>&1 || { echo "needs hyperfine and a Docker daemon" >&2; exit 2; }
scratch=$(mktemp -d) && trap 'rm -rf "$scratch"' EXIT
mkdir "$scratch/w" && chown 65534:65534 "$scratch/w" && cd "$scratch/w"
export XDG_STATE_HOME="$scratch/state"
runtime=${RUNTIME:+--runtime $RUNTIME}
docker_cmd="docker run --rm --network none $runtime $image true"
bb_cmd="$bb run --rm --backend container --image $image $runtime -- true"
for round in $(seq 1 "$rounds"); do
	if [ $((round % 2)) = 1 ]; then
		order=(-n docker "$docker_cmd" -n bot-bottle "$bb_cmd")
	else
		order=(-n bot-bottle "$bb_cmd" -n docker "$docker_cmd")
	fi
	hyperfine -N -w 3 -r "$runs" --export-json "$scratch/round$round.json" "${order[@]}" >/dev/null
done
echo "runtime: ${RUNTIME:-default}; load: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$scratch" "$rounds" <<'PY'
import json, statistics, sys
scratch, rounds = sys.argv[1], int(sys.argv[2])
for r in range(1, rounds + 1):
    results = json.load(open(f"{scratch}/round{r}.json"))["results"]
    med = {x["command"]: statistics.median(x["times"]) * 1000 for x in results}
    print(f"round {r}: docker run {med['docker']:.0f} ms, bot-bottle {med['bot-bottle']:.0f} ms, "
          f"ratio {med['bot-bottle'] / med['docker']:.2f}x")
PY
