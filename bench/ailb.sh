#!/usr/bin/env bash
# What the AILB adds to an LLM call: the same chat completion request against a fast mock
# provider (nginx answering a fixed OpenAI-shaped JSON) directly and through the AILB, in one run.
# One connection (added latency, p50/p99) and CONNECTIONS connections (requests/s at the load the
# machine allows). wrk, the AILB and nginx share the machine's cores.
#
#   bench/ailb.sh            # needs wrk and nginx: sudo apt-get install -y wrk nginx-light
#   DURATION=20 CONNECTIONS=64 bench/ailb.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-32}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/marchproxy-target}"

for tool in wrk nginx; do
  command -v "$tool" >/dev/null || { echo "$tool is missing; run: sudo apt-get install -y wrk nginx-light" >&2; exit 1; }
done
cargo build -q --release -p marchproxy-ailb
bin="$CARGO_TARGET_DIR/release/marchproxy-ailb"

work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

answer='{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"mock","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there, how can I help?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":8,"total_tokens":20}}'
cat > "$work/nginx.conf" <<NGINX
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  server {
    listen 127.0.0.1:18180 backlog=4096;
    keepalive_requests 1000000;
    location /v1/chat/completions { default_type application/json; return 200 '$answer'; }
  }
}
NGINX
nginx -c "$work/nginx.conf" -g 'daemon off;' & pids+=($!)

cat > "$work/ailb.toml" <<TOML
[module.providers.mock]
kind = "openai"
base_url = "http://127.0.0.1:18180/v1"
[module.models.bench]
deployments = [{ provider = "mock", model = "mock" }]
TOML
RUST_LOG=warn "$bin" --config "$work/ailb.toml" --listen 127.0.0.1:18181 \
  --grpc-listen 127.0.0.1:18182 --admin-listen 127.0.0.1:18183 & pids+=($!)
wait_port 18180; wait_port 18181

cat > "$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"bench","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Say hello."}],"max_tokens":32}'
LUA

# Prints "requests/s p50_ms p99_ms" for wrk against port $1 with $2 connections.
measure() {
  local threads=$(( $2 < 2 ? 1 : 2 ))
  wrk -t"$threads" -c"$2" -d"${DURATION}s" --latency -s "$work/post.lua" "http://127.0.0.1:$1/v1/chat/completions" > "$work/wrk.out"
  grep -q "Non-2xx" "$work/wrk.out" && { cat "$work/wrk.out" >&2; echo "wrk saw errors" >&2; exit 1; }
  awk '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    $1 == "50%" { p50 = ms($2) } $1 == "99%" { p99 = ms($2) } $1 == "Requests/sec:" { rps = $2 }
    END { printf "%.0f %.3f %.3f\n", rps, p50, p99 }' "$work/wrk.out"
}

read -r d1_rps d1_p50 d1_p99 < <(measure 18180 1)
read -r a1_rps a1_p50 a1_p99 < <(measure 18181 1)
read -r dn_rps dn_p50 dn_p99 < <(measure 18180 "$CONNECTIONS")
read -r an_rps an_p50 an_p99 < <(measure 18181 "$CONNECTIONS")

printf '\nchat completion, %s s per run\n' "$DURATION"
printf '%-34s %10s %10s %10s\n' "" "req/s" "p50 ms" "p99 ms"
printf '%-34s %10s %10s %10s\n' "mock directly, 1 connection" "$d1_rps" "$d1_p50" "$d1_p99"
printf '%-34s %10s %10s %10s\n' "through the AILB, 1 connection" "$a1_rps" "$a1_p50" "$a1_p99"
printf '%-34s %10s %10s %10s\n' "mock directly, $CONNECTIONS connections" "$dn_rps" "$dn_p50" "$dn_p99"
printf '%-34s %10s %10s %10s\n' "through the AILB, $CONNECTIONS connections" "$an_rps" "$an_p50" "$an_p99"
awk -v a="$a1_p50" -v b="$d1_p50" -v c="$a1_p99" -v d="$d1_p99" -v e="$an_rps" -v f="$dn_rps" \
  'BEGIN { printf "added by the AILB at 1 connection: p50 %.3f ms, p99 %.3f ms; throughput ratio at %s connections: %.2f\n", a - b, c - d, "'"$CONNECTIONS"'", e / f }'
