#!/usr/bin/env bash
# Builds every image deploy/docker-compose.yml runs, from nothing, on a machine with a Docker engine
# and no image registry (nothing can be pulled, no toolchain can be fetched inside an image):
#   marchproxy/runtime               busybox (sh, wget for health checks), CA certificates and the C
#                                    libraries the binaries link: the base of the images below
#   marchproxy/<binary>:latest       one per binary, the host's release build copied onto the runtime
#   marchproxy/services:latest       Debian (debootstrap) with Mosquitto, the docker-registry OCI
#                                    registry, PostgreSQL, etcd and moto's SQS-compatible server, for the
#                                    stack's own services; built once, kept until --rebuild-services
# Needs: docker, cargo, busybox-static, debootstrap and protoc (for the NLB's etcd support; installed
# with apt-get when missing and root).
set -euo pipefail
cd "$(dirname "$0")/.."

rebuild_services=false
[ "${1:-}" = "--rebuild-services" ] && rebuild_services=true

# Every image made here carries it, so the ones a rebuild replaces can be removed.
label="org.marchproxy.built-by=build-images"
binaries="marchproxy-nlb marchproxy-alb marchproxy-dblb marchproxy-rtmp marchproxy-ailb marchproxy-sqs-proxy marchproxy-wasm-registry marchctl"
target="${CARGO_TARGET_DIR:-$PWD/target}/release"

say() { printf '== %s\n' "$*"; }
need() {
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >/dev/null; }
  fi
  command -v "$1" >/dev/null 2>&1 || { echo "$1 is missing; run: sudo apt-get install -y $2" >&2; exit 1; }
}
need docker docker.io
need busybox busybox-static
need debootstrap debootstrap
need protoc protobuf-compiler
docker info >/dev/null 2>&1 || { echo "the Docker engine does not answer (docker info); start it and run this again" >&2; exit 1; }

say "release build"
# The NLB with etcd support, so the cluster profile's replicas can share their state.
cargo build --release --locked --bins --features marchproxy-nlb/etcd

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

say "marchproxy/runtime"
rootfs="$work/runtime"
mkdir -p "$rootfs/bin" "$rootfs/etc/ssl/certs" "$rootfs/tmp" "$rootfs/var/lib/marchproxy" "$rootfs/etc/marchproxy"
busybox_path="$(command -v busybox)"
file -L "$busybox_path" 2>/dev/null | grep -q 'dynamically linked' && { echo "$busybox_path is not static; install busybox-static" >&2; exit 1; }
cp "$busybox_path" "$rootfs/bin/busybox"
for applet in sh wget cat ls ps hostname sleep kill; do ln -s busybox "$rootfs/bin/$applet"; done
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
printf 'root:x:0:0:root:/root:/bin/sh\nmarchproxy:x:10001:10001::/var/lib/marchproxy:/bin/sh\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nmarchproxy:x:10001:\n' >"$rootfs/etc/group"
printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
# Every library any binary links, with the loader, at the paths the binaries expect.
for binary in $binaries; do
  # Any absolute path on a line: the library after `=>`, or the loader itself (POSIX awk).
  ldd "$target/$binary" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }'
done | sort -u | while read -r library; do
  cp --parents -L "$library" "$rootfs"
done
chown 10001:10001 "$rootfs/var/lib/marchproxy"
chmod 1777 "$rootfs/tmp"
tar -C "$rootfs" -c . | docker import -c 'ENV PATH=/usr/local/bin:/bin' -c "LABEL $label" - marchproxy/runtime:latest >/dev/null

for binary in $binaries; do
  say "marchproxy/$binary"
  context="$work/$binary"
  mkdir -p "$context"
  cp "$target/$binary" "$context/"
  strip --strip-debug "$context/$binary"
  docker build -q -f deploy/Dockerfile --build-arg "BINARY=$binary" -t "marchproxy/$binary:latest" "$context" >"$work/build.log" 2>&1 \
    || { cat "$work/build.log" >&2; exit 1; }
done

# An image from before etcd joined it is rebuilt too.
has_etcd() {
  docker image inspect marchproxy/services:latest >/dev/null 2>&1 \
    && docker run --rm --pull never --entrypoint /bin/sh marchproxy/services:latest -c 'command -v etcd' >/dev/null 2>&1
}
if $rebuild_services || ! has_etcd; then
  say "marchproxy/services (debootstrap: a few minutes, once)"
  services="$work/services"
  debootstrap --variant=minbase --include=mosquitto,docker-registry,postgresql,etcd-server,python3,python3-pip,ca-certificates \
    bookworm "$services" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  cp /etc/resolv.conf "$services/etc/resolv.conf"
  # pip inside trusts what the host trusts (a TLS-inspecting proxy's CA, say), for this one install.
  cp "$services/etc/ssl/certs/ca-certificates.crt" "$work/own-ca.crt"
  cp /etc/ssl/certs/ca-certificates.crt "$services/etc/ssl/certs/ca-certificates.crt"
  chroot "$services" env PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_FIND_LINKS= \
    python3 -m pip install --quiet --no-cache-dir --break-system-packages 'moto[server]'
  cp "$work/own-ca.crt" "$services/etc/ssl/certs/ca-certificates.crt"
  chroot "$services" apt-get clean
  rm -rf "$services/var/lib/apt/lists/"* "$services/var/cache/"*
  : >"$services/etc/resolv.conf"
  tar -C "$services" -c . | docker import -c 'ENV PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin' -c "LABEL $label" - marchproxy/services:latest >/dev/null
fi

# The images these replaced, now untagged: only ours, by their label.
docker image prune -f --filter "label=$label" >/dev/null

say "images"
docker images --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep '^marchproxy/' | sort
