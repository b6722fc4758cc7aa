#!/usr/bin/env bash
# Starts bot-bottle's egress proxy as the shared bench's candidate (../shared/bench/proxies.sh runs
# PROXY_CMD='"$BB_BENCH_DIR"/candidate.sh MODE' with the BENCH_* variables set; see its README).
#
#   MODE intercept    TLS interception for localhost:18443, leaves signed with the bench CA the client trusts
#   MODE passthrough  the same hosts, but localhost:18443 is `tls = "passthrough"` (a [[host]] entry in a policy
#                     file): the proxy checks the ClientHello's SNI, then relays the tunnel
#   MODE credential   as intercept, with a credential bound to the HTTPS host (value from BENCH_TOKEN), so every
#                     answer from it is searched for the real value (bench/redact.sh compares it with intercept)
#
# Needs BB_BIN (the release binary). Execs the proxy, so the harness measures its process and nothing else.
set -euo pipefail
mode=${1:?usage: candidate.sh intercept|passthrough}
: "${BB_BIN:?BB_BIN must name the bot-bottle release binary}"
: "${BENCH_PROXY_PORT:?run me from the shared bench harness}"

state=$BENCH_WORKDIR/bb-$mode
rm -rf "$state"
mkdir -p "$state"

# The proxy takes a PKCS#8 PEM key (its error message says so): a SEC1 key is converted. Either way a 0600 copy,
# so the proxy does not warn that the shared bench's key is world-readable.
key=$state/ca-key.pem
(umask 077 && if grep -q 'BEGIN EC PRIVATE KEY' "$BENCH_CA_KEY"; then
	openssl pkcs8 -topk8 -nocrypt -in "$BENCH_CA_KEY" -out "$key"
else
	cp "$BENCH_CA_KEY" "$key"
fi)

http=$BENCH_ALLOW_HOST:$BENCH_UPSTREAM_HTTP_PORT
https=$BENCH_ALLOW_HOST:$BENCH_UPSTREAM_HTTPS_PORT
# `localhost` is pinned to 127.0.0.1 (nginx listens there only); loopback is private, so a CIDR admits it.
common=(--listen "127.0.0.1:$BENCH_PROXY_PORT" --state-dir "$state"
	--ca-cert "$BENCH_CA_CERT" --ca-key "$key" --upstream-ca "$BENCH_UPSTREAM_CA")
case $mode in
intercept)
	args=(--allow "$http" --allow "$https" --allow-cidr 127.0.0.1/32 --resolve "$BENCH_ALLOW_HOST=127.0.0.1")
	;;
passthrough)
	policy=$state/passthrough.toml
	cat >"$policy" <<TOML
[network]
allow = ["$http"]
allow_cidr = ["127.0.0.1/32"]

[network.resolve]
"$BENCH_ALLOW_HOST" = "127.0.0.1"

[[host]]
name = "$https"
tls = "passthrough"
TOML
	args=(--policy "$policy")
	;;
credential)
	policy=$state/credential.toml
	cat >"$policy" <<TOML
[network]
allow = ["$http", "$https"]
allow_cidr = ["127.0.0.1/32"]

[network.resolve]
"$BENCH_ALLOW_HOST" = "127.0.0.1"

[[credential]]
host = "$BENCH_ALLOW_HOST"
header = "x-bench-token"
from_env = "BENCH_TOKEN"
TOML
	args=(--policy "$policy")
	;;
*)
	echo "candidate.sh: unknown mode $mode" >&2
	exit 2
	;;
esac
# No stray ./bottle.toml: the proxy reads one from its working directory when no --policy is given.
cd "$state"
echo "exec $BB_BIN proxy ${common[*]} ${args[*]}" >&2
exec "$BB_BIN" proxy "${common[@]}" "${args[@]}"
