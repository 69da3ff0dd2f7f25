#!/usr/bin/env bash
# The ALB against nginx as a reverse proxy, side by side in one run: both in front of the same
# upstream (nginx answering a small fixed body), both keeping keep-alive connections to it
# (nginx: `upstream { keepalive 64; }`, `proxy_http_version 1.1`), both setting Host and
# X-Forwarded-For. wrk with keep-alive: one connection (added latency) and CONNECTIONS
# connections (requests/s and p99). wrk, both proxies and the upstream share the machine's cores;
# nginx as the proxy gets as many workers as the ALB has threads (one per core).
#
#   bench/alb.sh            # needs wrk and nginx: sudo apt-get install -y wrk nginx-light
#   DURATION=20 CONNECTIONS=128 bench/alb.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-64}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/marchproxy-target}"

for tool in wrk nginx; do
  command -v "$tool" >/dev/null || { echo "$tool is missing; run: sudo apt-get install -y wrk nginx-light" >&2; exit 1; }
done
cargo build -q --release -p marchproxy-alb
bin="$CARGO_TARGET_DIR/release/marchproxy-alb"

work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

upstream=18280 nginx_proxy=18281 alb=18282
cat > "$work/upstream.conf" <<NGINX
worker_processes 1;
pid $work/upstream.pid;
error_log $work/upstream-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  server {
    listen 127.0.0.1:$upstream backlog=4096;
    keepalive_requests 1000000;
    location / { default_type text/plain; return 200 'hello from the upstream, a short answer of some 64 bytes....\n'; }
  }
}
NGINX
cat > "$work/proxy.conf" <<NGINX
worker_processes $(nproc);
pid $work/proxy.pid;
error_log $work/proxy-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  upstream backend { server 127.0.0.1:$upstream; keepalive 64; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$nginx_proxy backlog=4096;
    keepalive_requests 1000000;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
}
NGINX
cat > "$work/alb.toml" <<TOML
[[routes]]
route_id = "bench"
protocol = "http"
destination_pattern = "127.0.0.1:$upstream"
TOML
nginx -c "$work/upstream.conf" -g 'daemon off;' & pids+=($!)
nginx -c "$work/proxy.conf" -g 'daemon off;' & pids+=($!)
RUST_LOG=warn "$bin" --config "$work/alb.toml" --listen "127.0.0.1:$alb" \
  --grpc-listen 127.0.0.1:18283 --admin-listen 127.0.0.1:18284 & pids+=($!)
wait_port $upstream; wait_port $nginx_proxy; wait_port $alb

# Prints "requests/s p50_ms p99_ms" for wrk against port $1 with $2 connections.
measure() {
  local threads=$(( $2 < 2 ? 1 : 2 ))
  wrk -t"$threads" -c"$2" -d"${DURATION}s" --latency "http://127.0.0.1:$1/item" > "$work/wrk.out"
  grep -q "Non-2xx\|Socket errors" "$work/wrk.out" && { cat "$work/wrk.out" >&2; echo "wrk saw errors" >&2; exit 1; }
  awk '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    $1 == "50%" { p50 = ms($2) } $1 == "99%" { p99 = ms($2) } $1 == "Requests/sec:" { rps = $2 }
    END { printf "%.0f %.3f %.3f\n", rps, p50, p99 }' "$work/wrk.out"
}

read -r n1_rps n1_p50 n1_p99 < <(measure $nginx_proxy 1)
read -r a1_rps a1_p50 a1_p99 < <(measure $alb 1)
read -r nn_rps nn_p50 nn_p99 < <(measure $nginx_proxy "$CONNECTIONS")
read -r an_rps an_p50 an_p99 < <(measure $alb "$CONNECTIONS")

printf '\nreverse proxy, keep-alive, %s s per run\n' "$DURATION"
printf '%-30s %10s %10s %10s\n' "" "req/s" "p50 ms" "p99 ms"
printf '%-30s %10s %10s %10s\n' "nginx, 1 connection" "$n1_rps" "$n1_p50" "$n1_p99"
printf '%-30s %10s %10s %10s\n' "ALB, 1 connection" "$a1_rps" "$a1_p50" "$a1_p99"
printf '%-30s %10s %10s %10s\n' "nginx, $CONNECTIONS connections" "$nn_rps" "$nn_p50" "$nn_p99"
printf '%-30s %10s %10s %10s\n' "ALB, $CONNECTIONS connections" "$an_rps" "$an_p50" "$an_p99"
awk -v a="$a1_rps" -v b="$n1_rps" -v c="$an_rps" -v d="$nn_rps" -v e="$an_p99" -v f="$nn_p99" \
  'BEGIN { printf "ALB/nginx: requests/s %.2f at 1 connection, %.2f at '"$CONNECTIONS"'; p99 %.2f of nginx'"'"'s\n", a / b, c / d, e / f }'
