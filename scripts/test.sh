#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what the tests need (as root, with
# apt-get or pip) or stops with the exact command to run, then checks formatting and lints and runs
# every test, then the docker-compose stack when a Docker engine answers. CI (.ci/run) runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

if ! command -v cargo >/dev/null; then
  echo "cargo is missing. Install Rust (1.85 or newer) with rustup, then run this again:" >&2
  echo "  curl --proto '=https' -sSf https://sh.rustup.rs | sh -s -- -y --component rustfmt,clippy && . \"\$HOME/.cargo/env\"" >&2
  exit 1
fi
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$component" || { echo "run: rustup component add $component" >&2; exit 1; }
  fi
done

# Python grpcio stubs act as a client written by someone else (tests/python_client.rs).
if ! python3 -c 'import grpc, grpc_tools' >/dev/null 2>&1; then
  say "installing Python grpcio and grpcio-tools"
  python3 -m pip install --quiet grpcio grpcio-tools 2>/dev/null \
    || as_root apt-get install -y -q python3-grpcio python3-grpc-tools \
    || { as_root apt-get update -q && as_root apt-get install -y -q python3 python3-grpcio python3-grpc-tools; } \
    || { echo "cannot install grpcio; run: sudo apt-get install -y python3-grpcio python3-grpc-tools" >&2; exit 1; }
  python3 -c 'import grpc, grpc_tools' || { echo "grpcio still missing; run: python3 -m pip install grpcio grpcio-tools" >&2; exit 1; }
fi

# Real servers the module tests start: an MQTT broker (and Mosquitto's clients, which test the
# embedded broker), Redis, an OCI registry (htpasswd for its
# password-protected variant); curl is one of the AILB's and the ALB's test clients (HTTP/2);
# openssl makes the ALB test's certificate; ffmpeg publishes and plays the RTMP module's test streams;
# PostgreSQL and MariaDB (servers and their psql/mariadb clients) stand behind the DBLB.
if ! { command -v curl && command -v openssl && command -v ffmpeg && command -v ffprobe && command -v redis-server && command -v redis-cli && command -v docker-registry && command -v htpasswd \
       && { command -v mosquitto || test -x /usr/sbin/mosquitto; } && command -v mosquitto_sub && command -v mosquitto_pub \
       && ls /usr/lib/postgresql/*/bin/postgres && command -v psql && { command -v mariadbd || test -x /usr/sbin/mariadbd; } && command -v mariadb; } >/dev/null 2>&1; then
  packages="curl openssl ffmpeg mosquitto mosquitto-clients redis-server docker-registry apache2-utils postgresql mariadb-server mariadb-client"
  say "installing $packages"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $packages \
    || { as_root apt-get update -q && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $packages; } \
    || { echo "cannot install them; run: sudo apt-get install -y $packages" >&2; exit 1; }
fi

# moto's server mode is the SQS-compatible queue the SQS proxy's tests run against; ORAS pushes
# wasm artifacts to the registry; the official openai client drives the AILB.
if ! python3 -c 'import moto.server, flask, oras.client, openai' >/dev/null 2>&1; then
  say "installing moto[server] (an SQS-compatible server), oras and openai"
  python3 -m pip --version >/dev/null 2>&1 \
    || as_root apt-get install -y -q python3-pip \
    || { as_root apt-get update -q && as_root apt-get install -y -q python3-pip; } \
    || { echo "pip is missing; run: sudo apt-get install -y python3-pip" >&2; exit 1; }
  python3 -m pip install --quiet 'moto[server]' oras openai 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages 'moto[server]' oras openai \
    || { echo "cannot install them; run: python3 -m pip install 'moto[server]' oras openai" >&2; exit 1; }
fi

# etcd (a three-member cluster on loopback) holds the state NLB replicas share; the etcd client
# crate compiles etcd's protobuf API with protoc at build time.
if ! { command -v etcd && command -v etcdctl && command -v protoc; } >/dev/null 2>&1; then
  say "installing etcd-server, etcd-client and protobuf-compiler"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server etcd-client protobuf-compiler \
    || { as_root apt-get update -q && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server etcd-client protobuf-compiler; } \
    || { echo "cannot install them; run: sudo apt-get install -y etcd-server etcd-client protobuf-compiler" >&2; exit 1; }
fi

# Headless Chromium, its WebDriver and Selenium drive the NLB's operator console (tests/nlb_console.rs).
if ! { test -x /usr/bin/chromium && test -x /usr/bin/chromedriver; }; then
  say "installing chromium and chromium-driver"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver \
    || { as_root apt-get update -q && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } \
    || { echo "cannot install them; run: sudo apt-get install -y chromium chromium-driver" >&2; exit 1; }
fi
if ! python3 -c 'import selenium' >/dev/null 2>&1; then
  say "installing selenium"
  python3 -m pip install --quiet selenium 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages selenium \
    || { echo "cannot install selenium; run: python3 -m pip install selenium" >&2; exit 1; }
fi

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy"
# Once as everyone builds it (no protoc needed), once with the NLB's etcd support.
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --workspace --all-targets --locked --features marchproxy-nlb/etcd -- -D warnings
say "cargo test"
cargo test --workspace --locked --features marchproxy-nlb/etcd
say "the README's commands resolve from the repository root"
cargo run -q --locked --bin marchproxy -- up --help >/dev/null
cargo run -q --locked --bin marchctl -- --help >/dev/null
say "the compose stack (deploy/compose-test.sh)"
if ! docker info >/dev/null 2>&1; then
  echo "docker info does not answer here, so the compose stack is not tested; the same topology runs"
  echo "as processes in launcher/tests/up.rs. On a machine with a Docker engine: sudo deploy/compose-test.sh"
elif [ "$(id -u)" != 0 ]; then
  echo "the compose stack test builds its service image with debootstrap and chroot, which need root:"
  echo "run sudo deploy/compose-test.sh"
else
  deploy/compose-test.sh
fi
say "all tests passed"
