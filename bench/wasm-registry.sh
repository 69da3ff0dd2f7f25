#!/usr/bin/env bash
# Time for the wasm-registry to deliver a 10 MB module to 10 proplets through Mosquitto, set
# against the broker's own ceiling: the same chunk messages published raw with mosquitto_pub.
# Cold (pulled from the registry) and warm (from the disk cache); each the median of ROUNDS runs.
#
#   bench/wasm-registry.sh     # needs mosquitto, mosquitto-clients, docker-registry (apt) and oras (pip)
#   SIZE_MB=20 SUBSCRIBERS=20 QOS=2 ROUNDS=3 bench/wasm-registry.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB=${SIZE_MB:-10}
SUBSCRIBERS=${SUBSCRIBERS:-10}
QOS=${QOS:-2}
ROUNDS=${ROUNDS:-5}
CHUNK=512000
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/marchproxy-target}"

for tool in mosquitto_sub mosquitto_pub docker-registry; do
  command -v "$tool" >/dev/null || { echo "$tool is missing; run: sudo apt-get install -y mosquitto mosquitto-clients docker-registry" >&2; exit 1; }
done
mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)
python3 -c 'import oras.client' 2>/dev/null || { echo "oras is missing; run: python3 -m pip install oras" >&2; exit 1; }
cargo build -q --release -p marchproxy-wasm-registry
bin="$CARGO_TARGET_DIR/release/marchproxy-wasm-registry"

work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

printf 'listener 18800 127.0.0.1\nallow_anonymous true\n' > "$work/mosquitto.conf"
"$mosquitto" -c "$work/mosquitto.conf" >/dev/null 2>&1 & pids+=($!)
printf 'version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: %s/data\nhttp:\n  addr: 127.0.0.1:18801\n' "$work" > "$work/registry.yml"
docker-registry serve "$work/registry.yml" >/dev/null 2>&1 & pids+=($!)
wait_port 18800; wait_port 18801

head -c $((SIZE_MB * 1024 * 1024)) /dev/urandom > "$work/module.wasm"
(cd "$work" && python3 -c "
import oras.client
c = oras.client.OrasClient(hostname='127.0.0.1:18801', insecure=True)
c.push(target='127.0.0.1:18801/bench/module.wasm:v1', files=['module.wasm:application/wasm'], disable_path_validation=True)
" >/dev/null)
reference=127.0.0.1:18801/bench/module.wasm:v1
chunks=$(( (SIZE_MB * 1024 * 1024 + CHUNK - 1) / CHUNK ))
topic=m/d1/c/c1/registry/server

PROXY_MQTT_ADDRESS=tcp://127.0.0.1:18800 PROXY_DOMAIN_ID=d1 PROXY_CHANNEL_ID=c1 PROXY_MQTT_QOS=$QOS \
  PROXY_CACHE_DIR="$work/cache" PROXY_HTTP_PORT=18802 \
  "$bin" --grpc-listen 127.0.0.1:18803 --admin-listen 127.0.0.1:18804 2>"$work/service.log" & pids+=($!)
wait_port 18802
for _ in $(seq 100); do grep -q "MQTT subscribed" "$work/service.log" && break; sleep 0.1; done

# Starts the subscribers, runs "$@", and prints the seconds until every subscriber has all chunks.
deliver() {
  local subs=()
  for n in $(seq "$SUBSCRIBERS"); do
    timeout 120 mosquitto_sub -p 18800 -q "$QOS" -t "$topic" -C "$chunks" -i "bench-$n-$RANDOM" >/dev/null & subs+=($!)
  done
  sleep 1 # let every subscription settle before the clock starts
  local start end
  start=$(date +%s.%N)
  "$@"
  for sub in "${subs[@]}"; do
    wait "$sub" || { echo "a subscriber did not get all $chunks chunks within 120 s" >&2; exit 1; }
  done
  end=$(date +%s.%N)
  awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }'
}
request() { mosquitto_pub -p 18800 -q "$QOS" -t m/d1/c/c1/registry/proplet -m "{\"app_name\": \"$reference\"}"; }

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
cold=$(for _ in $(seq "$ROUNDS"); do rm -rf "$work/cache/sha256/"* "$work/cache/refs/"*; deliver request; echo; done | median)
warm=$(for _ in $(seq "$ROUNDS"); do deliver request; echo; done | median)

python3 - "$work/module.wasm" "$reference" "$CHUNK" > "$work/chunks.jsonl" <<'PY'
import base64, hashlib, json, sys
data = open(sys.argv[1], 'rb').read()
size, chunk = len(data), int(sys.argv[3])
total = (size + chunk - 1) // chunk
digest = 'sha256:' + hashlib.sha256(data).hexdigest()
for i in range(total):
    print(json.dumps({"app_name": sys.argv[2], "chunk_idx": i, "total_chunks": total,
                      "data": base64.b64encode(data[i*chunk:(i+1)*chunk]).decode(), "digest": digest, "size": size}))
PY
raw=$(for _ in $(seq "$ROUNDS"); do deliver sh -c "mosquitto_pub -p 18800 -q $QOS -t $topic -l < $work/chunks.jsonl"; echo; done | median)

printf '\n%s MB module, %s chunks, %s subscribers, QoS %s, median of %s runs\n' "$SIZE_MB" "$chunks" "$SUBSCRIBERS" "$QOS" "$ROUNDS"
printf '%-44s %8s s\n' "wasm-registry, cold (pulled from the registry)" "$cold"
printf '%-44s %8s s\n' "wasm-registry, warm (from the disk cache)" "$warm"
printf '%-44s %8s s\n' "mosquitto_pub, the same messages raw" "$raw"
awk -v c="$cold" -v w="$warm" -v r="$raw" 'BEGIN { printf "ratio to raw: cold %.2f, warm %.2f (1.00 = the broker'"'"'s ceiling)\n", c / r, w / r }'
