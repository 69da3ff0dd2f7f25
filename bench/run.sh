#!/usr/bin/env bash
# Side by side on one machine: MarchProxy's NLB and HAProxy (TCP mode) in front of the same
# backends. Short connections (wrk, one request per connection, against nginx) and bulk
# throughput (iperf3 through each proxy). Prints each figure and the NLB/HAProxy ratio.
#
#   bench/run.sh            # needs root for apt-get the first time, or: apt-get install haproxy wrk nginx-light iperf3
#   DURATION=20 CONNECTIONS=100 bench/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-50}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/marchproxy-target}"

missing=()
for tool in haproxy wrk nginx iperf3; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q haproxy wrk nginx-light iperf3 >/dev/null
  else
    echo "missing ${missing[*]}; run: sudo apt-get install -y haproxy wrk nginx-light iperf3" >&2
    exit 1
  fi
fi
cargo build -q --release -p marchproxy-nlb -p marchproxy-manager-client
bin="$CARGO_TARGET_DIR/release"

work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# Ports: backends 18080 (nginx) and 15201 (iperf3); HAProxy 18081/15202; NLB 18082/15203, gRPC 18090.
mkdir -p "$work/www"
printf 'ok\n' > "$work/www/index.html"
cat > "$work/nginx.conf" <<NGINX
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  server { listen 127.0.0.1:18080 reuseport backlog=4096; root $work/www; keepalive_requests 100000; }
}
NGINX
nginx -c "$work/nginx.conf" -g 'daemon off;' & pids+=($!)
iperf3 -s -p 15201 >/dev/null 2>&1 & pids+=($!)

cat > "$work/haproxy.cfg" <<HAPROXY
global
  nbthread 2
  maxconn 4000
defaults
  mode tcp
  timeout connect 2s
  timeout client 60s
  timeout server 60s
frontend web
  bind 127.0.0.1:18081
  default_backend nginx
backend nginx
  server n1 127.0.0.1:18080
frontend bulk
  bind 127.0.0.1:15202
  default_backend iperf
backend iperf
  server i1 127.0.0.1:15201
HAPROXY
haproxy -f "$work/haproxy.cfg" -db >/dev/null 2>&1 & pids+=($!)

RUST_LOG=warn "$bin/marchproxy-nlb" --grpc-listen 127.0.0.1:18090 --admin-listen 127.0.0.1:18091 \
  --listen tcp=127.0.0.1:18082 --listen postgres=127.0.0.1:15203 --unhealthy-after 1h --expire-after 2h \
  >"$work/nlb.log" 2>&1 & pids+=($!)

for port in 18080 15201 18081 15202 18090 18082; do
  up=no
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && { up=yes; break; }; sleep 0.1; done
  [ $up = yes ] || { echo "nothing listens on port $port; logs in $work" >&2; exit 1; }
done
ctl() { "$bin/marchctl" --nlb http://127.0.0.1:18090 "$@" >/dev/null; }
# Two instances standing for the modules in front of each backend; a named listener per protocol.
ctl modules register --id web --type alb --address 127.0.0.1:50051 --data-address 127.0.0.1:18080
ctl modules register --id bulk --type dblb --address 127.0.0.1:50052 --data-address 127.0.0.1:15201
ctl routes add --id web --protocol tcp --destination web
ctl routes add --id bulk --protocol postgres --destination bulk

# wrk: one request per connection; prints "<requests/s> <p99 ms>".
short() {
  wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency -H 'Connection: close' "http://127.0.0.1:$1/" | awk '
    /Requests\/sec/ { rps = $2 }
    /^ +99%/ { v = $2; if (v ~ /us$/) { sub(/us/, "", v); v /= 1000 } else if (v ~ /ms$/) { sub(/ms/, "", v) } else if (v ~ /s$/) { sub(/s/, "", v); v *= 1000 } p99 = v }
    END { printf "%.0f %.2f\n", rps, p99 }'
}
# iperf3 through a proxy port: Gbit/s received.
bulk() {
  iperf3 -c 127.0.0.1 -p "$1" -t "$DURATION" -J | python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 1e9))'
}

read -r direct_rps direct_p99 < <(short 18080)
read -r haproxy_rps haproxy_p99 < <(short 18081)
read -r nlb_rps nlb_p99 < <(short 18082)
haproxy_bulk=$(bulk 15202)
nlb_bulk=$(bulk 15203)

ratio() { python3 -c "print('%.2f' % ($1 / $2))"; }
echo
echo "MarchProxy NLB vs HAProxy $(haproxy -v | head -1 | awk '{print $3}') (TCP mode), $(nproc) cores, ${DURATION}s runs, $CONNECTIONS connections"
printf '%-34s %12s %12s %12s %8s\n' "" "direct" "HAProxy" "NLB" "NLB/HAProxy"
printf '%-34s %12s %12s %12s %8s\n' "short connections, requests/s" "$direct_rps" "$haproxy_rps" "$nlb_rps" "$(ratio "$nlb_rps" "$haproxy_rps")"
printf '%-34s %12s %12s %12s %8s\n' "short connections, p99 ms (lower)" "$direct_p99" "$haproxy_p99" "$nlb_p99" "$(ratio "$nlb_p99" "$haproxy_p99")"
printf '%-34s %12s %12s %12s %8s\n' "bulk TCP, Gbit/s" "-" "$haproxy_bulk" "$nlb_bulk" "$(ratio "$nlb_bulk" "$haproxy_bulk")"
