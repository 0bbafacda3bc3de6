"""Command line: ``python -m simulator --model NAME --port 8000 ...``.

Every option can also come from the environment as ``SIMULATOR_<OPTION>`` (e.g.
``SIMULATOR_TOKENS_PER_SECOND=50``); a command-line flag wins over the environment.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from simulator.config import DEFAULT_SLEEP_RESIDUAL_BYTES, OPTIONAL_APIS, SimulatorConfig
from simulator.server import run

_T = TypeVar("_T")

_DESCRIPTION = """\
vLLM engine SIMULATOR for the vLLM Chat Gateway. This is NOT vLLM: it loads no
model and needs no GPU. It serves vLLM's OpenAI-compatible API (/v1/models,
/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses), its Anthropic
Messages API (/v1/messages), /tokenize, /detokenize, /rerank, /score,
/v1/audio/transcriptions (--without-api takes any of these away), /health, /metrics and the
sleep contract (/sleep, /wake_up, /is_sleeping, /collective_rpc reload_weights, with
simulated delays and GPU memory) with deterministic pseudo-text, for tests and benchmarks.
With --test-routes (for tests only), also /simulator/stats, /simulator/requests (the last
request bodies), /simulator/reset and the per-request fault injection headers
X-Simulator-Die-After-Chunks, X-Simulator-Error-After-Chunks, X-Simulator-Stall-After-Chunks,
X-Simulator-Tokens-Per-Second, X-Simulator-First-Token-Delay, X-Simulator-Status.
Every option but --test-routes may also be set as SIMULATOR_<OPTION> in the environment; the
API key also as VLLM_API_KEY, as vLLM reads it."""


# vLLM's own variable for its API key (read when --api-key is not given).
VLLM_API_KEY_ENV = "VLLM_API_KEY"


def _env_name(flag: str) -> str:
    return "SIMULATOR_" + flag.lstrip("-").replace("-", "_").upper()


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _env_default(
    env: Mapping[str, str], flag: str, convert: Callable[[str], _T], default: _T
) -> _T:
    raw = env.get(_env_name(flag))
    if raw is None or raw == "":
        return default
    try:
        return convert(raw)
    except ValueError as exc:
        raise SystemExit(f"invalid {_env_name(flag)}={raw!r}: {exc}") from exc


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The argument parser, with defaults taken from ``SIMULATOR_*`` variables in ``env``."""
    env = os.environ if env is None else env
    p = argparse.ArgumentParser(
        prog="python -m simulator",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def opt_int(flag: str) -> int | None:
        """An optional integer default read from the environment."""
        return _env_default(env, flag, int, None)

    p.add_argument("--host", default=_env_default(env, "--host", str, "127.0.0.1"))
    p.add_argument("--port", type=int, default=_env_default(env, "--port", int, 8000))
    p.add_argument(
        "--model",
        default=_env_default(env, "--model", str, "simulated-model"),
        help="model 'path' reported as root (vLLM's --model)",
    )
    p.add_argument(
        "--served-model-name",
        nargs="+",
        action="extend",
        dest="served_model_names",
        default=None,
        metavar="ALIAS",
        help="names clients use (default: --model); env: comma-separated",
    )
    p.add_argument(
        "--startup-delay",
        type=float,
        default=_env_default(env, "--startup-delay", float, 0.0),
        metavar="SECONDS",
        help="simulated model loading time; nothing listens until it ends",
    )
    p.add_argument(
        "--tokens-per-second",
        type=float,
        metavar="N",
        default=_env_default(env, "--tokens-per-second", float, 0.0),
        help="decode speed per stream; 0 = as fast as possible",
    )
    p.add_argument(
        "--first-token-delay",
        type=float,
        metavar="SECONDS",
        default=_env_default(env, "--first-token-delay", float, 0.0),
        help="simulated prefill time before the first token",
    )
    p.add_argument(
        "--fail-at-start",
        action="store_true",
        default=_env_default(env, "--fail-at-start", _truthy, False),
        help="after the startup delay, print an error and exit 1 (like an engine OOM)",
    )
    p.add_argument(
        "--die-after-chunks",
        type=int,
        metavar="N",
        default=opt_int("--die-after-chunks"),
        help="exit the whole process abruptly after N content chunks of a response",
    )
    p.add_argument(
        "--die-after-seconds",
        type=float,
        metavar="SECONDS",
        default=_env_default(env, "--die-after-seconds", float, None),
        help="exit the whole process abruptly SECONDS after it starts serving "
        "(an engine that crashes soon after start)",
    )
    p.add_argument(
        "--error-after-chunks",
        type=int,
        metavar="N",
        default=opt_int("--error-after-chunks"),
        help='send data: {"error": ...} after N content chunks, then end the stream',
    )
    p.add_argument(
        "--stall-after-chunks",
        type=int,
        metavar="N",
        default=opt_int("--stall-after-chunks"),
        help="stop sending after N content chunks until the client goes away",
    )
    p.add_argument(
        "--max-model-len", type=int, default=_env_default(env, "--max-model-len", int, 4096)
    )
    p.add_argument(
        "--embedding-dim", type=int, default=_env_default(env, "--embedding-dim", int, 64)
    )
    p.add_argument(
        "--response-tokens",
        type=int,
        metavar="N",
        default=_env_default(env, "--response-tokens", int, 0),
        help="natural reply length in tokens (0 = 16..128, derived from the prompt)",
    )
    p.add_argument(
        "--kv-cache-tokens",
        type=int,
        metavar="N",
        default=_env_default(env, "--kv-cache-tokens", int, 0),
        help="pretend KV-cache size for the cache-usage gauge (0 = 16 x max-model-len)",
    )
    p.add_argument(
        "--sleep-delay-s",
        type=float,
        metavar="SECONDS",
        default=_env_default(env, "--sleep-delay-s", float, 0.0),
        help="how long POST /sleep takes (requests are refused meanwhile)",
    )
    p.add_argument(
        "--wake-delay-s",
        type=float,
        metavar="SECONDS",
        default=_env_default(env, "--wake-delay-s", float, 0.0),
        help="how long waking the weights takes (POST /wake_up, or ?tags=weights), and "
        "reloading them after a level-2 sleep (POST /collective_rpc reload_weights)",
    )
    p.add_argument(
        "--gpu-memory-bytes",
        type=int,
        metavar="BYTES",
        default=_env_default(env, "--gpu-memory-bytes", int, 0),
        help="simulated GPU memory it holds awake, on each GPU of its set (the claim it was "
        "started with); /metrics reports it allocated and freed by sleep",
    )
    p.add_argument(
        "--sleep-residual-bytes",
        type=int,
        metavar="BYTES",
        default=_env_default(env, "--sleep-residual-bytes", int, DEFAULT_SLEEP_RESIDUAL_BYTES),
        help="of that, what stays allocated while it sleeps (its CUDA context; default 1.5 GiB)",
    )
    p.add_argument(
        "--weights-bytes",
        type=int,
        metavar="BYTES",
        default=_env_default(env, "--weights-bytes", int, 0),
        help="of that, the weights (what a level-1 sleep backs up in host RAM; "
        "0 = half of what sleep frees)",
    )
    p.add_argument(
        "--fail-sleep",
        action="store_true",
        help="POST /sleep answers 500 and the engine stays awake (a sleep that fails)",
    )
    p.add_argument(
        "--fail-wake",
        action="store_true",
        help="POST /wake_up answers 500 and the engine stays asleep (a wake that fails)",
    )
    p.add_argument(
        "--without-api",
        action="append",
        dest="without_apis",
        choices=tuple(OPTIONAL_APIS),
        default=None,
        metavar="API",
        help="act as an engine that does not serve API (its routes answer 404); repeatable: "
        f"{', '.join(OPTIONAL_APIS)}; env: comma-separated",
    )
    p.add_argument(
        "--api-key",
        # Like vLLM, the key may come from VLLM_API_KEY: the gateway passes an engine's key
        # that way (the environment of a process is private to its user; argv is not).
        default=_env_default(env, "--api-key", str, None) or env.get(VLLM_API_KEY_ENV) or None,
        help="require 'Authorization: Bearer KEY' on /v1/*, the sleep routes (/sleep, "
        "/wake_up, /is_sleeping, /collective_rpc) and /simulator/* (401 otherwise); "
        f"default: ${_env_name('--api-key')}, else ${VLLM_API_KEY_ENV}",
    )
    p.add_argument(
        "--test-routes",
        action="store_true",
        # Never from the environment: the gateway passes SIMULATOR_* on to the engines it
        # starts, and these routes show other users' prompts; only an explicit flag turns them on.
        help="FOR TESTS ONLY: serve /simulator/stats, /simulator/requests (the last request "
        "bodies) and /simulator/reset, and obey the X-Simulator-* fault headers; off by "
        "default, when the simulator keeps no request body",
    )
    p.add_argument(
        "--log-level",
        default=_env_default(env, "--log-level", str, "info"),
        choices=("critical", "error", "warning", "info", "debug", "trace"),
    )
    return p


def config_from_args(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> SimulatorConfig:
    """Parse ``argv`` (and ``SIMULATOR_*`` variables) into a :class:`SimulatorConfig`."""
    env = os.environ if env is None else env
    parser = build_parser(env)
    args = parser.parse_args(argv)
    names: list[str] | None = args.served_model_names
    if names is None:
        raw = env.get(_env_name("--served-model-name"), "")
        names = [n for n in raw.replace(",", " ").split() if n]
    without: list[str] | None = args.without_apis
    if without is None:
        raw = env.get(_env_name("--without-api"), "")
        without = [n for n in raw.replace(",", " ").split() if n]
    try:
        return SimulatorConfig(
            model=args.model,
            served_model_names=tuple(names),
            host=args.host,
            port=args.port,
            startup_delay=args.startup_delay,
            tokens_per_second=args.tokens_per_second,
            first_token_delay=args.first_token_delay,
            fail_at_start=args.fail_at_start,
            die_after_chunks=args.die_after_chunks,
            die_after_seconds=args.die_after_seconds,
            error_after_chunks=args.error_after_chunks,
            stall_after_chunks=args.stall_after_chunks,
            max_model_len=args.max_model_len,
            embedding_dim=args.embedding_dim,
            api_key=args.api_key or None,
            response_tokens=args.response_tokens,
            kv_cache_tokens=args.kv_cache_tokens,
            log_level=args.log_level,
            test_routes=args.test_routes,
            sleep_delay_s=args.sleep_delay_s,
            wake_delay_s=args.wake_delay_s,
            gpu_memory_bytes=args.gpu_memory_bytes,
            sleep_residual_bytes=args.sleep_residual_bytes,
            weights_bytes=args.weights_bytes,
            fail_sleep=args.fail_sleep,
            fail_wake=args.fail_wake,
            without_apis=frozenset(without),
        )
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: configure logging, then run the simulator; returns the exit status."""
    config = config_from_args(argv)
    logging.basicConfig(
        level=config.log_level.upper() if config.log_level != "trace" else "DEBUG",
        format="%(asctime)s %(levelname)s [vllm-simulator] %(message)s",
        stream=sys.stderr,
    )
    try:
        return run(config)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
