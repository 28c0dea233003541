"""Runs the scheduler's public gRPC server: Generation, health (liveness and readiness), reflection."""

from __future__ import annotations

import asyncio
import signal

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from scheduler_service.engine import Engine
from scheduler_service.engine_config import EngineConfig
from scheduler_service.error_interceptor import ErrorInterceptor
from scheduler_service.servicer import GenerationServicer
from shared.pb.pagewire.v1 import generate_pb2, generate_pb2_grpc

log = structlog.get_logger(__name__)

SERVICE_NAME = generate_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


async def serve(config: EngineConfig, shutdown_grace_seconds: float = 5.0) -> None:
    """Serves until SIGTERM/SIGINT. Health "" is liveness (SERVING while the process runs);
    `pagewire.v1.Generation` is readiness (SERVING while connected to a ready executor)."""
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    health_servicer = health.aio.HealthServicer()

    def on_ready_change(ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        asyncio.ensure_future(health_servicer.set(SERVICE_NAME, status))

    engine = Engine(config, on_ready_change)
    generate_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(engine), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    engine.start()
    log.info("scheduler_listening", address=address, executor=config.executor_address)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("scheduler_stopping")
    await health_servicer.enter_graceful_shutdown()
    await engine.stop()
    await server.stop(shutdown_grace_seconds)
    log.info("scheduler_stopped")
