#!/usr/bin/env bash
# Sandbox launch, side by side with bare bwrap, unshare and Anthropic's sandbox-runtime in one hyperfine run of
# the shared harness: `bot-bottle run --rm -- true` does lease, CA, proxy, namespaces, self-test and teardown.
# Then the 100-bottle parallel check. Usage: bench/launch.sh   (results in ../shared/bench/results or RESULTS_DIR)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
shared=${SHARED_BENCH:-$repo/../shared/bench}
nice -n 10 cargo build --release -p bot-bottle --manifest-path "$repo/Cargo.toml"
bin=/tmp/bb-bench/bot-bottle-bin
mkdir -p "$bin" && cp "$repo/target/release/bot-bottle" "$bin/bot-bottle"
# A scratch workspace: the launcher refuses a workspace that holds the user's home or its own state.
scratch=$(mktemp -d) && trap 'rm -rf "$scratch"' EXIT
cd "$scratch"
export RESULTS_DIR=${RESULTS_DIR:-$here/results}
SANDBOX_CMD="$bin/bot-bottle run --rm -- true" SANDBOX_NAME=bot-bottle "$shared/bench-sandbox.sh"
BB="$bin/bot-bottle" "$here/parallel-launch.sh" 100
