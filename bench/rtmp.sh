#!/usr/bin/env bash
# One publisher and PLAYERS players on the RTMP module and on nginx with the RTMP module
# (nginx-rtmp), one after the other on this machine: the server's CPU and memory with every
# player attached, and per player (the increase over the publisher alone, divided by PLAYERS).
# The stream is a pre-encoded 640x360 H.264/AAC file published in a loop with -c copy, and the
# players copy it to nowhere (no decoding), so the figures are the servers' own.
#
#   bench/rtmp.sh            # needs ffmpeg and nginx's RTMP module: sudo apt-get install -y ffmpeg nginx-light libnginx-mod-rtmp
#   PLAYERS=100 DURATION=30 bench/rtmp.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PLAYERS=${PLAYERS:-50}
DURATION=${DURATION:-20}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/marchproxy-target}"

for tool in ffmpeg nginx; do
  command -v "$tool" >/dev/null || { echo "$tool is missing; run: sudo apt-get install -y ffmpeg nginx-light libnginx-mod-rtmp" >&2; exit 1; }
done
rtmp_module=/usr/lib/nginx/modules/ngx_rtmp_module.so
[ -f "$rtmp_module" ] || { echo "nginx's RTMP module is missing; run: sudo apt-get install -y libnginx-mod-rtmp" >&2; exit 1; }
cargo build -q --release -p marchproxy-rtmp
bin="$CARGO_TARGET_DIR/release/marchproxy-rtmp"

work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

ffmpeg -hide_banner -loglevel error -f lavfi -i testsrc=size=640x360:rate=25 -f lavfi -i sine=frequency=440:sample_rate=44100 \
  -c:v libx264 -preset veryfast -b:v 1000k -g 50 -pix_fmt yuv420p -c:a aac -t 60 -f flv "$work/stream.flv"

# CPU seconds (user + system) of the processes in "$@".
cpu() { local total=0; for pid in "$@"; do read -r -a f < "/proc/$pid/stat"; total=$((total + f[13] + f[14])); done; awk -v t="$total" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.3f", t / hz }'; }
# Resident memory in MiB of the processes in "$@".
rss() { local total=0; for pid in "$@"; do total=$((total + $(awk '/VmRSS/ { print $2 }' "/proc/$pid/status"))); done; awk -v t="$total" 'BEGIN { printf "%.1f", t / 1024 }'; }

# Measures the server whose processes are "$@" at rtmp://127.0.0.1:$port/live/bench.
# Prints: cpu% alone, rss alone, cpu% with players, rss with players.
measure() {
  local port=$1; shift
  local url="rtmp://127.0.0.1:$port/live/bench" players=()
  ffmpeg -hide_banner -loglevel error -re -stream_loop -1 -i "$work/stream.flv" -c copy -f flv "$url" & local publisher=$!
  sleep 3
  local c0 c1; c0=$(cpu "$@"); sleep 5; c1=$(cpu "$@")
  local alone_cpu alone_rss; alone_cpu=$(awk -v a="$c0" -v b="$c1" 'BEGIN { printf "%.1f", (b - a) / 5 * 100 }'); alone_rss=$(rss "$@")
  for _ in $(seq "$PLAYERS"); do
    ffmpeg -hide_banner -loglevel error -i "$url" -c copy -f null - & players+=($!)
  done
  sleep 5
  c0=$(cpu "$@"); sleep "$DURATION"; c1=$(cpu "$@")
  local with_cpu with_rss; with_cpu=$(awk -v a="$c0" -v b="$c1" -v s="$DURATION" 'BEGIN { printf "%.1f", (b - a) / s * 100 }'); with_rss=$(rss "$@")
  local alive=0; for p in "${players[@]}"; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
  kill "${players[@]}" "$publisher" 2>/dev/null || true; wait "${players[@]}" "$publisher" 2>/dev/null || true
  [ "$alive" = "$PLAYERS" ] || { echo "only $alive of $PLAYERS players were still playing" >&2; exit 1; }
  echo "$alone_cpu $alone_rss $with_cpu $with_rss"
}

RUST_LOG=warn "$bin" --listen 127.0.0.1:19360 --grpc-listen 127.0.0.1:19361 --admin-listen 127.0.0.1:19362 & ours=$!; pids+=($ours)
wait_port 19360
read -r o_cpu0 o_rss0 o_cpu o_rss < <(measure 19360 "$ours")
kill "$ours"

cat > "$work/nginx.conf" <<NGINX
load_module $rtmp_module;
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 4096; }
rtmp { server { listen 127.0.0.1:19370; application live { live on; } } }
NGINX
nginx -c "$work/nginx.conf" -g 'daemon off;' & nginx_master=$!; pids+=($nginx_master)
wait_port 19370
nginx_pids=("$nginx_master" $(pgrep -P "$nginx_master"))
read -r n_cpu0 n_rss0 n_cpu n_rss < <(measure 19370 "${nginx_pids[@]}")

printf '\none publisher (~1.1 Mbit/s), %s players, CPU over %s s\n' "$PLAYERS" "$DURATION"
printf '%-22s %14s %14s %16s %16s %16s\n' "" "CPU alone %" "RSS alone MiB" "CPU players %" "RSS players MiB" "per player"
per() { awk -v c0="$1" -v c="$2" -v r0="$3" -v r="$4" -v n="$PLAYERS" 'BEGIN { printf "%.2f%% %.0f KiB", (c - c0) / n, (r - r0) * 1024 / n }'; }
printf '%-22s %14s %14s %16s %16s %16s\n' "marchproxy-rtmp" "$o_cpu0" "$o_rss0" "$o_cpu" "$o_rss" "$(per "$o_cpu0" "$o_cpu" "$o_rss0" "$o_rss")"
printf '%-22s %14s %14s %16s %16s %16s\n' "nginx-rtmp" "$n_cpu0" "$n_rss0" "$n_cpu" "$n_rss" "$(per "$n_cpu0" "$n_cpu" "$n_rss0" "$n_rss")"
awk -v o="$o_cpu" -v n="$n_cpu" -v or="$o_rss" -v nr="$n_rss" 'BEGIN { printf "ratio to nginx-rtmp with players: CPU %.2f, memory %.2f (below 1: lighter)\n", o / n, or / nr }'
