"""create_app(settings) and the lifespan that owns every shared resource."""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from redis.asyncio import Redis

from gateway import __version__
from gateway.auth.admin_users import router as users_router
from gateway.auth.principal import CredentialAuthenticator
from gateway.auth.router import router as auth_router
from gateway.auth.tokens import check_token_keys
from gateway.chat.router import router as chat_router
from gateway.conversations.router import router as conversations_router
from gateway.conversations.service import startup_sweep, sweep_forever
from gateway.db import create_engine, create_session_factory
from gateway.engine import ModelControl
from gateway.errors import install_error_handlers
from gateway.fields import check_tier_grants
from gateway.health.router import router as health_router
from gateway.keys.router import router as keys_router
from gateway.limits.factory import build_limiters
from gateway.logging import configure_logging, get_logger
from gateway.meta.docs import install_docs
from gateway.meta.router import router as meta_router
from gateway.metrics import (
    BackgroundMetrics,
    count_limiter_fallback,
    mark_process_stopped,
    remove_dead_processes,
    start_counters_at_zero,
)
from gateway.metrics.router import router as metrics_router
from gateway.middleware import RequestContextMiddleware
from gateway.models_api.router import router as models_router
from gateway.openapi import install_openapi
from gateway.proxy.router import router as proxy_router
from gateway.proxy.scheduler import CloudUpstream, Scheduler, SchedulerConfig
from gateway.proxy.upstream import create_relay_session
from gateway.replicas.router import router as replicas_router
from gateway.replicas.start import start_replica
from gateway.settings import EngineMode, Settings
from gateway.state import AppState
from gateway.ui.router import router as ui_router
from gateway.usage.recorder import UsageRecorder
from gateway.usage.retention import prune_forever
from gateway.usage.router import router as usage_router
from gateway.users.service import bootstrap_identity

log = get_logger(__name__)


def _upstream_client(settings: Settings) -> httpx.AsyncClient:
    timeout = httpx.Timeout(
        connect=settings.UPSTREAM_CONNECT_TIMEOUT_S,
        read=settings.UPSTREAM_READ_TIMEOUT_S,
        write=30.0,
        pool=settings.UPSTREAM_CONNECT_TIMEOUT_S,
    )
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=128)
    # trust_env=False: a proxy variable in the environment must not redirect engine traffic.
    return httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)


def scheduler_config(settings: Settings) -> SchedulerConfig:
    """Load-balancing settings; a cloud upstream only when OPENAI_API_KEY is set."""
    cloud = None
    if settings.OPENAI_API_KEY is not None:
        cloud = CloudUpstream(
            api_base=settings.OPENAI_BASE_URL,
            api_key=settings.OPENAI_API_KEY.get_secret_value(),
            default_model=settings.CLOUD_MODEL,
            model_map=settings.CLOUD_MODEL_MAP,
            routes=frozenset(settings.CLOUD_ROUTES),
        )
    return SchedulerConfig(
        max_local=settings.MAX_QUEUE_SIZE,
        max_waiting=settings.QUEUE_MAX_WAITING,
        queue_timeout_s=settings.QUEUE_TIMEOUT_S,
        overflow_slo_s=settings.OVERFLOW_SLO_S,
        auto_switch=settings.AUTO_SWITCH,
        cloud=cloud,
        enabled=settings.LB_ENABLED,
        swap_max_wait_s=settings.SWAP_MAX_WAIT_S,
        max_local_set="MAX_QUEUE_SIZE" in settings.model_fields_set,
        secret_prefixes=_secret_prefixes(settings),
    )


def _secret_prefixes(settings: Settings) -> tuple[str, ...]:
    """How this gateway's secrets start (its key prefix, the admin key's first characters):
    a model name like them is never logged or echoed, even one that names a model."""
    prefixes = [settings.API_KEY_PREFIX]
    if settings.ADMIN_API_KEY is not None:
        prefixes.append(settings.ADMIN_API_KEY.get_secret_value()[:12])
    return tuple(prefixes)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the database, Redis, the upstream client and the model manager; close them after."""
    settings: Settings = app.state.settings
    # Unreadable or mismatched JWT key files stop startup here, not at the first login.
    check_token_keys(settings)
    if settings.admin_key_generated and settings.ADMIN_API_KEY is not None:
        # Development only: the generated key is shown once so the model API can be tried.
        sys.stderr.write(
            f"\n  Development admin key (model API): {settings.ADMIN_API_KEY.get_secret_value()}\n"
        )
    if settings.jwt_secret_generated:
        log.warning(
            "jwt_secret_generated",
            reason=settings.jwt_secret_problem,
            detail="development mode: a random JWT_SECRET was generated; "
            "tokens stop working at restart. Set a strong JWT_SECRET to keep them.",
        )
    db_engine = create_engine(settings.DATABASE_URL, pool_size=settings.DATABASE_POOL_SIZE)
    redis = (
        Redis.from_url(settings.REDIS_URL, socket_timeout=2.0, socket_connect_timeout=2.0)
        if settings.REDIS_URL
        else None
    )
    http = _upstream_client(settings)
    models = await asyncio.to_thread(ModelControl, settings, http)
    gpus = models.inventory()
    log.info("gpu_inventory", count=gpus.count, source=gpus.source, reason=gpus.reason)
    scheduler = Scheduler(models, scheduler_config(settings))
    session_factory = create_session_factory(db_engine)
    usage = UsageRecorder(
        session_factory,
        flush_interval_s=settings.USAGE_FLUSH_INTERVAL_S,
        batch_size=settings.USAGE_BATCH_SIZE,
        enabled=settings.USAGE_ENABLED,
    )
    relay_session = create_relay_session(
        connect_timeout_s=settings.UPSTREAM_CONNECT_TIMEOUT_S,
        read_timeout_s=settings.UPSTREAM_READ_TIMEOUT_S,
    )
    limiters = build_limiters(settings, redis, on_fallback=count_limiter_fallback)
    state = AppState(
        settings=settings,
        db_engine=db_engine,
        session_factory=session_factory,
        redis=redis,
        http=http,
        relay_session=relay_session,
        models=models,
        scheduler=scheduler,
        engine_required=settings.ENGINE is not EngineMode.NONE,
        usage=usage,
        limiters=limiters,
        authenticator=CredentialAuthenticator(
            settings=settings, session_factory=session_factory, admin_limiter=limiters.strict
        ),
    )
    app.state.resources = state
    await bootstrap_identity(settings=settings, session_factory=state.session_factory)
    swept = await startup_sweep(state.session_factory, stale_after_s=settings.CHAT_STALE_AFTER_S)
    log.info("chat_startup_sweep", interrupted=swept)
    sweeper = asyncio.ensure_future(
        sweep_forever(
            state.session_factory,
            stale_after_s=settings.CHAT_STALE_AFTER_S,
            interval_s=settings.CHAT_SWEEP_INTERVAL_S,
        )
    )
    state.background.add(sweeper)
    if settings.USAGE_RETENTION_DAYS:
        # Raw usage rows past the retention become daily totals, a small batch at a time.
        pruner = asyncio.ensure_future(
            prune_forever(
                state.session_factory,
                retention_days=settings.USAGE_RETENTION_DAYS,
                batch_size=settings.USAGE_PRUNE_BATCH_SIZE,
                interval_s=settings.USAGE_PRUNE_INTERVAL_S,
            )
        )
        state.background.add(pruner)
    scheduler.start()
    usage.start()
    remove_dead_processes()  # live gauges a killed worker left behind (multiprocess mode)
    background_metrics = BackgroundMetrics(models, gpu_interval_s=settings.METRICS_GPU_INTERVAL_S)
    if settings.METRICS_ENABLED:
        # Labelled counters exist at 0 from the start: dashboards show 0, not "no data".
        start_counters_at_zero()
        scheduler.metrics.start_at_zero()
        # GPU readings on an interval and engine events: never work done per scrape.
        background_metrics.start()
    # The engine loads in a background switch job: a slow model load must not block liveness.
    election = None
    if models.replicated:
        # Replicas on one cluster: lead (and start the fleet) or follow the replica that does.
        election = await start_replica(settings, models, http)
        state.background.add(asyncio.ensure_future(election.run()))
    else:
        await models.startup()  # logs its plan (engine_plan), a warning when no engine starts
    log.info("gateway_started", url=settings.public_url, version=__version__)
    # Everything made at startup (routes, models, SQLAlchemy and pydantic metadata) lives as
    # long as the process: move it out of the collector's reach, so the collections that
    # per-request garbage triggers stop re-scanning it (bench/README.md has the figures).
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        for task in list(state.background):
            task.cancel()
        await asyncio.gather(*state.background, return_exceptions=True)
        await background_metrics.aclose()
        await scheduler.aclose()
        await state.limiters.tokens.aclose()
        # After the scheduler: requests still finishing record their usage first.
        await usage.aclose()
        await models.aclose()
        if election is not None:
            await election.aclose()
        await http.aclose()
        await relay_session.close()
        if redis is not None:
            await redis.aclose()
        await db_engine.dispose()
        mark_process_stopped()
        gc.unfreeze()  # what this app made may be collected again (tests run many apps)
        log.info("gateway_stopped")


def create_app(settings: Settings) -> FastAPI:
    """Build the gateway for these settings; nothing is read from the environment here."""
    configure_logging(settings)
    # A routing field in ALLOWED_FIELDS_<TIER> stops startup instead of being ignored later.
    check_tier_grants(settings)
    app = FastAPI(
        title=settings.APP_NAME,
        version=__version__,
        summary="OpenAI-compatible gateway and model manager for self-hosted vLLM.",
        lifespan=lifespan,
        # No trailing-slash redirects: their Location would echo the client's Host header.
        redirect_slashes=False,
        # Served by gateway/meta/docs.py from local files (the defaults load a CDN).
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    install_error_handlers(app)
    install_openapi(app, settings)
    if settings.CORS_ORIGINS:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.CORS_ORIGINS,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID"],
        )
    # Added last so it wraps everything, CORS and error responses included.
    app.add_middleware(RequestContextMiddleware, max_header_bytes=settings.MAX_HEADER_BYTES)
    # Routes are matched in order: the OpenAI routes, the hot path, come first.
    app.include_router(proxy_router)
    app.include_router(replicas_router)
    app.include_router(chat_router)
    if settings.METRICS_ENABLED:
        app.include_router(metrics_router)
    app.include_router(meta_router)
    install_docs(app)
    app.include_router(health_router)
    app.include_router(auth_router)
    app.include_router(users_router)
    app.include_router(models_router)
    app.include_router(keys_router)
    app.include_router(usage_router)
    app.include_router(ui_router)
    app.include_router(conversations_router)
    return app
