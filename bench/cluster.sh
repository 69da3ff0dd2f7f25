#!/usr/bin/env bash
# The NLB's control plane with its state in one process (--state-dir) and on etcd with two
# replicas (--store), in one run: 1,000 simulated modules register and heartbeat as fast as 64
# calls in flight allow, then 200 blue/green weights are written on one replica and timed until
# the other answers with them (nlb/examples/cluster_load.rs). Prints a table.
#
#   bench/cluster.sh        # needs etcd and protoc: apt-get install etcd-server etcd-client protobuf-compiler
#   MODULES=2000 HEARTBEAT_SECONDS=20 bench/cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MODULES=${MODULES:-1000}
HEARTBEAT_SECONDS=${HEARTBEAT_SECONDS:-10}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/marchproxy-target}"

if ! { command -v etcd && command -v protoc; } >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server etcd-client protobuf-compiler >/dev/null
  else
    echo "missing etcd or protoc; run: sudo apt-get install -y etcd-server etcd-client protobuf-compiler" >&2
    exit 1
  fi
fi
cargo build -q --release -p marchproxy-nlb --features etcd --bin marchproxy-nlb --example cluster_load
bin="$CARGO_TARGET_DIR/release"

work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { for _ in $(seq 300); do port_open "$1" && return 0; sleep 0.1; done; echo "nothing listens on $1" >&2; exit 1; }

# Nothing expires while the load runs: the modules heartbeat in rounds, as fast as they can.
timeouts=(--unhealthy-after 300s --expire-after 600s)
load() { "$bin/examples/cluster_load" --modules "$MODULES" --heartbeat-seconds "$HEARTBEAT_SECONDS" --nlb "$1"; }

"$bin/marchproxy-nlb" --state-dir "$work/state" --grpc-listen 127.0.0.1:18190 --admin-listen 127.0.0.1:18191 "${timeouts[@]}" 2>"$work/embedded.log" &
pids+=($!)
wait_port 18190
embedded=$(load http://127.0.0.1:18190)
kill "${pids[-1]}"

members=""
for i in 0 1 2; do members="${members:+$members,}m$i=http://127.0.0.1:$((23800 + i))"; done
for i in 0 1 2; do
  etcd --name "m$i" --data-dir "$work/etcd-$i" \
    --listen-client-urls "http://127.0.0.1:$((23790 + i))" --advertise-client-urls "http://127.0.0.1:$((23790 + i))" \
    --listen-peer-urls "http://127.0.0.1:$((23800 + i))" --initial-advertise-peer-urls "http://127.0.0.1:$((23800 + i))" \
    --initial-cluster "$members" --initial-cluster-state new 2>"$work/etcd-$i.log" &
  pids+=($!)
done
for i in 0 1 2; do wait_port $((23790 + i)); done
ETCDCTL_API=3 etcdctl --endpoints 127.0.0.1:23790 endpoint health >/dev/null
store="etcd://127.0.0.1:23790,127.0.0.1:23791,127.0.0.1:23792"
for replica in 0 1; do
  "$bin/marchproxy-nlb" --store "$store" --replica-id "bench-$replica" --grpc-listen "127.0.0.1:$((18192 + 2 * replica))" \
    --admin-listen "127.0.0.1:$((18193 + 2 * replica))" "${timeouts[@]}" 2>"$work/replica-$replica.log" &
  pids+=($!)
  wait_port $((18192 + 2 * replica))
done
cluster=$(load http://127.0.0.1:18192,http://127.0.0.1:18194)
lag=$(curl -fsS --max-time 5 http://127.0.0.1:18195/metrics | awk '/^nlb_store_watch_lag_seconds_(sum|count)/ { v[$1] = $2 } END { if (v["nlb_store_watch_lag_seconds_count"] > 0) printf "%.2f", 1000 * v["nlb_store_watch_lag_seconds_sum"] / v["nlb_store_watch_lag_seconds_count"]; else print "n/a" }')

python3 - "$embedded" "$cluster" "$lag" <<'PY'
import json, sys
embedded, cluster, lag = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
rows = [
    ("registrations/s", "registrations_per_second"),
    ("heartbeats/s", "heartbeats_per_second"),
    ("weight write, p50 / p99 ms", ("write_ms_p50", "write_ms_p99")),
    ("write on one replica to in effect on the other, p50 / p99 ms", ("propagation_ms_p50", "propagation_ms_p99")),
]
print(f"{embedded['modules']} simulated modules, 64 calls in flight")
print(f"| | embedded store, one NLB | etcd, two replicas |")
print("|---|---|---|")
for label, key in rows:
    cell = lambda r: f"{r[key[0]]} / {r[key[1]]}" if isinstance(key, tuple) else f"{r[key]:.0f}"
    print(f"| {label} | {cell(embedded)} | {cell(cluster)} |")
print(f"mean watch lag on the reading replica (any write to applied): {lag} ms")
PY
