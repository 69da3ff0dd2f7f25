#!/usr/bin/env bash
# The compose stack end to end, on this machine's Docker engine: builds the images
# (deploy/build-images.sh), brings deploy/docker-compose.yml up under its own project name and host
# ports, then checks what an operator would: every module registered at the NLB, HTTP through the
# NLB to the ALB, a blue/green switch of the ALB to its second version, killing that version's
# container moves its traffic back, the Docker scaler starting and stopping an ALB, PostgreSQL through the NLB and the DBLB, an edge reading through
# the NLB to a regional SQS proxy and into the queue; the cluster profile (three etcd members, two
# NLB replicas): an ALB registered with both is served through either, and through the second
# after the first is killed; and `docker-compose down` leaves nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

docker info >/dev/null 2>&1 || { echo "docker info does not answer: start the Docker engine (the same topology runs as processes in launcher/tests/up.rs)" >&2; exit 1; }
if ! command -v docker-compose >/dev/null || ! command -v psql >/dev/null || ! command -v curl >/dev/null; then
  [ "$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose postgresql-client curl >/dev/null
  for tool in docker-compose psql curl; do
    command -v "$tool" >/dev/null || { echo "$tool is missing; run: sudo apt-get install -y docker-compose postgresql-client curl" >&2; exit 1; }
  done
fi

say() { printf '\n== compose: %s\n' "$*"; }
# Every HTTP call gives up after 10 s, so a hung connection fails the test instead of stalling it.
curl() { command curl --max-time 10 "$@"; }
fail() { echo "compose test FAILED: $*" >&2; exit 1; }
# Waits up to $1 seconds for the command after it to succeed.
wait_for() {
  local deadline=$((SECONDS + $1)) what="$2"; shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || fail "$what: not within the deadline"
    sleep 1
  done
}

deploy/build-images.sh

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export MARCHPROXY_GRPC_PORT=$(free_port) MARCHPROXY_ADMIN_PORT=$(free_port) MARCHPROXY_HTTP_PORT=$(free_port) \
  MARCHPROXY_POSTGRES_PORT=$(free_port) MARCHPROXY_MYSQL_PORT=$(free_port) MARCHPROXY_RTMP_PORT=$(free_port) \
  MARCHPROXY_CLUSTER_GRPC_PORT_1=$(free_port) MARCHPROXY_CLUSTER_GRPC_PORT_2=$(free_port) \
  MARCHPROXY_CLUSTER_HTTP_PORT_1=$(free_port) MARCHPROXY_CLUSTER_HTTP_PORT_2=$(free_port) \
  MARCHPROXY_CLUSTER_ADMIN_PORT_1=$(free_port) MARCHPROXY_CLUSTER_ADMIN_PORT_2=$(free_port)
export MARCHPROXY_API_KEY="compose-test-$RANDOM$RANDOM"
export MARCHPROXY_DB_PASSWORD="compose-test-$RANDOM$RANDOM"
export MARCHPROXY_DOCKER_GID=$(stat -c %g /var/run/docker.sock)
project="marchproxy-test-$$"
compose() { docker-compose -p "$project" -f deploy/docker-compose.yml -f deploy/docker-compose.scaling.yml --profile cluster "$@"; }
marchctl() { "${CARGO_TARGET_DIR:-$PWD/target}/release/marchctl" --nlb "http://127.0.0.1:$MARCHPROXY_GRPC_PORT" --api-key "$MARCHPROXY_API_KEY" "$@"; }
http="http://127.0.0.1:$MARCHPROXY_HTTP_PORT"
metrics() { curl -fsS "http://127.0.0.1:$MARCHPROXY_ADMIN_PORT/metrics"; }
# New connections the NLB handed to ALB instances of version $1 so far.
routed_to() { metrics | awk -v v="version=\"$1\"" '/^nlb_routed_connections_total/ && /module_type="alb"/ && index($0, v) { n += $NF } END { print n + 0 }'; }

cleanup() {
  status=$?
  if [ "$status" != 0 ]; then
    compose ps || true
    compose logs --tail=40 nlb alb alb-green dblb sqs-proxy-us postgres sqs nlb-1 nlb-2 alb-cluster etcd-1 2>&1 | tail -200 || true
  fi
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  exit "$status"
}
trap cleanup EXIT

say "up (project $project)"
started=$SECONDS
# The single-NLB stack first; the cluster profile's services come up later, in their own step.
docker-compose -p "$project" -f deploy/docker-compose.yml -f deploy/docker-compose.scaling.yml up -d

say "every module registered and healthy"
modules_ready() {
  marchctl -o json modules list | python3 -c '
import json, sys
instances = json.load(sys.stdin)
instances = instances.get("modules", instances) if isinstance(instances, dict) else instances
healthy = [m for m in instances if str(m.get("health_status", m.get("healthStatus", ""))).lower() in ("healthy", "health_status_healthy", "1")]
sys.exit(0 if len(healthy) >= 9 else 1)'
}
wait_for 90 "nine module instances healthy at the NLB" modules_ready
echo "ready $((SECONDS - started)) s after docker-compose up"
marchctl modules list

say "HTTP through the NLB to the ALB"
wait_for 30 "the NLB's status page through the ALB" curl -fsS "$http/marchproxy/status"
curl -fsS "$http/marchproxy/status" | grep -q '"alb' || fail "the status page does not list the ALB"

# Sends 20 requests through the NLB and checks which ALB version got their connections.
twenty_go_to() {
  local version="$1" other="$2" before before_other after after_other
  before=$(routed_to "$version"); before_other=$(routed_to "$other")
  for _ in $(seq 20); do curl -fsS -o /dev/null "$http/marchproxy/healthz" || fail "a request failed"; done
  after=$(routed_to "$version"); after_other=$(routed_to "$other")
  echo "$version: $before -> $after, $other: $before_other -> $after_other"
  [ $((after - before)) -ge 20 ] || fail "$version did not get the 20 connections"
  [ "$after_other" = "$before_other" ] || fail "$other got connections at 0 %"
}
say "blue/green: all new ALB connections to v1 (blue), then to v2 (green)"
marchctl bluegreen weight alb v1 100
twenty_go_to v1 v2
marchctl bluegreen weight alb v2 100
twenty_go_to v2 v1
after_v1=$(routed_to v1)

say "killing alb-green moves its traffic to v1"
compose kill alb-green
for _ in $(seq 20); do curl -fsS -o /dev/null "$http/marchproxy/healthz" || fail "a request failed while a healthy ALB remained"; done
moved_v1=$(routed_to v1)
echo "v1: $after_v1 -> $moved_v1"
[ $((moved_v1 - after_v1)) -ge 20 ] || fail "v1 did not take the traffic"

say "the Docker scaler: scale-up starts a copy of the ALB, scale-down stops it"
healthy_albs() {
  marchctl -o json modules list --type alb --status healthy --filter version=v1 | python3 -c '
import json, sys
listed = json.load(sys.stdin)
print(len(listed.get("modules", []) if isinstance(listed, dict) else listed))'
}
copies() { docker ps -q --filter "label=com.docker.compose.project=$project" --filter "label=marchproxy.scaled-by=nlb" | wc -l; }
before=$(healthy_albs)
marchctl scale alb --action scale-up
has_more_albs() { [ "$(healthy_albs)" -gt "$before" ]; }
wait_for 60 "a third ALB instance registered and healthy" has_more_albs
[ "$(copies)" = 1 ] || fail "expected one container started by the scaler, found $(copies)"
echo "healthy ALB instances: $before -> $(healthy_albs)"
for _ in $(seq 10); do curl -fsS -o /dev/null "$http/marchproxy/healthz" || fail "a request failed after scaling up"; done
marchctl scale alb --action scale-down
no_copies() { [ "$(copies)" = 0 ]; }
wait_for 60 "the copy stopped" no_copies
back_to_before() { [ "$(healthy_albs)" = "$before" ]; }
wait_for 60 "the copy gone from the NLB" back_to_before
echo "healthy ALB instances back to $(healthy_albs)"

say "PostgreSQL through the NLB and the DBLB"
wait_for 60 "SELECT through the NLB" env PGPASSWORD="$MARCHPROXY_DB_PASSWORD" PGCONNECT_TIMEOUT=5 \
  psql "host=127.0.0.1 port=$MARCHPROXY_POSTGRES_PORT user=postgres dbname=app sslmode=disable" -Atc "SELECT 1"
answer=$(PGPASSWORD="$MARCHPROXY_DB_PASSWORD" PGCONNECT_TIMEOUT=5 psql "host=127.0.0.1 port=$MARCHPROXY_POSTGRES_PORT user=postgres dbname=app sslmode=disable" -Atc "SELECT current_database() || ' ' || 6 * 7")
[ "$answer" = "app 42" ] || fail "PostgreSQL answered '$answer'"

say "an edge reading through the NLB to the us SQS proxy and into its queue"
curl -fsS -H 'Host: us.sensors.example' -H 'Content-Type: application/json' \
  -d '{"device":"sensor-1","temp":21.5}' "$http/send" >/dev/null || fail "POST /send to us.sensors.example"
queued() {
  compose exec -T sqs python3 -c '
import boto3, sys
sqs = boto3.client("sqs", endpoint_url="http://127.0.0.1:4566", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
url = sqs.get_queue_url(QueueName="edge-us")["QueueUrl"]
n = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"]["ApproximateNumberOfMessages"]
sys.exit(0 if int(n) >= 1 else 1)'
}
wait_for 30 "the reading in queue edge-us" queued

say "cluster profile: three etcd members, two NLB replicas, an ALB registered with both"
compose up -d etcd-1 etcd-2 etcd-3 nlb-1 nlb-2 alb-cluster
replica() { "${CARGO_TARGET_DIR:-$PWD/target}/release/marchctl" --nlb "http://127.0.0.1:$1" --api-key "$MARCHPROXY_API_KEY" "${@:2}"; }
cluster_alb_on() {
  replica "$1" -o json modules list --type alb --status healthy | python3 -c '
import json, sys
listed = json.load(sys.stdin)
listed = listed.get("modules", []) if isinstance(listed, dict) else listed
sys.exit(0 if len(listed) == 1 else 1)'
}
wait_for 90 "the cluster's ALB healthy on replica 1" cluster_alb_on "$MARCHPROXY_CLUSTER_GRPC_PORT_1"
wait_for 30 "the cluster's ALB healthy on replica 2" cluster_alb_on "$MARCHPROXY_CLUSTER_GRPC_PORT_2"
replica "$MARCHPROXY_CLUSTER_GRPC_PORT_2" status
for port in "$MARCHPROXY_CLUSTER_HTTP_PORT_1" "$MARCHPROXY_CLUSTER_HTTP_PORT_2"; do
  wait_for 30 "HTTP through the replica on $port" curl -fsS -o /dev/null "http://127.0.0.1:$port/marchproxy/healthz"
done
say "killing replica 1: replica 2 keeps serving and keeps the ALB"
compose kill nlb-1
for _ in $(seq 20); do
  curl -fsS -o /dev/null "http://127.0.0.1:$MARCHPROXY_CLUSTER_HTTP_PORT_2/marchproxy/healthz" || fail "a request through replica 2 failed"
done
# The ALB's heartbeats now reach replica 2, which renews the registration in etcd.
acknowledged_at_2() { curl -fsS "http://127.0.0.1:$MARCHPROXY_CLUSTER_ADMIN_PORT_2/metrics" | awk '/^nlb_heartbeats_total/ && /result="acknowledged"/ { n += $NF } END { print n + 0 }'; }
killed_at=$(acknowledged_at_2)
heartbeats_at_replica_2() { [ "$(acknowledged_at_2)" -gt "$((killed_at + 1))" ] && cluster_alb_on "$MARCHPROXY_CLUSTER_GRPC_PORT_2"; }
wait_for 20 "the ALB heartbeating to replica 2, healthy" heartbeats_at_replica_2
for _ in $(seq 10); do
  curl -fsS -o /dev/null "http://127.0.0.1:$MARCHPROXY_CLUSTER_HTTP_PORT_2/marchproxy/healthz" || fail "a request through replica 2 failed"
done

say "down leaves nothing behind"
compose down -v --remove-orphans
left="$(docker ps -aq --filter "label=com.docker.compose.project=$project")$(docker network ls -q --filter "label=com.docker.compose.project=$project")$(docker volume ls -q --filter "label=com.docker.compose.project=$project")"
[ -z "$left" ] || fail "containers, networks or volumes of $project are left: $left"

say "image sizes"
docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^marchproxy/' | sort
say "compose test passed"
