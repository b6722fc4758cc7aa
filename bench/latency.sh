#!/usr/bin/env bash
# Added latency without queueing: one connection (oha -c 1), direct vs through bot-bottle (intercepting), plain
# HTTP and HTTPS, 1 KiB. The matrix's c16 p99 on a shared 2-vCPU machine is mostly scheduling noise; this is
# the per-request cost of the extra hop. Uses the shared harness's upstream and candidate plumbing, stops what
# it starts. Needs BB_BIN and BB_BENCH_DIR (bench/run.sh sets them); prints a Markdown table.
set -euo pipefail
harness=${BENCH_HARNESS:?}
source "$harness/lib.sh"
: "${BB_BIN:?}" "${BB_BENCH_DIR:?}"
out=${1:?usage: latency.sh OUT.md}

started_upstream=0
cleanup() {
	"$harness/proxies.sh" stop candidate || true
	((started_upstream)) && "$harness/upstream.sh" stop || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ $("$harness/upstream.sh" status) != running ]]; then
	"$harness/upstream.sh" start
	started_upstream=1
fi
# shellcheck disable=SC2016
PROXY_CMD='"$BB_BENCH_DIR"/candidate.sh intercept' "$harness/proxies.sh" start candidate
px=http://127.0.0.1:$CANDIDATE_PORT

run() { # run LABEL URL [PROXY]
	local label=$1 url=$2 json
	json=$(mktemp)
	"$OHA" -z "${DURATION}s" -c 1 --no-tui --output-format json --cacert "$CLIENT_BUNDLE" ${3:+-x "$3"} "$url" >"$json"
	python3 - "$label" "$json" <<'PY'
import json, sys
d = json.load(open(sys.argv[2]))
p = d["latencyPercentiles"]
ok = sum(d.get("statusCodeDistribution", {}).values())
print(f"| {sys.argv[1]} | {d['summary']['requestsPerSec']:,.0f} | {p['p50'] * 1000:.3f} | {p['p99'] * 1000:.3f} | {ok} |")
PY
	rm -f "$json"
	sleep "$SETTLE"
}

{
	echo "| c1, ${DURATION}s | req/s | p50 ms | p99 ms | responses |"
	echo "|---|---|---|---|---|"
	for round in $(seq "$ROUNDS"); do
		run "direct HTTP (round $round)" "http://$ALLOW_HOST:$UPSTREAM_HTTP_PORT/small"
		run "bot-bottle HTTP (round $round)" "http://$ALLOW_HOST:$UPSTREAM_HTTP_PORT/small" "$px"
		run "direct HTTPS (round $round)" "https://$ALLOW_HOST:$UPSTREAM_HTTPS_PORT/small"
		run "bot-bottle HTTPS, intercepted (round $round)" "https://$ALLOW_HOST:$UPSTREAM_HTTPS_PORT/small" "$px"
	done
} | tee "$out"
