#!/usr/bin/env bash
# bot-bottle's egress proxy in the shared side-by-side proxy bench (../shared/bench, see its README): the same
# run, the same load and the same machine as direct, squid, tinyproxy and mitmproxy. Results and BENCHMARKS.md's
# target table land in bench/results/ (git-ignored).
#
#   bench/run.sh                           # ROUNDS=2 DURATION=5 (kind to a shared 2-vCPU machine), ~15 min
#   ROUNDS=3 DURATION=10 bench/run.sh      # the harness defaults, ~45 min
#   BB_BIN=/path/to/bot-bottle bench/run.sh   # skip the release build
#
# 1. intercept:   the full matrix, TARGETS="direct squid tinyproxy mitmproxy bot-bottle"
# 2. passthrough: the CONNECT cases only, TARGETS="direct squid bot-bottle-passthrough", with localhost:18443
#                 marked `tls = "passthrough"` in a policy file
# 3. bench/latency.sh: added latency at one connection (no queueing), direct vs bot-bottle, HTTP and HTTPS
# 4. bench/targets.py: issue #3's targets against the medians of runs 1 and 2
#
# Every server the harness starts (nginx, the proxies) is stopped when it ends, also on Ctrl-C.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
harness=${BENCH_HARNESS:-$repo/../shared/bench}
[[ -x $harness/bench-proxy.sh ]] || { echo "no bench harness at $harness (set BENCH_HARNESS)" >&2; exit 1; }
harness=$(cd "$harness" && pwd)

export ROUNDS=${ROUNDS:-2} DURATION=${DURATION:-5}
export RESULTS_DIR=${RESULTS_DIR:-$here/results}
export BENCH_TMP=${BENCH_TMP:-/tmp/bb-bench}
stamp=${STAMP:-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RESULTS_DIR" "$BENCH_TMP"

if [[ -z ${BB_BIN:-} ]]; then
	(cd "$repo" && nice -n 10 cargo build --release -p bot-bottle)
	# A private copy: a rebuild of target/ during the run must not change what is measured.
	mkdir -p "$BENCH_TMP/bot-bottle-bin"
	cp "$repo/target/release/bot-bottle" "$BENCH_TMP/bot-bottle-bin/bot-bottle"
	BB_BIN=$BENCH_TMP/bot-bottle-bin/bot-bottle
fi
export BB_BIN BB_BENCH_DIR=$here

"$harness/setup.sh"

# The harness expands PROXY_CMD in `bash -c "exec $PROXY_CMD"`, with BENCH_* set: keep the single quotes.
# shellcheck disable=SC2016
STAMP=$stamp-intercept PROXY_NAME=bot-bottle \
	PROXY_CMD='"$BB_BENCH_DIR"/candidate.sh intercept' \
	"$harness/bench-proxy.sh"

# shellcheck disable=SC2016
STAMP=$stamp-passthrough PROXY_NAME=bot-bottle-passthrough \
	TARGETS="direct squid candidate" SCENARIOS="https-small https-large" LOADGENS=oha \
	PROXY_CMD='"$BB_BENCH_DIR"/candidate.sh passthrough' \
	"$harness/bench-proxy.sh"

BENCH_HARNESS=$harness "$here/latency.sh" "$RESULTS_DIR/latency-$stamp.md"

python3 "$here/targets.py" "$RESULTS_DIR/proxy-$stamp-intercept" "$RESULTS_DIR/proxy-$stamp-passthrough" \
	| tee "$RESULTS_DIR/targets-$stamp.md"
echo "results: $RESULTS_DIR/{proxy,targets}-$stamp*" >&2
