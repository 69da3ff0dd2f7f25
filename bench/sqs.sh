#!/usr/bin/env bash
# The SQS proxy's POST /send under wrk: requests/s and p99 with the durable local queue (every
# acknowledged message fsync'd), and with moto's SQS-compatible server behind it; then moto
# taking SendMessage directly, so the proxy-over-moto figure has its ratio (batching lets the
# proxy put more messages on the queue per second than single sends would).
#
#   bench/sqs.sh            # needs wrk (apt-get install wrk) and moto (pip install 'moto[server]')
#   DURATION=20 CONNECTIONS=100 bench/sqs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-64}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/marchproxy-target}"

command -v wrk >/dev/null || { echo "wrk is missing; run: sudo apt-get install -y wrk" >&2; exit 1; }
python3 -c 'import moto.server' 2>/dev/null || { echo "moto is missing; run: python3 -m pip install 'moto[server]'" >&2; exit 1; }
cargo build -q --release -p marchproxy-sqs-proxy
bin="$CARGO_TARGET_DIR/release/marchproxy-sqs-proxy"

work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
auth='AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/sqs/aws4_request, SignedHeaders=host, Signature=0'

cat > "$work/send.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"job_id":"job-1","execution_id":"exec-1","hostname":"node-1","icon_name":"sun","timestamp":1700000001,"color":"orange","sequence":1,"region":"eu"}'
LUA

# Runs wrk; prints "requests/s p99_ms non2xx".
measure() {
  local out
  out=$(wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$1" "$2")
  local rps p99 errors
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us$/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v=v*1000}; print v}' <<<"$out")
  errors=$(awk '/Non-2xx/ {print $4}' <<<"$out")
  echo "$rps ${p99:-?} ${errors:-0}"
}

# 1. Local queue.
"$bin" --listen 127.0.0.1:18300 --grpc-listen 127.0.0.1:18301 --admin-listen 127.0.0.1:18302 \
  --queue local --queue-dir "$work/queue" 2>"$work/local.log" & pids+=($!)
wait_port 18300
read -r local_rps local_p99 local_err < <(measure "$work/send.lua" http://127.0.0.1:18300/send)

# 2. moto, through the proxy and directly.
python3 -m moto.server -H 127.0.0.1 -p 18310 >/dev/null 2>&1 & pids+=($!)
wait_port 18310
curl -fsS -o /dev/null -X POST http://127.0.0.1:18310/ -H "Authorization: $auth" \
  -d 'Action=CreateQueue&QueueName=bench&Version=2012-11-05'
queue=http://127.0.0.1:18310/123456789012/bench
SQS_QUEUE_URL=$queue AWS_ENDPOINT_URL=http://127.0.0.1:18310 AWS_REGION=us-east-1 \
  AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test \
  "$bin" --listen 127.0.0.1:18303 --grpc-listen 127.0.0.1:18304 --admin-listen 127.0.0.1:18305 \
  2>"$work/sqs.log" & pids+=($!)
wait_port 18303
read -r sqs_rps sqs_p99 sqs_err < <(measure "$work/send.lua" http://127.0.0.1:18303/send)

cat > "$work/direct.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Authorization"] = "$auth"
wrk.body = "Action=SendMessage&Version=2012-11-05&QueueUrl=$queue&MessageBody=%7B%22sequence%22%3A1%7D"
LUA
read -r direct_rps direct_p99 direct_err < <(measure "$work/direct.lua" http://127.0.0.1:18310/)

batch=$(curl -fsS http://127.0.0.1:18305/metrics | awk '/^sqs_proxy_queued_total/ {print $2}')
printf '\n%-40s %12s %10s %8s\n' "POST /send, $CONNECTIONS connections, ${DURATION}s" "requests/s" "p99 ms" "non-2xx"
printf '%-40s %12s %10s %8s\n' "proxy, local queue (fsync'd)" "$local_rps" "$local_p99" "$local_err"
printf '%-40s %12s %10s %8s\n' "proxy, moto SQS behind it" "$sqs_rps" "$sqs_p99" "$sqs_err"
printf '%-40s %12s %10s %8s\n' "moto SendMessage directly" "$direct_rps" "$direct_p99" "$direct_err"
awk -v a="$sqs_rps" -v b="$direct_rps" 'BEGIN { printf "proxy-over-moto / moto direct: %.2f (messages queued through the proxy: %s)\n", a / b, "'"$batch"'" }'
