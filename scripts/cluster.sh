#!/usr/bin/env bash
# A local ringhub cluster in one command: a redis-server and N nodes on loopback ports,
# all stopped (by their pids) when this script ends (Ctrl-C).
#
#   scripts/cluster.sh [N] [-- extra ringhub serve flags...]
#
#   N            nodes (default 2), listening on 127.0.0.1:$BASE_PORT, $BASE_PORT+1, ...
#   BASE_PORT    first node's port (default 5001)
#   REDIS_PORT   redis-server's port (default 6390)
#   RINGHUB_BIN  the ringhub binary (default: target/release/ringhub, built as the
#                README's `cargo run --release -- serve` builds it: the same
#                features, so either reuses the other's build)
#
# Example: scripts/cluster.sh 3 -- --api-key secret
set -euo pipefail
cd "$(dirname "$0")/.."

nodes=2
if [[ $# -gt 0 && $1 != "--" ]]; then
  nodes=$1
  shift
fi
[[ ${1:-} == "--" ]] && shift
extra=("$@")
base_port=${BASE_PORT:-5001}
redis_port=${REDIS_PORT:-6390}

if ! command -v redis-server > /dev/null 2>&1; then
  echo "cluster.sh: redis-server is not installed (Debian: apt-get install redis-server)" >&2
  exit 1
fi
if [[ -z ${RINGHUB_BIN:-} ]]; then
  # From the workspace root without -p, as `cargo run --release` does: a build of the
  # engine alone would unify other features and rebuild (and overwrite) the binary.
  cargo build --release --locked --bin ringhub
  RINGHUB_BIN=target/release/ringhub
fi

pids=()
work=$(mktemp -d)
stop() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2> /dev/null || true; done
  wait 2> /dev/null || true
  rm -rf "$work"
  echo "cluster stopped"
}
trap stop EXIT INT TERM

redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$work" > "$work/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  redis-cli -p "$redis_port" ping > /dev/null 2>&1 && break
  sleep 0.05
done

for i in $(seq 0 $((nodes - 1))); do
  port=$((base_port + i))
  "$RINGHUB_BIN" serve --listen "127.0.0.1:$port" --redis "redis://127.0.0.1:$redis_port" \
    --node-name "node-$i" --data "$work/data-$i" "${extra[@]}" 2> "$work/node-$i.log" &
  pids+=($!)
done
for i in $(seq 0 $((nodes - 1))); do
  port=$((base_port + i))
  for _ in $(seq 200); do
    curl -fs "http://127.0.0.1:$port/healthz" > /dev/null 2>&1 && break
    sleep 0.05
  done
  echo "node-$i: http://127.0.0.1:$port  (hub URL http://127.0.0.1:$port/hubs/{hub}, log $work/node-$i.log)"
done
echo "redis:  redis://127.0.0.1:$redis_port"
echo "Ctrl-C stops the cluster."
wait
