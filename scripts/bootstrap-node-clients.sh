#!/usr/bin/env bash
# Install the official Node SDKs the tests point at the gateway (npm's `openai` and
# `@anthropic-ai/sdk`, pinned exactly) into a cache folder outside the repo, and print that
# folder's node_modules path on stdout (the only thing printed there; logs go to stderr).
#
# Idempotent: each set of versions has its own folder, named by a hash of the versions and
# completed by a stamp; a later run only checks the stamp and prints the path. An install goes
# into a temp folder beside it and is renamed into place once complete, so an interrupted run
# leaves nothing that looks installed.
#
# Needs node and npm (scripts/bootstrap-system.sh installs Debian's nodejs and npm).
#
# Environment:
#   VCG_CACHE                   cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/vllm-chat-gateway)
#   VCG_NODE_OPENAI_VERSION     default 7.60.0
#   VCG_NODE_ANTHROPIC_VERSION  default 1.17.0
set -euo pipefail

log() { printf '[bootstrap-node-clients] %s\n' "$*" >&2; }

cache="${VCG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vllm-chat-gateway}"
openai_version="${VCG_NODE_OPENAI_VERSION:-7.60.0}"
anthropic_version="${VCG_NODE_ANTHROPIC_VERSION:-1.17.0}"
want="openai@$openai_version @anthropic-ai/sdk@$anthropic_version"
dir="$cache/node-clients/$(printf '%s' "$want" | sha256sum | cut -c1-16)"
stamp="$dir/.vcg-complete"

for tool in node npm; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        log "ERROR: $tool not found; run scripts/bootstrap-system.sh as root (apt: nodejs npm)"
        exit 1
    fi
done

installed() {
    [[ -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$want" ]] \
        && [[ -f "$dir/node_modules/openai/package.json" ]] \
        && [[ -f "$dir/node_modules/@anthropic-ai/sdk/package.json" ]]
}

if installed; then
    printf '%s\n' "$dir/node_modules"
    exit 0
fi

if [[ -e "$dir" ]]; then
    # Only ever delete a folder this script made (it holds our package.json), never another one.
    if [[ -f "$dir/package.json" ]] && grep -q '"name": "vcg-node-clients"' "$dir/package.json"; then
        log "incomplete install at $dir: reinstalling"
        rm -rf "$dir"
    else
        log "ERROR: $dir exists but was not made by this script; move it away or set VCG_CACHE"
        exit 1
    fi
fi

mkdir -p "$(dirname "$dir")"
work="$(mktemp -d "$dir.partial.XXXXXX")"
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
cat >"$work/package.json" <<EOF
{
  "name": "vcg-node-clients",
  "private": true,
  "description": "The official Node SDKs the gateway's tests run (scripts/bootstrap-node-clients.sh)",
  "dependencies": {
    "openai": "$openai_version",
    "@anthropic-ai/sdk": "$anthropic_version"
  }
}
EOF
node_major=$(node -p 'process.versions.node.split(".")[0]')
if ((node_major < 20)); then
    # Debian 12's own nodejs is 18; the SDKs were checked with node 20 (NodeSource's build).
    log "WARNING: node $(node --version) is older than the node 20 these SDKs were checked with"
fi
start=$SECONDS
log "installing $want with node $(node --version) into $dir"
# --ignore-scripts: neither SDK needs an install script, so none of its dependencies runs one.
# --loglevel=error: openai 7.x declares node >= 22 but runs on the machine's node 20 (the tests
# are the check); npm's engine warning would otherwise print on every fresh install.
npm install --prefix "$work" --no-audit --no-fund --ignore-scripts --loglevel=error >&2
for package in openai @anthropic-ai/sdk; do
    if [[ ! -f "$work/node_modules/$package/package.json" ]]; then
        log "ERROR: npm finished but $package is not in $work/node_modules"
        exit 1
    fi
done
printf '%s' "$want" >"$work/.vcg-complete"
if mv -T "$work" "$dir" 2>/dev/null; then
    trap - EXIT
    log "ready in $((SECONDS - start)) s: $dir/node_modules"
elif installed; then
    log "another run installed it meanwhile: $dir/node_modules"
else
    log "ERROR: could not move $work to $dir"
    exit 1
fi
printf '%s\n' "$dir/node_modules"
