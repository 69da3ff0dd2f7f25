#!/usr/bin/env bash
# The ALB's caching forward proxy against nginx's proxy_cache, side by side in one run, in front
# of the same upstream (nginx serving files at LIMIT_RATE per connection, like a distant update
# server). Two figures:
#   cold: CLIENTS clients ask at once for one SIZE_MB file nobody has cached yet: time until the
#         last one has it whole, and how many requests reached the upstream. nginx runs with
#         `proxy_cache_lock on` (one upstream fetch; the others wait for it to finish); the ALB
#         streams the one download to every client as it arrives.
#   warm: wrk with CLIENTS connections asking for a cached 1 MiB file: requests/s and p99.
# Devices send absolute-URI requests to the ALB (`GET http://upstream/file`, as through
# `curl -x`); nginx is asked for the same path as a reverse proxy.
#
#   bench/alb-cache.sh        # needs wrk, curl and nginx: sudo apt-get install -y wrk curl nginx-light
#   CLIENTS=100 SIZE_MB=128 bench/alb-cache.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-50}
SIZE_MB=${SIZE_MB:-64}
LIMIT_RATE=${LIMIT_RATE:-100m}
DURATION=${DURATION:-10}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/marchproxy-target}"

for tool in wrk curl nginx; do
  command -v "$tool" >/dev/null || { echo "$tool is missing; run: sudo apt-get install -y wrk curl nginx-light" >&2; exit 1; }
done
cargo build -q --release -p marchproxy-alb
bin="$CARGO_TARGET_DIR/release/marchproxy-alb"

work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

upstream=18380 nginx_cache=18381 alb=18382
mkdir -p "$work/files" "$work/nginx-cache" "$work/alb-cache"
head -c "$((SIZE_MB << 20))" /dev/urandom > "$work/files/nginx-cold.bin"
cp "$work/files/nginx-cold.bin" "$work/files/alb-cold.bin"
head -c $((1 << 20)) /dev/urandom > "$work/files/warm.bin"
# nginx workers run as an unprivileged user: they must read the files and write their cache.
chmod -R a+rwX "$work"
want=$(sha256sum < "$work/files/alb-cold.bin" | cut -d' ' -f1)

cat > "$work/upstream.conf" <<NGINX
worker_processes 1;
pid $work/upstream.pid;
error_log $work/upstream-error.log;
events { worker_connections 4096; }
http {
  log_format plain '\$request_uri';
  access_log $work/upstream-access.log plain;
  server {
    listen 127.0.0.1:$upstream backlog=4096;
    root $work/files;
    limit_rate $LIMIT_RATE;
  }
}
NGINX
cat > "$work/cache.conf" <<NGINX
worker_processes $(nproc);
pid $work/cache.pid;
error_log $work/cache-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  proxy_cache_path $work/nginx-cache keys_zone=files:10m max_size=4g inactive=1h use_temp_path=off;
  upstream backend { server 127.0.0.1:$upstream; keepalive 16; }
  server {
    listen 127.0.0.1:$nginx_cache backlog=4096;
    keepalive_requests 1000000;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache files;
      proxy_cache_valid 200 1h;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 600s;
      proxy_cache_lock_age 600s;
    }
  }
}
NGINX
nginx -c "$work/upstream.conf" -g 'daemon off;' & pids+=($!)
nginx -c "$work/cache.conf" -g 'daemon off;' & pids+=($!)
RUST_LOG=warn "$bin" --listen "127.0.0.1:$alb" --cache-dir "$work/alb-cache" \
  --grpc-listen 127.0.0.1:18383 --admin-listen 127.0.0.1:18384 & pids+=($!)
wait_port $upstream; wait_port $nginx_cache; wait_port $alb

# Prints "seconds upstream_requests" for CLIENTS concurrent curls of $2 (extra curl args in $1),
# after checking every client got the whole file.
cold() {
  local args=$1 url=$2 name=$3 start end
  start=$(date +%s.%N)
  for i in $(seq "$CLIENTS"); do
    # shellcheck disable=SC2086
    curl -s --max-time 600 $args -o "$work/$name-$i.out" "$url" &
  done
  # `cold` runs in a subshell (read < <(...)): its only children are these clients.
  wait
  end=$(date +%s.%N)
  for i in $(seq "$CLIENTS"); do
    [ "$(sha256sum < "$work/$name-$i.out" | cut -d' ' -f1)" = "$want" ] || { echo "client $i of $name got other bytes" >&2; exit 1; }
    rm "$work/$name-$i.out"
  done
  printf '%s %s\n' "$(awk -v s="$start" -v e="$end" 'BEGIN { printf "%.2f", e - s }')" \
    "$(grep -c "/$name.bin" "$work/upstream-access.log" || true)"
}

read -r n_secs n_up < <(cold "" "http://127.0.0.1:$nginx_cache/nginx-cold.bin" nginx-cold)
read -r a_secs a_up < <(cold "-x http://127.0.0.1:$alb" "http://127.0.0.1:$upstream/alb-cold.bin" alb-cold)

# Warm: the file cached first, then wrk; the ALB gets absolute-form request lines from a script.
curl -s -o /dev/null "http://127.0.0.1:$nginx_cache/warm.bin"
curl -s -o /dev/null -x "http://127.0.0.1:$alb" "http://127.0.0.1:$upstream/warm.bin"
printf 'wrk.path = "http://127.0.0.1:%s/warm.bin"\n' "$upstream" > "$work/absolute.lua"
measure() {
  wrk -t2 -c"$CLIENTS" -d"${DURATION}s" --latency "$@" > "$work/wrk.out"
  grep -q "Non-2xx\|Socket errors" "$work/wrk.out" && { cat "$work/wrk.out" >&2; echo "wrk saw errors" >&2; exit 1; }
  awk '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    $1 == "99%" { p99 = ms($2) } $1 == "Requests/sec:" { rps = $2 } $1 == "Transfer/sec:" { rate = $2 }
    END { printf "%.0f %.2f %s\n", rps, p99, rate }' "$work/wrk.out"
}
read -r nw_rps nw_p99 nw_rate < <(measure "http://127.0.0.1:$nginx_cache/warm.bin")
read -r aw_rps aw_p99 aw_rate < <(measure -s "$work/absolute.lua" "http://127.0.0.1:$alb/")
warm_upstream=$(grep -c "/warm.bin" "$work/upstream-access.log" || true)

printf '\ncold: %s clients of one %s MiB file, upstream at %s/s per connection\n' "$CLIENTS" "$SIZE_MB" "$LIMIT_RATE"
printf '%-22s %12s %18s\n' "" "all done, s" "upstream requests"
printf '%-22s %12s %18s\n' "nginx proxy_cache" "$n_secs" "$n_up"
printf '%-22s %12s %18s\n' "ALB cache" "$a_secs" "$a_up"
printf '\nwarm: %s connections, a cached 1 MiB file, %s s (upstream requests in all: %s)\n' "$CLIENTS" "$DURATION" "$warm_upstream"
printf '%-22s %10s %10s %12s\n' "" "req/s" "p99 ms" "transfer/s"
printf '%-22s %10s %10s %12s\n' "nginx proxy_cache" "$nw_rps" "$nw_p99" "$nw_rate"
printf '%-22s %10s %10s %12s\n' "ALB cache" "$aw_rps" "$aw_p99" "$aw_rate"
awk -v a="$a_secs" -v b="$n_secs" -v c="$aw_rps" -v d="$nw_rps" -v e="$aw_p99" -v f="$nw_p99" \
  'BEGIN { printf "ALB/nginx: cold time %.2f of nginx'"'"'s; warm requests/s %.2f, p99 %.2f of nginx'"'"'s\n", a / b, c / d, e / f }'
