"""Runs the scheduler's public gRPC server (Generation, health, reflection) and, on the same event loop,
its OpenAI-compatible HTTP API with /metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections.abc import Awaitable

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from scheduler_service.decode_error_interceptor import DecodeErrorInterceptor
from scheduler_service.engine import Engine
from scheduler_service.engine_config import EngineConfig
from scheduler_service.error_interceptor import ErrorInterceptor
from scheduler_service.grpc_server_options import grpc_server_options
from scheduler_service.http.http_server import HttpServer, HttpTls
from scheduler_service.http.openai_app import create_app
from scheduler_service.metrics.engine_metrics import EngineMetrics
from scheduler_service.metrics.scheduler_collector import SchedulerCollector
from scheduler_service.request_intake import RequestIntake
from scheduler_service.served_model_name import served_model_name
from scheduler_service.servicer import GenerationServicer
from shared.bearer_auth import BearerAuthInterceptor
from shared.tls import server_credentials
from shared.pb.pagewire.v1 import generate_pb2, generate_pb2_grpc

log = structlog.get_logger(__name__)

SERVICE_NAME = generate_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
API_KEY_ENV = "PAGEWIRE_API_KEY"


def with_env_api_key(config: EngineConfig) -> EngineConfig:
    """`config` with `api_key` from $PAGEWIRE_API_KEY when no --api-key was given."""
    if config.api_key is None and os.environ.get(API_KEY_ENV):
        return dataclasses.replace(config, api_key=os.environ[API_KEY_ENV])
    return config


async def serve(
    config: EngineConfig, shutdown_grace_seconds: float = 5.0, stop_when: Awaitable[object] | None = None
) -> None:
    """Serves until SIGTERM/SIGINT (or `stop_when` completes). Health "" is liveness (SERVING while the
    process runs); `pagewire.v1.Generation` is readiness (SERVING while connected to a ready executor).
    Raises ValueError, after shutting down, when the first executor cannot serve these settings."""
    config = with_env_api_key(config)
    # Innermost last: DecodeErrorInterceptor's deserializer is the one grpc runs.
    interceptors: list[grpc.aio.ServerInterceptor] = [ErrorInterceptor(), DecodeErrorInterceptor()]
    if config.api_key:
        interceptors.insert(0, BearerAuthInterceptor(config.api_key, SERVICE_NAME))
    server = grpc.aio.server(interceptors=interceptors, options=grpc_server_options(config))
    health_servicer = health.aio.HealthServicer()

    def on_ready_change(ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        asyncio.ensure_future(health_servicer.set(SERVICE_NAME, status))

    registry = CollectorRegistry()
    metrics = EngineMetrics(
        registry,
        model_name=lambda: served_model_name(engine),
        max_model_len=lambda: engine.model.max_model_len if engine.model is not None else None,
    )
    engine = Engine(config, on_ready_change, observer=metrics)
    registry.register(SchedulerCollector(engine))
    generate_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(engine), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert is not None and config.tls_key is not None:
        bound = server.add_secure_port(address, server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca))
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    http_server = None
    if config.http_port:
        app = create_app(engine, RequestIntake(engine), registry)
        http_server = HttpServer(app, config.host, config.http_port, shutdown_grace_seconds,
                                 tls=HttpTls.of(config.tls_cert, config.tls_key, config.tls_client_ca))
        await http_server.start()
    await server.start()
    engine.start()
    log.info("scheduler_listening", address=address, executors=list(config.executor_addresses))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(engine.failed.wait())}
    if stop_when is not None:
        waits.add(asyncio.ensure_future(stop_when))
    _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    log.info("scheduler_stopping")
    await health_servicer.enter_graceful_shutdown()
    await engine.stop()
    if http_server is not None:
        await http_server.stop()
    await server.stop(shutdown_grace_seconds)
    log.info("scheduler_stopped")
    if engine.startup_error is not None:
        raise engine.startup_error
