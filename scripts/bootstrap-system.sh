#!/usr/bin/env bash
# Install the system services the integration tests run for real (Debian/Ubuntu, apt):
#   PostgreSQL (initdb/pg_ctl), redis-server, dockerd (docker.io) and a static busybox
#   (busybox-static, used to build the tiny Docker test image), chromium (browser tests),
#   prometheus and docker-compose (observability and deploy tests), nodejs and npm (the official
#   Node SDKs against the gateway; scripts/bootstrap-node-clients.sh installs the SDKs),
#   build-essential and cmake (scripts/bootstrap-llama-cpp.sh builds llama.cpp from source).
#
# Idempotent: installs only what is missing. As root it runs apt-get (update once, then
# install --no-install-recommends); otherwise it lists what is missing and exits 1.
# Nothing is started here: the test session starts its own throwaway instances.
set -euo pipefail

log() { printf '[bootstrap-system] %s\n' "$*" >&2; }

missing=()

if compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
    log "postgresql: ok ($(ls -d /usr/lib/postgresql/*/bin/initdb | head -n1))"
else
    missing+=(postgresql)
fi

if command -v redis-server >/dev/null 2>&1; then
    log "redis-server: ok ($(command -v redis-server))"
else
    missing+=(redis-server)
fi

if command -v dockerd >/dev/null 2>&1 || [[ -x /usr/sbin/dockerd ]]; then
    log "dockerd: ok"
else
    missing+=(docker.io)
fi

# The test image needs a *static* busybox (it runs inside an otherwise empty image).
busybox_ok=0
for b in /bin/busybox /usr/bin/busybox; do
    if [[ -x "$b" ]] && ! LC_ALL=C ldd "$b" >/dev/null 2>&1; then busybox_ok=1; fi
done
if ((busybox_ok)); then
    log "busybox (static): ok"
else
    missing+=(busybox-static)
fi

# tests/gateway/metrics and tests/deploy: a real Prometheus (and promtool) scrapes the gateway;
# docker-compose checks deploy/compose.yml.
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)

# The browser tests (tests/gateway/ui) drive Debian's chromium through Playwright; never `playwright install`.
if command -v chromium >/dev/null 2>&1 || [[ -x /usr/bin/chromium ]]; then
    log "chromium: ok"
else
    missing+=(chromium)
fi
# ...and one of them uses a key from the command line, as a user would.
command -v curl >/dev/null 2>&1 || missing+=(curl)

# tests/gateway/proxy/test_sdk_node.py: npm's openai and @anthropic-ai/sdk run on the machine's
# node. A node that ships its own npm (NodeSource's nodejs) needs no Debian npm package.
if command -v node >/dev/null 2>&1; then
    log "node: ok ($(node --version))"
else
    missing+=(nodejs)
fi
command -v npm >/dev/null 2>&1 || missing+=(npm)

# scripts/bootstrap-llama-cpp.sh compiles llama.cpp (llama-cpp-python's sdist) with cmake >= 3.21.
if command -v cc >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1 && command -v make >/dev/null 2>&1; then
    log "C/C++ toolchain: ok"
else
    missing+=(build-essential)
fi
command -v cmake >/dev/null 2>&1 || missing+=(cmake)

if ((${#missing[@]} == 0)); then
    log "all system packages present"
    exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
    log "missing packages: ${missing[*]}"
    log "install them as root: apt-get install -y --no-install-recommends ${missing[*]}"
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
log "installing: ${missing[*]}"
apt-get update
apt-get install -y --no-install-recommends "${missing[@]}"
log "done"
