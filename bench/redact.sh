#!/usr/bin/env bash
# The cost of keeping real credential values out of the bottle (issue #11): the same intercepted HTTPS downloads
# through two bot-bottle proxies side by side, one plain (`candidate.sh intercept`) and one with a credential bound
# to the upstream host (`candidate.sh credential`), whose answers are therefore requested uncompressed and searched
# for the real value as they stream. nginx from ../shared/bench/upstream.sh serves /small (1 KiB) and /large
# (10 MiB of random bytes); hyperfine alternates nothing, so the two commands run back to back in one invocation.
#
#   bench/redact.sh [RESULT.md]        RUNS=30 WARMUP=3; BB_BIN=... to measure a given build
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
shared=${SHARED_BENCH:-$here/../../shared/bench}
out=${1:-$here/results/redact-$(date +%Y%m%d-%H%M%S).md}
runs=${RUNS:-30}
warmup=${WARMUP:-3}
mkdir -p "$(dirname "$out")"

command -v hyperfine >/dev/null && command -v nginx >/dev/null ||
	{ apt-get update -q && apt-get install -y -q --no-install-recommends hyperfine nginx-light >/dev/null; }
if [[ -z ${BB_BIN:-} ]]; then
	(cd "$here/.." && nice -n 10 cargo build --release -q -p bot-bottle)
	mkdir -p /tmp/bb-bench/bot-bottle-bin
	cp "$here/../target/release/bot-bottle" /tmp/bb-bench/bot-bottle-bin/bot-bottle
	BB_BIN=/tmp/bb-bench/bot-bottle-bin/bot-bottle
fi
export BB_BIN

source "$shared/lib.sh"
"$shared/upstream.sh" start >/dev/null
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	"$shared/upstream.sh" stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

export BENCH_ALLOW_HOST=$ALLOW_HOST BENCH_UPSTREAM_HTTP_PORT=$UPSTREAM_HTTP_PORT
export BENCH_UPSTREAM_HTTPS_PORT=$UPSTREAM_HTTPS_PORT BENCH_UPSTREAM_CA=$CA_CERT
export BENCH_CA_CERT=$CA_CERT BENCH_CA_KEY=$CERT_DIR/ca.key BENCH_DIR=$shared
export BENCH_TOKEN=bench-secret-0123456789abcdef0123456789abcdef
declare -A port=([intercept]=18141 [credential]=18142)
for mode in intercept credential; do
	export BENCH_PROXY_PORT=${port[$mode]} BENCH_WORKDIR=/tmp/bb-bench/redact-$mode
	mkdir -p "$BENCH_WORKDIR"
	"$here/candidate.sh" "$mode" 2>"$BENCH_WORKDIR/stderr" >"$BENCH_WORKDIR/stdout" &
	pids+=($!)
done
for mode in intercept credential; do
	for _ in $(seq 1 100); do grep -q "listening on" "/tmp/bb-bench/redact-$mode/stdout" 2>/dev/null && break; sleep 0.1; done
done

fetch() { # mode path
	echo "curl -sS -o /dev/null --fail -x http://127.0.0.1:${port[$1]} --cacert $CA_CERT https://$ALLOW_HOST:$UPSTREAM_HTTPS_PORT$2"
}
for mode in intercept credential; do $(fetch "$mode" /small); done # both answer, or stop here
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; } # utime + stime, in clock ticks
{
	echo "# Redaction cost, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) vCPU, $BB_BIN"
	echo
	for path in /large /small; do
		table=$(mktemp)
		hyperfine -N --style none --warmup "$warmup" --runs "$runs" \
			-n "intercept $path" "$(fetch intercept "$path")" \
			-n "credential $path" "$(fetch credential "$path")" \
			--export-markdown "$table" >/dev/null 2>&1
		cat "$table"
		rm -f "$table"
		echo
	done
	# Both proxies served the same requests: their CPU time is the cost of each, without the client's noise.
	hz=$(getconf CLK_TCK)
	echo "| proxy | CPU time for all requests above [ms] |"
	echo "|:---|---:|"
	echo "| intercept | $(($(cpu "${pids[0]}") * 1000 / hz)) |"
	echo "| credential | $(($(cpu "${pids[1]}") * 1000 / hz)) |"
} | tee "$out"
