#!/usr/bin/env bash
# Runs every test of ringhub: formatting and lints, the Rust tests (unit, property,
# interop, end-to-end; criterion benches run once each in test mode), the JS interop
# checks with the stock @microsoft/signalr client, and a short run of every fuzz target.
#
#   FUZZ_SECONDS=N   seconds per fuzz target (default 15; 0 skips fuzzing)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export RINGHUB_INTEROP_DIR="$root/target/interop"
mkdir -p "$RINGHUB_INTEROP_DIR"

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "the engine as a library without the binary's dependencies (no default features)"
cargo clippy -p ringhub-engine --no-default-features --lib --locked -- -D warnings

step "cargo doc (warnings are errors: broken links, stale references)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked -p ringhub-engine -p ringhub-protocol

step "JS dependencies (pinned by tests/js/package-lock.json)"
if [ ! -d tests/js/node_modules ] || [ tests/js/package-lock.json -nt tests/js/node_modules ]; then
  (cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
fi

step "Python dependencies (pinned by tests/python/requirements.txt)"
if [ ! -x target/pyvenv/bin/python ] || [ tests/python/requirements.txt -nt target/pyvenv ]; then
  python3 -m venv target/pyvenv
  target/pyvenv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
  touch target/pyvenv
fi

step "interop vectors written by the JS client"
node tests/js/gen-vectors.mjs

step "cargo test (workspace, all targets)"
cargo test --workspace --all-targets --locked

step "JS client decodes what ringhub encodes"
node tests/js/check-rust-vectors.mjs

cargo build -p ringhub-engine --bin ringhub --example ward_monitor --example typed_hub --example axum_embed --locked
for transport in WebSockets ServerSentEvents LongPolling; do
  step "end to end with the stock @microsoft/signalr client over $transport"
  RINGHUB_TRANSPORT=$transport RINGHUB_BIN="$root/target/debug/ringhub" \
    RINGHUB_WARD_MONITOR_BIN="$root/target/debug/examples/ward_monitor" \
    RINGHUB_TYPED_HUB_BIN="$root/target/debug/examples/typed_hub" \
    RINGHUB_AXUM_EMBED_BIN="$root/target/debug/examples/axum_embed" \
    node --test --test-concurrency=1 tests/js/e2e/
done

step "the fault suite: a crashed node replaced, a rolling restart behind a balancer, Redis absent, killed, paused and black-holed, a host stall, concurrent durable changes"
# Stock clients and real processes (nodes, redis-server, a TCP proxy), default flags.
RINGHUB_BIN="$root/target/debug/ringhub" node --test --test-force-exit --test-concurrency=1 tests/js/faults/

step "scripts/cluster.sh starts a cluster whose nodes share Redis, and stops it"
cluster_log="$root/target/cluster-smoke.log"
RINGHUB_BIN="$root/target/debug/ringhub" BASE_PORT=15201 REDIS_PORT=16401 \
  scripts/cluster.sh 2 -- --api-key smoke > "$cluster_log" 2>&1 &
cluster_pid=$!
# Whole answers are read, then matched: in `curl | grep -q` grep quits at its match
# and curl, cut off mid-write, fails the pipeline (pipefail).
backplane_connected() { [[ "$(curl -fs "http://127.0.0.1:$1/metrics" 2> /dev/null)" == *$'\n'"ringhub_backplane_connected 1"* ]]; }
for port in 15201 15202; do
  for _ in $(seq 200); do
    backplane_connected "$port" && break
    sleep 0.05
  done
  backplane_connected "$port"
done
# Durable membership stored through one node is read through the other.
curl -fs -X PUT -H "authorization: Bearer smoke" http://127.0.0.1:15201/api/hubs/chat/groups/g/users/u
groups=$(curl -fs -H "authorization: Bearer smoke" http://127.0.0.1:15202/api/hubs/chat/users/u)
[[ "$groups" == *'"groups":["g"]'* ]]
kill "$cluster_pid"
wait "$cluster_pid" || true
leftovers="^redis-server 127.0.0.1:16401|ringhub serve --listen 127.0.0.1:1520[12]"
if pgrep -f "$leftovers" > /dev/null; then
  echo "cluster.sh left processes behind:"; pgrep -af "$leftovers"
  exit 1
fi

step "end to end with the stock Python client (signalrcore)"
RINGHUB_BIN="$root/target/debug/ringhub" RINGHUB_TYPED_HUB_BIN="$root/target/debug/examples/typed_hub" \
  target/pyvenv/bin/python -m unittest -v tests/python/test_signalrcore.py

step "benchmark smoke: every workload against every server, briefly (so it cannot rot)"
cargo build -p ringhub-engine -p ringhub-bench --bins --locked
"$root/target/debug/ringhub-bench" run --workloads all --servers all --scale 0.02 \
  --warmup-secs 1 --duration-secs 1 --out "$root/target/bench-smoke"
grep -q "^| ringhub | " "$root/target/bench-smoke/README.md"
for plot in deliveries latency memory; do test -s "$root/target/bench-smoke/$plot.svg"; done
if pgrep -f "ceiling-peer|naive-peer|socketio-peer|ringhub-bench idle" > /dev/null; then
  echo "the benchmark left processes behind:"; pgrep -af "ceiling-peer|naive-peer|socketio-peer|ringhub-bench idle"
  exit 1
fi

fuzz_seconds=${FUZZ_SECONDS:-15}
if [ "$fuzz_seconds" -gt 0 ]; then
  step "fuzz smoke: ${fuzz_seconds}s per target"
  (
    cd fuzz
    cargo +nightly fuzz build
    for target in $(cargo +nightly fuzz list); do
      log="$root/target/fuzz-$target.log"
      rc=0
      cargo +nightly fuzz run "$target" -- -max_total_time="$fuzz_seconds" -print_final_stats=1 > "$log" 2>&1 || rc=$?
      runs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}')
      echo "-- $target: ${runs:-?} executions in ${fuzz_seconds}s, exit $rc"
      if [ "$rc" -ne 0 ]; then
        tail -n 40 "$log"
        exit 1
      fi
    done
  )
fi

step "all tests passed"
