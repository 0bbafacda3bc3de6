#!/usr/bin/env bash
# Create the llama.cpp virtualenv (llama-cpp-python[server], built from source for the CPU) and
# the tiny GGUF test model used by the real-llama.cpp tests.
#
# Prints two lines on stdout, the only thing printed there (logs go to stderr):
#   LLAMA_CPP_PYTHON=<the venv's python>
#   TINY_GGUF=<the tiny model's .gguf>
#
# Idempotent, every step cached under the cache root:
#   sdist/       the llama-cpp-python sdist (it vendors llama.cpp, whose converter makes the GGUF)
#   wheels/      the wheel built from it (keyed by version and CMake arguments), so a recreated
#                venv installs in seconds instead of compiling llama.cpp again (~4 min on 2 cores)
#   llama-cpp-converter/VERSION/   the converter (convert_hf_to_gguf.py, conversion/, gguf-py/)
#   llama-cpp-venv/  the venv, complete once its stamp matches
#   tiny-gguf/tiny.gguf  converted from the tiny Llama that scripts/bootstrap-vllm.sh makes
# Each is written beside its place and renamed into it once complete.
#
# Needs a C/C++ toolchain and cmake >= 3.21 (scripts/bootstrap-system.sh: build-essential cmake),
# and scripts/bootstrap-vllm.sh run first (its venv has torch and transformers for the converter,
# and it makes the tiny Llama).
#
# Environment:
#   VCG_CACHE                  cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/vllm-chat-gateway)
#   VCG_LLAMA_CPP_VENV         venv location (default: $VCG_CACHE/llama-cpp-venv)
#   VCG_LLAMA_CPP_VERSION      llama-cpp-python version, default 0.3.36
#   VCG_LLAMA_CPP_CMAKE_ARGS   CMake arguments of the build (default: a portable CPU build, no
#                              -march=native so a cached wheel runs on any x86-64/arm64 machine,
#                              and no OpenMP so it needs no libgomp at run time)
#   VCG_TINY_GGUF              where the tiny GGUF goes (default: $VCG_CACHE/tiny-gguf/tiny.gguf)
#   VCG_TINY_MODEL_DIR         the tiny Llama (default: $VCG_CACHE/tiny-llama)
#   VCG_VLLM_VENV              the vLLM venv that runs the converter (default: $VCG_CACHE/vllm-venv)
#   VCG_PYTHON                 interpreter used to create the venv (default: python3; needs >= 3.10)
set -euo pipefail

log() { printf '[bootstrap-llama-cpp] %s\n' "$*" >&2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${VCG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vllm-chat-gateway}"
venv="${VCG_LLAMA_CPP_VENV:-$cache/llama-cpp-venv}"
version="${VCG_LLAMA_CPP_VERSION:-0.3.36}"
cmake_args="${VCG_LLAMA_CPP_CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_OPENMP=OFF}"
gguf="${VCG_TINY_GGUF:-$cache/tiny-gguf/tiny.gguf}"
model_dir="${VCG_TINY_MODEL_DIR:-$cache/tiny-llama}"
vllm_python="${VCG_VLLM_VENV:-$cache/vllm-venv}/bin/python"
python="${VCG_PYTHON:-python3}"

sdist="$cache/sdist/llama_cpp_python-$version.tar.gz"
wheel_want="llama-cpp-python==$version CMAKE_ARGS=$cmake_args"
wheel_dir="$cache/wheels/llama-cpp-python-$version-$(printf '%s' "$wheel_want" | sha256sum | cut -c1-12)"
converter="$cache/llama-cpp-converter/$version"
venv_want="llama-cpp-python[server]==$version CMAKE_ARGS=$cmake_args"
gguf_want="tiny-llama converted by llama-cpp-python==$version's convert_hf_to_gguf.py, f32"

# A folder made next to TARGET and renamed into place by `finish`; removed on any failure.
partial=""
trap '[[ -z "$partial" ]] || rm -rf "$partial"' EXIT
begin() {
    mkdir -p "$(dirname "$1")"
    partial="$(mktemp -d "$1.partial.XXXXXX")"
    chmod 755 "$partial"
}
finish() {
    rm -rf "$1"
    mv -T "$partial" "$1"
    partial=""
}

# -- the sdist (the wheel's source, and the converter's) ---------------------------------------
if [[ -f "$sdist" ]]; then
    log "sdist: ok ($sdist)"
else
    if ! command -v "$python" >/dev/null 2>&1; then
        log "ERROR: $python not found (set VCG_PYTHON to a Python >= 3.10 interpreter)"
        exit 1
    fi
    begin "$cache/sdist/.download"
    log "downloading the llama-cpp-python==$version sdist"
    "$python" -m pip download --quiet --no-binary :all: --no-deps --dest "$partial" \
        "llama-cpp-python==$version" >&2
    mkdir -p "$(dirname "$sdist")"
    mv "$partial/$(basename "$sdist")" "$sdist"
    rm -rf "$partial"
    partial=""
fi

# -- the venv (from the cached wheel, built first if missing) -----------------------------------
venv_ok() {
    # Cheap check (no import of the native library) so that repeated runs return at once.
    [[ -f "$venv/.vcg-complete" ]] && [[ "$(cat "$venv/.vcg-complete")" == "$venv_want" ]] \
        && [[ -x "$venv/bin/python" ]] \
        && "$venv/bin/python" -c '
import importlib.util, sys
missing = [m for m in ("llama_cpp", "uvicorn", "fastapi", "sse_starlette") if importlib.util.find_spec(m) is None]
sys.exit(1 if missing else 0)' >/dev/null 2>&1
}

wheel_ok() {
    [[ -f "$wheel_dir/.vcg-complete" ]] && [[ "$(cat "$wheel_dir/.vcg-complete")" == "$wheel_want" ]] \
        && compgen -G "$wheel_dir/llama_cpp_python-$version-*.whl" >/dev/null
}

if venv_ok; then
    log "venv: ok ($venv, $venv_want)"
else
    if ! command -v "$python" >/dev/null 2>&1; then
        log "ERROR: $python not found (set VCG_PYTHON to a Python >= 3.10 interpreter)"
        exit 1
    fi
    if [[ -e "$venv" ]]; then
        # Only ever delete something that is a (partial) venv, never an arbitrary directory.
        if [[ -f "$venv/pyvenv.cfg" ]] || [[ -z "$(ls -A "$venv" 2>/dev/null)" ]]; then
            log "venv at $venv is incomplete or stale: recreating it"
            rm -rf "$venv"
        else
            log "ERROR: $venv exists but is not a virtualenv; move it away or set VCG_LLAMA_CPP_VENV"
            exit 1
        fi
    fi
    start=$SECONDS
    log "creating venv $venv with $("$python" -V 2>&1)"
    "$python" -m venv "$venv"
    pip=("$venv/bin/python" -m pip)
    "${pip[@]}" install --quiet --upgrade pip >&2
    if wheel_ok; then
        log "wheel: ok ($wheel_dir)"
    else
        for tool in cc c++ make cmake; do
            if ! command -v "$tool" >/dev/null 2>&1; then
                log "ERROR: $tool not found; run scripts/bootstrap-system.sh as root (apt: build-essential cmake)"
                exit 1
            fi
        done
        begin "$wheel_dir"
        log "building llama.cpp from the sdist (CMAKE_ARGS=$cmake_args; minutes)"
        build_start=$SECONDS
        CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
            "${pip[@]}" wheel --quiet --no-deps --wheel-dir "$partial" "$sdist" >&2
        printf '%s' "$wheel_want" >"$partial/.vcg-complete"
        finish "$wheel_dir"
        log "wheel built in $((SECONDS - build_start)) s: $wheel_dir"
    fi
    log "installing llama-cpp-python[server]==$version from $wheel_dir"
    "${pip[@]}" install --quiet --find-links "$wheel_dir" "llama-cpp-python[server]==$version" >&2
    log "checking the install"
    "$venv/bin/python" -c 'import llama_cpp, llama_cpp.server.app' >&2
    printf '%s' "$venv_want" >"$venv/.vcg-complete"
    log "venv ready in $((SECONDS - start)) s: $venv"
fi

# -- the converter, from the sdist's vendored llama.cpp ------------------------------------------
if [[ -f "$converter/convert_hf_to_gguf.py" ]]; then
    log "converter: ok ($converter)"
else
    begin "$converter"
    top="llama_cpp_python-$version/vendor/llama.cpp"
    tar -xzf "$sdist" -C "$partial" --strip-components=3 \
        "$top/convert_hf_to_gguf.py" "$top/conversion" "$top/gguf-py"
    finish "$converter"
    log "converter extracted: $converter"
fi

# -- the tiny GGUF ---------------------------------------------------------------------------------
gguf_stamp="$gguf.vcg-complete"
if [[ -f "$gguf" ]] && [[ -f "$gguf_stamp" ]] && [[ "$(cat "$gguf_stamp")" == "$gguf_want" ]]; then
    log "tiny GGUF: ok ($gguf)"
else
    if [[ ! -x "$vllm_python" ]] || [[ ! -f "$model_dir/config.json" ]]; then
        log "ERROR: the converter runs with the vLLM venv's python on the tiny Llama; run"
        log "       scripts/bootstrap-vllm.sh first ($vllm_python, $model_dir)"
        exit 1
    fi
    log "converting $model_dir to $gguf"
    rm -f "$gguf_stamp"
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$vllm_python" "$here/make_tiny_gguf.py" \
        --converter "$converter" "$model_dir" "$gguf" >&2
    printf '%s' "$gguf_want" >"$gguf_stamp"
fi

printf 'LLAMA_CPP_PYTHON=%s\n' "$venv/bin/python"
printf 'TINY_GGUF=%s\n' "$gguf"
