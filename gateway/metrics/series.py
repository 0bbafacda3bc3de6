"""Every Prometheus series the gateway exports, defined once.

Label values are bounded: route templates (never raw paths), HTTP methods from a fixed list,
model names from the profiles and the configured cloud models (anything else is "other"),
profile ids, tiers and error codes the gateway itself defines. No user, key or request ids.

With PROMETHEUS_MULTIPROC_DIR set in the environment before the gateway starts, prometheus_client
keeps these values in files shared by every worker process and `GET /metrics` merges them; the
`multiprocess_mode` of each gauge says how the workers' values combine.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

from gateway import __version__

# `*_created` series would double every counter and histogram for a timestamp no panel uses.
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0)
_TOKENS_PER_S_BUCKETS = (1, 5, 10, 20, 40, 60, 80, 100, 150, 200, 300, 500, 1000, 2000, 5000)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_SWITCH_BUCKETS = (1, 5, 10, 20, 30, 60, 90, 120, 180, 300, 600, 900, 1800)
# A wake or sleep takes about a second, a cold start of a large model minutes.
_OPERATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 180, 300, 450, 600)

# -- the process ------------------------------------------------------------------------------

BUILD_INFO = Gauge(
    "gateway_build_info",
    "Always 1; the gateway's version as a label.",
    ["version"],
    multiprocess_mode="livemax",
)
BUILD_INFO.labels(version=__version__).set(1)

# -- HTTP (every request, recorded by the request middleware) --------------------------------

HTTP_REQUESTS = Counter(
    "gateway_http_requests_total",
    "HTTP requests by route template, method and status code.",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "gateway_http_request_duration_seconds",
    "Time from the request's arrival to the end of its response (a stream's whole length).",
    ["route", "method"],
    buckets=_LATENCY_BUCKETS,
)

# -- the proxy, per model ---------------------------------------------------------------------

MODEL_REQUESTS = Counter(
    "gateway_model_requests_total",
    "Requests relayed to an engine, by model and upstream (local engine or cloud overflow).",
    ["model", "upstream"],
)
MODEL_ERRORS = Counter(
    "gateway_model_errors_total",
    "Relayed requests that did not end well, by model, upstream and reason.",
    ["model", "upstream", "reason"],
)
MODEL_TTFT = Histogram(
    "gateway_model_time_to_first_token_seconds",
    "Streaming requests: time from sending to the engine to the first event relayed back.",
    ["model", "upstream"],
    buckets=_TTFT_BUCKETS,
)
MODEL_DURATION = Histogram(
    "gateway_model_request_duration_seconds",
    "Time from sending to the engine to the end of the relayed response.",
    ["model", "upstream"],
    buckets=_LATENCY_BUCKETS,
)
MODEL_TOKENS = Counter(
    "gateway_model_tokens_total",
    "Tokens reported by the engine's usage, by direction (prompt = in, completion = out).",
    ["model", "upstream", "direction"],
)
MODEL_TOKENS_PER_S = Histogram(
    "gateway_model_generation_tokens_per_second",
    "Per request: completion tokens / generation time (after the first token for streams).",
    ["model", "upstream"],
    buckets=_TOKENS_PER_S_BUCKETS,
)
OVERFLOW = Counter(
    "gateway_overflow_total",
    "Requests sent to the cloud upstream instead of the local engine, by the model asked for.",
    ["model"],
)

# -- admission (the scheduler) ----------------------------------------------------------------

QUEUE_DEPTH = Gauge(
    "gateway_queue_depth",
    "Requests waiting for a local slot or for a model to load.",
    multiprocess_mode="livesum",
)
QUEUE_WAIT = Histogram(
    "gateway_queue_wait_seconds",
    "Time from asking for a slot to getting one (0 when one was free), by outcome.",
    ["outcome"],
    buckets=_QUEUE_BUCKETS,
)
SWAP_WAIT = Histogram(
    "gateway_fleet_swap_wait_seconds",
    "How long the request that asked for a load or wake had waited before the swap began "
    "(the no-thrash wait, bounded by SWAP_MAX_WAIT_S), by the model swapped in.",
    ["model"],
    buckets=_QUEUE_BUCKETS,
)
IN_FLIGHT = Gauge(
    "gateway_in_flight_requests",
    "Requests being served now, by upstream.",
    ["upstream"],
    multiprocess_mode="livesum",
)
LOCAL_SLOTS = Gauge(
    "gateway_local_slots",
    "Concurrent requests the local engine is given (MAX_QUEUE_SIZE).",
    multiprocess_mode="livesum",
)

# -- identity and limits ----------------------------------------------------------------------

RATE_LIMITED = Counter(
    "gateway_rate_limit_rejections_total",
    "Requests refused with 429, by tier and by the limit hit "
    "(requests, tokens, login, session, admin).",
    ["tier", "limit"],
)
AUTH_FAILURES = Counter(
    "gateway_auth_failures_total",
    "Requests refused by the credential check (401/403), by the error code returned.",
    ["reason"],
)
RATE_LIMITER_FALLBACK = Counter(
    "gateway_rate_limiter_fallback_total",
    "Rate-limit decisions made by the in-process limiter because Redis was unreachable.",
)

# -- the engine manager -----------------------------------------------------------------------

ENGINE_STATE = Gauge(
    "gateway_engine_state",
    "1 for the state each profile's engine is in, 0 for the others (inactive profiles: idle).",
    ["profile", "state"],
    multiprocess_mode="livemax",
)
SWITCHES = Counter(
    "gateway_engine_switches_total",
    "Finished model switch jobs, by target profile and outcome.",
    ["profile", "outcome"],
)
ENGINE_RESTARTS = Counter(
    "gateway_engine_restarts_total",
    "Restarts of an engine that died on its own (crash, OOM kill, kill -9), by profile; past "
    "ENGINE_RESTART_MAX within the window the engine stays failed (a crash loop).",
    ["profile"],
)
SWITCH_DURATION = Histogram(
    "gateway_engine_switch_duration_seconds",
    "Duration of model switch jobs (drain + stop + start + health), by outcome.",
    ["outcome"],
    buckets=_SWITCH_BUCKETS,
)

# -- the fleet (several engines at once; read from the manager at each scrape) ---------------

FLEET_ENGINES = Gauge(
    "gateway_fleet_engines",
    "Engines the fleet has run, by state now (every state, 0 included; a profile never "
    "loaded is not counted).",
    ["state"],
    multiprocess_mode="livemax",
)
FLEET_VRAM_CLAIM = Gauge(
    "gateway_fleet_vram_claim_bytes",
    "GPU memory the placement ledger says each resident engine holds on each of its GPUs: "
    "its budget, or the residual while asleep (engines that left the ledger have no series).",
    ["gpu", "engine"],
    multiprocess_mode="livemax",
)
FLEET_VRAM_BUDGET = Gauge(
    "gateway_fleet_vram_budget_bytes",
    "Each resident engine's budget on each of its GPUs: what it holds awake, and what a "
    "wake needs back.",
    ["gpu", "engine"],
    multiprocess_mode="livemax",
)
FLEET_OPERATIONS = Histogram(
    "gateway_fleet_operation_seconds",
    "Duration of engine operations, by kind: cold (a start until it serves or fails), wake, sleep.",
    ["kind"],
    buckets=_OPERATION_BUCKETS,
)
FLEET_EVICTIONS = Counter(
    "gateway_fleet_evictions_total",
    "Engines put to sleep or stopped to make room, by why and how: placement (another needed "
    "its GPU memory), max_engines (FLEET_MAX_ENGINES reached), idle (idle_ttl_s), each "
    "_sleep or _stop.",
    ["reason"],
)
FLEET_LEDGER_MISMATCHES = Counter(
    "gateway_fleet_ledger_mismatches_total",
    "GPUs whose NVML used memory disagreed (by more than 1 GiB) with the placement ledger, "
    "checked after every start, stop, sleep and wake (never with a recorded GPU snapshot).",
)

# -- GPUs (sampled in the background, not per scrape) -----------------------------------------

GPU_INFO = Gauge(
    "gateway_gpu_info",
    "Always 1 per GPU; its name as a label.",
    ["gpu", "name"],
    multiprocess_mode="livemostrecent",
)
GPU_MEMORY_USED = Gauge(
    "gateway_gpu_memory_used_bytes",
    "GPU memory in use.",
    ["gpu"],
    multiprocess_mode="livemostrecent",
)
GPU_MEMORY_TOTAL = Gauge(
    "gateway_gpu_memory_total_bytes",
    "GPU memory in all.",
    ["gpu"],
    multiprocess_mode="livemostrecent",
)
GPU_UTILIZATION = Gauge(
    "gateway_gpu_utilization_ratio",
    "GPU busy fraction over NVML's last sample period (0-1).",
    ["gpu"],
    multiprocess_mode="livemostrecent",
)
GPU_TEMPERATURE = Gauge(
    "gateway_gpu_temperature_celsius",
    "GPU core temperature.",
    ["gpu"],
    multiprocess_mode="livemostrecent",
)
GPU_POWER = Gauge(
    "gateway_gpu_power_watts",
    "GPU power draw.",
    ["gpu"],
    multiprocess_mode="livemostrecent",
)
GPU_POWER_LIMIT = Gauge(
    "gateway_gpu_power_limit_watts",
    "GPU power limit.",
    ["gpu"],
    multiprocess_mode="livemostrecent",
)
GPU_SAMPLED_AT = Gauge(
    "gateway_gpu_last_sample_timestamp_seconds",
    "When the GPUs were last read (Unix time); 0 GPUs still records the reading.",
    multiprocess_mode="livemax",
)
GPU_COUNT = Gauge(
    "gateway_gpu_count",
    "GPUs seen by the last reading.",
    multiprocess_mode="livemostrecent",
)
